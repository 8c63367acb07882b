// Per-ISA float32 copies of the propagation loops (nisp_kernels_<isa>.cpp compile nisp_kernels_impl.h
// with their own -m flags); nisp_kernels(isa) returns the table for the ISA chosen at run time.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace fastprune {
namespace nisp {

struct NispKernels {
  // a[c] = sum_k |w[c * taps + k]| for c < cols (one output row of the weight).
  void (*abs_row)(const float* w, int64_t cols, int64_t taps, float* a);
  // y[j * ldy + i] += s[j] * |w[i]| for j < m, i < n (a stretch of one weight row, taps not summed).
  void (*abs_axpy)(const float* w, int64_t n, const float* s, int64_t m, float* y, int64_t ldy);
  const char* name;
};

const NispKernels& nisp_kernels(Isa isa);

namespace scalar { extern const NispKernels kKernels; }
namespace avx2 { extern const NispKernels kKernels; }
namespace avx512 { extern const NispKernels kKernels; }

}  // namespace nisp
}  // namespace fastprune
