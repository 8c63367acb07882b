// AVX-512 copy of the CSR loops: 16 samples per vector (the one-sample loop is the AVX2 one).
#include <immintrin.h>

#include "common/simd_x86.h"
#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"
#include "sparse/pool_impl.h"
#include "sparse/sparse_simd_impl.h"

namespace fastprune {
namespace sparse {
namespace avx512 {
namespace {

struct V512 : simd::F32x16 {
  static constexpr int kGroupVecs = 4;  // 4 rows x 4 vectors: 16 of the 32 zmm registers accumulate
  static constexpr int kTokenVecs = 8;  // 8 zmm accumulate 128 samples
  static constexpr int64_t kPanelMerge = 1;  // panels of kPanelCols (1024 measured level on the Xeon)
  static Reg max0(Reg v) { return _mm512_max_ps(v, _mm512_setzero_ps()); }
  // the polynomial GELU (kErfPoly, sparse_core.h) on 16 lanes: each lane's interval picks its coefficients by permute
  static Reg gelu(Reg x) {
    const Reg ax = _mm512_abs_ps(x);
    const Reg z = _mm512_min_ps(_mm512_mul_ps(ax, _mm512_set1_ps(0.707106781f)), _mm512_set1_ps(kErfZMax));
    const __m512i i = _mm512_cvttps_epi32(_mm512_mul_ps(z, _mm512_set1_ps(2.0f)));
    const Reg t = _mm512_sub_ps(z, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f)));
    auto coef = [&](int d) { return _mm512_permutexvar_ps(i, _mm512_castps256_ps512(_mm256_loadu_ps(kErfPoly[d]))); };
    Reg e = coef(kErfDegree);
    for (int d = kErfDegree - 1; d >= 0; --d) e = _mm512_fmadd_ps(e, t, coef(d));
    const Reg half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
    const Reg se = _mm512_or_ps(e, _mm512_and_ps(x, _mm512_set1_ps(-0.0f)));  // erf's sign: x's
    return _mm512_fmadd_ps(half, se, half);
  }
};

void spmm(const int32_t* rp, const int32_t* runs, const void* col, bool wide, const float* val, const float* xt,
          int64_t ldx, int64_t K, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y,
          int64_t ldy, bool* bad) {
  spmm_t<V512>(rp, runs, col, wide, val, xt, ldx, K, n, bias, relu, r0, r1, y, ldy, bad);
}

}  // namespace

void conv_rows(const int32_t* rp, const int32_t* runs, const int32_t* off, const float* val, const float* xin,
               int64_t r0, int64_t r1, const ConvOut<float>& out) {
  conv_rows_simd<V512>(rp, runs, off, val, xin, r0, r1, out);
}

void tile_finish(const float* src, int64_t lds, float* out, int64_t ldo, int64_t rows, int64_t n, const float* bias,
                 const float* res, int64_t ldr, bool relu) {
  tile_finish_t<V512>(src, lds, out, ldo, rows, n, bias, res, ldr, relu);
}

void spmm_panels(const int32_t* pst, int64_t np, const void* col, bool wide, const float* val,
                 const float* xb, const float* bias, int act, int64_t r0, int64_t r1, float* y) {
  spmm_panels_any<V512>(pst, np, col, wide, val, xb, bias, act, r0, r1, y);
}

void max_pool_row_cl(const float* x, const PoolGeometry& g, int64_t oy, bool relu, float* row) {
  max_pool_row_cl_t<float>(x, g, oy, relu, row);
}

void max_pool_plane(const float* x, const PoolGeometry& g, bool relu, float* tmp, float* out) {
  max_pool_plane_t<float>(x, g, relu, tmp, out);
}

const SparseKernels kKernels = {avx2::spmv, spmm, conv_rows, tile_finish, avx2::transpose, spmm_panels, V512::kWidth * kPanelVecs, "avx512", V512::kTokenVecs * V512::kWidth, max_pool_row_cl, max_pool_plane, gelu_t<V512>};

}  // namespace avx512
}  // namespace sparse
}  // namespace fastprune
