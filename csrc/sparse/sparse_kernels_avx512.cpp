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
      __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
      if (bias != nullptr) acc = _mm512_add_ps(acc, _mm512_set1_ps(bias[r]));
      if (relu) acc = _mm512_max_ps(acc, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(y + r * ldy + j0, m, acc);
    }
  }
}

}  // namespace

// One sample: the AVX2 gather loop (8-wide gathers measured faster than 16-wide ones on Zen 4).
// 64 output positions in 4 zmm accumulators, two nonzeros per step into two accumulator sets (8
// independent FMA chains: enough to cover the FMA latency on both pipes).
void conv_rows(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t q_len, int64_t r0,
               int64_t r1, float* out_wide, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    float* orow = out_wide + r * ldo;
    for (int64_t q0 = 0; q0 < q_len; q0 += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
      const float* base = xin + q0;
      int64_t k = k0;
      for (; k + 2 <= k1; k += 2) {
        const float* s0 = base + off[k];
        const float* s1 = base + off[k + 1];
        const __m512 v0 = _mm512_set1_ps(val[k]), v1 = _mm512_set1_ps(val[k + 1]);
        a0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0), a0);
        a1 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 16), a1);
        a2 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 32), a2);
        a3 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 48), a3);
        b0 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(s1), b0);
        b1 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(s1 + 16), b1);
        b2 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(s1 + 32), b2);
        b3 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(s1 + 48), b3);
      }
      if (k < k1) {
        const float* s0 = base + off[k];
        const __m512 v0 = _mm512_set1_ps(val[k]);
        a0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0), a0);
        a1 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 16), a1);
        a2 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 32), a2);
        a3 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s0 + 48), a3);
      }
      _mm512_storeu_ps(orow + q0, _mm512_add_ps(a0, b0));
      _mm512_storeu_ps(orow + q0 + 16, _mm512_add_ps(a1, b1));
      _mm512_storeu_ps(orow + q0 + 32, _mm512_add_ps(a2, b2));
      _mm512_storeu_ps(orow + q0 + 48, _mm512_add_ps(a3, b3));
    }
  }
}

const SparseKernels kKernels = {avx2::spmv, spmm, conv_rows, "avx512"};

}  // namespace avx512
}  // namespace sparse
}  // namespace fastprune
