// scaled_dot_product_attention on the CPU: softmax(scale * Q K^T + mask) V for each (batch, head).
// Work items are (batch x head, block of up to kQueryBlock query rows), in that order, split among
// the threads by at::parallel_for; a thread transposes its item's K into K^T (E, S padded to the
// score loop's column block, zeros beyond S) once per (batch, head), so that the score loop reads
// contiguous key vectors (float32: the sparse kernels' register transposes), and keeps a (block, S) score buffer. q, k, v are read through their row
// strides (HuggingFace's (B, H, L, D) views of (B, L, H, D) projections need no copy). float32 runs
// the ISA chosen at run time (attention_simd_impl.h; portable: attention_impl.h), float64 the
// portable loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "attention/attention.h"
#include "attention/attention_impl.h"
#include "attention/attention_kernels.h"
#include "common/kernel_log.h"
#include "sparse/sparse_kernels.h"

namespace fastprune {
namespace attention {

const AttentionKernels& attention_kernels(Isa isa) {
  switch (isa) {
#if defined(FP_HAVE_X86_KERNELS)
    case Isa::kAvx512: return avx512::kKernels;
    case Isa::kAvx2: return avx2::kKernels;
#endif
    default: return scalar::kKernels;
  }
}

namespace {

constexpr int64_t kQueryBlock = 128;

template <typename T, typename Rows, typename Transpose>
void run(const AttentionInputs& in, at::Tensor& out, int64_t pad, Rows rows, Transpose transpose) {
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &mask = in.mask;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), S = k.size(2), Ev = v.size(3);
  const int64_t ldkt = std::max<int64_t>(pad, (S + pad - 1) / pad * pad);
  const int64_t nqb = (L + kQueryBlock - 1) / kQueryBlock, qb_rows = std::min(L, kQueryBlock);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* mp = mask.defined() ? mask.const_data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const T scale = static_cast<T>(in.scale);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> kt(static_cast<size_t>(E * ldkt), T(0)), sc(static_cast<size_t>(qb_rows * ldkt));
    int64_t have = -1;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bh = w / nqb, b = bh / H, h = bh % H, i0 = (w % nqb) * kQueryBlock;
      const int64_t nq = std::min(kQueryBlock, L - i0);
      if (bh != have) {  // (K's last stride is 1: check_attention_inputs)
        transpose(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), kt.data(), ldkt, S, E);
        have = bh;
      }
      rows(qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2), q.stride(2), kt.data(), ldkt,
           vp + b * v.stride(0) + h * v.stride(1), v.stride(2),
           mp != nullptr ? mp + b * mask.stride(0) + h * mask.stride(1) + i0 * mask.stride(2) : nullptr,
           mp != nullptr ? mask.stride(2) : 0, nq, S, E, Ev, scale, sc.data(), op + (bh * L + i0) * Ev, Ev);
    }
  });
}

at::Tensor attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& attn_mask, std::optional<double> scale) {
  const AttentionInputs in = check_attention_inputs(query, key, value, attn_mask, scale);
  const bool f32 = query.scalar_type() == at::kFloat;
  const Isa isa = active_isa();
  note_kernel(KernelOp::kAttention, f32 ? path_of_isa(static_cast<int>(isa)) : KernelPath::kFloat64);
  at::Tensor out = at::empty({in.q.size(0), in.q.size(1), in.q.size(2), in.v.size(3)}, query.options());
  if (out.numel() != 0) {
    if (in.k.size(2) == 0) {
      out.zero_();  // no keys: every row is fully masked
    } else if (f32) {
      const AttentionKernels& kern = attention_kernels(isa);
      run<float>(in, out, kern.kt_pad, kern.rows, sparse::sparse_kernels(isa).transpose);
    } else {
      run<double>(in, out, 1, rows_portable<double>, transpose_portable<double>);
    }
  }
  return out.reshape(in.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("scaled_dot_product_attention", &attention_cpu); }

}  // namespace attention
}  // namespace fastprune
