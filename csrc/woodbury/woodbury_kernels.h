// Per-ISA copies of the one hot loop nest (C += A^T B on float64 panels). Each
// woodbury_kernels_<isa>.cpp compiles woodbury_kernels_impl.h with its own -m flags and tile
// sizes; gemm_kernels() returns the table for the ISA chosen at run time.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace fastprune {
namespace woodbury {

// Panels are padded by the caller so that m and n are multiples of kPanelAlign.
constexpr int64_t kPanelAlign = 16;
// Pivot block of the symmetric sweep (woodbury_cpu.cpp): rank-32 trailing updates.
constexpr int64_t kSweepBlock = 32;

struct GemmKernels {
  // C[0:m, 0:n] += A^T B for A (K x m, row stride lda), B (K x n, row stride ldb), C row stride ldc.
  // upper_only: skip register tiles lying wholly below the diagonal (a symmetric product whose
  // lower triangle the caller never reads): the Gram then costs half a GEMM.
  void (*gemm_tn)(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t K, int64_t m,
                  int64_t n, double* c, int64_t ldc, bool upper_only);
  // dst[c] = (double)src[c] for c < n; returns false if any value is NaN or Inf.
  bool (*convert_f32)(const float* src, int64_t n, double* dst);
  bool (*convert_f64)(const double* src, int64_t n, double* dst);
  // In-place sweep of a kSweepBlock x kSweepBlock symmetric matrix (row stride kSweepBlock) whose
  // rows and columns past n are zero: leaves -P^{-1} in the leading n x n part. Returns 0, or
  // p + 1 if pivot p is not positive and finite.
  int64_t (*sweep_small)(double* p, int64_t n);
  // dst[c] = (T)src[c] for c < n.
  void (*store_f32)(const double* src, int64_t n, float* dst);
  const char* name;
};

const GemmKernels& gemm_kernels(Isa isa);

namespace scalar { extern const GemmKernels kKernels; }
namespace avx2 { extern const GemmKernels kKernels; }
namespace avx512 { extern const GemmKernels kKernels; }

}  // namespace woodbury
}  // namespace fastprune
