// Included once per ISA translation unit with FP_ISA_NS, FP_MR, FP_NR defined.
// Loop order: column tiles of NR outside, row tiles of MR inside, the whole K depth in one pass:
// the B strip (K x NR) stays in L1/L2 while A strips stream; the caller bounds K (panel depth) so
// that panels stay cache resident.
#include "woodbury/woodbury_core.h"
#include "woodbury/woodbury_kernels.h"

namespace fastprune {
namespace woodbury {
namespace FP_ISA_NS {

static void gemm_tn(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t K, int64_t m,
                    int64_t n, double* c, int64_t ldc, bool upper_only) {
  for (int64_t j0 = 0; j0 < n; j0 += FP_NR) {
    for (int64_t i0 = 0; i0 < m; i0 += FP_MR) {
      if (upper_only && i0 > j0 + FP_NR - 1) break;  // tile entirely below the diagonal
      gemm_tn_tile<FP_MR, FP_NR, double>(a + i0, lda, b + j0, ldb, K, c + i0 * ldc + j0, ldc);
    }
  }
}

// Conversion and the finiteness check in one vectorisable pass: the exponent bits are all ones
// exactly for NaN and Inf, and an integer OR-reduction vectorises where a float one would not.
static bool convert_f32(const float* src, int64_t n, double* dst) {
  uint32_t bad = 0;
  for (int64_t c = 0; c < n; ++c) {
    uint32_t bits;
    __builtin_memcpy(&bits, src + c, 4);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    dst[c] = static_cast<double>(src[c]);
  }
  return bad == 0;
}

static bool convert_f64(const double* src, int64_t n, double* dst) {
  uint64_t bad = 0;
  for (int64_t c = 0; c < n; ++c) {
    uint64_t bits;
    __builtin_memcpy(&bits, src + c, 8);
    bad |= static_cast<uint64_t>((bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
    dst[c] = src[c];
  }
  return bad == 0;
}

// The scalar sweep on one pivot block, with the block size fixed at compile time so that each
// rank-1 step is a handful of full-width vector FMAs.
static int64_t sweep_small(double* P, int64_t n) {
  constexpr int64_t kb = kSweepBlock;
  for (int64_t p = 0; p < n; ++p) {
    const double piv = P[p * kb + p];
    if (!(piv > 0.0) || !(piv < __builtin_inf())) return p + 1;
    const double inv = 1.0 / piv;
    double col[kb], row[kb];
    for (int64_t i = 0; i < kb; ++i) {
      col[i] = P[i * kb + p];
      row[i] = P[p * kb + i] * inv;
    }
    for (int64_t i = 0; i < kb; ++i) {
      const double ci = col[i];
      double* pi = P + i * kb;
      for (int64_t j = 0; j < kb; ++j) pi[j] -= ci * row[j];
    }
    for (int64_t i = 0; i < kb; ++i) {
      P[i * kb + p] = col[i] * inv;
      P[p * kb + i] = row[i];
    }
    P[p * kb + p] = -inv;
  }
  return 0;
}

static void store_f32(const double* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

const GemmKernels kKernels{&gemm_tn, &convert_f32, &convert_f64, &sweep_small, &store_f32, FP_ISA_NAME};

}  // namespace FP_ISA_NS
}  // namespace woodbury
}  // namespace fastprune
