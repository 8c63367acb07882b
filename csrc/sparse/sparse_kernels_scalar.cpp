// Portable copy of the CSR loops (also the reference for the vector copies' tails).
#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"
#include "sparse/pool_impl.h"

#define FP_ISA_NS scalar
#include "sparse/sparse_conv_impl.h"

namespace fastprune {
namespace sparse {
namespace scalar {
namespace {

void spmv(const int32_t* rp, const int32_t* /*runs*/, const void* col, bool wide, const float* val, const float* x, int64_t K,
          const float* bias, bool relu, int64_t r0, int64_t r1, float* y, bool* bad) {
  for (int64_t r = r0; r < r1; ++r) {
    const float acc = csr_partial_dot<float, float>(rp, col, wide, val, x, 1, K, r, 0, 1, bad);
    y[r] = finish_output<float>(acc, bias, r, relu);
  }
}

void spmm(const int32_t* rp, const int32_t* /*runs*/, const void* col, bool wide, const float* val, const float* xt, int64_t ldx, int64_t K,
          int64_t n, const float* bias, bool relu, int64_t r0, int64_t r1, float* y, int64_t ldy, bool* bad) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      const float acc = csr_partial_dot<float, float>(rp, col, wide, val, xt + j, ldx, K, r, 0, 1, bad);
      y[r * ldy + j] = finish_output<float>(acc, bias, r, relu);
    }
  }
}

void tile_finish(const float* src, int64_t lds, float* out, int64_t ldo, int64_t rows, int64_t n, const float* bias,
                 const float* res, int64_t ldr, bool relu) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t t = 0; t < n; ++t) {
      const float y = src[i * lds + t] + (res != nullptr ? res[i * ldr + t] : 0.0f);
      out[i * ldo + t] = finish_output<float>(y, bias, i, relu);
    }
  }
}

void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

}  // namespace

void conv_rows(const int32_t* rp, const int32_t* /*runs*/, const int32_t* off, const float* val, const float* xin,
               int64_t r0, int64_t r1, const ConvOut<float>& out) {
  conv_rows_t<float>(rp, off, val, xin, r0, r1, out);
}

void max_pool_row_cl(const float* x, const PoolGeometry& g, int64_t oy, bool relu, float* row) {
  max_pool_row_cl_t<float>(x, g, oy, relu, row);
}

void max_pool_plane(const float* x, const PoolGeometry& g, bool relu, float* tmp, float* out) {
  max_pool_plane_t<float>(x, g, relu, tmp, out);
}

const SparseKernels kKernels = {spmv, spmm, conv_rows, tile_finish, transpose, nullptr, 0, "scalar", 64, max_pool_row_cl, max_pool_plane, nullptr};

void conv_rows_f64(const int32_t* rp, const int32_t* off, const double* val, const double* xin, int64_t r0,
                   int64_t r1, const ConvOut<double>& out) {
  conv_rows_t<double>(rp, off, val, xin, r0, r1, out);
}

}  // namespace scalar
}  // namespace sparse
}  // namespace fastprune
