// Included once per ISA translation unit with FP_ISA_NS and FP_ISA_NAME defined: plain loops that
// the compiler vectorises with that unit's -m flags (contiguous, no aliasing, no branches).
#include "nisp/nisp_core.h"
#include "nisp/nisp_kernels.h"

namespace fastprune {
namespace nisp {
namespace FP_ISA_NS {

static void abs_row(const float* FP_RESTRICT w, int64_t cols, int64_t taps, float* FP_RESTRICT a) {
  if (taps == 1) {
    for (int64_t c = 0; c < cols; ++c) a[c] = abs_value(w[c]);
    return;
  }
  for (int64_t c = 0; c < cols; ++c) a[c] = abs_tap_sum(w + c * taps, taps);
}

static void abs_axpy(const float* FP_RESTRICT w, int64_t n, const float* FP_RESTRICT s, int64_t m,
                     float* FP_RESTRICT y, int64_t ldy) {
  for (int64_t j = 0; j < m; ++j) {
    const float sj = s[j];
    float* FP_RESTRICT yj = y + j * ldy;
    for (int64_t i = 0; i < n; ++i) yj[i] += sj * abs_value(w[i]);
  }
}

extern const NispKernels kKernels;
const NispKernels kKernels{abs_row, abs_axpy, FP_ISA_NAME};

}  // namespace FP_ISA_NS
}  // namespace nisp
}  // namespace fastprune
