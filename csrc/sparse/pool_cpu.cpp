// max_pool2d on the CPU. Channels-last input (a dense conv computed channels-last, as sparsify runs a
// ResNet stem): parallel over (image, output row), each row's windows reduced along the channels
// (contiguous: the ISA's vectors) into a (Wout, C) row, then transposed into the NCHW output with the
// kernels' register transposes. Otherwise the input made NCHW-contiguous: parallel over planes, each
// output row the max of its window's input rows, then of its columns. The loops are pool_impl.h's;
// float32 runs the ISA chosen at run time, float64 the portable copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/kernel_log.h"
#include "sparse/pool_impl.h"
#include "sparse/sparse.h"
#include "sparse/sparse_kernels.h"

namespace fastprune {
namespace sparse {
namespace {

template <typename T>
void pool_channels_last(const T* x, const PoolGeometry& g, bool relu, T* out, const SparseKernels& kern) {
  const int64_t plane = g.Hout * g.Wout;
  at::parallel_for(0, g.N * g.Hout, 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> row(g.Wout * g.C);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = w / g.Hout, oy = w % g.Hout;
      const T* img = x + n * g.H * g.W * g.C;
      T* dst = out + n * g.C * plane + oy * g.Wout;
      if constexpr (std::is_same_v<T, float>) {
        kern.max_pool_row_cl(img, g, oy, relu, row.data());
        kern.transpose(row.data(), g.C, dst, plane, g.Wout, g.C);
      } else {
        max_pool_row_cl_t<T>(img, g, oy, relu, row.data());
        for (int64_t ox = 0; ox < g.Wout; ++ox) {
          for (int64_t c = 0; c < g.C; ++c) dst[c * plane + ox] = row[ox * g.C + c];
        }
      }
    }
  });
}

template <typename T>
void pool_planes(const T* x, const PoolGeometry& g, bool relu, T* out, const SparseKernels& kern) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Hout * g.Wout));
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
    std::vector<T> tmp(g.W);
    for (int64_t p = p0; p < p1; ++p) {
      const T* src = x + p * g.H * g.W;
      T* dst = out + p * g.Hout * g.Wout;
      if constexpr (std::is_same_v<T, float>) {
        kern.max_pool_plane(src, g, relu, tmp.data(), dst);
      } else {
        max_pool_plane_t<T>(src, g, relu, tmp.data(), dst);
      }
    }
  });
}

at::Tensor max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool relu) {
  const PoolGeometry g = check_max_pool2d_inputs(input, kernel_size, stride, padding);
  at::Tensor out = at::empty({g.N, g.C, g.Hout, g.Wout}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const bool f32 = input.scalar_type() == at::kFloat;
  const Isa isa = active_isa();
  const auto& kern = sparse_kernels(isa);
  note_kernel(KernelOp::kMaxPool2d, f32 ? path_of_isa(static_cast<int>(isa)) : KernelPath::kFloat64);
  if (out.numel() == 0) return out;
  // (input that is both, e.g. one channel or a 1x1 image, takes the plane loop: nothing to transpose)
  const bool channels_last = !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (channels_last) {
    note_kernel(KernelOp::kMaxPool2dChannelsLast, f32 ? path_of_isa(static_cast<int>(isa)) : KernelPath::kFloat64);
  }
  const at::Tensor x = channels_last ? input : input.contiguous();
  if (f32) {
    (channels_last ? pool_channels_last<float> : pool_planes<float>)(x.const_data_ptr<float>(), g, relu,
                                                                     out.data_ptr<float>(), kern);
  } else {
    (channels_last ? pool_channels_last<double> : pool_planes<double>)(x.const_data_ptr<double>(), g, relu,
                                                                       out.data_ptr<double>(), kern);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("max_pool2d", &max_pool2d_cpu); }

}  // namespace sparse
}  // namespace fastprune
