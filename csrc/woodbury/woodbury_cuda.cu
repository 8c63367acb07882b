// CUDA implementation of the Woodbury ops: indexing and launches only. The per-element index
// math (block_valid) comes from woodbury_core.h, shared with the CPU kernels; the dense algebra
// (batched float64 GEMM, Cholesky, triangular solve) goes to ATen, which calls cuBLAS/cuSOLVER.
// Algorithms and precision match the CPU path (woodbury_cpu.cpp): float64 accumulation and
// factorisation, "gram" for N >= B, one rank-N "woodbury" step for N < B.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "woodbury/woodbury.h"
#include "woodbury/woodbury_core.h"

namespace fastprune {
namespace woodbury {
namespace {

constexpr int kThreads = 256;

// panel[b][n][c] = (double) grads[n][b*B + c], zero past d. One thread per panel element.
template <typename T>
__global__ void pack_blocks_kernel(const T* __restrict__ g, int64_t s0, int64_t s1, int64_t rows, int64_t d,
                                   int64_t B, int64_t nb, double* __restrict__ panel) {
  const int64_t total = nb * rows * B;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % B;
    const int64_t n = (idx / B) % rows;
    const int64_t b = idx / (B * rows);
    panel[idx] = c < block_valid(d, B, b) ? static_cast<double>(g[n * s0 + (b * B + c) * s1]) : 0.0;
  }
}

// out[b][i][j] = inv[b][i][j] on the valid part; padded coordinates get exactly 1/damp on the diagonal.
template <typename T>
__global__ void store_blocks_kernel(const double* __restrict__ inv, int64_t d, int64_t B, int64_t nb, double damp,
                                    T* __restrict__ out) {
  const int64_t total = nb * B * B;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % B;
    const int64_t i = (idx / B) % B;
    const int64_t b = idx / (B * B);
    const int64_t valid = block_valid(d, B, b);
    double v = inv[idx];
    if (i >= valid || j >= valid) v = (i == j) ? 1.0 / damp : 0.0;
    out[idx] = static_cast<T>(v);
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

at::Tensor pack_blocks(const at::Tensor& grads, int64_t B) {
  const int64_t rows = grads.size(0), d = grads.size(1), nb = num_blocks(d, B);
  at::Tensor panel = at::empty({nb, rows, B}, grads.options().dtype(at::kDouble));
  if (panel.numel() == 0) return panel;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "fastprune_pack_blocks", [&] {
    pack_blocks_kernel<scalar_t><<<grid_for(panel.numel()), kThreads, 0, stream>>>(
        grads.const_data_ptr<scalar_t>(), grads.stride(0), grads.stride(1), rows, d, B, nb,
        panel.mutable_data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return panel;
}

at::Tensor woodbury_inverse_fisher_cuda(const at::Tensor& grads, int64_t block_size, double damp) {
  check_woodbury_inverse_fisher_inputs(grads, block_size, damp);
  c10::cuda::CUDAGuard guard(grads.device());
  TORCH_CHECK_VALUE(at::isfinite(grads).all().item<bool>(), "grads contains NaN or Inf");
  const int64_t N = grads.size(0), d = grads.size(1), B = block_size, nb = num_blocks(d, B);
  at::Tensor out = at::empty({nb, B, B}, grads.options());
  if (nb == 0) return out;
  at::Tensor P = pack_blocks(grads, B);  // (nb, N, B) float64
  at::Tensor eye = at::eye(B, P.options());
  at::Tensor inv;
  if (N >= B) {
    at::Tensor F = at::baddbmm(eye.mul(damp).expand({nb, B, B}), P.transpose(1, 2), P, 1.0, 1.0 / N);
    auto [L, info] = at::linalg_cholesky_ex(F);
    TORCH_CHECK_VALUE(info.max().item<int64_t>() == 0, "the damped Fisher is not positive definite in float64 (damp = ",
                      damp, " is too small for these gradients)");
    inv = at::cholesky_inverse(L);
  } else {
    at::Tensor K = at::baddbmm(at::eye(N, P.options()).mul(N * damp).expand({nb, N, N}), P, P.transpose(1, 2));
    auto [L, info] = at::linalg_cholesky_ex(K);
    TORCH_CHECK_VALUE(info.max().item<int64_t>() == 0, "G G^T + N damp I is not positive definite in float64");
    at::Tensor V = at::linalg_solve_triangular(L, P, /*upper=*/false);
    inv = (eye - at::bmm(V.transpose(1, 2), V)).div_(damp);
  }
  inv = inv.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "fastprune_store_blocks", [&] {
    store_blocks_kernel<scalar_t><<<grid_for(out.numel()), kThreads, 0, stream>>>(
        inv.const_data_ptr<double>(), d, B, nb, damp, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void woodbury_update_cuda(const at::Tensor& finv, const at::Tensor& grads, double num_samples) {
  check_woodbury_update_inputs(finv, grads, num_samples);
  c10::cuda::CUDAGuard guard(finv.device());
  const int64_t k = grads.size(0), B = finv.size(1);
  if (k == 0 || finv.size(0) == 0) return;
  TORCH_CHECK_VALUE(at::isfinite(grads).all().item<bool>(), "grads contains NaN or Inf");
  at::Tensor G = pack_blocks(grads, B);  // (nb, k, B) float64
  at::Tensor F = finv.to(at::kDouble);
  at::Tensor U = at::bmm(G, F);
  at::Tensor M = at::baddbmm(at::eye(k, F.options()).mul(num_samples).expand({F.size(0), k, k}), U, G.transpose(1, 2));
  auto [L, info] = at::linalg_cholesky_ex(M);
  TORCH_CHECK_VALUE(info.max().item<int64_t>() == 0,
                    "woodbury_update_: N I + G F^-1 G^T is not positive definite: finv is not a valid inverse");
  at::Tensor V = at::linalg_solve_triangular(L, U, /*upper=*/false);
  F.sub_(at::bmm(V.transpose(1, 2), V));
  finv.copy_(F);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("woodbury_update_", &woodbury_update_cuda);
  m.impl("woodbury_inverse_fisher", &woodbury_inverse_fisher_cuda);
}

}  // namespace woodbury
}  // namespace fastprune
