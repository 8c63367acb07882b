// CUDA implementation of nisp_propagate: indexing and launch only. |W| is reduced over the kernel taps
// by one thread per (output, input) pair with nisp_core.h's abs_tap_sum (the CPU loops' arithmetic);
// the product with the score vectors is one GEMM per group (ATen -> cuBLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nisp/nisp.h"
#include "nisp/nisp_core.h"

namespace fastprune {
namespace nisp {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void abs_reduce_kernel(const T* __restrict__ w, int64_t pairs, int64_t taps, T* __restrict__ a) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < pairs;
       idx += int64_t(gridDim.x) * blockDim.x) {
    a[idx] = abs_tap_sum(w + idx * taps, taps);
  }
}

at::Tensor nisp_propagate_cuda(const at::Tensor& weight, const at::Tensor& scores, int64_t groups) {
  const NispShape sh = check_nisp_propagate_inputs(weight, scores, groups);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t og = sh.out / sh.groups, ig = sh.in_per_group, in = ig * sh.groups, m = sh.m;
  at::Tensor out = at::zeros({m, in}, scores.options());
  if (m > 0 && in > 0 && sh.out > 0) {
    const at::Tensor w = weight.contiguous();
    at::Tensor a = at::empty({sh.out, ig}, w.options());
    const int64_t pairs = sh.out * ig;
    const int blocks = static_cast<int>(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 65535));
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "nisp_propagate_cuda", [&] {
      abs_reduce_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          w.const_data_ptr<scalar_t>(), pairs, sh.taps, a.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor s = scores.reshape({m, sh.out});
    for (int64_t g = 0; g < sh.groups; ++g) {
      out.narrow(1, g * ig, ig).copy_(at::mm(s.narrow(1, g * og, og), a.narrow(0, g * og, og)));
    }
  }
  return scores.dim() == 1 ? out.reshape({in}) : out;
}

}  // namespace
}  // namespace nisp

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("nisp_propagate", &nisp::nisp_propagate_cuda); }

}  // namespace fastprune
