// Sparse (CSR) execution ops: pack_sparse and sparse_linear. Schemas in registration.cpp; the
// packed format is documented in sparse_core.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {

// weight (O, K) float32/float64, finite -> (row_ptr int32 (O+1), col_idx int16|int32 (nnz), values (nnz)).
void check_pack_inputs(const at::Tensor& weight);
// Validates shapes, dtypes, devices and row_ptr's ends; returns O.
int64_t check_sparse_linear_inputs(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& values, int64_t in_features,
                                   const std::optional<at::Tensor>& bias);
// sparse_ffn's activation is "none", "relu" or "gelu".
void check_ffn_activation(c10::string_view activation);
// The GELU between sparse_ffn's layers where it is not fused into the panel loop: at::gelu, with
// GELU(+inf) = +inf as the panel loop's polynomial gives it (at::gelu's float kernels return NaN
// there), so that every row of one call gets the same activation whichever path it takes.
at::Tensor ffn_gelu(const at::Tensor& h);
// Geometry of one sparse_conv2d call (validated), and the size of its phase buffer.
struct ConvGeometry {
  int64_t N, C, H, W, O, Cg, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  // plane: elements per (phase, channel) plane, Hph * Wph rounded up to 16 floats so that a plane
  // starts on a 64-byte line (aligned vector loads for 1x1 convolutions)
  int64_t Hout, Wout, Hph, Wph, plane, buf_len;
};
ConvGeometry check_sparse_conv2d_inputs(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        const at::Tensor& values, at::IntArrayRef weight_shape,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        const std::optional<at::Tensor>& residual);
// Geometry of one max_pool2d call (validated; PoolGeometry is in sparse_core.h).
PoolGeometry check_max_pool2d_inputs(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding);
// dtype of col_idx for K columns.
at::ScalarType col_dtype_for(int64_t K);
// How many times the CPU kernels derived per-nonzero data (tap offsets, row runs) from a packed
// weight instead of finding it cached: tests check that a model's second call derives nothing.
int64_t derived_computed();
// Composite (ATen-only) packing, used by the CUDA registration.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_composite(const at::Tensor& weight);

}  // namespace sparse
}  // namespace fastprune
