// CUDA implementation of scaled_dot_product_attention: indexing and launch only. One thread per
// query row (batch, head, i): a pass over the keys for the row's largest score, then one that
// accumulates the softmax weights (attention_core.h's softmax_weight, as on the CPU) times V's rows
// into the row's output, finished by finish_row. Any row strides (the canonical form of
// check_attention_inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention/attention.h"
#include "attention/attention_core.h"

namespace fastprune {
namespace attention {
namespace {

struct Strides4 {
  int64_t b, h, r;
};

template <typename T>
__device__ T score(const T* q, const T* k, int64_t E, T scale, const T* mrow, int64_t j) {
  T acc = T(0);
  for (int64_t d = 0; d < E; ++d) acc += q[d] * k[d];
  return acc * scale + (mrow != nullptr ? mrow[j] : T(0));
}

template <typename T>
__global__ void attention_rows_kernel(const T* __restrict__ q, Strides4 qs, const T* __restrict__ k, Strides4 ks,
                                      const T* __restrict__ v, Strides4 vs, const T* __restrict__ mask, Strides4 ms,
                                      int64_t H, int64_t L, int64_t S, int64_t E, int64_t Ev, int64_t rows_total,
                                      T scale, T* __restrict__ out) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows_total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t % L, bh = t / L, b = bh / H, h = bh % H;
    const T* qr = q + b * qs.b + h * qs.h + i * qs.r;
    const T* kb = k + b * ks.b + h * ks.h;
    const T* vb = v + b * vs.b + h * vs.h;
    const T* mr = mask != nullptr ? mask + b * ms.b + h * ms.h + i * ms.r : nullptr;
    T m = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      const T x = score(qr, kb + j * ks.r, E, scale, mr, j);
      m = (x > m || x != x) ? x : m;
    }
    T* o = out + t * Ev;
    for (int64_t e = 0; e < Ev; ++e) o[e] = T(0);
    T sum = T(0);
    for (int64_t j = 0; j < S; ++j) {
      const T p = softmax_weight(score(qr, kb + j * ks.r, E, scale, mr, j), m);
      sum += p;
      for (int64_t e = 0; e < Ev; ++e) o[e] += p * vb[j * vs.r + e];
    }
    for (int64_t e = 0; e < Ev; ++e) o[e] = finish_row(o[e], sum);
  }
}

at::Tensor attention_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& attn_mask, std::optional<double> scale) {
  const AttentionInputs in = check_attention_inputs(query, key, value, attn_mask, scale);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &mask = in.mask;
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, query.options());
  const int64_t rows_total = q.size(0) * q.size(1) * q.size(2);
  if (out.numel() != 0) {
    const int threads = 128;
    const int blocks = static_cast<int>(std::min<int64_t>((rows_total + threads - 1) / threads, 65535));
    auto st = [](const at::Tensor& t) { return t.defined() ? Strides4{t.stride(0), t.stride(1), t.stride(2)} : Strides4{0, 0, 0}; };
    AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "scaled_dot_product_attention_cuda", [&] {
      attention_rows_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          q.const_data_ptr<scalar_t>(), st(q), k.const_data_ptr<scalar_t>(), st(k), v.const_data_ptr<scalar_t>(), st(v),
          mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, st(mask), q.size(1), q.size(2), k.size(2),
          q.size(3), v.size(3), rows_total, static_cast<scalar_t>(in.scale), out.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.reshape(in.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("scaled_dot_product_attention", &attention_cuda); }

}  // namespace attention
}  // namespace fastprune
