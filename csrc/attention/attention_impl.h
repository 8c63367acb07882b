// The portable attention loops (any T): the scalar table's float32 copy and the float64 path.
// One query row at a time: scores against every key (K^T rows, contiguous along the keys), the
// scaled and masked scores' softmax weights (attention_core.h), then the weighted sum of V's rows.
#pragma once

#include <cstdint>

#include "attention/attention_core.h"

namespace fastprune {
namespace attention {

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (K into K^T; float32 takes the sparse
// kernels' register transposes)
template <typename T>
void transpose_portable(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
  }
}

template <typename T>
void rows_portable(const T* q, int64_t ldq, const T* kt, int64_t ldkt, const T* v, int64_t ldv, const T* mask,
                   int64_t ldm, int64_t nq, int64_t S, int64_t E, int64_t Ev, T scale, T* sc, T* out, int64_t ldo) {
  for (int64_t i = 0; i < nq; ++i) {
    T* s = sc + i * ldkt;
    for (int64_t j = 0; j < S; ++j) s[j] = T(0);
    for (int64_t d = 0; d < E; ++d) {
      const T qd = q[i * ldq + d];
      const T* kr = kt + d * ldkt;
      for (int64_t j = 0; j < S; ++j) s[j] += qd * kr[j];
    }
    T m = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      const T x = s[j] * scale + (mask != nullptr ? mask[i * ldm + j] : T(0));
      s[j] = x;
      m = (x > m || x != x) ? x : m;  // (a NaN score makes m NaN: the row's output is NaN)
    }
    T sum = T(0);
    for (int64_t j = 0; j < S; ++j) {
      s[j] = softmax_weight(s[j], m);
      sum += s[j];
    }
    T* o = out + i * ldo;
    for (int64_t e = 0; e < Ev; ++e) o[e] = T(0);
    for (int64_t j = 0; j < S; ++j) {
      const T p = s[j];
      const T* vr = v + j * ldv;
      for (int64_t e = 0; e < Ev; ++e) o[e] += p * vr[e];
    }
    for (int64_t e = 0; e < Ev; ++e) o[e] = finish_row(o[e], sum);
  }
}

}  // namespace attention
}  // namespace fastprune
