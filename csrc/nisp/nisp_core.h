// NISP score propagation, the per-element arithmetic shared by the CPU loops and the CUDA kernel.
// A layer's weight W (out, in/groups, taps) propagates the scores of its outputs to its inputs as
//   S_in[c] = sum_o S_out[o] * a[o][c],   a[o][c] = sum_k |W[o][c][k]|
// (Yu et al. 2018, NISP: |W|^T s through an "absolute, linearised" copy of the layer).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fastprune {
namespace nisp {

template <typename T>
FP_HOST_DEVICE inline T abs_value(T v) {
  return v < T(0) ? -v : v;
}

// a = sum_k |w[k]| over one (output, input) pair's `taps` kernel entries.
template <typename T>
FP_HOST_DEVICE inline T abs_tap_sum(const T* FP_RESTRICT w, int64_t taps) {
  T s = T(0);
  for (int64_t k = 0; k < taps; ++k) s += abs_value(w[k]);
  return s;
}

}  // namespace nisp
}  // namespace fastprune
