// The portable sparse direct convolution loop (the scalar table and the float64 path; the AVX2 and
// AVX-512 tables use the register-tiled conv_rows_simd of sparse_simd_impl.h on the same layout):
//   xin   one sample's input, relaid out into stride phases, each plane (Hph, Wph), zero padded;
//   q     a position of the "wide" output grid (Hout, Wph): q = oh * Wph + ow (ow >= Wout is junk);
//   off   per nonzero, the element offset of its (channel, kh, kw) tap in xin, so that the input
//         of output position q for that tap is xin[off + q]: contiguous in q, for any stride,
//         padding and dilation (the phases turn strided reads into unit-stride ones).
// out[r * ldo + q] = sum_k val[k] * xin[off[k] + q] for rows r in [r0, r1), q in [0, q_len), in
// tiles of kConvTile positions, stored as ConvOut (sparse_core.h) says. xin has 128 floats of slack
// past its end, and so does a wide buffer (ldo and the slack are whole 128-position tiles).
#pragma once

#include <cstdint>

#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {
namespace FP_ISA_NS {

constexpr int64_t kConvTile = 64;

template <typename T>
void conv_rows_t(const int32_t* rp, const int32_t* off, const T* val, const T* xin, int64_t r0, int64_t r1,
                 const ConvOut<T>& o) {
  const int64_t q_len = o.q_len;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = rp[r], k1 = rp[r + 1];
    T* orow = o.out + r * o.ldo;
    for (int64_t q0 = 0; q0 < q_len; q0 += kConvTile) {
      const int64_t n = q_len - q0 < kConvTile ? q_len - q0 : kConvTile;  // nothing read past q_len
      T acc[kConvTile];
      for (int64_t t = 0; t < kConvTile; ++t) acc[t] = T(0);
      for (int64_t k = k0; k < k1; ++k) {
        const T v = val[k];
        const T* src = xin + off[k] + q0;
        for (int64_t t = 0; t < n; ++t) acc[t] += v * src[t];
      }
      if (!o.direct) {
        for (int64_t t = 0; t < kConvTile; ++t) orow[q0 + t] = acc[t];
        continue;
      }
      for (int64_t t = 0; t < kConvTile && q0 + t < q_len; ++t) {
        T y = acc[t] + (o.residual != nullptr ? o.residual[r * o.ldo + q0 + t] : T(0));
        orow[q0 + t] = finish_output<T>(y, o.bias, r, o.relu);
      }
    }
  }
}

}  // namespace FP_ISA_NS
}  // namespace sparse
}  // namespace fastprune
