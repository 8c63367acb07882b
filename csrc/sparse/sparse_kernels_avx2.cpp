// AVX2 copy of the CSR loops: 8-wide gathers for one sample, 8 samples per vector otherwise.
#include <immintrin.h>

#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"


namespace fastprune {
namespace sparse {
namespace avx2 {
namespace {

inline __m256i load_cols(const void* col, bool wide, int64_t k) {
  if (wide) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int32_t*>(col) + k));
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(col) + k)));
}

// nonzeros ahead of the current one at which the value/column streams are prefetched
constexpr int64_t kPrefetch = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Column lanes made safe to gather. 16-bit columns index a zero-padded copy of x of 65536 floats
// (padded_copy), so every value the type holds is in bounds and nothing is checked; 32-bit ones are
// clamped to [0, K) and any out-of-range one is flagged (signed compares: K < 2^31 is checked).
template <bool kWide>
struct ColGuard {
  __m256i kmax, zero, bad;
  explicit ColGuard(int64_t K)
      : kmax(_mm256_set1_epi32(static_cast<int32_t>(K - 1))), zero(_mm256_setzero_si256()), bad(zero) {}
  __m256i operator()(__m256i i) {
    if constexpr (!kWide) {
      return i;
    } else {
      bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(i, kmax), _mm256_cmpgt_epi32(zero, i)));
      return _mm256_max_epi32(_mm256_min_epi32(i, kmax), zero);
    }
  }
};

template <bool kWide>
void spmv_rows(const int32_t* rp, const void* col, const float* val, const float* x, int64_t K, const float* bias,
               bool relu, int64_t r0, int64_t r1, float* y, bool* bad) {
  ColGuard<kWide> guard(K);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k = rp[r];
    const int64_t k1 = rp[r + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    // four independent gathers in flight per step
    for (; k + 32 <= k1; k += 32) {
      // the value and column streams are read once: fetch them ahead of the gathers
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetch + 16), _MM_HINT_T0);
      _mm_prefetch(static_cast<const char*>(col) + (k + kPrefetch) * (kWide ? 4 : 2), _MM_HINT_T0);
      const __m256i i0 = guard(load_cols(col, kWide, k)), i1 = guard(load_cols(col, kWide, k + 8));
      const __m256i i2 = guard(load_cols(col, kWide, k + 16)), i3 = guard(load_cols(col, kWide, k + 24));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, i0, 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 16), _mm256_i32gather_ps(x, i2, 4), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 24), _mm256_i32gather_ps(x, i3, 4), a3);
    }
    for (; k + 8 <= k1; k += 8) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, guard(load_cols(col, kWide, k)), 4), a0);
    }
    float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < k1; ++k) {
      int64_t c = col_at(col, kWide, k);
      if (kWide && (c >= K || c < 0)) {
        *bad = true;
        c = K - 1;
      }
      acc += val[k] * x[c];
    }
    y[r] = finish_output<float>(acc, bias, r, relu);
  }
  if (!_mm256_testz_si256(guard.bad, guard.bad)) *bad = true;
}

void spmm(const int32_t* rp, const void* col, bool wide, const float* val, const float* xt, int64_t ldx, int64_t K,
          int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy, bool* bad) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const int64_t w = n - j0 < 8 ? n - j0 : 8;
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
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
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(val[k]), _mm256_maskload_ps(xt + c[0] * ldx + j0, m), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(val[k + 1]), _mm256_maskload_ps(xt + c[1] * ldx + j0, m), a1);
        a2 = _mm256_fmadd_ps(_mm256_set1_ps(val[k + 2]), _mm256_maskload_ps(xt + c[2] * ldx + j0, m), a2);
        a3 = _mm256_fmadd_ps(_mm256_set1_ps(val[k + 3]), _mm256_maskload_ps(xt + c[3] * ldx + j0, m), a3);
      }
      for (; k < k1; ++k) {
        int64_t c = col_at(col, wide, k);
        if (c >= K || c < 0) {
          *bad = true;
          c = K - 1;
        }
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(val[k]), _mm256_maskload_ps(xt + c * ldx + j0, m), a0);
      }
      __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      if (bias != nullptr) acc = _mm256_add_ps(acc, _mm256_set1_ps(bias[r]));
      if (relu) acc = _mm256_max_ps(acc, _mm256_setzero_ps());
      _mm256_maskstore_ps(y + r * ldy + j0, m, acc);
    }
  }
}

}  // namespace

void spmv(const int32_t* rp, const void* col, bool wide, const float* val, const float* x, int64_t K,
          const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad) {
  if (wide) {
    spmv_rows<true>(rp, col, val, x, K, bias, relu, r0, r1, y, bad);
  } else {
    spmv_rows<false>(rp, col, val, padded_copy(x, K), K, bias, relu, r0, r1, y, bad);
  }
}

// 32 output positions in 4 ymm accumulators, two nonzeros per step into two accumulator sets.
// (The caller's tile is 64 positions: two passes of 32.)
void conv_rows(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t q_len, int64_t r0,
               int64_t r1, float* out_wide, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    float* orow = out_wide + r * ldo;
    const int64_t q_end = (q_len + 63) / 64 * 64;
    for (int64_t q0 = 0; q0 < q_end; q0 += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
      const float* base = xin + q0;
      int64_t k = k0;
      for (; k + 2 <= k1; k += 2) {
        const float* s0 = base + off[k];
        const float* s1 = base + off[k + 1];
        const __m256 v0 = _mm256_set1_ps(val[k]), v1 = _mm256_set1_ps(val[k + 1]);
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0), a0);
        a1 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 8), a1);
        a2 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 16), a2);
        a3 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 24), a3);
        b0 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(s1), b0);
        b1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(s1 + 8), b1);
        b2 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(s1 + 16), b2);
        b3 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(s1 + 24), b3);
      }
      if (k < k1) {
        const float* s0 = base + off[k];
        const __m256 v0 = _mm256_set1_ps(val[k]);
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0), a0);
        a1 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 8), a1);
        a2 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 16), a2);
        a3 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(s0 + 24), a3);
      }
      _mm256_storeu_ps(orow + q0, _mm256_add_ps(a0, b0));
      _mm256_storeu_ps(orow + q0 + 8, _mm256_add_ps(a1, b1));
      _mm256_storeu_ps(orow + q0 + 16, _mm256_add_ps(a2, b2));
      _mm256_storeu_ps(orow + q0 + 24, _mm256_add_ps(a3, b3));
    }
  }
}

const SparseKernels kKernels = {spmv, spmm, conv_rows, "avx2"};

}  // namespace avx2
}  // namespace sparse
}  // namespace fastprune
