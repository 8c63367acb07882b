// The float vector operations every per-ISA traits type shares (sparse_kernels_<isa>.cpp,
// attention_kernels_<isa>.cpp): each traits type derives from the base of its ISA and adds what
// its loops need. Defined only where the translation unit's -m flags allow them, and in an
// anonymous namespace, like the traits types themselves, so that each copy stays inside its own
// translation unit.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastprune {
namespace simd {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
// 8 floats; Mask: the lanes an AVX2 masked load or store takes (all bits of a lane set).
struct F32x8 {
  using Reg = __m256;
  using Mask = __m256i;
  static constexpr int64_t kWidth = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float f) { return _mm256_set1_ps(f); }
  static Reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  // the first w lanes (0 <= w <= 8)
  static Mask mask(int64_t w) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg maskz_load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void mask_store(float* p, Mask m, Reg v) { _mm256_maskstore_ps(p, m, v); }
};
#endif

#if defined(__AVX512F__)
// 16 floats; Mask: a k-register of lanes.
struct F32x16 {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kWidth = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float f) { return _mm512_set1_ps(f); }
  static Reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  // the first w lanes (0 <= w <= 16)
  static Mask mask(int64_t w) { return static_cast<Mask>((1u << w) - 1u); }
  static Reg maskz_load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void mask_store(float* p, Mask m, Reg v) { _mm512_mask_storeu_ps(p, m, v); }
};
#endif

}  // namespace
}  // namespace simd
}  // namespace fastprune
