// nisp_propagate: S_in = S_out |W| (kernel taps summed), per group. See nisp_core.h for the math.
#pragma once

#include <ATen/ATen.h>

namespace fastprune {

struct NispShape {
  int64_t out, in_per_group, taps, groups, m;
};

// Validates (weight, scores, groups) for every backend; returns the sizes.
NispShape check_nisp_propagate_inputs(const at::Tensor& weight, const at::Tensor& scores, int64_t groups);

}  // namespace fastprune
