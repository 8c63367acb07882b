// Input validation for the Woodbury ops (one function per op, used by every backend). Value
// errors map to Python ValueError, type errors to TypeError, both naming the argument.
#include "woodbury/woodbury.h"

#include <ATen/ATen.h>

#include <cmath>

namespace fastprune {
namespace {

void check_float_matrix(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) &&
                       (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                   name, " must be a float32 or float64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

}  // namespace

void check_woodbury_inverse_fisher_inputs(const at::Tensor& grads, int64_t block_size, double damp) {
  check_float_matrix(grads, "grads", 2);
  TORCH_CHECK_VALUE(grads.size(0) >= 1, "grads must hold at least one gradient (row), got shape ",
                    grads.sizes());
  TORCH_CHECK_VALUE(block_size >= 1, "block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(std::isfinite(damp) && damp > 0.0, "damp must be finite and > 0, got ", damp);
}

void check_woodbury_update_inputs(const at::Tensor& finv, const at::Tensor& grads, double num_samples) {
  check_float_matrix(finv, "finv", 3);
  check_float_matrix(grads, "grads", 2);
  TORCH_CHECK_TYPE(finv.scalar_type() == grads.scalar_type(), "finv and grads must have the same dtype, got ",
                   finv.scalar_type(), " and ", grads.scalar_type());
  TORCH_CHECK_VALUE(finv.device() == grads.device(), "finv and grads must be on the same device, got ",
                    finv.device(), " and ", grads.device());
  TORCH_CHECK_VALUE(finv.size(1) == finv.size(2) && finv.size(1) >= 1,
                    "finv must have shape (num_blocks, B, B) with B >= 1, got ", finv.sizes());
  const int64_t block = finv.size(1);
  const int64_t d = grads.size(1);
  const int64_t nb = (d + block - 1) / block;
  TORCH_CHECK_VALUE(finv.size(0) == nb, "finv has ", finv.size(0), " blocks of size ", block,
                    " but grads has d = ", d, " columns, which needs ceil(d / B) = ", nb, " blocks");
  TORCH_CHECK_VALUE(std::isfinite(num_samples) && num_samples > 0.0,
                    "num_samples must be finite and > 0, got ", num_samples);
  // A positive definite block has a positive, finite diagonal: the necessary condition, checked in
  // O(nb B) before anything is written (an all-zero state would otherwise "update" to zeros).
  if (finv.numel() > 0) {
    const at::Tensor diag = at::diagonal(finv, 0, 1, 2);
    TORCH_CHECK_VALUE(at::logical_and(at::isfinite(diag), diag > 0).all().item<bool>(),
                      "finv is not positive definite: a diagonal entry is <= 0 or not finite (start from "
                      "woodbury_inverse_fisher, or I / damp)");
  }
}

}  // namespace fastprune
