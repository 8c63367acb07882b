// The vector loops shared by the AVX2 and AVX-512 copies, written once over a traits type V that
// each sparse_kernels_<isa>.cpp defines (in an anonymous namespace, so every instantiation stays
// inside its own translation unit and its own -m flags). V provides: Reg, Mask, kWidth, zero(),
// set1(f), loadu(p), storeu(p, v), fmadd(a, b, c), add(a, b), max0(v), mask(w) (first w lanes),
// maskz_load(m, p), mask_store(p, m, v), kGroupVecs: the vectors of output positions per row in the
// shared-pattern conv loop (its G rows x kGroupVecs accumulators must fit the register file), and
// kTokenVecs: the accumulator vectors of the many-sample product (a power of two, at least 4).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"

namespace fastprune {
namespace sparse {

// Rows [r0, r1) of Y^T = act(W X + b), vectorised along the n samples (xt: X^T (K, n), row stride
// ldx; yt (O, n), row stride ldy). The samples go in blocks of kTokenVecs vectors whose slice of X^T
// stays in cache while every row of [r0, r1) runs over it; within a block each row holds NV vectors
// of accumulators, so that a nonzero's weight, broadcast once, feeds NV FMAs and the NV input loads
// are the only other work (the loop once ran one vector of samples per pass over a row: one
// broadcast, one column decode and one load per FMA, 0.83x dense MKL for BERT's 768 x 768 at 90 %
// and 128 tokens on Zen 1). Columns are read unchecked: the caller has checked them against K
// (sparse_linear_cpu, once per packed weight).

// G rows r.. (sharing one column pattern when G > 1) x NV vectors of samples from j0: per nonzero,
// NV input vectors loaded once feed G x NV FMAs. kTail: the last vector holds n - j0 - (NV-1) W
// samples (masked load and store). With fewer than 8 accumulators (G x NV < 8) the row's nonzeros
// are split among U interleaved partial sums (nonzero k into sum k mod U, added at the end), so that
// at least 8 independent FMA chains hide the FMA latency: one row over one vector of 16 samples was
// one chain, 4 cycles a nonzero (BERT's 768 x 768 at 16 rows: 3.5x dense, Zen 5).
template <class V, int G, int NV, bool kTail, class Col>
inline void spmm_block(const int32_t* rp, const Col* col, const float* val, const float* xt, int64_t ldx, int64_t n,
                       const float* bias, bool relu, int64_t r, int64_t j0, float* y, int64_t ldy) {
  constexpr int64_t W = V::kWidth;
  constexpr int U = std::max(1, std::min(4, 8 / (G * NV)));
  const int64_t k0 = rp[r], len = rp[r + 1] - k0;
  const Col* c = col + k0;
  const float* w[G];
  for (int i = 0; i < G; ++i) w[i] = val + rp[r + i];
  const auto m = V::mask(kTail ? n - j0 - (NV - 1) * W : W);
  typename V::Reg acc[U][G][NV];
  FP_UNROLL
  for (int u = 0; u < U; ++u) {
    FP_UNROLL
    for (int i = 0; i < G; ++i) {
      FP_UNROLL
      for (int v = 0; v < NV; ++v) acc[u][i][v] = V::zero();
    }
  }
  const float* base = xt + j0;
  auto step = [&](int64_t k, typename V::Reg(&a)[G][NV]) {
    const float* s = base + static_cast<int64_t>(c[k]) * ldx;
    typename V::Reg x[NV];
    FP_UNROLL
    for (int v = 0; v < NV; ++v) x[v] = (kTail && v == NV - 1) ? V::maskz_load(m, s + v * W) : V::loadu(s + v * W);
    FP_UNROLL
    for (int i = 0; i < G; ++i) {
      const typename V::Reg b = V::set1(w[i][k]);
      FP_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] = V::fmadd(b, x[v], a[i][v]);
    }
  };
  int64_t k = 0;
  for (; k + U <= len; k += U) {
    FP_UNROLL
    for (int u = 0; u < U; ++u) step(k + u, acc[u]);
  }
  for (; k < len; ++k) step(k, acc[0]);  // (acc[0]: a run-time index would put acc in memory)
  FP_UNROLL
  for (int u = 1; u < U; ++u) {
    FP_UNROLL
    for (int i = 0; i < G; ++i) {
      FP_UNROLL
      for (int v = 0; v < NV; ++v) acc[0][i][v] = V::add(acc[0][i][v], acc[u][i][v]);
    }
  }
  for (int i = 0; i < G; ++i) {
    const typename V::Reg b = bias != nullptr ? V::set1(bias[r + i]) : V::zero();
    float* out = y + (r + i) * ldy + j0;
    for (int v = 0; v < NV; ++v) {
      typename V::Reg a = V::add(acc[0][i][v], b);
      if (relu) a = V::max0(a);
      if (kTail && v == NV - 1) {
        V::mask_store(out + v * W, m, a);
      } else {
        V::storeu(out + v * W, a);
      }
    }
  }
}

// The rest of a span, nv <= NV vectors (the last one masked when tail): one spmm_block of exactly nv
// vectors, so that the rest is one more pass over the row's nonzeros, not one per power of two (24
// samples on AVX2 once ran 16 + 8: 768 -> 768 at 90 % took 0.252 ms against 0.139 for 16, Zen 3).
template <class V, int G, int NV, class Col>
inline void spmm_rest(int nv, bool tail, const int32_t* rp, const Col* col, const float* val, const float* xt,
                      int64_t ldx, int64_t n, const float* bias, bool relu, int64_t r, int64_t j, float* y, int64_t ldy) {
  if constexpr (NV >= 1) {
    if (nv == NV) {
      if (tail) {
        spmm_block<V, G, NV, true>(rp, col, val, xt, ldx, n, bias, relu, r, j, y, ldy);
      } else {
        spmm_block<V, G, NV, false>(rp, col, val, xt, ldx, n, bias, relu, r, j, y, ldy);
      }
    } else {
      spmm_rest<V, G, NV - 1>(nv, tail, rp, col, val, xt, ldx, n, bias, relu, r, j, y, ldy);
    }
  }
}

// G rows r.. over the samples [j0, j1): blocks of kTokenVecs / G vectors (G x NV accumulators fill
// the registers set aside for them), then one block of the vectors left, its last one masked when
// partial. (Samples past j1 are n's: a partial vector only occurs where j1 == n.)
template <class V, int G, class Col>
inline void spmm_span(const int32_t* rp, const Col* col, const float* val, const float* xt, int64_t ldx, int64_t n,
                      const float* bias, bool relu, int64_t r, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  constexpr int64_t W = V::kWidth;
  constexpr int M = V::kTokenVecs / G;
  static_assert(M >= 1, "kTokenVecs / G must be at least 1");
  int64_t j = j0;
  for (; j + M * W <= j1; j += M * W) spmm_block<V, G, M, false>(rp, col, val, xt, ldx, n, bias, relu, r, j, y, ldy);
  const int64_t rest = j1 - j;
  if (rest > 0) {
    spmm_rest<V, G, M>(static_cast<int>((rest + W - 1) / W), rest % W != 0, rp, col, val, xt, ldx, n, bias, relu, r,
                       j, y, ldy);
  }
}

// Two rows r, r + 1 with patterns of their own over one vector of samples from j0 (kTail: n - j0 <
// W of them, masked): both rows' nonzeros interleaved, 4 partial sums each (8 independent FMA
// chains), up to the shorter row's length, then each row's rest. With one vector a row's fixed work
// (its bounds, the loop's exit, 4 partial sums added, the store) is paid over only its nonzeros'
// FMAs; two rows share the loop and overlap that work. Against one row at a time, the same
// process, Zen 5, 1 thread: 16 samples, BERT-base's 768 -> 768 at 95 % 1.09x, 768 -> 3072 at 90 %
// 1.13-1.20x, 3072 -> 768 1.03-1.06x; 8 samples 1.05-1.08x; the AVX2 copy at 6-8 samples
// 1.04-1.19x. (Pairs over 2-4 vectors, 24-63 samples, were level or worse: there the fixed work is
// spread already. The build with this function ran 24 and 32 samples, whose code it leaves alone,
// 2-4 % slower and 63 samples 1.24x faster: code placement, not followed further.)
template <class V, bool kTail, class Col>
inline void spmm_pair(const int32_t* rp, const Col* col, const float* val, const float* xt, int64_t ldx, int64_t n,
                      const float* bias, bool relu, int64_t r, int64_t j0, float* y, int64_t ldy) {
  constexpr int64_t W = V::kWidth;
  constexpr int U = 4;
  const Col* c[2] = {col + rp[r], col + rp[r + 1]};
  const float* w[2] = {val + rp[r], val + rp[r + 1]};
  const int64_t len[2] = {rp[r + 1] - rp[r], rp[r + 2] - rp[r + 1]};
  const int64_t m = std::min(len[0], len[1]);
  const auto mk = V::mask(kTail ? n - j0 : W);
  const float* base = xt + j0;
  auto step = [&](int i, int64_t k, typename V::Reg& acc) {
    const float* s = base + static_cast<int64_t>(c[i][k]) * ldx;
    acc = V::fmadd(V::set1(w[i][k]), kTail ? V::maskz_load(mk, s) : V::loadu(s), acc);
  };
  typename V::Reg a[2][U];
  FP_UNROLL
  for (int i = 0; i < 2; ++i) {
    FP_UNROLL
    for (int u = 0; u < U; ++u) a[i][u] = V::zero();
  }
  int64_t t = 0;
  for (; t + U <= m; t += U) {
    FP_UNROLL
    for (int u = 0; u < U; ++u) {
      step(0, t + u, a[0][u]);
      step(1, t + u, a[1][u]);
    }
  }
  FP_UNROLL
  for (int i = 0; i < 2; ++i) {
    for (int64_t k = t; k < len[i]; ++k) step(i, k, a[i][0]);
    typename V::Reg o = V::add(V::add(a[i][0], a[i][1]), V::add(a[i][2], a[i][3]));
    if (bias != nullptr) o = V::add(o, V::set1(bias[r + i]));
    if (relu) o = V::max0(o);
    float* out = y + (r + i) * ldy + j0;
    if (kTail) {
      V::mask_store(out, mk, o);
    } else {
      V::storeu(out, o);
    }
  }
}

// Rows [r0, r1) over one vector of samples from j0 (n - j0 <= W): consecutive rows with patterns of
// their own in pairs (spmm_pair), shared-pattern groups as in spmm_tokens.
template <class V, class Col>
void spmm_one_vector(const int32_t* rp, const int32_t* runs, const Col* col, const float* val, const float* xt,
                     int64_t ldx, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, int64_t j0,
                     float* y, int64_t ldy) {
  const bool tail = n - j0 < V::kWidth;
  auto single = [&](int64_t r) { spmm_span<V, 1>(rp, col, val, xt, ldx, n, bias, relu, r, j0, n, y, ldy); };
  auto shared = [&](int64_t r, auto g) {
    spmm_span<V, decltype(g)::value>(rp, col, val, xt, ldx, n, bias, relu, r, j0, n, y, ldy);
  };
  int64_t held = -1;  // a row waiting for the next one
  for_row_groups(runs, r0, r1, shared, [&](int64_t r) {
    if (held >= 0 && held == r - 1) {
      if (tail) {
        spmm_pair<V, true>(rp, col, val, xt, ldx, n, bias, relu, held, j0, y, ldy);
      } else {
        spmm_pair<V, false>(rp, col, val, xt, ldx, n, bias, relu, held, j0, y, ldy);
      }
      held = -1;
      return;
    }
    if (held >= 0) single(held);
    held = r;
  });
  if (held >= 0) single(held);
}

template <class V, class Col>
void spmm_tokens(const int32_t* rp, const int32_t* runs, const Col* col, const float* val, const float* xt,
                 int64_t ldx, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  constexpr int64_t B = V::kTokenVecs * V::kWidth;
  for (int64_t j0 = 0; j0 < n; j0 += B) {
    const int64_t j1 = std::min(n, j0 + B);
    if (j1 - j0 <= V::kWidth) {  // (only where j1 == n)
      spmm_one_vector<V>(rp, runs, col, val, xt, ldx, n, bias, relu, r0, r1, j0, y, ldy);
      continue;
    }
    auto shared = [&](int64_t r, auto g) {
      spmm_span<V, decltype(g)::value>(rp, col, val, xt, ldx, n, bias, relu, r, j0, j1, y, ldy);
    };
    for_row_groups(runs, r0, r1, shared, [&](int64_t r) {
      spmm_span<V, 1>(rp, col, val, xt, ldx, n, bias, relu, r, j0, j1, y, ldy);
    });
  }
}

// (K and bad: the table's signature, which the portable copy's range checks use)
template <class V>
void spmm_t(const int32_t* rp, const int32_t* runs, const void* col, bool wide, const float* val, const float* xt,
            int64_t ldx, int64_t /*K*/, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y,
            int64_t ldy, bool* /*bad*/) {
  if (wide) {
    spmm_tokens<V>(rp, runs, static_cast<const int32_t*>(col), val, xt, ldx, n, bias, relu, r0, r1, y, ldy);
  } else {
    spmm_tokens<V>(rp, runs, static_cast<const uint16_t*>(col), val, xt, ldx, n, bias, relu, r0, r1, y, ldy);
  }
}

// Rows [r0, r1) of the many-sample product on one full block of NV vectors of samples, over the
// column panels of the input block xb (K, NV * W): R rows at a time (R x NV independent FMA
// chains: with one row over 4 vectors, 4 chains of 4-cycle FMAs bound the loop), first over the
// nonzeros both rows have in the panel, then each row's rest; the accumulators go through y (O,
// NV * W) between panels, bias and ReLU after the last. pst[r * (np + 1) + p]: the first nonzero of
// row r in panel p of kPanelCols columns; the loop's panel is [p, p1) of those (V::kPanelMerge of
// them). (Columns are read unchecked, as in spmm_block.) Every loop over rows and vectors is
// unrolled (FP_UNROLL): without it GCC kept acc on the stack, 8 zmm stores and loads a call (768 ->
// 3072 at 128 / 512 rows 1.04-1.11x, sparse_ffn 1.04-1.08x with, Zen 5; the AVX2 copy level-1.04x).
template <class V, int R, int NV, class Col>
inline void panel_rows(const int32_t* pst, int64_t np1, int64_t p, int64_t p1, const Col* col, const float* val,
                       const float* x, int64_t r, float* y, bool first, bool last, const float* bias, int act) {
  constexpr int64_t W = V::kWidth, L = NV * W;
  typename V::Reg acc[R][NV];
  int64_t k[R], e[R];
  int64_t m = std::numeric_limits<int64_t>::max();
  FP_UNROLL
  for (int i = 0; i < R; ++i) {
    k[i] = pst[(r + i) * np1 + p];
    e[i] = pst[(r + i) * np1 + p1];
    m = std::min(m, e[i] - k[i]);
    // (the row kPanelPrefetchRows ahead, in this panel: its first 32 values and columns. A row's
    // segment of a panel is a short run a row's length from the last one's, which the hardware
    // prefetchers do not follow well from memory. After a cache-evicting call, medians, the same
    // process, Zen 5: 3072 -> 768 at 512 rows 2.29 -> 2.11 ms with the transpose's prefetch, 2.71
    // -> 2.54 without; within 1 % with warm caches.)
    const int64_t ahead = pst[(r + i + kPanelPrefetchRows) * np1 + p];
    __builtin_prefetch(val + ahead, 0, 3);
    __builtin_prefetch(val + ahead + 16, 0, 3);
    __builtin_prefetch(col + ahead, 0, 3);
    FP_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? V::zero() : V::loadu(y + (r + i) * L + v * W);
  }
  for (int64_t t = 0; t < m; ++t) {
    FP_UNROLL
    for (int i = 0; i < R; ++i) {
      const float* s = x + static_cast<int64_t>(col[k[i] + t]) * L;
      const typename V::Reg b = V::set1(val[k[i] + t]);
      FP_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(b, V::loadu(s + v * W), acc[i][v]);
    }
  }
  FP_UNROLL
  for (int i = 0; i < R; ++i) {
    for (int64_t q = k[i] + m; q < e[i]; ++q) {
      const float* s = x + static_cast<int64_t>(col[q]) * L;
      const typename V::Reg b = V::set1(val[q]);
      FP_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(b, V::loadu(s + v * W), acc[i][v]);
    }
    const typename V::Reg b = last && bias != nullptr ? V::set1(bias[r + i]) : V::zero();
    FP_UNROLL
    for (int v = 0; v < NV; ++v) {
      typename V::Reg a = last ? V::add(acc[i][v], b) : acc[i][v];
      if (last && act == kActRelu) a = V::max0(a);
      if (last && act == kActGelu) a = V::gelu(a);
      V::storeu(y + (r + i) * L + v * W, a);
    }
  }
}

template <class V, class Col>
void spmm_panels_t(const int32_t* pst, int64_t np, const Col* col, const float* val,
                   const float* xb, const float* bias, int act, int64_t r0, int64_t r1, float* y) {
  constexpr int NV = kPanelVecs;
  const int64_t np1 = np + 1;
  constexpr int64_t step = V::kPanelMerge;  // panels of kPanelCols walked as one
  for (int64_t p = 0; p < np; p += step) {
    const int64_t p1 = std::min(np, p + step);
    const bool first = p == 0, last = p1 == np;
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) panel_rows<V, 2, NV>(pst, np1, p, p1, col, val, xb, r, y, first, last, bias, act);
    for (; r < r1; ++r) panel_rows<V, 1, NV>(pst, np1, p, p1, col, val, xb, r, y, first, last, bias, act);
  }
}

template <class V>
void spmm_panels_any(const int32_t* pst, int64_t np, const void* col, bool wide,
                     const float* val, const float* xb, const float* bias, int act, int64_t r0, int64_t r1, float* y) {
  if (wide) {
    spmm_panels_t<V>(pst, np, static_cast<const int32_t*>(col), val, xb, bias, act, r0, r1, y);
  } else {
    spmm_panels_t<V>(pst, np, static_cast<const uint16_t*>(col), val, xb, bias, act, r0, r1, y);
  }
}

// SparseKernels::gelu: x[i] = V::gelu(x[i]) for i < n.
template <class V>
void gelu_t(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::storeu(x + i, V::gelu(V::loadu(x + i)));
  if (i < n) {
    const auto m = V::mask(n - i);
    V::mask_store(x + i, m, V::gelu(V::maskz_load(m, x + i)));
  }
}

// SparseKernels::tile_finish, vectorised.
template <class V>
void tile_finish_t(const float* src, int64_t lds, float* out, int64_t ldo, int64_t rows, int64_t n, const float* bias,
                   const float* res, int64_t ldr, bool relu) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j0 = 0; j0 < n; j0 += V::kWidth) {
      const auto m = V::mask(n - j0 < V::kWidth ? n - j0 : V::kWidth);
      typename V::Reg a = V::maskz_load(m, src + i * lds + j0);
      if (bias != nullptr) a = V::add(a, V::set1(bias[i]));
      if (res != nullptr) a = V::add(a, V::maskz_load(m, res + i * ldr + j0));
      V::mask_store(out + i * ldo + j0, m, relu ? V::max0(a) : a);
    }
  }
}

// Stores row r's vector of results at position q as ConvOut says (sparse_core.h).
template <class V>
inline void conv_store(const ConvOut<float>& o, int64_t r, int64_t q, typename V::Reg acc) {
  float* p = o.out + r * o.ldo + q;
  if (!o.direct) {
    V::storeu(p, acc);
    return;
  }
  if (o.bias != nullptr) acc = V::add(acc, V::set1(o.bias[r]));
  const float* res = o.residual != nullptr ? o.residual + r * o.ldo + q : nullptr;
  if (q + V::kWidth <= o.q_len) {
    if (res != nullptr) acc = V::add(acc, V::loadu(res));
    V::storeu(p, o.relu ? V::max0(acc) : acc);
    return;
  }
  const auto m = V::mask(o.q_len - q);  // the last vector: nothing read or written past q_len
  if (res != nullptr) acc = V::add(acc, V::maskz_load(m, res));
  V::mask_store(p, m, o.relu ? V::max0(acc) : acc);
}

// One tile of T vectors of output positions from q0 for G rows r.. sharing one pattern of tap
// offsets: per nonzero, T input vectors loaded once feed G x T FMAs (the one-row loop below does one
// FMA per load and is bound by the loads; sharing makes it bound by the FMAs).
// (Tail vectors read whole vectors past q_len, within the input's slack. Masking those loads made
// the 4-row 7x7 tiles 2.2x slower on Zen 4: 0.37 vs 0.17 ms for 1x1 512 -> 2048 at 90 %.)
template <class V, int G, int T>
inline void conv_tile(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t q0,
                      int64_t r, const ConvOut<float>& out) {
  constexpr int64_t W = V::kWidth;
  const int64_t k0 = rp[r], len = rp[r + 1] - k0;
  const int32_t* o = off + k0;
  const float* w[G];
  FP_UNROLL
  for (int i = 0; i < G; ++i) w[i] = val + rp[r + i];
  typename V::Reg acc[G][T];
  FP_UNROLL
  for (int i = 0; i < G; ++i) {
    FP_UNROLL
    for (int t = 0; t < T; ++t) acc[i][t] = V::zero();
  }
  const float* base = xin + q0;
  for (int64_t k = 0; k < len; ++k) {
    const float* s = base + o[k];
    typename V::Reg x[T];
    FP_UNROLL
    for (int t = 0; t < T; ++t) x[t] = V::loadu(s + t * W);
    FP_UNROLL
    for (int i = 0; i < G; ++i) {
      const typename V::Reg v = V::set1(w[i][k]);
      FP_UNROLL
      for (int t = 0; t < T; ++t) acc[i][t] = V::fmadd(v, x[t], acc[i][t]);
    }
  }
  FP_UNROLL
  for (int i = 0; i < G; ++i) {
    FP_UNROLL
    for (int t = 0; t < T; ++t) conv_store<V>(out, r + i, q0 + t * W, acc[i][t]);
  }
}

// The last, partial tile of G rows: only the vectors that hold positions below q_len (on 7x7 and
// 14x14 planes a whole 64-position tile would waste up to a quarter of the work).
template <class V, int G>
inline void conv_tail(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t q0,
                      int64_t r, const ConvOut<float>& out) {
  switch ((out.q_len - q0 + V::kWidth - 1) / V::kWidth) {
    case 1: conv_tile<V, G, 1>(rp, off, val, xin, q0, r, out); break;
    case 2: conv_tile<V, G, 2>(rp, off, val, xin, q0, r, out); break;
    case 3: conv_tile<V, G, 3>(rp, off, val, xin, q0, r, out); break;
    default: conv_tile<V, G, 4>(rp, off, val, xin, q0, r, out); break;
  }
}

template <class V, int G>
inline void conv_group(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t r,
                       const ConvOut<float>& out) {
  constexpr int64_t step = V::kGroupVecs * V::kWidth;
  int64_t q0 = 0;
  for (; q0 + step <= out.q_len; q0 += step) conv_tile<V, G, V::kGroupVecs>(rp, off, val, xin, q0, r, out);
  if (q0 < out.q_len) conv_tail<V, G>(rp, off, val, xin, q0, r, out);
}

// The sparse direct convolution (see sparse_conv_impl.h for the layout): out[r * ldo + q] =
// sum_k val[k] * xin[off[k] + q], in steps of 4 vectors of output positions held in registers, two
// nonzeros per step into two accumulator sets (8 independent FMA chains); the last partial step
// computes only the vectors it needs (xin has the slack of whole vectors). Rows that share a pattern
// (runs) go 4 or 2 at a time through conv_group. Results are stored as ConvOut says.
template <class V>
void conv_rows_simd(const int32_t* rp, const int32_t* runs, const int32_t* off, const float* val, const float* xin,
                    int64_t r0, int64_t r1, const ConvOut<float>& out) {
  constexpr int64_t W = V::kWidth;
  const int64_t q_len = out.q_len;
  const int64_t q_full = q_len / (4 * W) * (4 * W);
  auto shared = [&](int64_t r, auto g) { conv_group<V, decltype(g)::value>(rp, off, val, xin, r, out); };
  for_row_groups(runs, r0, r1, shared, [&](int64_t r) {
    if (q_full < q_len) conv_tail<V, 1>(rp, off, val, xin, q_full, r, out);
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    for (int64_t q0 = 0; q0 < q_full; q0 += 4 * W) {
      typename V::Reg a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      typename V::Reg b0 = V::zero(), b1 = V::zero(), b2 = V::zero(), b3 = V::zero();
      const float* base = xin + q0;
      int64_t k = k0;
      for (; k + 2 <= k1; k += 2) {
        const float* s0 = base + off[k];
        const float* s1 = base + off[k + 1];
        const typename V::Reg v0 = V::set1(val[k]), v1 = V::set1(val[k + 1]);
        a0 = V::fmadd(v0, V::loadu(s0), a0);
        a1 = V::fmadd(v0, V::loadu(s0 + W), a1);
        a2 = V::fmadd(v0, V::loadu(s0 + 2 * W), a2);
        a3 = V::fmadd(v0, V::loadu(s0 + 3 * W), a3);
        b0 = V::fmadd(v1, V::loadu(s1), b0);
        b1 = V::fmadd(v1, V::loadu(s1 + W), b1);
        b2 = V::fmadd(v1, V::loadu(s1 + 2 * W), b2);
        b3 = V::fmadd(v1, V::loadu(s1 + 3 * W), b3);
      }
      if (k < k1) {
        const float* s0 = base + off[k];
        const typename V::Reg v0 = V::set1(val[k]);
        a0 = V::fmadd(v0, V::loadu(s0), a0);
        a1 = V::fmadd(v0, V::loadu(s0 + W), a1);
        a2 = V::fmadd(v0, V::loadu(s0 + 2 * W), a2);
        a3 = V::fmadd(v0, V::loadu(s0 + 3 * W), a3);
      }
      conv_store<V>(out, r, q0, V::add(a0, b0));
      conv_store<V>(out, r, q0 + W, V::add(a1, b1));
      conv_store<V>(out, r, q0 + 2 * W, V::add(a2, b2));
      conv_store<V>(out, r, q0 + 3 * W, V::add(a3, b3));
    }
  });
}

}  // namespace sparse
}  // namespace fastprune
