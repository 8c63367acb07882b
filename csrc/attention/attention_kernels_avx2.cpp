// AVX2 copy of the attention loops (attention_simd_impl.h): 8 keys / columns per vector.
#include <immintrin.h>

#include "attention/attention_simd_impl.h"
#include "common/simd_x86.h"

namespace fastprune {
namespace attention {
namespace avx2 {
namespace {

struct V256 : simd::F32x8 {
  static constexpr int kScoreRows = 6;  // 6 rows x 2 vectors of keys: 12 of the 16 ymm accumulate
  static constexpr int kOutRows = 2;    // 2 rows x 4 vectors of V's columns: 8 accumulate, 4 hold V's row
  static Reg load_tail(const float* p, int64_t n, float fill) {
    const Mask m = mask(n);
    return _mm256_blendv_ps(set1(fill), maskz_load(m, p), _mm256_castsi256_ps(m));
  }
  static void store_tail(float* p, int64_t n, Reg v) { mask_store(p, mask(n), v); }
  static Reg keep(Reg x, int64_t n, float fill) { return _mm256_blendv_ps(set1(fill), x, _mm256_castsi256_ps(mask(n))); }
  static float hmax(Reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(Reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // as V512::exp (attention_kernels_avx512.cpp), 2^n built in the exponent bits (n >= -126 here)
  static Reg exp(Reg x) {
    const Reg lo = set1(kExpLow);
    const Reg xc = _mm256_max_ps(lo, x);
    const Reg n = _mm256_round_ps(_mm256_mul_ps(xc, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm256_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    const Reg p = exp_reduced<V256>(r);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const Reg e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_blendv_ps(e, zero(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  }
};

void rows(const float* q, int64_t ldq, const float* kt, int64_t ldkt, const float* v, int64_t ldv, const float* mask,
          int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, float scale, float* sc, float* out, int64_t ldo) {
  rows_simd<V256>(q, ldq, kt, ldkt, v, ldv, mask, ldm, nq, S, E, Ev, scale, sc, out, ldo);
}

}  // namespace

extern const AttentionKernels kKernels;
const AttentionKernels kKernels{rows, 2 * V256::kWidth, "avx2"};

}  // namespace avx2
}  // namespace attention
}  // namespace fastprune
