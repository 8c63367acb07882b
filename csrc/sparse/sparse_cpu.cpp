// CPU implementation of pack_sparse and sparse_linear. Rows are split into chunks of about equal
// nonzero count for at::parallel_for; the float32 loops come from the per-ISA kernel table
// (sparse_kernels.h), float64 runs the portable loop of sparse_core.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "sparse/sparse.h"
#include "sparse/sparse_core.h"
#include "sparse/sparse_kernels.h"

namespace fastprune {
namespace sparse {

const SparseKernels& sparse_kernels(Isa isa) {
#if defined(FP_HAVE_X86_KERNELS)
  switch (isa) {
    case Isa::kAvx512: return avx512::kKernels;
    case Isa::kAvx2: return avx2::kKernels;
    default: break;
  }
#endif
  return scalar::kKernels;
}

const float* padded_copy(const float* x, int64_t K) {
  thread_local std::vector<float> buf(kNarrowMaxK, 0.0f);
  thread_local int64_t filled = 0;
  std::copy(x, x + K, buf.begin());
  if (filled > K) std::fill(buf.begin() + K, buf.begin() + filled, 0.0f);  // stale values of a wider call
  filled = K;
  return buf.data();
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_cpu(const at::Tensor& weight_in) {
  check_pack_inputs(weight_in);
  const at::Tensor w = weight_in.contiguous();
  const int64_t O = w.size(0), K = w.size(1);
  at::Tensor counts = at::empty({O + 1}, w.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  cnt[0] = 0;
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_sparse", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, O, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t c = 0;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t v = p[r * K + k];
          c += v != scalar_t(0);
          finite &= std::isfinite(v);
        }
        cnt[r + 1] = c;
        if (!finite) nonfinite = true;
      }
    });
  });
  TORCH_CHECK(!nonfinite, "pack_sparse: weight holds NaN or Inf");
  for (int64_t r = 0; r < O; ++r) cnt[r + 1] += cnt[r];
  const int64_t nnz = cnt[O];
  TORCH_CHECK(nnz < (int64_t(1) << 31), "pack_sparse: more than 2^31 nonzeros");
  at::Tensor row_ptr = counts.to(at::kInt);
  const bool wide = col_dtype_for(K) == at::kInt;
  at::Tensor col = at::empty({nnz}, w.options().dtype(col_dtype_for(K)));
  at::Tensor values = at::empty({nnz}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_sparse", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    scalar_t* v = values.data_ptr<scalar_t>();
    void* cp = col.data_ptr();
    at::parallel_for(0, O, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t j = cnt[r];
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t x = p[r * K + k];
          if (x == scalar_t(0)) continue;
          if (wide) {
            static_cast<int32_t*>(cp)[j] = static_cast<int32_t>(k);
          } else {
            static_cast<uint16_t*>(cp)[j] = static_cast<uint16_t>(k);
          }
          v[j++] = x;
        }
      }
    });
  });
  return {row_ptr, col, values};
}

// Row ranges of about equal nonzero count (at least one row each), for parallel_for.
std::vector<int64_t> balanced_chunks(const int32_t* rp, int64_t O, int64_t parts) {
  std::vector<int64_t> b{0};
  const int64_t nnz = rp[O];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = nnz * p / parts;
    const int64_t r = std::upper_bound(rp, rp + O + 1, static_cast<int32_t>(target)) - rp - 1;
    if (r > b.back()) b.push_back(r);
  }
  if (b.back() != O) b.push_back(O);
  return b;
}

at::Tensor sparse_linear_cpu(const at::Tensor& input, const at::Tensor& row_ptr_in, const at::Tensor& col_in,
                             const at::Tensor& values_in, int64_t in_features, const std::optional<at::Tensor>& bias_in,
                             bool relu) {
  const int64_t O = check_sparse_linear_inputs(input, row_ptr_in, col_in, values_in, in_features, bias_in);
  const int64_t K = in_features;
  const at::Tensor rp_t = row_ptr_in.contiguous(), col = col_in.contiguous(), values = values_in.contiguous();
  const int32_t* rp = rp_t.const_data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[O] == values.numel(), "sparse_linear: row_ptr must start at 0 and end at nnz (",
              values.numel(), ")");
  for (int64_t r = 0; r < O; ++r) {
    TORCH_CHECK(rp[r] <= rp[r + 1], "sparse_linear: row_ptr must not decrease (row ", r, ")");
  }
  const bool wide = col.scalar_type() == at::kInt;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = O;
  const int64_t n = input.numel() / K;
  at::Tensor out = at::empty({n, O}, input.options());
  if (n == 0 || O == 0) return out.reshape(out_shape);
  const at::Tensor x = input.reshape({n, K}).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const auto chunks = balanced_chunks(rp, O, std::max<int64_t>(1, at::get_num_threads() * 4));
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  std::atomic<bool> any_bad{false};
  if (input.scalar_type() == at::kFloat) {
    const auto& kern = sparse_kernels(active_isa());
    const float* v = values.const_data_ptr<float>();
    const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    float* y = out.data_ptr<float>();
    // one sample: gather-dot per row; several: the transposed input makes each column a
    // contiguous run of samples, so every nonzero is one vector FMA across the batch
    const at::Tensor xt = n == 1 ? x : x.t().contiguous();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      bool bad = false;
      for (int64_t c = c0; c < c1; ++c) {
        if (n == 1) {
          kern.spmv(rp, col.const_data_ptr(), wide, v, xt.const_data_ptr<float>(), K, b, relu, chunks[c], chunks[c + 1], y, &bad);
        } else {
          kern.spmm(rp, col.const_data_ptr(), wide, v, xt.const_data_ptr<float>(), n, K, n, b, relu, chunks[c],
                    chunks[c + 1], y, O, &bad);
        }
      }
      if (bad) any_bad = true;
    });
  } else {
    const double* v = values.const_data_ptr<double>();
    const double* b = bias.defined() ? bias.const_data_ptr<double>() : nullptr;
    const double* xp = x.const_data_ptr<double>();
    double* y = out.data_ptr<double>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      bool bad = false;
      for (int64_t r = chunks[c0]; r < chunks[c1]; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          const double acc = csr_partial_dot<double, double>(rp, col.const_data_ptr(), wide, v, xp + j * K, 1, K, r, 0, 1, &bad);
          y[j * O + r] = finish_output<double>(acc, b, r, relu);
        }
      }
      if (bad) any_bad = true;
    });
  }
  TORCH_CHECK(!any_bad, "sparse_linear: col_idx holds a column outside [0, ", K,
              "): the packed weight was made for a different shape");
  return out.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("pack_sparse", &pack_sparse_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
}

}  // namespace sparse
}  // namespace fastprune
