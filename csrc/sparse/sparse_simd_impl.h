// The vector loops shared by the AVX2 and AVX-512 copies, written once over a traits type V that
// each sparse_kernels_<isa>.cpp defines (in an anonymous namespace, so every instantiation stays
// inside its own translation unit and its own -m flags). V provides: Reg, Mask, kWidth, zero(),
// set1(f), loadu(p), storeu(p, v), fmadd(a, b, c), add(a, b), max0(v), mask(w) (first w lanes),
// maskz_load(m, p), mask_store(p, m, v).
#pragma once

#include <cstdint>

#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {

// Rows [r0, r1) of Y^T = act(W X + b), vectorised along the n samples (xt: X^T (K, n), row stride
// ldx; yt (O, n), row stride ldy); four accumulators hide the FMA latency when one vector covers
// all samples. Columns are range-checked (clamped, *bad set).
template <class V>
void spmm_t(const int32_t* rp, const void* col, bool wide, const float* val, const float* xt, int64_t ldx, int64_t K,
            int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy, bool* bad) {
  auto column = [&](int64_t k) {
    int64_t c = col_at(col, wide, k);
    if (c >= K || c < 0) {
      *bad = true;
      c = K - 1;
    }
    return c;
  };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    for (int64_t j0 = 0; j0 < n; j0 += V::kWidth) {
      const auto m = V::mask(n - j0 < V::kWidth ? n - j0 : V::kWidth);
      typename V::Reg a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        const int64_t c0 = column(k), c1 = column(k + 1), c2 = column(k + 2), c3 = column(k + 3);
        a0 = V::fmadd(V::set1(val[k]), V::maskz_load(m, xt + c0 * ldx + j0), a0);
        a1 = V::fmadd(V::set1(val[k + 1]), V::maskz_load(m, xt + c1 * ldx + j0), a1);
        a2 = V::fmadd(V::set1(val[k + 2]), V::maskz_load(m, xt + c2 * ldx + j0), a2);
        a3 = V::fmadd(V::set1(val[k + 3]), V::maskz_load(m, xt + c3 * ldx + j0), a3);
      }
      for (; k < k1; ++k) a0 = V::fmadd(V::set1(val[k]), V::maskz_load(m, xt + column(k) * ldx + j0), a0);
      typename V::Reg acc = V::add(V::add(a0, a1), V::add(a2, a3));
      if (bias != nullptr) acc = V::add(acc, V::set1(bias[r]));
      if (relu) acc = V::max0(acc);
      V::mask_store(y + r * ldy + j0, m, acc);
    }
  }
}

// The sparse direct convolution (see sparse_conv_impl.h for the layout): out_wide[r * ldo + q] =
// sum_k val[k] * xin[off[k] + q], in steps of 4 vectors of output positions held in registers, two
// nonzeros per step into two accumulator sets (8 independent FMA chains). q runs over whole tiles of
// 64 positions (xin and out_wide have the slack).
template <class V>
void conv_rows_simd(const int32_t* rp, const int32_t* off, const float* val, const float* xin, int64_t q_len,
                    int64_t r0, int64_t r1, float* out_wide, int64_t ldo) {
  constexpr int64_t W = V::kWidth;
  const int64_t q_end = (q_len + 63) / 64 * 64;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    float* orow = out_wide + r * ldo;
    for (int64_t q0 = 0; q0 < q_end; q0 += 4 * W) {
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
      V::storeu(orow + q0, V::add(a0, b0));
      V::storeu(orow + q0 + W, V::add(a1, b1));
      V::storeu(orow + q0 + 2 * W, V::add(a2, b2));
      V::storeu(orow + q0 + 3 * W, V::add(a3, b3));
    }
  }
}

}  // namespace sparse
}  // namespace fastprune
