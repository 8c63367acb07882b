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

void check_ffn_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "relu" || activation == "gelu",
              "sparse_ffn: activation must be 'none', 'relu' or 'gelu', got '", std::string(activation), "'");
}

at::Tensor ffn_gelu(const at::Tensor& h) { return at::where(at::isposinf(h), h, at::gelu(h)); }

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

PoolGeometry check_max_pool2d_inputs(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding) {
  TORCH_CHECK(input.dim() == 4, "max_pool2d: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "max_pool2d: input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "max_pool2d: kernel_size, stride and padding take two values each");
  PoolGeometry g{};
  g.N = input.size(0), g.C = input.size(1), g.H = input.size(2), g.W = input.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1, "max_pool2d: kernel_size and stride must be positive, got ",
              kernel_size, " and ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && 2 * g.ph <= g.kh && 2 * g.pw <= g.kw,
              "max_pool2d: padding must be between 0 and half the kernel size, got ", padding, " for ", kernel_size);
  g.Hout = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wout = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, "max_pool2d: the ", g.H, "x", g.W,
              " input (padded by ", padding, ") is smaller than the ", kernel_size, " kernel");
  return g;
}

ConvGeometry check_sparse_conv2d_inputs(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        const at::Tensor& values, at::IntArrayRef ws,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(input.dim() == 4, "sparse_conv2d: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(ws.size() == 4, "sparse_conv2d: weight_shape must be [out, in/groups, kh, kw]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sparse_conv2d: stride, padding and dilation take two values each");
  ConvGeometry g{};
  g.N = input.size(0), g.C = input.size(1), g.H = input.size(2), g.W = input.size(3);
  g.O = ws[0], g.Cg = ws[1], g.kh = ws[2], g.kw = ws[3], g.groups = groups;
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  TORCH_CHECK(groups >= 1 && g.O >= 0 && g.Cg >= 1 && g.kh >= 1 && g.kw >= 1 && g.O % groups == 0,
              "sparse_conv2d: bad weight_shape ", ws, " for groups=", groups);
  TORCH_CHECK(g.C == g.Cg * groups, "sparse_conv2d: input has ", g.C, " channels, the packed weight expects ",
              g.Cg * groups, " (in/groups = ", g.Cg, ", groups = ", groups, ")");
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "sparse_conv2d: stride and dilation must be >= 1, padding >= 0");
  const int64_t K = g.Cg * g.kh * g.kw;
  (void)check_sparse_linear_inputs(at::empty({0, K}, input.options()), row_ptr, col_idx, values, K, bias);
  TORCH_CHECK(row_ptr.numel() - 1 == g.O, "sparse_conv2d: row_ptr has ", row_ptr.numel() - 1,
              " rows, weight_shape says ", g.O);
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  const int64_t eh = g.dh * (g.kh - 1) + 1, ew = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(Hp >= eh && Wp >= ew, "sparse_conv2d: the (padded) input ", Hp, "x", Wp,
              " is smaller than the dilated kernel ", eh, "x", ew);
  g.Hout = (Hp - eh) / g.sh + 1;
  g.Wout = (Wp - ew) / g.sw + 1;
  g.Hph = (Hp + g.sh - 1) / g.sh;
  g.Wph = (Wp + g.sw - 1) / g.sw;
  // the largest read is plane base + (C-1) plane + the deepest tap + the last (rounded-up) tile,
  // and up to 16 floats more (the generated code loads the aligned chunk after an offset's)
  const int64_t q_pad = (g.Hout * g.Wph + 127) / 128 * 128;
  g.plane = (g.Hph * g.Wph + 15) / 16 * 16;
  g.buf_len = g.sh * g.sw * g.C * g.plane + q_pad + g.Wph + 64 + 16;
  TORCH_CHECK(g.buf_len < (int64_t(1) << 31), "sparse_conv2d: input too large for 32-bit offsets");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, g.O, g.Hout, g.Wout}) &&
                    residual->scalar_type() == input.scalar_type() && residual->device() == input.device(),
                "sparse_conv2d: residual must be (", g.N, ", ", g.O, ", ", g.Hout, ", ", g.Wout, ") like the output");
  }
  return g;
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
