// CPU kernel of nisp_propagate: S_in (m, in) = S_out (m, out) |W| with the kernel taps summed, per group.
// W is read once. Few score vectors (m <= kFusedMax): one pass over W (fused_group: contiguous
// |w| * score FMAs into a wide accumulator, kernel taps summed at the end; the per-ISA loops of
// nisp_kernels_<isa>.cpp); threads split the input channels, so each weight is read by one thread. Many vectors: |W| reduced to (out, in/groups) once, then one
// GEMM per group (ATen). float64 takes the same structure with portable loops. No autograd: the
// scores are statistics, not a differentiable layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_features.h"
#include "common/kernel_log.h"
#include "nisp/nisp.h"
#include "nisp/nisp_core.h"
#include "nisp/nisp_kernels.h"

namespace fastprune {
namespace nisp {

const NispKernels& nisp_kernels(Isa isa) {
  switch (isa) {
#if defined(FP_HAVE_X86_KERNELS)
    case Isa::kAvx512: return avx512::kKernels;
    case Isa::kAvx2: return avx2::kKernels;
#endif
    default: return scalar::kKernels;
  }
}

namespace {

constexpr int64_t kFusedMax = 8;    // up to this many score vectors: the fused single pass
constexpr int64_t kStripe = 4096;   // weights of one row per work item of the fused pass (16 KiB float32)

// Fused pass for one group. Each work item owns a stripe of input channels [c0, c0 + n) and walks the
// group's output rows: the stripe of a row is n * taps contiguous weights, added (times each vector's
// score of that output, absolute) into a wide (m, n * taps) accumulator with contiguous vector FMAs;
// the taps are summed once at the end. Every weight element is read once, in order.
template <typename T, typename AbsAxpy>
void fused_group(const T* w, const T* s, int64_t lds, int64_t o0, int64_t og, int64_t cols, int64_t taps, int64_t m,
                 T* y, int64_t ldy, AbsAxpy abs_axpy) {
  const int64_t block = std::max<int64_t>(1, kStripe / taps);  // input channels per work item
  at::parallel_for(0, (cols + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> wide(static_cast<size_t>(m * block * taps));
    std::vector<T> so(static_cast<size_t>(m));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * block;
      const int64_t n = std::min(block, cols - c0);
      const int64_t len = n * taps;
      std::fill(wide.begin(), wide.end(), T(0));
      for (int64_t o = o0; o < o0 + og; ++o) {
        for (int64_t j = 0; j < m; ++j) so[j] = s[j * lds + o];
        abs_axpy(w + (o * cols + c0) * taps, len, so.data(), m, wide.data(), len);
      }
      for (int64_t j = 0; j < m; ++j) {
        const T* wj = wide.data() + j * len;
        for (int64_t c = 0; c < n; ++c) {
          T acc = T(0);
          for (int64_t k = 0; k < taps; ++k) acc += wj[c * taps + k];
          y[j * ldy + c0 + c] += acc;
        }
      }
    }
  });
}

template <typename T>
void row_portable(const T* w, int64_t cols, int64_t taps, T* a) {
  for (int64_t c = 0; c < cols; ++c) a[c] = abs_tap_sum(w + c * taps, taps);
}

template <typename T>
void abs_axpy_portable(const T* w, int64_t n, const T* s, int64_t m, T* y, int64_t ldy) {
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t i = 0; i < n; ++i) y[j * ldy + i] += s[j] * abs_value(w[i]);
  }
}

}  // namespace

at::Tensor nisp_propagate_cpu(const at::Tensor& weight, const at::Tensor& scores, int64_t groups) {
  const NispShape sh = check_nisp_propagate_inputs(weight, scores, groups);
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "weight must be a CPU tensor for the CPU kernel");
  const int64_t og = sh.out / sh.groups, ig = sh.in_per_group, in = ig * sh.groups, m = sh.m;
  const bool vector_in = scores.dim() == 1;
  at::Tensor out = at::zeros({m, in}, scores.options());
  if (m == 0 || in == 0 || sh.out == 0) return vector_in ? out.reshape({in}) : out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = scores.reshape({m, sh.out}).contiguous();
  if (m <= kFusedMax) {
    if (w.scalar_type() == at::kFloat) {
      const Isa isa = active_isa();
      const NispKernels& k = nisp_kernels(isa);
      note_kernel(KernelOp::kNispPropagate, path_of_isa(static_cast<int>(isa)));
      for (int64_t g = 0; g < sh.groups; ++g) {
        fused_group<float>(w.const_data_ptr<float>(), s.const_data_ptr<float>(), sh.out, g * og, og, ig, sh.taps, m,
                           out.data_ptr<float>() + g * ig, in, k.abs_axpy);
      }
    } else {
      note_kernel(KernelOp::kNispPropagate, KernelPath::kFloat64);
      for (int64_t g = 0; g < sh.groups; ++g) {
        fused_group<double>(w.const_data_ptr<double>(), s.const_data_ptr<double>(), sh.out, g * og, og, ig, sh.taps,
                            m, out.data_ptr<double>() + g * ig, in, abs_axpy_portable<double>);
      }
    }
    return vector_in ? out.reshape({in}) : out;
  }
  // many vectors: |W| reduced over the taps once, then a GEMM per group
  at::Tensor a = at::empty({sh.out, ig}, w.options());
  if (w.scalar_type() == at::kFloat) {
    const Isa isa = active_isa();
    const NispKernels& k = nisp_kernels(isa);
    note_kernel(KernelOp::kNispPropagate, path_of_isa(static_cast<int>(isa)));
    const float* wp = w.const_data_ptr<float>();
    float* ap = a.data_ptr<float>();
    at::parallel_for(0, sh.out, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) k.abs_row(wp + o * ig * sh.taps, ig, sh.taps, ap + o * ig);
    });
  } else {
    note_kernel(KernelOp::kNispPropagate, KernelPath::kFloat64);
    const double* wp = w.const_data_ptr<double>();
    double* ap = a.data_ptr<double>();
    at::parallel_for(0, sh.out, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) row_portable<double>(wp + o * ig * sh.taps, ig, sh.taps, ap + o * ig);
    });
  }
  if (sh.groups == 1) {
    at::mm_out(out, s, a);
  } else {
    for (int64_t g = 0; g < sh.groups; ++g) {
      out.narrow(1, g * ig, ig).copy_(at::mm(s.narrow(1, g * og, og), a.narrow(0, g * og, og)));
    }
  }
  return vector_in ? out.reshape({in}) : out;
}

}  // namespace nisp

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("nisp_propagate", &nisp::nisp_propagate_cpu); }

}  // namespace fastprune
