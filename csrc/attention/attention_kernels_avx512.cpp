// AVX-512 copy of the attention loops (attention_simd_impl.h): 16 keys / columns per vector.
#include <immintrin.h>

#include "attention/attention_simd_impl.h"
#include "common/simd_x86.h"

namespace fastprune {
namespace attention {
namespace avx512 {
namespace {

struct V512 : simd::F32x16 {
  static constexpr int kScoreRows = 8;  // 8 rows x 2 vectors of keys: 16 of the 32 zmm accumulate
  static constexpr int kOutRows = 6;    // 6 rows x 4 vectors of V's columns: 24 accumulate
  static Reg load_tail(const float* p, int64_t n, float fill) { return _mm512_mask_loadu_ps(set1(fill), mask(n), p); }
  static void store_tail(float* p, int64_t n, Reg v) { mask_store(p, mask(n), v); }
  static Reg keep(Reg x, int64_t n, float fill) { return _mm512_mask_blend_ps(mask(n), set1(fill), x); }
  static float hmax(Reg v) { return _mm512_reduce_max_ps(v); }
  static float hsum(Reg v) { return _mm512_reduce_add_ps(v); }
  // e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (two-part ln 2), e^r by its degree-7 Taylor
  // polynomial (|r| <= ln2 / 2: error below 1e-8 relative), 2^n by scalef; 0 below -87.3 (e^x would
  // be denormal: -inf scores weigh exactly 0); NaN stays NaN (max(lo, x) returns x when x is NaN).
  static Reg exp(Reg x) {
    const Reg lo = set1(kExpLow);
    const Reg xc = _mm512_max_ps(lo, x);
    const Reg n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm512_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    const Reg p = exp_reduced<V512>(r);
    const Reg e = _mm512_scalef_ps(p, n);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), e, zero());
  }
};

void rows(const float* q, int64_t ldq, const float* kt, int64_t ldkt, const float* v, int64_t ldv, const float* mask,
          int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, float scale, float* sc, float* out, int64_t ldo) {
  rows_simd<V512>(q, ldq, kt, ldkt, v, ldv, mask, ldm, nq, S, E, Ev, scale, sc, out, ldo);
}

}  // namespace

extern const AttentionKernels kKernels;
const AttentionKernels kKernels{rows, 2 * V512::kWidth, "avx512"};

}  // namespace avx512
}  // namespace attention
}  // namespace fastprune
