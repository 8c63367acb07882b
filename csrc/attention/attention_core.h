// Per-element arithmetic of scaled_dot_product_attention shared by the CPU loops and the CUDA kernel.
// A row's weights are exp(x_j - m) with m its largest score; a row whose every score is -inf (all
// masked out) has m = -inf and gets weight 0 everywhere, so its output is 0 (as torch's SDPA gives),
// not the NaN of exp(-inf - -inf). NaN scores stay NaN (x_j - m is NaN whatever m is).
#pragma once

#include <cmath>

#include "common/macros.h"

namespace fastprune {
namespace attention {

template <typename T>
FP_HOST_DEVICE inline T softmax_weight(T x, T m) {
  return m == -INFINITY ? T(0) : exp(x - m);
}

// the output of a row from its weighted sum acc and its weights' sum (0 for a fully masked row)
template <typename T>
FP_HOST_DEVICE inline T finish_row(T acc, T sum) {
  return sum == T(0) ? T(0) : acc / sum;
}

}  // namespace attention
}  // namespace fastprune
