// CUDA implementation of the sparse ops: indexing and launches only. The per-row arithmetic
// (csr_partial_dot, finish_output) comes from sparse_core.h, shared with the CPU loops: one warp
// per (row, sample), each lane summing a strided share of the row's nonzeros in groups of 4 read
// with 16-byte loads (Sputnik's 1-D row tiling and vector loads), then a warp reduction. The convolution: one thread per output element, taps decoded
// with decode_tap. Packing uses ATen (nonzero, cumsum), as the CPU result's layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sparse/sparse.h"
#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {
namespace {

constexpr int kWarpsPerBlock = 8;

// 16-byte loads of 4 values (float4) and 4 columns (ushort4: 8 bytes; int4) for csr_partial_dot;
// the launch checks the alignment of val and col (else PlainLoad4).
struct VectorLoad4 {
  __device__ static void load(const float* val, const void* col, bool wide, int64_t k, float* v, int64_t* c) {
    const float4 f = *reinterpret_cast<const float4*>(val + k);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    if (wide) {
      const int4 i = *reinterpret_cast<const int4*>(static_cast<const int32_t*>(col) + k);
      c[0] = i.x, c[1] = i.y, c[2] = i.z, c[3] = i.w;
    } else {
      const ushort4 u = *reinterpret_cast<const ushort4*>(static_cast<const uint16_t*>(col) + k);
      c[0] = u.x, c[1] = u.y, c[2] = u.z, c[3] = u.w;
    }
  }
  template <typename T>
  __device__ static void load(const T* val, const void* col, bool wide, int64_t k, T* v, int64_t* c) {
    PlainLoad4::load(val, col, wide, k, v, c);  // double: two 16-byte loads would need double2 pairs
  }
};

template <typename T, class Load4>
__global__ void sparse_linear_kernel(const int32_t* __restrict__ row_ptr, const void* __restrict__ col, bool wide,
                                     const T* __restrict__ val, const T* __restrict__ x, int64_t K, int64_t n,
                                     int64_t O, const T* __restrict__ bias, bool relu, T* __restrict__ y,
                                     int* __restrict__ bad_flag) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t total = O * n;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = warp; w < total; w += warps) {
    const int64_t r = w % O, j = w / O;
    bool bad = false;
    T acc = csr_partial_dot<T, T, Load4>(row_ptr, col, wide, val, x + j * K, 1, K, r, lane, 32, &bad);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (bad) atomicOr(bad_flag, 1);
    if (lane == 0) y[j * O + r] = finish_output<T>(acc, bias, r, relu);
  }
}

at::Tensor sparse_linear_cuda(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_in,
                              const at::Tensor& values, int64_t in_features, const std::optional<at::Tensor>& bias_in,
                              bool relu) {
  const int64_t O = check_sparse_linear_inputs(input, row_ptr, col_in, values, in_features, bias_in);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = in_features, n = input.numel() / K;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = O;
  at::Tensor out = at::empty({n, O}, input.options());
  if (n == 0 || O == 0) return out.reshape(out_shape);
  const at::Tensor x = input.reshape({n, K}).contiguous(), rp = row_ptr.contiguous(), col = col_in.contiguous(),
                   v = values.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor bad = at::zeros({1}, input.options().dtype(at::kInt));
  const int64_t warps = O * n;
  const int threads = 32 * kWarpsPerBlock;
  const int blocks = static_cast<int>(std::min<int64_t>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_linear_cuda", [&] {
    const bool aligned = reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(col.const_data_ptr()) % 16 == 0;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          rp.const_data_ptr<int32_t>(), col.const_data_ptr(), col.scalar_type() == at::kInt,
          v.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), K, n, O,
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, relu, out.data_ptr<scalar_t>(),
          bad.data_ptr<int>());
    };
    if (aligned) {
      launch(sparse_linear_kernel<scalar_t, VectorLoad4>);
    } else {
      launch(sparse_linear_kernel<scalar_t, PlainLoad4>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(bad.item<int>() == 0, "sparse_linear: col_idx holds a column outside [0, ", K,
              "): the packed weight was made for a different shape");
  return out.reshape(out_shape);
}

// One thread per output element (n, o, oh, ow): the row's nonzeros decoded with decode_tap, the
// input read at (oh * sh - ph + i * dh, ow * sw - pw + j * dw), zero outside.
template <typename T>
__global__ void sparse_conv2d_kernel(const int32_t* __restrict__ row_ptr, const void* __restrict__ col, bool wide,
                                     const T* __restrict__ val, const T* __restrict__ x, ConvGeometry g,
                                     const T* __restrict__ bias, const T* __restrict__ res, bool relu,
                                     T* __restrict__ y, int* __restrict__ bad_flag) {
  const int64_t total = g.N * g.O * g.Hout * g.Wout;
  const int64_t K = g.Cg * g.kh * g.kw, rows_per_group = g.O / g.groups;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = idx % g.Wout, oh = (idx / g.Wout) % g.Hout, o = (idx / (g.Wout * g.Hout)) % g.O;
    const int64_t n = idx / (g.Wout * g.Hout * g.O);
    const int64_t c0 = (o / rows_per_group) * g.Cg;
    T acc = T(0);
    for (int64_t k = row_ptr[o]; k < row_ptr[o + 1]; ++k) {
      const int64_t cl = col_at(col, wide, k);
      if (cl < 0 || cl >= K) {
        atomicOr(bad_flag, 1);
        continue;
      }
      const Tap t = decode_tap(cl, g.kh, g.kw);
      const int64_t ih = oh * g.sh - g.ph + t.i * g.dh, iw = ow * g.sw - g.pw + t.j * g.dw;
      if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
        acc += val[k] * x[((n * g.C + c0 + t.c) * g.H + ih) * g.W + iw];
      }
    }
    if (res != nullptr) acc += res[idx];
    y[idx] = finish_output<T>(acc + (bias != nullptr ? bias[o] : T(0)), nullptr, o, relu);
  }
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col_in,
                              const at::Tensor& values, at::IntArrayRef weight_shape,
                              const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, bool relu,
                              const std::optional<at::Tensor>& residual_in) {
  const ConvGeometry g = check_sparse_conv2d_inputs(input, row_ptr, col_in, values, weight_shape, bias_in, stride,
                                                    padding, dilation, groups, residual_in);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({g.N, g.O, g.Hout, g.Wout}, input.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(), rp = row_ptr.contiguous(), col = col_in.contiguous(), v = values.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor res = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  at::Tensor bad = at::zeros({1}, input.options().dtype(at::kInt));
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((out.numel() + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_conv2d_cuda", [&] {
    sparse_conv2d_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rp.const_data_ptr<int32_t>(), col.const_data_ptr(), col.scalar_type() == at::kInt, v.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(), g, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, relu, out.data_ptr<scalar_t>(), bad.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(bad.item<int>() == 0, "sparse_conv2d: col_idx holds a column outside [0, ", g.Cg * g.kh * g.kw,
              "): the packed weight was made for a different shape");
  return out;
}

// max_pool2d: one thread per output element (n, c, oy, ox), any input strides; the window and its
// arithmetic are sparse_core.h's (pool_window, pool_max, pool_finish), as on the CPU.
template <typename T>
__global__ void max_pool2d_kernel(const T* __restrict__ x, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                  PoolGeometry g, bool relu, T* __restrict__ out) {
  const int64_t total = g.N * g.C * g.Hout * g.Wout;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = i % g.Wout, oy = (i / g.Wout) % g.Hout, c = (i / (g.Wout * g.Hout)) % g.C;
    const int64_t n = i / (g.Wout * g.Hout * g.C);
    int64_t y0, y1, x0, x1;
    pool_window(oy, g.kh, g.sh, g.ph, g.H, &y0, &y1);
    pool_window(ox, g.kw, g.sw, g.pw, g.W, &x0, &x1);
    const T* plane = x + n * sn + c * sc;
    T acc = pool_init<T>();
    for (int64_t iy = y0; iy < y1; ++iy) {
      for (int64_t ix = x0; ix < x1; ++ix) acc = pool_max(acc, plane[iy * sh + ix * sw]);
    }
    out[i] = pool_finish(acc, relu);
  }
}

at::Tensor max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool relu) {
  const PoolGeometry g = check_max_pool2d_inputs(input, kernel_size, stride, padding);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({g.N, g.C, g.Hout, g.Wout}, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((out.numel() + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2d_cuda", [&] {
    max_pool2d_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2), input.stride(3), g, relu,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_cuda(const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return pack_sparse_composite(weight);
}

// sparse_ffn on the GPU: the two sparse_linear launches with ffn_gelu (at::gelu) / the fused ReLU
// between them (the blocked layout is a CPU cache optimisation).
at::Tensor sparse_ffn_cuda(const at::Tensor& input, const at::Tensor& rp1, const at::Tensor& col1,
                           const at::Tensor& val1, const std::optional<at::Tensor>& bias1, const at::Tensor& rp2,
                           const at::Tensor& col2, const at::Tensor& val2, const std::optional<at::Tensor>& bias2,
                           int64_t in_features, c10::string_view activation) {
  check_ffn_activation(activation);
  at::Tensor h = sparse_linear_cuda(input, rp1, col1, val1, in_features, bias1, activation == "relu");
  if (activation == "gelu") h = ffn_gelu(h);
  return sparse_linear_cuda(h, rp2, col2, val2, rp1.numel() - 1, bias2, false);
}

// sparse_bottleneck on the GPU: the three sparse_conv2d launches (the bands are a CPU cache
// optimisation).
at::Tensor sparse_bottleneck_cuda(const at::Tensor& input, const at::Tensor& rp1, const at::Tensor& col1,
                                  const at::Tensor& val1, const std::optional<at::Tensor>& b1, const at::Tensor& rp2,
                                  const at::Tensor& col2, const at::Tensor& val2, const std::optional<at::Tensor>& b2,
                                  at::IntArrayRef ws2, at::IntArrayRef padding2, const at::Tensor& rp3,
                                  const at::Tensor& col3, const at::Tensor& val3, const std::optional<at::Tensor>& b3) {
  TORCH_CHECK(input.dim() == 4 && ws2.size() == 4, "sparse_bottleneck: input must be 4-D, weight_shape2 four values");
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  const at::Tensor a = sparse_conv2d_cuda(input, rp1, col1, val1, {rp1.numel() - 1, input.size(1), 1, 1}, b1, one, zero,
                                          one, 1, true, std::nullopt);
  const at::Tensor b = sparse_conv2d_cuda(a, rp2, col2, val2, ws2, b2, one, padding2, one, 1, true, std::nullopt);
  return sparse_conv2d_cuda(b, rp3, col3, val3, {input.size(1), ws2[0], 1, 1}, b3, one, zero, one, 1, true, input);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("pack_sparse", &pack_sparse_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_ffn", &sparse_ffn_cuda);
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_bottleneck", &sparse_bottleneck_cuda);
  m.impl("max_pool2d", &max_pool2d_cuda);
}

}  // namespace sparse
}  // namespace fastprune
