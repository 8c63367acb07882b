// fastprune::woodbury_update_ and fastprune::woodbury_inverse_fisher: declarations and the one
// input check per op, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastprune {

// Validates (finv, grads, num_samples) for woodbury_update_; errors name the argument.
void check_woodbury_update_inputs(const at::Tensor& finv, const at::Tensor& grads, double num_samples);
// Validates (grads, block_size, damp) for woodbury_inverse_fisher.
void check_woodbury_inverse_fisher_inputs(const at::Tensor& grads, int64_t block_size, double damp);

}  // namespace fastprune
