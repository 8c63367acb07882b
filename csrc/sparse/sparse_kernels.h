// Per-ISA float32 copies of the CSR product loops (sparse_kernels_<isa>.cpp, each compiled with its
// own -m flags); sparse_kernels(isa) returns the table for the ISA chosen at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_features.h"
#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {

// runs (nullable): runs[r] = how many rows from r on share row r's pattern (its columns, or for a
// convolution its tap offsets), at least 1. The vector loops run up to four such rows together, so
// that every input vector they load (or gather) feeds several rows' FMAs; nullptr: one row at a time.
// The portable loops ignore it.
// columns per panel of the panel starts (pst), and vectors of samples per block, of spmm_panels; an
// ISA's loop walks V::kPanelMerge of those panels as one (AVX2: 1024 columns)
constexpr int64_t kPanelCols = 512;
constexpr int kPanelVecs = 4;
// rows ahead at which the panel loop prefetches a row's values and columns in the panel it is on;
// pst holds that many rows of zeros past the last, so that the prefetch needs no bound
constexpr int64_t kPanelPrefetchRows = 8;
// the activation of spmm_panels' outputs
constexpr int kActNone = 0, kActRelu = 1, kActGelu = 2;

struct SparseKernels {
  // Rows [r0, r1) of y = act(W x + b) for one sample: x (K), y (O). Gathers x at the columns.
  void (*spmv)(const int32_t* row_ptr, const int32_t* runs, const void* col, bool wide, const float* val, const float* x, int64_t K,
               const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad);
  // Rows [r0, r1) of Y^T = act(W X + b) for n samples, vectorised along the samples:
  // xt (K, n) row stride ldx (the input transposed), yt (O, n) row stride ldy (the output transposed:
  // each row's results are one contiguous vector store).
  void (*spmm)(const int32_t* row_ptr, const int32_t* runs, const void* col, bool wide, const float* val, const float* xt, int64_t ldx,
               int64_t K, int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy,
               bool* bad);
  // Rows [r0, r1) of the sparse direct convolution on one sample (see sparse_conv_impl.h):
  // out[r * ldo + q] = sum_k val[k] * xin[off[k] + q] for q < out.q_len, stored as ConvOut says.
  void (*conv_rows)(const int32_t* row_ptr, const int32_t* runs, const int32_t* off, const float* val,
                    const float* xin, int64_t r0, int64_t r1, const ConvOut<float>& out);
  // Rows [0, rows) x positions [0, n) of one tile (n <= 16) of the generated code's output (sparse_jit.h):
  // out[i * ldo + t] = act(src[i * lds + t] + bias[i] + res[i * ldr + t]); bias and res nullable; src may be out.
  void (*tile_finish)(const float* src, int64_t lds, float* out, int64_t ldo, int64_t rows, int64_t n,
                      const float* bias, const float* res, int64_t ldr, bool relu);
  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (the many-sample linear product lays its
  // input and output out with it).
  void (*transpose)(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);
  // Rows [r0, r1) of the many-sample product on one block of panel_samples samples, column panels
  // of kPanelCols x V::kPanelMerge (sparse_simd_impl.h, spmm_panels_t); nullptr where the ISA has none.
  // act: kActNone, kActRelu or kActGelu (the polynomial GELU: kErfPoly, sparse_core.h), applied after the bias.
  void (*spmm_panels)(const int32_t* pst, int64_t np, const void* col, bool wide,
                      const float* val, const float* xb, const float* bias, int act, int64_t r0, int64_t r1,
                      float* y);
  int64_t panel_samples;
  const char* name;
  // samples per block of spmm that one pass over a row keeps in registers (kTokenVecs vectors): the
  // caller lays X^T out in blocks of this many samples (sparse_linear_cpu)
  int64_t spmm_samples;
  // max_pool2d (pool_impl.h): output row oy of one channels-last image x (H, W, C) into row (Wout, C);
  // one NCHW plane x (H, W) into out (Hout, Wout), tmp a row of W floats.
  void (*max_pool_row_cl)(const float* x, const PoolGeometry& g, int64_t oy, bool relu, float* row);
  void (*max_pool_plane)(const float* x, const PoolGeometry& g, bool relu, float* tmp, float* out);
  // x[i] = GELU(x[i]), i < n, by the panel loop's polynomial (kErfPoly), for the rows of a sparse_ffn
  // call that do not take the panels; nullptr where the ISA has no panels.
  void (*gelu)(float* x, int64_t n);
};

const SparseKernels& sparse_kernels(Isa isa);

// Rows [r0, r1) in the steps runs allows: shared(r, std::integral_constant<int, G>{}) for G = 4 or 2
// rows from r that share a pattern, one(r) for a row on its own.
template <class Shared, class One>
inline void for_row_groups(const int32_t* runs, int64_t r0, int64_t r1, Shared shared, One one) {
  for (int64_t r = r0; r < r1;) {
    const int64_t run = runs != nullptr ? std::min<int64_t>(runs[r], r1 - r) : 1;
    if (run >= 4) {
      shared(r, std::integral_constant<int, 4>{});
      r += 4;
    } else if (run >= 2) {
      shared(r, std::integral_constant<int, 2>{});
      r += 2;
    } else {
      one(r);
      r += 1;
    }
  }
}

// A zero-padded per-thread copy of x (K floats) of kNarrowMaxK entries: with 16-bit columns every
// index the type can hold is in bounds, so the gather loops need no range checks. Defined in
// sparse_cpu.cpp (baseline flags: shared by every ISA copy).
const float* padded_copy(const float* x, int64_t K);

namespace scalar {
extern const SparseKernels kKernels;
void conv_rows_f64(const int32_t* row_ptr, const int32_t* off, const double* val, const double* xin, int64_t r0,
                   int64_t r1, const ConvOut<double>& out);
}
namespace avx2 {
extern const SparseKernels kKernels;
// Also the AVX-512 table's single-sample loop: on Zen 4, 8-wide gathers beat 16-wide ones.
void spmv(const int32_t* row_ptr, const int32_t* runs, const void* col, bool wide, const float* val, const float* x, int64_t K,
          const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad);
// Also the AVX-512 table's transpose (8 x 8 blocks in registers).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);
}
namespace avx512 { extern const SparseKernels kKernels; }

}  // namespace sparse
}  // namespace fastprune
