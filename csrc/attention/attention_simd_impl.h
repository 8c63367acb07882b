// The vector attention loops, compiled once per ISA (attention_kernels_<isa>.cpp, float32) on that
// unit's vector type V. Per block of query rows: (1) scores, R rows x 2 vectors of keys at a time
// (2R independent FMA chains; each K^T row pair loaded once feeds R rows), into sc; (2) per row the
// scaled + masked scores' max, exp (V::exp: exact 0 below exp's range, so -inf masks weigh 0 as in
// torch) and sum, in place; (3) out = P V, R rows x up to 4 vectors of V's columns at a time, each V
// row loaded once for R rows, scaled by 1 / sum at the end. A row whose scores are all -inf gets 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention/attention_core.h"
#include "common/macros.h"
#include "attention/attention_kernels.h"

namespace fastprune {
namespace attention {

// e^r for |r| <= ln 2 / 2 by its degree-7 Taylor polynomial (error below 1e-8 relative), the part of
// V::exp that both ISAs share; V::exp reduces x = n ln 2 + r (ln 2 in two parts, kLn2Hi + kLn2Lo) and
// scales by 2^n its own way.
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f, kExpLow = -87.3f;

template <class V>
inline typename V::Reg exp_reduced(typename V::Reg r) {
  constexpr float c[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  typename V::Reg p = V::set1(c[0]);
  FP_UNROLL
  for (int d = 1; d < 8; ++d) p = V::fmadd(p, r, V::set1(c[d]));
  return p;
}

template <class V, int R>
inline void score_block(const float* q, int64_t ldq, const float* kt, int64_t ldkt, int64_t S, int64_t E, float* sc,
                        int64_t i0) {
  constexpr int64_t W = V::kWidth;
  for (int64_t j = 0; j < S; j += 2 * W) {
    typename V::Reg a[R][2];
    FP_UNROLL
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = V::zero();
    for (int64_t d = 0; d < E; ++d) {
      const typename V::Reg k0 = V::loadu(kt + d * ldkt + j), k1 = V::loadu(kt + d * ldkt + j + W);
      FP_UNROLL
      for (int r = 0; r < R; ++r) {
        const typename V::Reg b = V::set1(q[(i0 + r) * ldq + d]);
        a[r][0] = V::fmadd(b, k0, a[r][0]);
        a[r][1] = V::fmadd(b, k1, a[r][1]);
      }
    }
    FP_UNROLL
    for (int r = 0; r < R; ++r) {
      V::storeu(sc + (i0 + r) * ldkt + j, a[r][0]);
      V::storeu(sc + (i0 + r) * ldkt + j + W, a[r][1]);
    }
  }
}

// row i's softmax weights in place (unnormalised); returns their sum (0: every score -inf; NaN: a NaN score)
template <class V>
inline float softmax_row(float* s, const float* mrow, int64_t S, float scale) {
  constexpr int64_t W = V::kWidth;
  const typename V::Reg sv = V::set1(scale);
  typename V::Reg mx = V::set1(-INFINITY);
  int64_t j = 0;
  for (; j + W <= S; j += W) {
    typename V::Reg x = V::mul(V::loadu(s + j), sv);
    if (mrow != nullptr) x = V::add(x, V::loadu(mrow + j));
    V::storeu(s + j, x);
    mx = V::max(mx, x);
  }
  const int64_t t = S - j;
  if (t > 0) {
    typename V::Reg x = V::mul(V::load_tail(s + j, t, 0.0f), sv);
    if (mrow != nullptr) x = V::add(x, V::load_tail(mrow + j, t, 0.0f));
    x = V::keep(x, t, -INFINITY);
    V::store_tail(s + j, t, x);
    mx = V::max(mx, x);
  }
  const float m = V::hmax(mx);
  if (m == -INFINITY) {  // every score -inf, or NaN ones that the max dropped: NaN propagates
    for (j = 0; j < S; ++j) {
      if (s[j] != s[j]) return NAN;
    }
    return 0.0f;
  }
  const typename V::Reg mv = V::set1(m);
  typename V::Reg sum = V::zero();
  for (j = 0; j + W <= S; j += W) {
    const typename V::Reg p = V::exp(V::sub(V::loadu(s + j), mv));
    V::storeu(s + j, p);
    sum = V::add(sum, p);
  }
  if (t > 0) {
    const typename V::Reg p = V::keep(V::exp(V::sub(V::load_tail(s + j, t, -INFINITY), mv)), t, 0.0f);
    V::store_tail(s + j, t, p);
    sum = V::add(sum, p);
  }
  return V::hsum(sum);
}

// out rows [i0, i0 + R), columns [c0, c0 + NV * W) (the last vector holds tail lanes, tail <= W)
template <class V, int R, int NV>
inline void pv_block(const float* sc, int64_t ldkt, const float* v, int64_t ldv, int64_t S, const float* inv,
                     float* out, int64_t ldo, int64_t i0, int64_t c0, int64_t tail) {
  constexpr int64_t W = V::kWidth;
  typename V::Reg a[R][NV];
  FP_UNROLL
  for (int r = 0; r < R; ++r) {
    FP_UNROLL
    for (int c = 0; c < NV; ++c) a[r][c] = V::zero();
  }
  for (int64_t j = 0; j < S; ++j) {
    const float* vr = v + j * ldv + c0;
    typename V::Reg vv[NV];
    FP_UNROLL
    for (int c = 0; c < NV; ++c) vv[c] = (c == NV - 1 && tail < W) ? V::load_tail(vr + c * W, tail, 0.0f) : V::loadu(vr + c * W);
    FP_UNROLL
    for (int r = 0; r < R; ++r) {
      const typename V::Reg p = V::set1(sc[(i0 + r) * ldkt + j]);
      FP_UNROLL
      for (int c = 0; c < NV; ++c) a[r][c] = V::fmadd(p, vv[c], a[r][c]);
    }
  }
  FP_UNROLL
  for (int r = 0; r < R; ++r) {
    const typename V::Reg iv = V::set1(inv[r]);
    float* o = out + (i0 + r) * ldo + c0;
    FP_UNROLL
    for (int c = 0; c < NV; ++c) {
      const typename V::Reg y = V::mul(a[r][c], iv);
      if (c == NV - 1 && tail < W) {
        V::store_tail(o + c * W, tail, y);
      } else {
        V::storeu(o + c * W, y);
      }
    }
  }
}

template <class V, int R>
inline void pv_rows(const float* sc, int64_t ldkt, const float* v, int64_t ldv, int64_t S, int64_t Ev,
                    const float* inv, float* out, int64_t ldo, int64_t i0) {
  constexpr int64_t W = V::kWidth;
  for (int64_t c0 = 0; c0 < Ev; c0 += 4 * W) {
    const int64_t n = std::min<int64_t>(4 * W, Ev - c0);
    const int64_t nv = (n + W - 1) / W, tail = n - (nv - 1) * W;
    switch (nv) {
      case 4: pv_block<V, R, 4>(sc, ldkt, v, ldv, S, inv, out, ldo, i0, c0, tail); break;
      case 3: pv_block<V, R, 3>(sc, ldkt, v, ldv, S, inv, out, ldo, i0, c0, tail); break;
      case 2: pv_block<V, R, 2>(sc, ldkt, v, ldv, S, inv, out, ldo, i0, c0, tail); break;
      default: pv_block<V, R, 1>(sc, ldkt, v, ldv, S, inv, out, ldo, i0, c0, tail); break;
    }
  }
}

template <class V>
void rows_simd(const float* q, int64_t ldq, const float* kt, int64_t ldkt, const float* v, int64_t ldv,
               const float* mask, int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, float scale, float* sc,
               float* out, int64_t ldo) {
  constexpr int RS = V::kScoreRows, RO = V::kOutRows;
  int64_t i = 0;
  for (; i + RS <= nq; i += RS) score_block<V, RS>(q, ldq, kt, ldkt, S, E, sc, i);
  for (; i < nq; ++i) score_block<V, 1>(q, ldq, kt, ldkt, S, E, sc, i);
  float inv[RO];
  bool dead[RO];
  for (i = 0; i < nq; i += RO) {
    const int64_t r1 = std::min<int64_t>(nq, i + RO);
    for (int64_t r = i; r < r1; ++r) {
      const float sum = softmax_row<V>(sc + r * ldkt, mask != nullptr ? mask + r * ldm : nullptr, S, scale);
      dead[r - i] = sum == 0.0f;
      inv[r - i] = dead[r - i] ? 0.0f : 1.0f / sum;
      if (dead[r - i]) {
        for (int64_t j = 0; j < S; ++j) sc[r * ldkt + j] = 0.0f;
      }
    }
    if (r1 - i == RO) {
      pv_rows<V, RO>(sc, ldkt, v, ldv, S, Ev, inv, out, ldo, i);
    } else {
      for (int64_t r = i; r < r1; ++r) pv_rows<V, 1>(sc, ldkt, v, ldv, S, Ev, inv + (r - i), out, ldo, r);
    }
    // a fully masked row: output 0 (finish_row), whatever V holds
    for (int64_t r = i; r < r1; ++r) {
      if (dead[r - i]) {
        for (int64_t e = 0; e < Ev; ++e) out[r * ldo + e] = 0.0f;
      }
    }
  }
}

}  // namespace attention
}  // namespace fastprune
