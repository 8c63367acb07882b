// CPU kernels for the blocked Woodbury inverse Fisher.
//
// Math (per block b of B coordinates, G_b the (N, B) column slice of the gradients):
//   F_b = damp I + G_b^T G_b / N,  and we want F_b^{-1}.
// Two exact algorithms, chosen by a flop model (the Woodbury step wins for N below about 0.65 B):
//   N >~ B  "gram":     S = G_b^T G_b (symmetric rank-N product, half a GEMM), then the inverse of
//                       S/N + damp I by the blocked symmetric sweep (B^3 flops).
//   N <~ B  "woodbury": one rank-N Woodbury step from damp^-1 I:
//                       F^{-1} = (I - V^T V) / damp,  V = R^{-T} G_b,  R^T R = G_b G_b^T + N damp I,
//                       which never forms (or factors) a B x B matrix that is nearly singular.
// The update op applies F^{-1} <- F^{-1} - U^T (N I + U G^T)^{-1} U with U = G F^{-1} per block.
// All O(n^3) work (Gram, sweep, blocked Cholesky, triangular solves) runs on one register-tiled
// kernel, C += A^T B (woodbury_kernels_impl.h), compiled per ISA; LAPACK's small-matrix routines
// run level-2 code on this CPU and were 3-5x slower per block.
//
// Precision: inputs are float32 or float64; everything is accumulated and factored in float64
// (float32 products are exact in float64). See woodbury_core.h.
//
// Memory layout: grads is read in place through its strides (any layout); each block is copied
// once, panel by panel, into a float64 row-major panel padded to a multiple of 16 columns.
// Parallel scheme: at::parallel_for over blocks, one block per task; each task owns its panels,
// so working memory is O(threads * (B^2 + panel)) on top of the (nb, B, B) output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/cpu_features.h"
#include "common/kernel_log.h"
#include "woodbury/woodbury.h"
#include "woodbury/woodbury_core.h"
#include "woodbury/woodbury_kernels.h"

namespace fastprune {
namespace woodbury {

const GemmKernels& gemm_kernels(Isa isa) {
  switch (isa) {
#if defined(FP_HAVE_X86_KERNELS)
    case Isa::kAvx512: return avx512::kKernels;
    case Isa::kAvx2: return avx2::kKernels;
#endif
    default: return scalar::kKernels;
  }
}

namespace {

constexpr int64_t kPanelRows = 256;  // depth of one packed panel (rows of G)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline bool convert_row(const GemmKernels& kern, const float* src, int64_t n, double* dst) {
  return kern.convert_f32(src, n, dst);
}
inline bool convert_row(const GemmKernels& kern, const double* src, int64_t n, double* dst) {
  return kern.convert_f64(src, n, dst);
}

inline void store_row(const GemmKernels& kern, const double* src, int64_t n, float* dst) { kern.store_f32(src, n, dst); }
inline void store_row(const GemmKernels&, const double* src, int64_t n, double* dst) { std::copy(src, src + n, dst); }

// Copy G[r0:r0+rows, c0:c0+cols] (strided) into a float64 row-major panel with row stride ld,
// zero-filling columns [cols, ld). Returns false if a value is not finite.
template <typename T>
bool pack_rows(const GemmKernels& kern, const T* g, int64_t s0, int64_t s1, int64_t r0, int64_t rows, int64_t c0,
               int64_t cols, double* panel, int64_t ld) {
  bool finite = true;
  constexpr int64_t kAhead = 8;  // rows are s0 apart (a new page each): prefetch them early
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = g + (r0 + r) * s0 + c0 * s1;
    double* dst = panel + r * ld;
    if (s1 == 1 && r + kAhead < rows) {
      const char* next = reinterpret_cast<const char*>(src + kAhead * s0);
      for (int64_t off = 0; off < cols * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(next + off);
    }
    if (s1 == 1) {
      finite = convert_row(kern, src, cols, dst) && finite;
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        dst[c] = static_cast<double>(src[c * s1]);
        finite = finite && std::isfinite(dst[c]);
      }
    }
    for (int64_t c = cols; c < ld; ++c) dst[c] = 0.0;
  }
  return finite;
}

// Writes the symmetric block from the upper triangle of `up` (n valid coordinates, stride ld) into
// out (B x B). scale/shift turn the stored matrix into the inverse: out = scale * (shift I + up).
// Padded coordinates [n, B) get exactly 1/damp on the diagonal and 0 elsewhere.
// dst (cols x ldd) = src^T for src (rows x lds), rows [rows, ldd) of each dst row zero-filled.
void transpose_into(const double* src, int64_t rows, int64_t lds, int64_t cols, double* dst, int64_t ldd) {
  constexpr int64_t t = 8;  // 8 x 8 tiles: both sides touch whole cache lines
  for (int64_t r0 = 0; r0 < rows; r0 += t)
    for (int64_t c0 = 0; c0 < cols; c0 += t)
      for (int64_t r = r0; r < std::min(rows, r0 + t); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + t); ++c) dst[c * ldd + r] = src[r * lds + c];
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ldd + rows, dst + (c + 1) * ldd, 0.0);
}

// Copy the upper triangle of an n x n row-major matrix into its lower triangle, in 16 x 16 tiles
// (a plain column walk misses the cache on every read for n >= 64).
void mirror_upper(double* a, int64_t n, int64_t ld) {
  constexpr int64_t t = 16;
  for (int64_t i0 = 0; i0 < n; i0 += t)
    for (int64_t j0 = 0; j0 <= i0; j0 += t)
      for (int64_t i = i0; i < std::min(n, i0 + t); ++i)
        for (int64_t j = j0; j < std::min(i, j0 + t); ++j) a[i * ld + j] = a[j * ld + i];
}

// In-place inverse of the SPD matrix held in the upper triangle of A (n x n, row stride ld, columns
// and rows [n, ld) zero) by the blocked symmetric sweep operator: sweeping pivot block K with
// P = A_KK^{-1} sets A_KK <- -P, A_Kj <- P A_Kj, A_ij <- A_ij - A_iK P A_Kj (i, j not in K); after all
// blocks A holds -A^{-1}. Each sweep's trailing update is one rank-16 call of the Gram kernel on the
// upper triangle, so the inverse costs n^3 flops at GEMM speed (LAPACK's potrf + potri on small
// blocks run level-2 code here). Pivots are Schur complements of an SPD matrix: a pivot that is not
// positive and finite means A is not numerically SPD; returns k + 1 then (0 on success).
int64_t sweep_inverse_upper(double* A, int64_t n, int64_t ld, const GemmKernels& kern, double* work) {
  constexpr int64_t kb = kSweepBlock;
  double* R = work;            // kb x ld: the pivot rows before the sweep
  double* Y = R + kb * ld;     // kb x ld: -(P R)
  double* P = Y + kb * ld;     // kb x kb
  for (int64_t k0 = 0; k0 < n; k0 += kb) {
    const int64_t bk = std::min(kb, n - k0);
    // P = -(A_KK)^{-1} by the scalar sweep on a full symmetric copy.
    for (int64_t i = 0; i < kb; ++i)
      for (int64_t j = 0; j < kb; ++j)
        P[i * kb + j] = (i >= bk || j >= bk) ? 0.0
                        : i <= j ? A[(k0 + i) * ld + k0 + j] : A[(k0 + j) * ld + k0 + i];
    if (const int64_t bad = kern.sweep_small(P, bk); bad != 0) return k0 + bad;
    // R = pivot rows of A as full rows, read through the upper triangle: columns k0.. of the rows above
    // the block (each a contiguous run of bk values), then the block's own rows. Zero rows past bk.
    for (int64_t j = 0; j < k0; ++j) {
      const double* a = A + j * ld + k0;
      for (int64_t k = 0; k < bk; ++k) R[k * ld + j] = a[k];
    }
    for (int64_t k = 0; k < kb; ++k) {
      double* r = R + k * ld;
      if (k >= bk) {
        std::fill(r, r + ld, 0.0);
        continue;
      }
      const int64_t row = k0 + k;
      for (int64_t j = k0; j < row; ++j) r[j] = A[j * ld + row];
      for (int64_t j = row; j < ld; ++j) r[j] = A[row * ld + j];
    }
    // Y = -(A_KK^{-1} R) = P R, since P holds -A_KK^{-1}; P is symmetric, so P R = P^T R is the
    // same kernel (P is zero past bk: the small sweep keeps zero rows and columns zero).
    std::fill(Y, Y + kb * ld, 0.0);
    kern.gemm_tn(P, kb, R, ld, kb, kb, ld, Y, ld, /*upper_only=*/false);
    // A_ij += R^T Y = A_ij - A_iK A_KK^{-1} A_Kj on the upper triangle.
    kern.gemm_tn(R, ld, Y, ld, kb, ld, ld, A, ld, /*upper_only=*/true);
    // Pivot rows and columns: A_Kj <- A_KK^{-1} A_Kj = -Y, A_KK <- -A_KK^{-1} = P.
    for (int64_t i = 0; i < k0; ++i) {
      double* a = A + i * ld + k0;
      for (int64_t k = 0; k < bk; ++k) a[k] = -Y[k * ld + i];
    }
    for (int64_t k = 0; k < bk; ++k) {
      double* a = A + (k0 + k) * ld;
      for (int64_t j = k0 + bk; j < n; ++j) a[j] = -Y[k * ld + j];
      for (int64_t j = k; j < bk; ++j) a[k0 + j] = P[k * kb + j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) A[i * ld + j] = -A[i * ld + j];
  return 0;
}

// W (kSweepBlock x kSweepBlock, zero past n) = R^{-1} for the n x n upper-triangular R (n <= 32).
void upper_tri_inverse(const double* r, int64_t n, int64_t ldr, double* w) {
  constexpr int64_t kb = kSweepBlock;
  std::fill(w, w + kb * kb, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const double wjj = 1.0 / r[j * ldr + j];
    w[j * kb + j] = wjj;
    for (int64_t i = 0; i < j; ++i) {
      double acc = 0.0;
      for (int64_t m = i; m < j; ++m) acc += w[i * kb + m] * r[m * ldr + j];
      w[i * kb + j] = -acc * wjj;
    }
  }
}

// Blocked right-looking Cholesky A = R^T R (R upper, row-major, in place on the upper triangle of
// an n x n matrix with row stride ld; rows and columns [n, ld) zero). The panel solve and the
// trailing rank-32 update run on the Gram kernel: n^3/3 flops at GEMM speed. Also leaves the
// inverse of every diagonal block in winv (ceil(n/32) blocks of 32 x 32), for solve_rt_blocked.
// Returns 0, or the failing pivot + 1. work: 2 * kSweepBlock * ld doubles.
int64_t cholesky_blocked(double* A, int64_t n, int64_t ld, const GemmKernels& kern, double* winv, double* work) {
  constexpr int64_t kb = kSweepBlock;
  double* T = work;             // kb x ld: R_{K,J} = R_KK^{-T} A_{K,J}
  double* Tn = T + kb * ld;     // kb x ld: -R_{K,J}
  for (int64_t k0 = 0; k0 < n; k0 += kb) {
    const int64_t bk = std::min(kb, n - k0);
    double* akk = A + k0 * ld + k0;
    if (const int64_t bad = cholesky_upper(akk, bk, ld); bad != 0) return k0 + bad;
    double* W = winv + (k0 / kb) * kb * kb;
    upper_tri_inverse(akk, bk, ld, W);
    const int64_t j0 = k0 + bk;
    if (j0 >= n) break;  // bk == kb from here on, so j0 and ld - j0 are multiples of 16
    const int64_t nc = ld - j0;
    std::fill(T, T + kb * ld, 0.0);
    kern.gemm_tn(W, kb, A + k0 * ld + j0, ld, bk, kb, nc, T, ld, false);
    for (int64_t i = 0; i < bk; ++i) {
      double* a = A + (k0 + i) * ld + j0;
      for (int64_t j = 0; j < nc; ++j) {
        a[j] = T[i * ld + j];
        Tn[i * ld + j] = -T[i * ld + j];
      }
    }
    kern.gemm_tn(Tn, ld, T, ld, bk, nc, nc, A + j0 * ld + j0, ld, true);
  }
  return 0;
}

// X <- R^{-T} X for R and winv from cholesky_blocked (n x n, row stride ldr) and X with
// round_up(n, 16) rows (rows past n zero) of ncols (a multiple of 16) columns, row stride ldx:
// blocked forward substitution, X_K <- W_K^T (X_K - R_{<K,K}^T X_{<K}), on the Gram kernel.
// work: kSweepBlock * (ldr + ldx) doubles.
void solve_rt_blocked(const double* R, int64_t n, int64_t ldr, const double* winv, double* X, int64_t ncols,
                      int64_t ldx, const GemmKernels& kern, double* work) {
  constexpr int64_t kb = kSweepBlock;
  double* T = work;             // kb x ldx
  double* Rn = T + kb * ldx;    // k0 x bm: -R_{<K,K}
  for (int64_t k0 = 0; k0 < n; k0 += kb) {
    const int64_t bk = std::min(kb, n - k0);
    const int64_t bm = round_up(bk, kPanelAlign);
    double* xk = X + k0 * ldx;
    if (k0 > 0) {
      for (int64_t m = 0; m < k0; ++m)
        for (int64_t i = 0; i < bm; ++i) Rn[m * bm + i] = -R[m * ldr + k0 + i];
      kern.gemm_tn(Rn, bm, X, ldx, k0, bm, ncols, xk, ldx, false);
    }
    std::fill(T, T + bm * ldx, 0.0);
    kern.gemm_tn(winv + (k0 / kb) * kb * kb, kb, xk, ldx, bm, bm, ncols, T, ldx, false);
    for (int64_t i = 0; i < bm; ++i) std::copy(T + i * ldx, T + i * ldx + ncols, xk + i * ldx);
  }
}

template <typename T>
bool store_block(double* up, int64_t n, int64_t ld, double scale, double shift, double damp, T* out, int64_t B) {
  // Mirror the upper triangle into the lower one (in the float64 buffer), then one streaming pass.
  // Returns false if a stored value is not finite (a float32 result beyond float32's range).
  for (int64_t i = 0; i < n; ++i) up[i * ld + i] += shift;
  mirror_upper(up, n, ld);
  const T inv_damp = static_cast<T>(1.0 / damp);
  T check = T(0);  // x - x is 0 for finite x and NaN otherwise
  for (int64_t i = 0; i < B; ++i) {
    T* o = out + i * B;
    if (i < n) {
      const double* u = up + i * ld;
      for (int64_t j = 0; j < n; ++j) {
        o[j] = static_cast<T>(u[j] * scale);
        check += o[j] - o[j];
      }
      for (int64_t j = n; j < B; ++j) o[j] = T(0);
    } else {
      for (int64_t j = 0; j < B; ++j) o[j] = T(0);
      o[i] = inv_damp;
    }
  }
  return check == T(0) && inv_damp - inv_damp == T(0);
}

struct Workspace {
  std::vector<double> a, b, c, d;
  double* A(int64_t n) { if ((int64_t)a.size() < n) a.resize(n); return a.data(); }
  double* Bf(int64_t n) { if ((int64_t)b.size() < n) b.resize(n); return b.data(); }
  double* C(int64_t n) { if ((int64_t)c.size() < n) c.resize(n); return c.data(); }
  double* D(int64_t n) { if ((int64_t)d.size() < n) d.resize(n); return d.data(); }
};

enum class BlockStatus { kOk, kNonFinite, kNotPD, kOverflow };

// "gram" regime for one block: returns kNotPD when the factorisation fails (caller falls back).
template <typename T>
BlockStatus inverse_block_gram(const T* g, int64_t s0, int64_t s1, int64_t N, int64_t c0, int64_t bv, int64_t B,
                               double damp, const GemmKernels& kern, Workspace& ws, T* out) {
  const int64_t ld = round_up(bv, kPanelAlign);
  double* S = ws.C(ld * ld);
  std::fill(S, S + ld * ld, 0.0);
  double* P = ws.A(kPanelRows * ld);
  for (int64_t r0 = 0; r0 < N; r0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, N - r0);
    if (!pack_rows(kern, g, s0, s1, r0, rows, c0, bv, P, ld)) return BlockStatus::kNonFinite;
    kern.gemm_tn(P, ld, P, ld, rows, ld, ld, S, ld, /*upper_only=*/true);
  }
  gram_to_fisher_upper(S, bv, ld, 1.0 / static_cast<double>(N), damp);
  if (sweep_inverse_upper(S, bv, ld, kern, ws.D(2 * kSweepBlock * ld + kSweepBlock * kSweepBlock)) != 0)
    return BlockStatus::kNotPD;
  return store_block(S, bv, ld, 1.0, 0.0, damp, out, B) ? BlockStatus::kOk : BlockStatus::kOverflow;
}

// "woodbury" regime for one block (exact for any N; cheapest when N < B):
//   F^{-1} = (I - V^T V) / damp,  V = R^{-T} G,  R^T R = G G^T + N damp I.
template <typename T>
BlockStatus inverse_block_woodbury(const T* g, int64_t s0, int64_t s1, int64_t N, int64_t c0, int64_t bv,
                                   int64_t B, double damp, const GemmKernels& kern, Workspace& ws, T* out) {
  const int64_t ldn = round_up(N, kPanelAlign);
  const int64_t ld = round_up(bv, kPanelAlign);
  double* Gn = ws.A(ldn * ld);  // N x bv, n-major; becomes V
  double* Gt = ws.Bf(ld * ldn);  // G^T; becomes -V
  double* K = ws.C(std::max(ldn * ldn, ld * ld));
  double* winv = ws.D(ldn * kSweepBlock + kSweepBlock * kSweepBlock + 2 * kSweepBlock * (ldn + ld));
  double* work = winv + ldn * kSweepBlock + kSweepBlock * kSweepBlock;
  if (!pack_rows(kern, g, s0, s1, 0, N, c0, bv, Gn, ld)) return BlockStatus::kNonFinite;
  std::fill(Gn + N * ld, Gn + ldn * ld, 0.0);
  transpose_into(Gn, ldn, ld, ld, Gt, ldn);
  std::fill(K, K + ldn * ldn, 0.0);
  kern.gemm_tn(Gt, ldn, Gt, ldn, ld, ldn, ldn, K, ldn, /*upper_only=*/true);
  const double nd = static_cast<double>(N) * damp;
  for (int64_t i = 0; i < N; ++i) K[i * ldn + i] += nd;
  if (cholesky_blocked(K, N, ldn, kern, winv, work) != 0) return BlockStatus::kNotPD;
  solve_rt_blocked(K, N, ldn, winv, Gn, ld, ld, kern, work);
  double* Vneg = Gt;
  for (int64_t i = 0; i < ldn * ld; ++i) Vneg[i] = -Gn[i];
  double* D = K;  // K is no longer needed
  std::fill(D, D + ld * ld, 0.0);
  kern.gemm_tn(Vneg, ld, Gn, ld, ldn, ld, ld, D, ld, /*upper_only=*/true);
  // F^{-1} = (I + D) / damp with D = -V^T V.
  return store_block(D, bv, ld, 1.0 / damp, 1.0, damp, out, B) ? BlockStatus::kOk : BlockStatus::kOverflow;
}

at::Tensor woodbury_inverse_fisher_cpu(const at::Tensor& grads, int64_t block_size, double damp) {
  check_woodbury_inverse_fisher_inputs(grads, block_size, damp);
  TORCH_CHECK_VALUE(grads.device().is_cpu(), "grads must be a CPU tensor for the CPU kernel");
  const int64_t N = grads.size(0), d = grads.size(1), B = block_size;
  const int64_t nb = num_blocks(d, B);
  at::Tensor out = at::empty({nb, B, B}, grads.options());
  if (nb == 0) return out;
  const Isa isa = active_isa();
  const auto& kern = gemm_kernels(isa);
  note_kernel(KernelOp::kWoodburyInverseFisher, path_of_isa(static_cast<int>(isa)));
  // Flop model per block: gram N B^2 + B^3 (sweep), woodbury N B^2 + 2 N^2 B + N^3 / 3. The
  // Woodbury step wins up to N ~ 0.65 B; both are exact in float64, and each is the other's fallback.
  const double nn = static_cast<double>(N), bb = static_cast<double>(std::min(B, d));
  const bool gram_first = !(2.0 * nn * nn * bb + nn * nn * nn / 3.0 < bb * bb * bb);
  std::atomic<int> non_finite{0};
  std::atomic<int64_t> failed_block{-1};
  std::atomic<int64_t> overflow_block{-1};
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "woodbury_inverse_fisher_cpu", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const int64_t s0 = grads.stride(0), s1 = grads.stride(1);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      Workspace ws;
      for (int64_t b = b0; b < b1; ++b) {
        if (non_finite.load(std::memory_order_relaxed)) return;
        const int64_t bv = block_valid(d, B, b);
        scalar_t* ob = o + b * B * B;
        BlockStatus st = gram_first
            ? inverse_block_gram(g, s0, s1, N, b * B, bv, B, damp, kern, ws, ob)
            : inverse_block_woodbury(g, s0, s1, N, b * B, bv, B, damp, kern, ws, ob);
        if (st == BlockStatus::kNotPD) {  // fall back to the other exact algorithm
          st = gram_first ? inverse_block_woodbury(g, s0, s1, N, b * B, bv, B, damp, kern, ws, ob)
                          : inverse_block_gram(g, s0, s1, N, b * B, bv, B, damp, kern, ws, ob);
        }
        if (st == BlockStatus::kNonFinite) non_finite.store(1);
        if (st == BlockStatus::kNotPD) failed_block.store(b);
        if (st == BlockStatus::kOverflow) overflow_block.store(b);
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite.load(), "grads contains NaN or Inf");
  TORCH_CHECK_VALUE(overflow_block.load() < 0, "the inverse Fisher of block ", overflow_block.load(),
                    " overflows ", grads.scalar_type(), " (damp = ", damp,
                    " is too small to represent 1/damp): pass float64 gradients or a larger damp");
  TORCH_CHECK_VALUE(failed_block.load() < 0, "the damped Fisher of block ", failed_block.load(),
                    " is not positive definite in float64 (damp = ", damp, " is too small for these gradients)");
  return out;
}

// One block of the in-place rank-k update, F (B x B, type T) with G the (k, bv) gradient slice:
//   U = G F,  M = N I + U G^T = R^T R,  V = R^{-T} U,  F <- F - V^T V.
// Every product runs on the Gram kernel; flops per gradient 3 B^2 + 2 k B + k^2 / 3, against
// B^2 for the Gram of woodbury_inverse_fisher. Returns false if M is not SPD.
template <typename T>
bool update_block(T* F, int64_t B, const T* g, int64_t s0, int64_t s1, int64_t k, int64_t c0, int64_t bv,
                  double num_samples, const GemmKernels& kern, Workspace& ws) {
  const int64_t ld = round_up(B, kPanelAlign);
  const int64_t ldk = round_up(k, kPanelAlign);
  double* F64 = ws.C(ld * ld + 3 * ld * ldk + ldk * ldk);
  double* Gn = F64 + ld * ld;   // ldk x ld: G, n-major (rows past k zero); later U, then V
  double* Gt = Gn + ld * ldk;   // ld x ldk: G^T; later -V (ldk x ld)
  double* Ut = Gt + ld * ldk;   // ld x ldk: U^T
  double* M = Ut + ld * ldk;    // ldk x ldk
  double* winv = ws.D(ldk * kSweepBlock + kSweepBlock * kSweepBlock + 2 * kSweepBlock * (ldk + ld));
  double* work = winv + ldk * kSweepBlock + kSweepBlock * kSweepBlock;
  pack_rows(kern, F, B, 1, 0, B, 0, B, F64, ld);
  std::fill(F64 + B * ld, F64 + ld * ld, 0.0);
  pack_rows(kern, g, s0, s1, 0, k, c0, bv, Gn, ld);  // finiteness was checked by the caller
  std::fill(Gn + k * ld, Gn + ldk * ld, 0.0);
  transpose_into(Gn, ldk, ld, ld, Gt, ldk);
  // U^T[j][n] = sum_c F[c][j] G[n][c]
  std::fill(Ut, Ut + ld * ldk, 0.0);
  kern.gemm_tn(F64, ld, Gt, ldk, ld, ld, ldk, Ut, ldk, false);
  // M = U G^T + N I (upper) = R^T R
  std::fill(M, M + ldk * ldk, 0.0);
  kern.gemm_tn(Ut, ldk, Gt, ldk, ld, ldk, ldk, M, ldk, true);
  for (int64_t i = 0; i < k; ++i) M[i * ldk + i] += num_samples;
  if (cholesky_blocked(M, k, ldk, kern, winv, work) != 0) return false;
  // V = R^{-T} U (n-major), then F += (-V)^T V on the upper triangle.
  double* V = Gn;
  transpose_into(Ut, ld, ldk, ldk, V, ld);
  solve_rt_blocked(M, k, ldk, winv, V, ld, ld, kern, work);
  double* Vneg = Gt;
  for (int64_t i = 0; i < ldk * ld; ++i) Vneg[i] = -V[i];
  kern.gemm_tn(Vneg, ld, V, ld, ldk, ld, ld, F64, ld, true);
  mirror_upper(F64, B, ld);
  for (int64_t i = 0; i < B; ++i) store_row(kern, F64 + i * ld, B, F + i * B);
  return true;
}

void woodbury_update_cpu(const at::Tensor& finv, const at::Tensor& grads, double num_samples) {
  check_woodbury_update_inputs(finv, grads, num_samples);
  TORCH_CHECK_VALUE(finv.device().is_cpu(), "finv must be a CPU tensor for the CPU kernel");
  const int64_t k = grads.size(0), d = grads.size(1), B = finv.size(1), nb = finv.size(0);
  if (k == 0 || nb == 0) return;
  // Validate everything before touching finv: a failed call leaves it unchanged.
  TORCH_CHECK_VALUE(at::isfinite(grads).all().item<bool>(), "grads contains NaN or Inf");
  at::Tensor work = finv.is_contiguous() ? finv : finv.contiguous();
  const Isa isa = active_isa();
  const auto& kern = gemm_kernels(isa);
  note_kernel(KernelOp::kWoodburyUpdate, path_of_isa(static_cast<int>(isa)));
  std::atomic<int64_t> failed_block{-1};
  // The update is applied into a copy when finv is not contiguous; when it is, each block is written
  // only after its own factorisation succeeded, and a failure anywhere is reported after the loop.
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "woodbury_update_cpu", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const int64_t s0 = grads.stride(0), s1 = grads.stride(1);
    scalar_t* f = work.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      Workspace ws;
      for (int64_t b = b0; b < b1; ++b) {
        if (!update_block(f + b * B * B, B, g, s0, s1, k, b * B, block_valid(d, B, b), num_samples, kern, ws))
          failed_block.store(b);
      }
    });
  });
  TORCH_CHECK_VALUE(failed_block.load() < 0, "woodbury_update_: N I + G F^-1 G^T of block ", failed_block.load(),
                    " is not positive definite: finv is not a valid (symmetric positive definite) inverse");
  if (!work.is_same(finv)) finv.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("woodbury_update_", &woodbury_update_cpu);
  m.impl("woodbury_inverse_fisher", &woodbury_inverse_fisher_cpu);
}

}  // namespace woodbury
}  // namespace fastprune
