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
