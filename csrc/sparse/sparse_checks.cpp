#include <c10/util/Exception.h>

#include "sparse/sparse.h"
#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {

void check_pack_inputs(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_sparse: weight must be 2-D (out, in); flatten a conv filter to (out, in/groups*kh*kw), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "pack_sparse: weight must be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.size(0) < (int64_t(1) << 31) && weight.size(1) < (int64_t(1) << 31),
              "pack_sparse: dimensions must be below 2^31");
}

at::ScalarType col_dtype_for(int64_t K) { return K <= kNarrowMaxK ? at::kShort : at::kInt; }

int64_t check_sparse_linear_inputs(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& values, int64_t in_features,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1, "sparse_linear: input must have at least 1 dimension");
  TORCH_CHECK(in_features >= 1, "sparse_linear: in_features must be positive, got ", in_features);
  TORCH_CHECK(input.size(-1) == in_features, "sparse_linear: input has ", input.size(-1),
              " features but the packed weight was made for ", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1 && row_ptr.scalar_type() == at::kInt,
              "sparse_linear: row_ptr must be a 1-D int32 tensor of out_features + 1 entries");
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt),
              "sparse_linear: col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(col_idx.scalar_type() == at::kInt || in_features <= kNarrowMaxK,
              "sparse_linear: int16 col_idx cannot index ", in_features, " features");
  TORCH_CHECK(values.dim() == 1 && values.numel() == col_idx.numel(),
              "sparse_linear: values and col_idx must be 1-D of the same length");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "sparse_linear: values are ", values.scalar_type(),
              ", input is ", input.scalar_type());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "sparse_linear: input must be float32 or float64, got ", input.scalar_type());
  for (const at::Tensor* t : {&row_ptr, &col_idx, &values}) {
    TORCH_CHECK(t->device() == input.device(), "sparse_linear: all tensors must be on ", input.device());
  }
  const int64_t O = row_ptr.numel() - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == O && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "sparse_linear: bias must be 1-D with ", O, " entries of the input's dtype and device");
  }
  return O;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_composite(const at::Tensor& weight) {
  check_pack_inputs(weight);
  TORCH_CHECK(at::isfinite(weight).all().item<bool>(), "pack_sparse: weight holds NaN or Inf");
  const at::Tensor nz = weight != 0;
  const at::Tensor counts = nz.sum(1, false, at::kLong);
  const at::Tensor row_ptr =
      at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)}).to(at::kInt);
  const at::Tensor where = nz.nonzero();  // row-major order, as CSR wants
  const at::Tensor col = where.select(1, 1).to(col_dtype_for(weight.size(1)));
  return {row_ptr, col, weight.masked_select(nz)};
}

}  // namespace sparse
}  // namespace fastprune
