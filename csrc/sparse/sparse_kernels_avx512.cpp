// AVX-512 copy of the CSR loops: 16 samples per vector (the one-sample loop is the AVX2 one).
#include <immintrin.h>

#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"

namespace fastprune {
namespace sparse {
namespace avx512 {
namespace {

void spmm(const int32_t* rp, const void* col, bool wide, const float* val, const float* xt, int64_t ldx, int64_t K,
          int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy, bool* bad) {
  alignas(64) float out[16];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t w = n - j0 < 16 ? n - j0 : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << w) - 1u);
      // four accumulators hide the FMA latency when one vector covers all samples
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        int64_t c[4];
        for (int q = 0; q < 4; ++q) {
          c[q] = col_at(col, wide, k + q);
          if (c[q] >= K || c[q] < 0) {
            *bad = true;
            c[q] = K - 1;
          }
        }
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(val[k]), _mm512_maskz_loadu_ps(m, xt + c[0] * ldx + j0), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(val[k + 1]), _mm512_maskz_loadu_ps(m, xt + c[1] * ldx + j0), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(val[k + 2]), _mm512_maskz_loadu_ps(m, xt + c[2] * ldx + j0), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(val[k + 3]), _mm512_maskz_loadu_ps(m, xt + c[3] * ldx + j0), a3);
      }
      for (; k < k1; ++k) {
        int64_t c = col_at(col, wide, k);
        if (c >= K || c < 0) {
          *bad = true;
          c = K - 1;
        }
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(val[k]), _mm512_maskz_loadu_ps(m, xt + c * ldx + j0), a0);
      }
      _mm512_store_ps(out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      for (int64_t j = 0; j < w; ++j) y[(j0 + j) * ldy + r] = finish_output<float>(out[j], bias, r, relu);
    }
  }
}

}  // namespace

// One sample: the AVX2 gather loop (8-wide gathers measured faster than 16-wide ones on Zen 4).
const SparseKernels kKernels = {avx2::spmv, spmm, "avx512"};

}  // namespace avx512
}  // namespace sparse
}  // namespace fastprune
