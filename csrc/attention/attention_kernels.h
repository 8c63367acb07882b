// Per-ISA float32 copies of the attention loops (attention_kernels_<isa>.cpp compile
// attention_simd_impl.h with their own -m flags; the scalar table is the portable template);
// attention_kernels(isa) returns the table for the ISA chosen at run time.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace fastprune {
namespace attention {

// Rows [0, nq) of one batch item's output: q (nq, E) row stride ldq; kt = K^T (E, S) row stride ldkt
// (at least S rounded up to kt_pad columns, the extra ones zero); v (S, Ev) row stride ldv; mask
// (nq, S) row stride ldm or nullptr (added to the scaled scores); sc a buffer of nq * ldkt floats;
// out (nq, Ev) row stride ldo.
struct AttentionKernels {
  void (*rows)(const float* q, int64_t ldq, const float* kt, int64_t ldkt, const float* v, int64_t ldv,
               const float* mask, int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, float scale, float* sc,
               float* out, int64_t ldo);
  int64_t kt_pad;  // kt's row length is a multiple of this (the score loop's column block)
  const char* name;
};

const AttentionKernels& attention_kernels(Isa isa);

namespace scalar { extern const AttentionKernels kKernels; }
namespace avx2 { extern const AttentionKernels kKernels; }
namespace avx512 { extern const AttentionKernels kKernels; }

}  // namespace attention
}  // namespace fastprune
