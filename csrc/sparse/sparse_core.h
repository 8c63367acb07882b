// Index math of the CSR sparse ops, shared by the CPU loops and the CUDA kernels.
//
// Packed format (pack_sparse): a weight (O, K) becomes
//   row_ptr (O + 1) int32: the nonzeros of row o are k in [row_ptr[o], row_ptr[o + 1]);
//   col_idx (nnz) int16 when K <= 65536 (read as uint16: batch-1 products are memory-bound and
//           16-bit columns cut the bytes per nonzero from 8 to 6), else int32;
//   values  (nnz) the weight's dtype.
// For a convolution the K columns index the flattened (C / groups, kh, kw) filter, a
// shape-independent form; the conv kernels derive input offsets from it per input geometry.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace fastprune {
namespace sparse {

// Largest K whose columns fit the 16-bit form.
constexpr int64_t kNarrowMaxK = 65536;

FP_HOST_DEVICE inline int64_t col_at(const void* col, bool wide, int64_t k) {
  return wide ? static_cast<int64_t>(static_cast<const int32_t*>(col)[k])
              : static_cast<int64_t>(static_cast<const uint16_t*>(col)[k]);
}

// Four consecutive nonzeros (values and columns) from k on, k a multiple of 4. PlainLoad4 reads them
// one by one (the host; any alignment); the CUDA file adds a float4 / ushort4 / int4 loader.
struct PlainLoad4 {
  template <typename T>
  FP_HOST_DEVICE static void load(const T* val, const void* col, bool wide, int64_t k, T* v, int64_t* c) {
    for (int i = 0; i < 4; ++i) {
      v[i] = val[k + i];
      c[i] = col_at(col, wide, k + i);
    }
  }
};

// val * x at column c, the column range-checked (see csr_partial_dot).
template <typename T, typename Acc>
FP_HOST_DEVICE inline Acc checked_product(T v, int64_t c, const T* x, int64_t x_stride, int64_t K, bool* bad) {
  if (c >= K || c < 0) {
    *bad = true;
    c = K - 1;
  }
  return static_cast<Acc>(v) * static_cast<Acc>(x[c * x_stride]);
}

// Partial dot product of CSR row r with x (x[c * x_stride]) in steps of 4 consecutive nonzeros
// (Sputnik's vector loads): lane takes the 4-aligned groups lane, lane + nlanes, ... of the row's
// body, loaded by Load4 (16-byte loads on the GPU), and its share of the up to 3 nonzeros before and
// after the body (lane 0 of 1 on the CPU; one lane per thread of a warp on the GPU). Columns >= K
// read x[K - 1] (and negative ones) and set *bad (the caller reports the packed weight as made for
// another shape).
template <typename T, typename Acc, class Load4 = PlainLoad4>
FP_HOST_DEVICE inline Acc csr_partial_dot(const int32_t* row_ptr, const void* col, bool wide, const T* val,
                                           const T* x, int64_t x_stride, int64_t K, int64_t r, int64_t lane,
                                           int64_t nlanes, bool* bad) {
  const int64_t k0 = row_ptr[r], k1 = row_ptr[r + 1];
  const int64_t a0 = (k0 + 3) / 4 * 4 < k1 ? (k0 + 3) / 4 * 4 : k1;
  const int64_t a1 = k1 / 4 * 4 > a0 ? k1 / 4 * 4 : a0;
  Acc acc = Acc(0);
  for (int64_t k = k0 + lane; k < a0; k += nlanes) {
    acc += checked_product<T, Acc>(val[k], col_at(col, wide, k), x, x_stride, K, bad);
  }
  for (int64_t k = a1 + lane; k < k1; k += nlanes) {
    acc += checked_product<T, Acc>(val[k], col_at(col, wide, k), x, x_stride, K, bad);
  }
  for (int64_t k = a0 + 4 * lane; k < a1; k += 4 * nlanes) {
    T v[4];
    int64_t c[4];
    Load4::load(val, col, wide, k, v, c);
    for (int i = 0; i < 4; ++i) acc += checked_product<T, Acc>(v[i], c[i], x, x_stride, K, bad);
  }
  return acc;
}

// Column of a packed conv filter -> (channel within the group, kernel row, kernel column).
struct Tap {
  int64_t c, i, j;
};
FP_HOST_DEVICE inline Tap decode_tap(int64_t col, int64_t kh, int64_t kw) {
  return Tap{col / (kh * kw), (col / kw) % kh, col % kw};
}

// Where a conv loop puts row r's results at positions q < q_len (see sparse_conv_impl.h):
// direct == false: plain stores into the wide buffer (row stride ldo, with the slack of whole
//   vectors past q_len; the caller applies bias, residual and ReLU while copying out);
// direct == true: the final output of one sample, (O, q_len) with ldo == q_len (possible when the
//   wide grid has no junk columns), bias, residual (same layout) and ReLU applied, nothing written
//   at or past q_len.
template <typename T>
struct ConvOut {
  T* out;
  int64_t ldo, q_len;
  const T* bias;
  const T* residual;
  bool relu, direct;
};

// Bias and the optional fused ReLU applied to one output.
template <typename Acc>
FP_HOST_DEVICE inline Acc finish_output(Acc acc, const Acc* bias_or_null, int64_t r, bool relu) {
  if (bias_or_null != nullptr) acc += bias_or_null[r];
  return (relu && acc < Acc(0)) ? Acc(0) : acc;
}

// The exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)), as the many-sample kernels apply it to their
// accumulators (sparse_ffn's up layer): erf(z) for z = |x| / sqrt 2 in [0, 4) is a degree-7 polynomial
// in t = z - c on each of 8 intervals [i / 2, i / 2 + 1/2) (c their centres); kErfPoly[d][i] is interval
// i's coefficient of t^d, a least-squares fit to erf on 200 Chebyshev nodes per interval, in float64
// (max |error| 9.2e-8 in float32 over [0, 6], 1.5 units in the last place near 1; erf(4) is 1 in
// float32, so z >= 4 evaluates the last interval at its end). The vector copies look the
// coefficients up with one permute per degree (V256::gelu, V512::gelu in sparse_kernels_avx2/avx512.cpp):
// z = min(|x| / sqrt 2, kErfZMax), i = int(2 z), t = z - (i / 2 + 1/4), erf by Horner in t,
// gelu = x / 2 + (x / 2) * copysign(erf, x).
constexpr int kErfIntervals = 8, kErfDegree = 7;
constexpr float kErfZMax = 3.99999976f;  // the largest float below 4
constexpr float kErfPoly[kErfDegree + 1][kErfIntervals] = {
    {0.276326388f, 0.711155653f, 0.92290014f, 0.986671686f, 0.998537302f, 0.999899387f, 0.999995708f, 0.999999881f},
    {1.06001413f, 0.642931044f, 0.236521125f, 0.0527749956f, 0.00714231934f, 0.000586277281f, 2.91890119e-05f, 8.81428832e-07f},
    {-0.265002966f, -0.482198149f, -0.295651734f, -0.092356205f, -0.0160701573f, -0.00161226746f, -9.48693341e-05f, -3.30607099e-06f},
    {-0.309170485f, 0.0267883502f, 0.167535886f, 0.0901573896f, 0.0217245128f, 0.00276038027f, 0.000195812623f, 7.97032772e-06f},
    {0.126934558f, 0.150675625f, -0.00613203505f, -0.048105523f, -0.0190882571f, -0.00325771049f, -0.000286169437f, -1.37854095e-05f},
    {0.0800362676f, -0.0532170907f, -0.0471865535f, 0.00661847321f, 0.0106600598f, 0.00275629107f, 0.000313628843f, 1.83300581e-05f},
    {-0.0393407941f, -0.0265828297f, 0.0205977373f, 0.00904949475f, -0.00277956505f, -0.00166785053f, -0.000273758429f, -2.06924196e-05f},
    {-0.0158033706f, 0.017885495f, 0.00374511047f, -0.00593309943f, -0.000721526972f, 0.000635815435f, 0.00017359652f, 1.71447373e-05f},
};

// Geometry of one max_pool2d call: input (N, C, H, W), kernel kh x kw, stride, padding, output Hout x Wout.
struct PoolGeometry {
  int64_t N, C, H, W, kh, kw, sh, sw, ph, pw, Hout, Wout;
};

// Max pooling (max_pool2d): the running max of a window, NaN-propagating like torch's (a NaN anywhere
// in the window is the result), and the optional ReLU after it (which keeps NaN, as torch.relu does).
// A window starts at -inf; with 2 * padding <= kernel it always holds an input element.
template <typename T>
FP_HOST_DEVICE inline T pool_init() {
  return -static_cast<T>(INFINITY);
}
template <typename T>
FP_HOST_DEVICE inline T pool_max(T acc, T v) {
  const T m = v > acc ? v : acc;  // acc when either is NaN; then a NaN v. (Two selects, no branch: both
  return v != v ? v : m;           // vectorise; one select with || compiled to branches, 2x slower)
}
template <typename T>
FP_HOST_DEVICE inline T pool_finish(T acc, bool relu) {
  return (relu && acc < T(0)) ? T(0) : acc;
}
// The input rows (or columns) [*i0, *i1) of output o's window: start o * s - p, length k, clipped to [0, n).
FP_HOST_DEVICE inline void pool_window(int64_t o, int64_t k, int64_t s, int64_t p, int64_t n, int64_t* i0, int64_t* i1) {
  const int64_t a = o * s - p, b = a + k;
  *i0 = a < 0 ? 0 : a;
  *i1 = b > n ? n : b;
}

}  // namespace sparse
}  // namespace fastprune
