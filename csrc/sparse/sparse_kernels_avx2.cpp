// AVX2 copy of the CSR loops: 8 columns per vector for one sample, 8 samples per vector otherwise.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/simd_x86.h"
#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"
#include "sparse/pool_impl.h"
#include "sparse/sparse_simd_impl.h"


namespace fastprune {
namespace sparse {
namespace avx2 {
namespace {

// nonzeros ahead of the current one at which the value/column streams are prefetched
constexpr int64_t kPrefetch = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x at 8 columns from k on. 16-bit columns index a zero-padded copy of x of 65536 floats
// (padded_copy), so every value the type holds is in bounds and nothing is checked; they are read as
// two 64-bit words and x with 8 scalar loads: on Zen 4 that is 1.6x faster than vgatherdps (0.22 vs
// 0.37 ns per nonzero, Linear 4096 at 90 %). 32-bit columns are clamped to [0, K), any out-of-range
// one flagged (signed compares: K < 2^31 is checked), and gathered.
template <bool kWide>
struct Gather8 {
  __m256i kmax, zero, bad;
  explicit Gather8(int64_t K)
      : kmax(_mm256_set1_epi32(static_cast<int32_t>(K - 1))), zero(_mm256_setzero_si256()), bad(zero) {}
  __m256 operator()(const float* x, const void* col, int64_t k) {
    if constexpr (!kWide) {
      const uint16_t* c = static_cast<const uint16_t*>(col) + k;
      uint64_t a, b;
      std::memcpy(&a, c, 8);
      std::memcpy(&b, c + 4, 8);
      return _mm256_setr_ps(x[a & 0xFFFF], x[(a >> 16) & 0xFFFF], x[(a >> 32) & 0xFFFF], x[a >> 48], x[b & 0xFFFF],
                            x[(b >> 16) & 0xFFFF], x[(b >> 32) & 0xFFFF], x[b >> 48]);
    } else {
      const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int32_t*>(col) + k));
      bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(i, kmax), _mm256_cmpgt_epi32(zero, i)));
      return _mm256_i32gather_ps(x, _mm256_max_epi32(_mm256_min_epi32(i, kmax), zero), 4);
    }
  }
  bool any_bad() const { return !_mm256_testz_si256(bad, bad); }
};

// G rows r.. sharing one column pattern: each gather feeds G rows' FMAs (the gathers, not the
// FMAs, bound the one-row loop).
template <bool kWide, int G>
void spmv_group(const int32_t* rp, const void* col, const float* val, const float* x, int64_t K, const float* bias,
                bool relu, int64_t r, float* y, Gather8<kWide>& gather, bool* bad) {
  const int64_t k0 = rp[r], len = rp[r + 1] - k0;
  const float* w[G];
  for (int i = 0; i < G; ++i) w[i] = val + rp[r + i];
  __m256 a[G][2];
  for (int i = 0; i < G; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    const __m256 g0 = gather(x, col, k0 + k);
    const __m256 g1 = gather(x, col, k0 + k + 8);
    for (int i = 0; i < G; ++i) {
      a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w[i] + k), g0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w[i] + k + 8), g1, a[i][1]);
    }
  }
  for (; k + 8 <= len; k += 8) {
    const __m256 g0 = gather(x, col, k0 + k);
    for (int i = 0; i < G; ++i) a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w[i] + k), g0, a[i][0]);
  }
  float acc[G];
  for (int i = 0; i < G; ++i) acc[i] = hsum(_mm256_add_ps(a[i][0], a[i][1]));
  for (; k < len; ++k) {
    int64_t c = col_at(col, kWide, k0 + k);
    if (kWide && (c >= K || c < 0)) {
      *bad = true;
      c = K - 1;
    }
    for (int i = 0; i < G; ++i) acc[i] += w[i][k] * x[c];
  }
  for (int i = 0; i < G; ++i) y[r + i] = finish_output<float>(acc[i], bias, r + i, relu);
}

template <bool kWide>
void spmv_rows(const int32_t* rp, const int32_t* runs, const void* col, const float* val, const float* x, int64_t K,
               const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad) {
  Gather8<kWide> gather(K);
  auto shared = [&](int64_t r, auto g) {
    spmv_group<kWide, decltype(g)::value>(rp, col, val, x, K, bias, relu, r, y, gather, bad);
  };
  for_row_groups(runs, r0, r1, shared, [&](int64_t r) {
    int64_t k = rp[r];
    const int64_t k1 = rp[r + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    // four independent gathers in flight per step
    for (; k + 32 <= k1; k += 32) {
      // the value and column streams are read once: fetch them ahead of the gathers
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetch + 16), _MM_HINT_T0);
      _mm_prefetch(static_cast<const char*>(col) + (k + kPrefetch) * (kWide ? 4 : 2), _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather(x, col, k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), gather(x, col, k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 16), gather(x, col, k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 24), gather(x, col, k + 24), a3);
    }
    for (; k + 8 <= k1; k += 8) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather(x, col, k), a0);
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
  });
  if (gather.any_bad()) *bad = true;
}

struct V256 : simd::F32x8 {
  static constexpr int kGroupVecs = 2;  // 4 rows x 2 vectors: 8 of the 16 ymm registers accumulate
  static constexpr int kTokenVecs = 8;  // 8 of the 16 ymm registers accumulate 64 samples
  // the panel loop's panels: 2 x kPanelCols = 1024 columns (a 128 KB slice of 32 samples). Against
  // 512, same process, Zen 3 (32 KB L1, 512 KB L2), 128 rows: BERT-base's Linears 1.03-1.07x at 90 %,
  // 1.08-1.13x at 95 %, the FFN call 1.07x / 1.15x, the encoder 1.04x; 512 rows 0.99-1.07x; 256 / 128
  // columns 0.78-0.94x / 0.59-0.73x, 3072 (one panel) 1.03-1.12x (2026-12-03). On the Xeon the
  // AVX-512 copy measured 1024 level with 512.
  static constexpr int64_t kPanelMerge = 2;
  static Reg max0(Reg v) { return _mm256_max_ps(v, _mm256_setzero_ps()); }
  // the polynomial GELU (kErfPoly, sparse_core.h) on 8 lanes: each lane's interval picks its coefficients by permute
  static Reg gelu(Reg x) {
    const Reg sign = _mm256_set1_ps(-0.0f);
    const Reg ax = _mm256_andnot_ps(sign, x);
    const Reg z = _mm256_min_ps(_mm256_mul_ps(ax, _mm256_set1_ps(0.707106781f)), _mm256_set1_ps(kErfZMax));
    const __m256i i = _mm256_cvttps_epi32(_mm256_mul_ps(z, _mm256_set1_ps(2.0f)));
    const Reg t = _mm256_sub_ps(z, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(0.5f), _mm256_set1_ps(0.25f)));
    auto coef = [&](int d) { return _mm256_permutevar8x32_ps(_mm256_loadu_ps(kErfPoly[d]), i); };
    Reg e = coef(kErfDegree);
    for (int d = kErfDegree - 1; d >= 0; --d) e = _mm256_fmadd_ps(e, t, coef(d));
    const Reg half = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
    const Reg se = _mm256_or_ps(e, _mm256_and_ps(x, sign));  // erf's sign: x's
    return _mm256_fmadd_ps(half, se, half);
  }
};

void spmm(const int32_t* rp, const int32_t* runs, const void* col, bool wide, const float* val, const float* xt,
          int64_t ldx, int64_t K, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y,
          int64_t ldy, bool* bad) {
  spmm_t<V256>(rp, runs, col, wide, val, xt, ldx, K, n, bias, relu, r0, r1, y, ldy, bad);
}

}  // namespace

void spmv(const int32_t* rp, const int32_t* runs, const void* col, bool wide, const float* val, const float* x,
          int64_t K, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad) {
  if (wide) {
    spmv_rows<true>(rp, runs, col, val, x, K, bias, relu, r0, r1, y, bad);
  } else {
    spmv_rows<false>(rp, runs, col, val, padded_copy(x, K), K, bias, relu, r0, r1, y, bad);
  }
}

void conv_rows(const int32_t* rp, const int32_t* runs, const int32_t* off, const float* val, const float* xin,
               int64_t r0, int64_t r1, const ConvOut<float>& out) {
  conv_rows_simd<V256>(rp, runs, off, val, xin, r0, r1, out);
}

void tile_finish(const float* src, int64_t lds, float* out, int64_t ldo, int64_t rows, int64_t n, const float* bias,
                 const float* res, int64_t ldr, bool relu) {
  tile_finish_t<V256>(src, lds, out, ldo, rows, n, bias, res, ldr, relu);
}

// One 8 x 8 block through registers (unpack, shuffle, 128-bit lane swap).
inline void transpose8x8(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m256 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(s + k * lds);
  __m256 t[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  __m256 u[8];
  for (int k = 0; k < 2; ++k) {
    u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(d + k * ldd, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
    _mm256_storeu_ps(d + (k + 4) * ldd, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
  }
}

// 16 x 16 tiles of four 8 x 8 blocks, so that every cache line of 16 floats is read whole and
// written whole within one tile. (Strips of 8 rows once wrote each output line in two halves a whole
// strip apart: with BERT's 3072 outputs the rows are 12 KB apart, all in one L1 set, and the line
// was gone before its second half came: that transpose cost 0.33 of 1.08 ms in 768 -> 3072 at 128
// samples, Zen 5.) Then 8 x 8 blocks along the edges, then element by element.
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  auto block = [&](int64_t i, int64_t j) { transpose8x8(src + i * lds + j, lds, dst + j * ldd + i, ldd); };
  // Source rows 8 KB or more apart: each 16 x 16 tile prefetches its 16 source lines 64 columns on,
  // which the next call of to_blocks' loop reads (64 row streams 12 KB apart, 3072 inputs, are more
  // than the hardware follows from memory: after a cache-evicting call 3072 -> 768 at 512 rows went
  // 2.54 -> 2.11 ms with the panel loop's prefetch, 2.71 -> 2.29 ms without, medians, Zen 5). At 3
  // KB (768 inputs) it cost 3-4 % with warm caches and gained nothing cold.
  const bool far = lds * static_cast<int64_t>(sizeof(float)) >= 8192;
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    int64_t i = 0;
    for (; i + 16 <= rows; i += 16) {
      if (far) {
        for (int64_t q = 0; q < 16; ++q) {
          _mm_prefetch(reinterpret_cast<const char*>(src + (i + q) * lds + j + 64), _MM_HINT_T0);
        }
      }
      block(i, j);
      block(i + 8, j);
      block(i, j + 8);
      block(i + 8, j + 8);
    }
    if (i + 8 <= rows) {
      block(i, j);
      block(i, j + 8);
    }
  }
  if (j + 8 <= cols) {
    for (int64_t i = 0; i + 8 <= rows; i += 8) block(i, j);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j0 = i < r8 ? c8 : 0;
    for (int64_t j = j0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

void spmm_panels(const int32_t* pst, int64_t np, const void* col, bool wide, const float* val,
                 const float* xb, const float* bias, int act, int64_t r0, int64_t r1, float* y) {
  spmm_panels_any<V256>(pst, np, col, wide, val, xb, bias, act, r0, r1, y);
}

void max_pool_row_cl(const float* x, const PoolGeometry& g, int64_t oy, bool relu, float* row) {
  max_pool_row_cl_t<float>(x, g, oy, relu, row);
}

void max_pool_plane(const float* x, const PoolGeometry& g, bool relu, float* tmp, float* out) {
  max_pool_plane_t<float>(x, g, relu, tmp, out);
}

const SparseKernels kKernels = {spmv, spmm, conv_rows, tile_finish, transpose, spmm_panels, V256::kWidth * kPanelVecs, "avx2", V256::kTokenVecs * V256::kWidth, max_pool_row_cl, max_pool_plane, gelu_t<V256>};

}  // namespace avx2
}  // namespace sparse
}  // namespace fastprune
