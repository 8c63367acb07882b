// Input validation of scaled_dot_product_attention (used by every backend), and its canonical
// (B, H, L, E) form: value errors -> ValueError, dtype errors -> TypeError.
#include <cmath>

#include "attention/attention.h"

namespace fastprune {
namespace {

// (..., r, c) -> (B, H, r, c): views for up to 4 dims; more leading dims are merged (a copy when the
// strides do not allow a view); a last stride other than 1 is made contiguous
at::Tensor four_d(const at::Tensor& t) {
  at::Tensor x = t;
  while (x.dim() < 4) x = x.unsqueeze(0);
  if (x.dim() > 4) x = x.reshape({-1, x.size(-3), x.size(-2), x.size(-1)});
  if (x.stride(3) != 1 && x.size(3) > 1) x = x.contiguous();
  return x;
}

}  // namespace

AttentionInputs check_attention_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const std::optional<at::Tensor>& attn_mask, std::optional<double> scale) {
  const auto dt = query.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, "query must be a float32 or float64 tensor, got ", dt);
  TORCH_CHECK_TYPE(key.scalar_type() == dt && value.scalar_type() == dt,
                   "query, key and value must have the same dtype, got ", dt, ", ", key.scalar_type(), " and ",
                   value.scalar_type());
  TORCH_CHECK_VALUE(key.device() == query.device() && value.device() == query.device(),
                    "query, key and value must be on the same device");
  TORCH_CHECK_VALUE(query.dim() >= 2 && key.dim() == query.dim() && value.dim() == query.dim(),
                    "query (..., L, E), key (..., S, E) and value (..., S, Ev) must have the same number of dims "
                    "(at least 2), got shapes ", query.sizes(), ", ", key.sizes(), " and ", value.sizes());
  const int64_t nd = query.dim();
  for (int64_t d = 0; d < nd - 2; ++d) {
    TORCH_CHECK_VALUE(key.size(d) == query.size(d) && value.size(d) == query.size(d),
                      "query, key and value must have the same leading dims, got shapes ", query.sizes(), ", ",
                      key.sizes(), " and ", value.sizes());
  }
  TORCH_CHECK_VALUE(key.size(-1) == query.size(-1), "key has ", key.size(-1), " features per row, query ",
                    query.size(-1));
  TORCH_CHECK_VALUE(value.size(-2) == key.size(-2), "value has ", value.size(-2), " rows, key ", key.size(-2));
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale), "scale must be finite, got ", *scale);
  }
  AttentionInputs in;
  in.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(1, query.size(-1))));
  in.out_shape = query.sizes().vec();
  in.out_shape.back() = value.size(-1);
  in.q = four_d(query);
  in.k = four_d(key);
  in.v = four_d(value);
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == dt,
                     "attn_mask must be bool or the query's dtype (", dt, "), got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == query.device(), "attn_mask must be on the query's device");
    std::vector<int64_t> full = query.sizes().vec();
    full.back() = key.size(-2);
    bool fits = m.dim() <= nd;
    for (int64_t d = 1; fits && d <= m.dim(); ++d) {
      fits = m.size(-d) == 1 || m.size(-d) == full[nd - d];
    }
    TORCH_CHECK_VALUE(fits, "attn_mask of shape ", m.sizes(), " does not broadcast to (..., L, S) = ", at::IntArrayRef(full));
    // bool: True takes part (0 added), False is masked out (-inf), as in torch's SDPA
    const at::Tensor add = m.scalar_type() == at::kBool
                               ? at::where(m, at::zeros({}, query.options()), at::full({}, -INFINITY, query.options()))
                               : m;
    in.mask = four_d(add.expand(full));
  }
  return in;
}

}  // namespace fastprune
