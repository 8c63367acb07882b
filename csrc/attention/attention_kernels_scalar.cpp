// Portable copy of the attention loops (attention_impl.h), for CPUs without AVX2.
#include "attention/attention_impl.h"
#include "attention/attention_kernels.h"

namespace fastprune {
namespace attention {
namespace scalar {
namespace {

void rows(const float* q, int64_t ldq, const float* kt, int64_t ldkt, const float* v, int64_t ldv, const float* mask,
          int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, float scale, float* sc, float* out, int64_t ldo) {
  rows_portable<float>(q, ldq, kt, ldkt, v, ldv, mask, ldm, nq, S, E, Ev, scale, sc, out, ldo);
}

}  // namespace

extern const AttentionKernels kKernels;
const AttentionKernels kKernels{rows, 1, "scalar"};

}  // namespace scalar
}  // namespace attention
}  // namespace fastprune
