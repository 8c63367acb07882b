// Arithmetic shared by the CPU and CUDA Woodbury kernels (FP_HOST_DEVICE templates).
//
// Block layout: a flattened parameter vector of length d is cut into nb = ceil(d / B) blocks of
// B consecutive coordinates. Block b covers columns [b*B, b*B + valid(b)) of the (N, d) gradient
// matrix; the last block may be short (valid < B): its padded coordinates are decoupled from the
// rest and hold exactly 1/damp on the diagonal of the inverse.
//
// Precision: float32 products are exact in float64 (24 + 24 < 53 mantissa bits), so every
// accumulation below runs in the accumulator type Acc (double for float32 inputs). A float32
// accumulator is not accurate enough on low-rank gradients at small damp: the inverse amplifies
// Gram errors by about ||F|| / damp (see tests/ops/test_woodbury.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace fastprune {
namespace woodbury {

FP_HOST_DEVICE inline int64_t num_blocks(int64_t d, int64_t block) { return (d + block - 1) / block; }

// Number of real (unpadded) coordinates in block b.
FP_HOST_DEVICE inline int64_t block_valid(int64_t d, int64_t block, int64_t b) {
  const int64_t rest = d - b * block;
  return rest < block ? rest : block;
}

// Register tile of C += A^T B where A is (K, >= MR) and B is (K, >= NR), both row-major with
// leading dimensions lda and ldb ("k-major panels"). This one loop nest is the Gram (syrk: A = B),
// the G F product and the V^T V downdate. Compiled per ISA; with fixed MR, NR the compiler keeps
// acc in vector registers and emits broadcast-FMAs.
template <int MR, int NR, typename T>
FP_HOST_DEVICE inline void gemm_tn_tile(const T* FP_RESTRICT a, int64_t lda, const T* FP_RESTRICT b,
                                        int64_t ldb, int64_t K, T* FP_RESTRICT c, int64_t ldc) {
  T acc[MR][NR];
  FP_UNROLL
  for (int i = 0; i < MR; ++i) {
    FP_UNROLL
    for (int j = 0; j < NR; ++j) acc[i][j] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* ak = a + k * lda;
    const T* bk = b + k * ldb;
    FP_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T ai = ak[i];
      FP_UNROLL
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * bk[j];
    }
  }
  FP_UNROLL
  for (int i = 0; i < MR; ++i) {
    FP_UNROLL
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += acc[i][j];
  }
}

// F = gram / num_samples + damp * I, on the upper triangle of an n x n row-major matrix.
template <typename T>
FP_HOST_DEVICE inline void gram_to_fisher_upper(T* g, int64_t n, int64_t ld, T inv_samples, T damp) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) g[i * ld + j] *= inv_samples;
    g[i * ld + i] += damp;
  }
}

// In-place Cholesky A = U^T U on the upper triangle of a row-major n x n matrix (equivalently
// A = L L^T with L = U^T in column-major terms). Returns 0, or k + 1 if pivot k is not positive
// or not finite. The CPU path factors 32 x 32 diagonal blocks with it (woodbury_cpu.cpp).
template <typename T>
FP_HOST_DEVICE inline int64_t cholesky_upper(T* a, int64_t n, int64_t ld) {
  for (int64_t k = 0; k < n; ++k) {
    T pivot = a[k * ld + k];
    if (!(pivot > T(0)) || !(pivot < T(INFINITY))) return k + 1;
    pivot = sqrt(pivot);
    a[k * ld + k] = pivot;
    const T inv = T(1) / pivot;
    for (int64_t j = k + 1; j < n; ++j) a[k * ld + j] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      const T uki = a[k * ld + i];
      for (int64_t j = i; j < n; ++j) a[i * ld + j] -= uki * a[k * ld + j];
    }
  }
  return 0;
}

}  // namespace woodbury
}  // namespace fastprune
