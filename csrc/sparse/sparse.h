// Sparse (CSR) execution ops: pack_sparse and sparse_linear. Schemas in registration.cpp; the
// packed format is documented in sparse_core.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastprune {
namespace sparse {

// weight (O, K) float32/float64, finite -> (row_ptr int32 (O+1), col_idx int16|int32 (nnz), values (nnz)).
void check_pack_inputs(const at::Tensor& weight);
// Validates shapes, dtypes, devices and row_ptr's ends; returns O.
int64_t check_sparse_linear_inputs(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& values, int64_t in_features,
                                   const std::optional<at::Tensor>& bias);
// dtype of col_idx for K columns.
at::ScalarType col_dtype_for(int64_t K);
// Composite (ATen-only) packing, used by the CUDA registration.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_composite(const at::Tensor& weight);

}  // namespace sparse
}  // namespace fastprune
