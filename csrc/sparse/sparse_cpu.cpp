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
#include <cstdlib>
#include <cstring>
#include <array>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <unistd.h>

#include "common/kernel_log.h"
#include "sparse/sparse.h"
#include "sparse/sparse_core.h"
#include "sparse/sparse_jit.h"
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

// When the generated code runs (see the comment at its use), and how many blocks ahead its code and
// values are prefetched. Measured on Zen 4 (ResNet-50 layers at 90 %, bench_sparse.py and the
// ResNet-50-like model end to end).
constexpr int64_t kJitMinPositions = 32;
constexpr int64_t kJitMinRowNnz = 4;
constexpr int64_t kJitPrefetchBlocks = 2;
// tiles of 16 positions per work item of the tile-major order (run_jit)
constexpr int64_t kTileSpan = 16;

// Samples per block of the many-sample linear product: the kernel's register block (full), halved
// (to a floor of 16) while the block's slice of the input, K * B floats, exceeds 4/5 of the L2
// cache. (Half of it, before, gave 32 samples for BERT's 3072 -> 768 on Zen 5's 1 MB L2: 64 ran that
// layer 1.25x faster at 128 rows, 90 %; 128 was best for 768 inputs, measured in one process, 2026-12-02).
int64_t l2_cache_bytes() {
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(512) << 10;
  }();
  return l2;
}

int64_t linear_block(int64_t samples, int64_t K) {
  const int64_t l2 = l2_cache_bytes();
  int64_t B = samples;
  while (B > 16 && K * B * static_cast<int64_t>(sizeof(float)) * 5 > l2 * 4) B /= 2;
  return B;
}

// Row ranges of about equal nonzero count (at least one row each), for parallel_for.
std::vector<int64_t> balanced_chunks(const int32_t* rp, int64_t O, int64_t parts) {
  std::vector<int64_t> b{0};
  const int64_t nnz = rp[O];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = nnz * p / parts;
    // on a multiple of 4 rows: a chunk edge never splits a group of rows sharing a pattern
    const int64_t r = (std::upper_bound(rp, rp + O + 1, static_cast<int32_t>(target)) - rp - 1) / 4 * 4;
    if (r > b.back()) b.push_back(r);
  }
  if (b.back() != O) b.push_back(O);
  return b;
}

// What the kernels derive from a packed weight (and, for a convolution, the input geometry):
// off  per nonzero, its tap's offset in the phase buffer (convolutions only);
// runs per row, how many rows from it on share its pattern (sparse_kernels.h).
struct Derived {
  std::vector<int32_t> off, runs;
  // (linear layers) every column is below K: the many-sample loop reads them unchecked
  bool cols_in_range = false;
  // (linear layers) pst[r * (np + 1) + p]: row r's first nonzero in column panel p (kPanelCols
  // columns each; columns are sorted within a row), for the panel loop of the many-sample product,
  // then kPanelPrefetchRows rows of zeros (the loop's prefetch reads ahead unbounded)
  std::vector<int32_t> pst;
  int64_t np = 0;
  // generated code for these offsets, per set of jit::Flags (sparse_jit.h). The code carries a copy
  // of the values, so a slot also names the values it was made from: made at the first float32 call
  // that uses it, and again when the values change (another tensor, other storage, or an in-place
  // change: its version counter). Callers hold the code they run (a concurrent call may replace it).
  struct JitSlot {
    bool made = false;  // (code may be null: none can be made here)
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> values;
    uint32_t version = 0;
    const void* data = nullptr;
    std::shared_ptr<const jit::ConvCode> code;
  };
  mutable std::mutex jit_mu;
  mutable std::array<JitSlot, jit::kFlagSets> jit;
  std::shared_ptr<const jit::ConvCode> jit_code(const int32_t* rp, int64_t rows, int flags, const at::Tensor& values_in,
                                                const float* v) const {
    const uint32_t version = values_in.unsafeGetTensorImpl()->version_counter().current_version();
    std::lock_guard<std::mutex> lock(jit_mu);
    JitSlot& s = jit[flags];
    if (!s.made || s.version != version || s.data != v || s.values->lock().get() != values_in.unsafeGetTensorImpl()) {
      s.code = jit::ConvCode::build(rp, off.data(), v, rows, flags, kJitMaxBytes);
      s.made = true;
      s.values.emplace(values_in.getIntrusivePtr());
      s.version = version;
      s.data = v;
    }
    return s.code;
  }
  static constexpr int64_t kJitMaxBytes = int64_t(64) << 20;
};

// runs[r] from same(r) = "row r + 1 has row r's pattern" (rows of equal length only are compared).
template <class Same>
std::vector<int32_t> row_runs(const int32_t* rp, int64_t O, Same same) {
  std::vector<int32_t> runs(O, 1);
  for (int64_t r = O - 2; r >= 0; --r) {
    if (rp[r + 1] - rp[r] == rp[r + 2] - rp[r + 1] && same(r)) runs[r] = runs[r + 1] + 1;
  }
  return runs;
}

std::shared_ptr<const Derived> linear_derived(const int32_t* rp, const at::Tensor& col, int64_t O, int64_t K) {
  auto d = std::make_shared<Derived>();
  const int64_t nnz = rp[O];
  if (col.scalar_type() == at::kInt) {
    const int32_t* c = col.const_data_ptr<int32_t>();
    d->cols_in_range = std::all_of(c, c + nnz, [K](int32_t v) { return v >= 0 && v < K; });
  } else {
    const uint16_t* c = static_cast<const uint16_t*>(col.const_data_ptr());
    d->cols_in_range = std::all_of(c, c + nnz, [K](uint16_t v) { return v < K; });
  }
  d->np = std::max<int64_t>(1, (K + kPanelCols - 1) / kPanelCols);
  d->pst.assign((O + kPanelPrefetchRows) * (d->np + 1), 0);
  auto panels = [&](auto* c) {
    for (int64_t r = 0; r < O; ++r) {
      int32_t k = rp[r];
      for (int64_t p = 0; p < d->np; ++p) {
        d->pst[r * (d->np + 1) + p] = k;
        while (k < rp[r + 1] && static_cast<int64_t>(c[k]) < (p + 1) * kPanelCols) ++k;
      }
      d->pst[r * (d->np + 1) + d->np] = rp[r + 1];
    }
  };
  if (col.scalar_type() == at::kInt) {
    panels(col.const_data_ptr<int32_t>());
  } else {
    panels(static_cast<const uint16_t*>(col.const_data_ptr()));
  }
  const auto* bytes = static_cast<const unsigned char*>(col.const_data_ptr());
  const int64_t es = col.element_size();
  d->runs = row_runs(rp, O, [&](int64_t r) {
    return std::memcmp(bytes + rp[r] * es, bytes + rp[r + 1] * es, (rp[r + 1] - rp[r]) * es) == 0;
  });
  return d;
}

std::shared_ptr<const Derived> compute_offsets(const int32_t* rp, const at::Tensor& col, const ConvGeometry& g) {
  const int64_t nnz = col.numel();
  auto d = std::make_shared<Derived>();
  d->off.resize(nnz);
  std::vector<int32_t>* off = &d->off;
  const int64_t taps = g.kh * g.kw, rows_per_group = g.O / g.groups, plane = g.plane;
  // offset of each column (channel within the group, kh, kw) for a group starting at channel 0; a
  // row of group gi adds gi * Cg planes. A table of K entries: no division per nonzero.
  const int64_t K = g.Cg * taps;
  std::vector<int64_t> col_off(K);
  for (int64_t cl = 0; cl < K; ++cl) {
    const Tap t = decode_tap(cl, g.kh, g.kw);
    const int64_t c = t.c, a = t.i * g.dh, b = t.j * g.dw;
    col_off[cl] = (((a % g.sh) * g.sw + (b % g.sw)) * g.C + c) * plane + (a / g.sh) * g.Wph + b / g.sw;
  }
  bool bad = false;
  auto fill = [&](auto* cols) {
    for (int64_t r = 0; r < g.O; ++r) {
      const int64_t base = (r / rows_per_group) * g.Cg * plane;
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        int64_t cl = static_cast<int64_t>(cols[k]);
        if (cl < 0 || cl >= K) {
          bad = true;
          cl = 0;
        }
        (*off)[k] = static_cast<int32_t>(base + col_off[cl]);
      }
    }
  };
  if (col.scalar_type() == at::kInt) {
    fill(col.const_data_ptr<int32_t>());
  } else {
    fill(static_cast<const uint16_t*>(col.const_data_ptr()));
  }
  TORCH_CHECK(!bad, "sparse_conv2d: col_idx holds a column outside [0, ", K,
              "): the packed weight was made for a different shape");
  // equal offsets, not equal columns: rows of different conv groups read different planes
  d->runs = row_runs(rp, g.O, [&](int64_t r) {
    return std::equal(off->begin() + rp[r], off->begin() + rp[r + 1], off->begin() + rp[r + 1]);
  });
  return d;
}

// Cache of Derived, keyed by the packed tensors' identity (a weak reference to their TensorImpl plus
// its version counter: an in-place change or a new tensor misses) and the input geometry with its
// plane length (for a linear layer: -1 and K). Inference tensors have no version counter: computed
// afresh each call. Entries live as long as their tensors, so every layer of a model (or of several
// models) keeps its own, however many there are: a global bound made a model with more layers than
// the bound recompute everything at every call (each call evicted the entry the next one needed).
// What is bounded is the geometries per weight (input sizes that keep changing): the oldest goes.
struct OffsetEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> col, rp;
  uint32_t col_version, rp_version;
  std::array<int64_t, 13> geom;
  std::shared_ptr<const Derived> derived;
};
constexpr size_t kGeometriesPerWeight = 16;
std::atomic<int64_t> g_derived_computed{0};

template <class Compute>
std::shared_ptr<const Derived> cached_derived(const at::Tensor& col_in, const at::Tensor& rp_in,
                                              const std::array<int64_t, 13>& geom, Compute compute) {
  if (col_in.is_inference() || rp_in.is_inference()) {
    g_derived_computed.fetch_add(1, std::memory_order_relaxed);
    return compute();
  }
  static std::mutex mu;
  static std::unordered_map<const c10::TensorImpl*, std::deque<OffsetEntry>> cache;  // by col_idx
  static size_t inserts = 0;
  const c10::TensorImpl* key = col_in.unsafeGetTensorImpl();
  const uint32_t cv = col_in.unsafeGetTensorImpl()->version_counter().current_version();
  const uint32_t rv = rp_in.unsafeGetTensorImpl()->version_counter().current_version();
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      for (const OffsetEntry& e : it->second) {
        if (e.col_version != cv || e.rp_version != rv || e.geom != geom) continue;
        const auto c = e.col.lock(), r = e.rp.lock();
        if (c.get() == key && r.get() == rp_in.unsafeGetTensorImpl()) return e.derived;
      }
    }
  }
  auto derived = compute();
  g_derived_computed.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu);
  // now and then, drop the entries whose tensors are gone (a freed tensor's address may come back:
  // its stale entries fail the identity check above and are dropped here)
  if (++inserts % 64 == 0) {
    for (auto it = cache.begin(); it != cache.end();) {
      auto& q = it->second;
      q.erase(std::remove_if(q.begin(), q.end(), [](const OffsetEntry& e) { return e.col.expired(); }), q.end());
      it = q.empty() ? cache.erase(it) : std::next(it);
    }
  }
  std::deque<OffsetEntry>& q = cache[key];
  q.erase(std::remove_if(q.begin(), q.end(),
                         [&](const OffsetEntry& e) { return e.col.lock().get() != key || e.geom == geom; }),
          q.end());
  if (q.size() >= kGeometriesPerWeight) q.pop_front();
  q.push_back(OffsetEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(col_in.getIntrusivePtr()),
                          c10::weak_intrusive_ptr<c10::TensorImpl>(rp_in.getIntrusivePtr()), cv, rv, geom, derived});
  return derived;
}

std::shared_ptr<const Derived> conv_derived(const at::Tensor& col_in, const at::Tensor& rp_in, const int32_t* rp,
                                            const at::Tensor& col, const ConvGeometry& g) {
  const std::array<int64_t, 13> geom{g.C, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups, g.plane};
  return cached_derived(col_in, rp_in, geom, [&] { return compute_offsets(rp, col, g); });
}

// row_ptr starts at 0, ends at nnz and never decreases. (Every call: one branch-free pass, which
// the compiler vectorises, and the offending row looked for only when there is one; a check per
// row cost ~0.2 us a call for 768 rows.)
void check_row_ptr(const int32_t* rp, int64_t O, int64_t nnz) {
  TORCH_CHECK(rp[0] == 0 && rp[O] == nnz, "sparse_linear: row_ptr must start at 0 and end at nnz (", nnz, ")");
  bool ok = true;
  for (int64_t r = 0; r < O; ++r) ok &= rp[r] <= rp[r + 1];
  if (ok) return;
  for (int64_t r = 0; r < O; ++r) {
    TORCH_CHECK(rp[r] <= rp[r + 1], "sparse_linear: row_ptr must not decrease (row ", r, ")");
  }
}

// Samples [b0 * B, (b0 + count) * B) of x (n, K), row-major, laid out as count blocks (K, B) at xb:
// block i's column k holds its samples' k-th features (a last block past n holds only n - b * B),
// through the kernels' register transposes, parallel over (block, 64 columns).
void to_blocks(const SparseKernels& kern, const float* x, int64_t n, int64_t K, int64_t B, int64_t b0, int64_t count,
               float* xb) {
  const int64_t kparts = (K + 63) / 64;
  at::parallel_for(0, count * kparts, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bi = b0 + w / kparts, k0 = (w % kparts) * 64;
      kern.transpose(x + bi * B * K + k0, K, xb + (bi - b0) * K * B + k0 * B, B, std::min(B, n - bi * B),
                     std::min<int64_t>(64, K - k0));
    }
  });
}

at::Tensor sparse_linear_cpu(const at::Tensor& input, const at::Tensor& row_ptr_in, const at::Tensor& col_in,
                             const at::Tensor& values_in, int64_t in_features, const std::optional<at::Tensor>& bias_in,
                             bool relu) {
  const int64_t O = check_sparse_linear_inputs(input, row_ptr_in, col_in, values_in, in_features, bias_in);
  const int64_t K = in_features;
  const at::Tensor rp_t = row_ptr_in.contiguous(), col = col_in.contiguous(), values = values_in.contiguous();
  const int32_t* rp = rp_t.const_data_ptr<int32_t>();
  check_row_ptr(rp, O, values.numel());
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
    const Isa isa = active_isa();
    const auto& kern = sparse_kernels(isa);
    note_kernel(KernelOp::kSparseLinear, path_of_isa(static_cast<int>(isa)));
    const std::array<int64_t, 13> geom{-1, K, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    const auto derived = cached_derived(col_in, row_ptr_in, geom, [&] { return linear_derived(rp, col, O, K); });
    const int32_t* runs = derived->runs.data();
    const float* v = values.const_data_ptr<float>();
    const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    const float* xp = x.const_data_ptr<float>();
    if (n == 1) {  // one sample: a gather-dot per row
      float* y = out.data_ptr<float>();
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        bool bad = false;
        for (int64_t c = c0; c < c1; ++c) {
          kern.spmv(rp, runs, col.const_data_ptr(), wide, v, xp, K, b, relu, chunks[c], chunks[c + 1], y, &bad);
        }
        if (bad) any_bad = true;
      });
    } else {
      // Several: the input transposed in blocks of B samples, xb (nb, K, B), so that every nonzero is
      // vector FMAs across a block's samples and a block's slice is one contiguous run of K * B floats
      // (with X^T as one (K, n) matrix the slice of a block has a row per column, n floats apart:
      // at n = 1024 every column of a block sat in its own page, and 3072 -> 768 ran 0.90x dense).
      // B is the kernel's register block, halved while the slice exceeds 4/5 of the L2 cache.
      TORCH_CHECK(derived->cols_in_range, "sparse_linear: col_idx holds a column outside [0, ", K,
                  "): the packed weight was made for a different shape");
      // With at least one full block of panel_samples (64 on AVX-512), full blocks run the panel
      // loop: two rows at a time over 4 vectors of samples (8 independent FMA chains), in column
      // panels of 512 (1024 on AVX2: sparse_kernels_avx2.cpp). Against the one-row loop (8 vectors
      // of samples for 768 inputs, 4 for 3072, halved for L2), BERT-base's shapes at 90 / 95 %,
      // same process, Zen 5: 64 rows 1.13-1.51x, 128 rows 1.05-1.31x, 512 rows 0.97-1.21x; the AVX2
      // copy on the same CPU 0.97-1.33x.
      // (Panels of 64 / 128 columns, whose slice fits L1, measured 0.52-0.88x: each row's
      // accumulators go through memory once per panel; one vector of 16 samples, 4 rows at a
      // time, 0.62-0.85x at 128 rows: every nonzero's value and column are read per 16 samples.)
      const bool panel = kern.spmm_panels != nullptr && n >= kern.panel_samples;
      // (a single block no wider than the samples rounded up to 16: with 16 samples in blocks of 128,
      // each column's vector sat alone at the start of 512 bytes, in an eighth of L1's sets, so the
      // 48 KB of X^T at 768 inputs missed L1 as if it were 384 KB)
      const int64_t B = panel ? kern.panel_samples : std::min(linear_block(kern.spmm_samples, K), (n + 15) / 16 * 16);
      const int64_t nb = (n + B - 1) / B, last = n - (nb - 1) * B;
      if (panel) note_kernel(KernelOp::kSparseLinearPanels, path_of_isa(static_cast<int>(isa)));
      // Where the blocks' X^T passes the threads' L2 caches together, groups of g blocks, as many as
      // those hold, through one (g, K, B) and one (g, O, B) buffer, reused: the whole input
      // transposed first into (nb, K, B) (and every block's results into (nb, O, B)) went out to L3
      // and came back, 6.3 MB each way for 512 x 3072 inputs (a block at a time: 3072 -> 768 at 512
      // rows 1.11-1.21x, Zen 5, 1 thread). Below that, one group: a parallel region per block or
      // group cost 768 x 768 at 512 rows 4-15 % at 2 threads. (The bound was twice one L2 whatever
      // the threads: at 1 thread, 128 rows of 3072 inputs made two blocks, 1.5 MB, whose second
      // transpose wrote lines that came from memory first, where reusing one block's 786 KB keeps
      // them in L2. After a cache-evicting call, 3072 -> 768 at 95 %, 128 rows: 0.53-0.79 ms against
      // 0.67-0.86, medians of 100, the same process, Zen 5.)
      const int64_t xbytes = K * B * static_cast<int64_t>(sizeof(float));
      const int64_t l2all = l2_cache_bytes() * std::max<int64_t>(1, at::get_num_threads());
      const int64_t g = nb * xbytes <= l2all ? nb : std::max<int64_t>(1, l2all / xbytes);
      at::Tensor xb = at::empty({g, K, B}, input.options());
      at::Tensor yb = at::empty({g, O, B}, input.options());
      float* xbp = xb.data_ptr<float>();
      float* ybp = yb.data_ptr<float>();
      float* outp = out.data_ptr<float>();
      for (int64_t g0 = 0; g0 < nb; g0 += g) {
        const int64_t gn = std::min(g, nb - g0);
        // (ATen's strided copies for these two layouts cost 39 of BERT-base's 250 ms at 90 %)
        to_blocks(kern, xp, n, K, B, g0, gn, xbp);
        // work items (block, chunk of rows): a thread runs its rows over a block while it is in
        // cache, then writes their results, transposed, into the output
        at::parallel_for(0, gn * nchunks, 1, [&](int64_t w0, int64_t w1) {
          bool bad = false;
          for (int64_t w = w0; w < w1; ++w) {
            const int64_t j = w / nchunks, c = w % nchunks, bi = g0 + j, nbi = bi == nb - 1 ? last : B;
            const int64_t r0 = chunks[c], r1 = chunks[c + 1];
            const float* xj = xbp + j * K * B;
            float* yj = ybp + j * O * B;
            if (panel && nbi == B) {  // (a last, partial block: the one-row loop, which masks its lanes)
              kern.spmm_panels(derived->pst.data(), derived->np, col.const_data_ptr(), wide, v, xj, b,
                               relu ? kActRelu : kActNone, r0, r1, yj);
            } else {
              kern.spmm(rp, runs, col.const_data_ptr(), wide, v, xj, B, K, nbi, b, relu, r0, r1, yj, B, &bad);
            }
            kern.transpose(yj + r0 * B, B, outp + bi * B * O + r0, O, r1 - r0, nbi);
          }
          if (bad) any_bad = true;
        });
      }
    }
  } else {
    note_kernel(KernelOp::kSparseLinear, KernelPath::kFloat64);
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

// Two sparse linear layers with an activation between them, act in {"none", "relu", "gelu"} (GELU:
// the exact erf form: the kErfPoly polynomial wherever the ISA has panels, for every row of a call;
// ffn_gelu (at::gelu) on the portable copy and for float64): down(act(up(x))), x (..., K) -> (..., O),
// hidden H.
// With full blocks of the panel loop's samples, each block goes up -> act -> down in the blocked
// layout (H, B) the down layer reads, so the hidden activations never take the (n, H) layout: the
// up layer's output transpose and the down layer's input transpose (rows 4 H bytes apart, 12 KB for
// BERT's 3072: one L1 set) are skipped, and a block's hidden (H x 64 floats) stays in L2 between
// the layers. Other calls (float64, fewer samples, the last partial block) compose sparse_linear.
at::Tensor sparse_ffn_cpu(const at::Tensor& input, const at::Tensor& rp1_in, const at::Tensor& col1_in,
                          const at::Tensor& val1_in, const std::optional<at::Tensor>& bias1, const at::Tensor& rp2_in,
                          const at::Tensor& col2_in, const at::Tensor& val2_in, const std::optional<at::Tensor>& bias2,
                          int64_t in_features, c10::string_view activation) {
  check_ffn_activation(activation);
  const int64_t K = in_features;
  const int64_t H = check_sparse_linear_inputs(input, rp1_in, col1_in, val1_in, K, bias1);
  TORCH_CHECK(H >= 1, "sparse_ffn: the first layer has no outputs");
  const int64_t O = check_sparse_linear_inputs(at::empty({0, H}, input.options()), rp2_in, col2_in, val2_in, H, bias2);
  const bool relu = activation == "relu", gelu = activation == "gelu";
  const int64_t n = input.numel() / K;
  const Isa isa = active_isa();
  const auto& kern = sparse_kernels(isa);
  auto compose = [&](const at::Tensor& x) {
    at::Tensor h = sparse_linear_cpu(x, rp1_in, col1_in, val1_in, K, bias1, relu);
    if (gelu && h.scalar_type() == at::kFloat && kern.gelu != nullptr) {
      kern.gelu(h.data_ptr<float>(), h.numel());  // (h: sparse_linear's fresh contiguous output)
    } else if (gelu) {
      h = ffn_gelu(h);
    }
    return sparse_linear_cpu(h, rp2_in, col2_in, val2_in, H, bias2, false);
  };
  if (input.scalar_type() != at::kFloat || kern.spmm_panels == nullptr || n < kern.panel_samples || O == 0) {
    return compose(input);
  }
  note_kernel(KernelOp::kSparseFfnBlocked, path_of_isa(static_cast<int>(isa)));
  const at::Tensor rp1_t = rp1_in.contiguous(), col1 = col1_in.contiguous(), val1 = val1_in.contiguous();
  const at::Tensor rp2_t = rp2_in.contiguous(), col2 = col2_in.contiguous(), val2 = val2_in.contiguous();
  const int32_t* rp1 = rp1_t.const_data_ptr<int32_t>();
  const int32_t* rp2 = rp2_t.const_data_ptr<int32_t>();
  check_row_ptr(rp1, H, val1.numel());
  check_row_ptr(rp2, O, val2.numel());
  const std::array<int64_t, 13> g1{-1, K, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, g2{-1, H, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  const auto d1 = cached_derived(col1_in, rp1_in, g1, [&] { return linear_derived(rp1, col1, H, K); });
  const auto d2 = cached_derived(col2_in, rp2_in, g2, [&] { return linear_derived(rp2, col2, O, H); });
  TORCH_CHECK(d1->cols_in_range && d2->cols_in_range, "sparse_ffn: col_idx holds a column outside the layer's ",
              "inputs: the packed weights were made for different shapes");
  const bool wide1 = col1.scalar_type() == at::kInt, wide2 = col2.scalar_type() == at::kInt;
  const at::Tensor b1t = bias1.has_value() ? bias1->contiguous() : at::Tensor();
  const at::Tensor b2t = bias2.has_value() ? bias2->contiguous() : at::Tensor();
  const float* b1 = b1t.defined() ? b1t.const_data_ptr<float>() : nullptr;
  const float* b2 = b2t.defined() ? b2t.const_data_ptr<float>() : nullptr;
  const float* v1 = val1.const_data_ptr<float>();
  const float* v2 = val2.const_data_ptr<float>();
  const int64_t B = kern.panel_samples, full = n / B;
  // the activation on the up layer's accumulators as the panels store them (GELU: the kErfPoly
  // polynomial, no pass of at::gelu_ over each hidden block: the GELU's share of a BERT-base FFN call,
  // 128 rows at 90 %, 281 -> ~100 us, Xeon)
  const int act1 = relu ? kActRelu : gelu ? kActGelu : kActNone;
  const int64_t parts = std::max<int64_t>(1, at::get_num_threads() * 4);
  const auto chunks1 = balanced_chunks(rp1, H, parts), chunks2 = balanced_chunks(rp2, O, parts);
  const int64_t nc1 = static_cast<int64_t>(chunks1.size()) - 1, nc2 = static_cast<int64_t>(chunks2.size()) - 1;
  const at::Tensor x = input.reshape({n, K}).contiguous();
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = O;
  at::Tensor out = at::empty({n, O}, input.options());
  at::Tensor xb = at::empty({K, B}, input.options()), hb = at::empty({H, B}, input.options());
  at::Tensor yb = at::empty({O, B}, input.options());
  const float* xp = x.const_data_ptr<float>();
  float* xbp = xb.data_ptr<float>();
  float* hbp = hb.data_ptr<float>();
  float* ybp = yb.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  for (int64_t bi = 0; bi < full; ++bi) {
    to_blocks(kern, xp, n, K, B, bi, 1, xbp);
    at::parallel_for(0, nc1, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = chunks1[c], r1 = chunks1[c + 1];
        kern.spmm_panels(d1->pst.data(), d1->np, col1.const_data_ptr(), wide1, v1, xbp, b1, act1, r0, r1, hbp);
      }
    });
    at::parallel_for(0, nc2, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = chunks2[c], r1 = chunks2[c + 1];
        kern.spmm_panels(d2->pst.data(), d2->np, col2.const_data_ptr(), wide2, v2, hbp, b2, kActNone, r0, r1, ybp);
        kern.transpose(ybp + r0 * B, B, outp + bi * B * O + r0, O, r1 - r0, B);
      }
    });
  }
  if (full * B < n) out.narrow(0, full * B, n - full * B).copy_(compose(x.narrow(0, full * B, n - full * B)));
  return out.reshape(out_shape);
}

constexpr int64_t kJitScratch = jit::ConvCode::kRowsPerBlockAligned * 16;

// A tile of 16 positions of the wide grid whose output columns are not contiguous (kCompress):
// where it starts in the grid (q0) and in an output plane (out), and its lane masks (sparse_jit.h).
struct JitTile {
  int64_t q0, out;
  uint64_t masks;
};

// The tiles of a grid of Hout rows of Wph positions, of which the first Wout of each row are outputs
// (tiles with no output left out).
std::vector<JitTile> jit_tiles(int64_t Hout, int64_t Wph, int64_t Wout) {
  std::vector<JitTile> tiles;
  const int64_t q_len = Hout * Wph;
  for (int64_t q0 = 0; q0 < q_len; q0 += 16) {
    uint64_t keep = 0;
    int64_t out = -1, n = 0;
    for (int64_t t = 0; t < 16 && q0 + t < q_len; ++t) {
      const int64_t q = q0 + t;
      if (q % Wph >= Wout) continue;
      keep |= uint64_t(1) << t;
      if (out < 0) out = q / Wph * Wout + q % Wph;
      ++n;
    }
    if (n > 0) tiles.push_back({q0, out, keep | (((uint64_t(1) << n) - 1) << 16)});
  }
  return tiles;
}

// Block b of the generated code on tiles [i0, i1): the listed tiles (kCompress code) or the
// direct / wide output's tiles of 16 positions (run_jit says which). scratch, scratch_res: two
// kJitScratch buffers of the calling thread, for a last partial tile of a direct output.
void run_block_tiles(const SparseKernels& kern, const jit::ConvCode* code, int64_t b, const float* x, int64_t O,
                     const ConvOut<float>& o, const std::vector<JitTile>* tiles, int64_t i0, int64_t i1,
                     float* scratch, float* scratch_res) {
  const int64_t rb = code->row_begin(b), rows = std::min<int64_t>(code->rows_per_block(), O - rb);
  const float* bias = o.bias != nullptr ? o.bias + rb : nullptr;
  const jit::TileFn fn = code->fn(b);
  if (tiles != nullptr) {
    for (int64_t i = i0; i < i1; ++i) {
      const JitTile& t = (*tiles)[i];
      const float* res = o.residual != nullptr ? o.residual + rb * o.ldo + t.out : nullptr;
      fn(o.out + rb * o.ldo + t.out, x + t.q0, o.ldo * 4, bias, res, t.masks);
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t q0 = 16 * i, n = std::min<int64_t>(16, o.q_len - q0);
    const float* res = o.residual != nullptr ? o.residual + rb * o.ldo + q0 : nullptr;
    if (n == 16) {
      fn(o.out + rb * o.ldo + q0, x + q0, o.ldo * 4, bias, res, 0);
    } else if (!o.direct) {  // the wide buffer has the slack of whole tiles
      fn(o.out + rb * o.ldo + q0, x + q0, o.ldo * 4, nullptr, nullptr, 0);
    } else {  // scratch tiles (row stride 16): the valid part of the residual in, of the result out
      if (res != nullptr) kern.tile_finish(res, o.ldo, scratch_res, 16, rows, n, nullptr, nullptr, 0, false);
      fn(scratch, x + q0, 16 * 4, bias, res != nullptr ? scratch_res : nullptr, 0);
      kern.tile_finish(scratch, 16, o.out + rb * o.ldo + q0, o.ldo, rows, n, nullptr, nullptr, 0, false);
    }
  }
}

// All rows through the generated code, each block of rows, 16 positions of the wide grid at a time.
// tiles (code made with kCompress): the final output (o.ldo its plane), only the listed tiles, each
// writing its outputs where they go. Otherwise a direct output (the final output, row stride q_len):
// code made with o's bias / residual / ReLU flags, the last partial tile through scratch tiles
// (nothing is read or written past q_len); or o.out is the wide buffer and the code has no flags
// (the caller finishes the output).
template <typename T>
void run_jit(const jit::ConvCode* code, const T* x, int64_t O, const ConvOut<T>& o, bool tile_major,
             const std::vector<JitTile>* tiles = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    const auto& kern = sparse_kernels(Isa::kAvx512);
    const int64_t rpb = code->rows_per_block(), nb = code->blocks();
    const int64_t ntiles = tiles != nullptr ? static_cast<int64_t>(tiles->size()) : (o.q_len + 15) / 16;
    // work items: (block, range of tiles). With few blocks per thread (a 64-row layer has 3) the
    // tiles are split too, so that every thread has work (each runs its blocks' code on its tiles)
    const int64_t threads = at::get_num_threads();
    // Tile-major (ranges of kTileSpan tiles, every block on each): where the weight has at least as
    // many columns as rows (each tile range's input is reused by every block while in L2, and the
    // threads split the input instead of each reading all of it). Block-major reads the whole input
    // once per block. ResNet-50's convs at 90 %, one process, Xeon (AVX-512), 1 / 2 threads: 1x1
    // 256 -> 64 at 56x56 1.55x / 2.15x (batch 8: 1.45x / 2.04x), 256 -> 128 2.0x / 2.2x, 512 -> 128
    // at 28x28 1.12x / 1.17x (batch 8: 1.37x / 1.32x); 3x3 64 -> 64 at 56x56 1.00x / 1.30x (batch 8:
    // 0.94x / 1.36x; 128 -> 128 at 28x28 0.97x / 1.20x), so wider kernels go tile-major only with
    // several threads; 64 -> 256 0.69x / 0.85x and 128 -> 512 0.73-0.97x (more rows than columns:
    // every tile range runs all of the larger code and writes all the rows) stay block-major.
    auto run_tiles = [&](int64_t b, int64_t i0, int64_t i1, float* scratch, float* scratch_res) {
      run_block_tiles(kern, code, b, x, O, o, tiles, i0, i1, scratch, scratch_res);
    };
    if (tile_major && ntiles >= 2 * kTileSpan) {
      note_kernel(KernelOp::kSparseConv2dTileMajor, KernelPath::kJit);
      at::parallel_for(0, (ntiles + kTileSpan - 1) / kTileSpan, 1, [&](int64_t w0, int64_t w1) {
        alignas(64) float scratch[kJitScratch];
        alignas(64) float scratch_res[kJitScratch] = {};
        for (int64_t w = w0; w < w1; ++w) {
          for (int64_t b = 0; b < nb; ++b) {
            run_tiles(b, w * kTileSpan, std::min(ntiles, (w + 1) * kTileSpan), scratch, scratch_res);
          }
        }
      });
      return;
    }
    const int64_t parts = nb >= 4 * threads ? 1 : std::min(ntiles, (4 * threads + nb - 1) / nb);
    at::parallel_for(0, nb * parts, 1, [&](int64_t w0, int64_t w1) {
      alignas(64) float scratch[kJitScratch];
      alignas(64) float scratch_res[kJitScratch] = {};
      // the code (with its values) of the next blocks is asked for ahead: it is cold at each call in a
      // whole model (spreading the requests over the tiles of the block before measured no better)
      code->prefetch(w0 / parts);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / parts, i0 = ntiles * (w % parts) / parts, i1 = ntiles * (w % parts + 1) / parts;
        if (w == w0 || w % parts == 0) {
          for (int64_t d = 1; d <= kJitPrefetchBlocks; ++d) code->prefetch(b + d);  // (past the end: harmless)
        }
        run_tiles(b, i0, i1, scratch, scratch_res);
      }
    });
  }
}

// float32: the per-ISA loop; float64: the portable one.
void conv_rows_any(const int32_t* rp, const int32_t* runs, const int32_t* off, const float* v, const float* x,
                   int64_t r0, int64_t r1, const ConvOut<float>& out) {
  sparse_kernels(active_isa()).conv_rows(rp, runs, off, v, x, r0, r1, out);
}
void conv_rows_any(const int32_t* rp, const int32_t* /*runs*/, const int32_t* off, const double* v, const double* x,
                   int64_t r0, int64_t r1, const ConvOut<double>& out) {
  scalar::conv_rows_f64(rp, off, v, x, r0, r1, out);
}

// One sample relaid out for the direct convolution: stride phases (sh * sw planes of (Hph, Wph)) of
// the zero-padded input, so that every tap reads a unit-stride run (see sparse_conv_impl.h). Every
// element of the phases some tap reads is written once (input or zero padding: no memset of the
// whole buffer first), the unused phases are left alone (a 1x1 stride-2 conv reads one of four:
// nothing reads the others), and the slack past the last plane is zeroed.
template <typename T>
void build_phases(const T* x, const ConvGeometry& g, T* buf) {
  const int64_t plane = g.plane;
  std::vector<char> used(g.sh * g.sw, 0);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) used[((i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw] = 1;
  }
  for (int64_t pr = 0; pr < g.sh; ++pr) {
    for (int64_t pc = 0; pc < g.sw; ++pc) {
      if (!used[pr * g.sw + pc]) continue;
      // phase column w2 reads input column w2 * sw + pc - pw: valid for w2 in [w_lo, w_hi)
      const int64_t w_lo = std::min(g.Wph, std::max<int64_t>(0, (g.pw - pc + g.sw - 1) / g.sw));
      const int64_t w_hi = std::max(w_lo, std::min(g.Wph, (g.W - 1 + g.pw - pc) / g.sw + 1));
      T* dst = buf + (pr * g.sw + pc) * g.C * plane;
      const bool whole = g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;  // a plane is the input's plane
      at::parallel_for(0, g.C, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          T* dplane = dst + c * plane;
          if (whole) {
            std::copy(x + c * g.H * g.W, x + (c + 1) * g.H * g.W, dplane);
            std::fill(dplane + g.H * g.W, dplane + plane, T(0));
            continue;
          }
          for (int64_t h2 = 0; h2 < g.Hph; ++h2) {
            T* d = dplane + h2 * g.Wph;
            const int64_t h = h2 * g.sh + pr - g.ph;
            if (h < 0 || h >= g.H) {
              std::fill(d, d + g.Wph, T(0));
              continue;
            }
            std::fill(d, d + w_lo, T(0));
            const T* src = x + (c * g.H + h) * g.W + (w_lo * g.sw + pc - g.pw);
            if (g.sw == 1) {
              std::copy(src, src + (w_hi - w_lo), d + w_lo);
            } else {
              for (int64_t w2 = w_lo; w2 < w_hi; ++w2) d[w2] = src[(w2 - w_lo) * g.sw];
            }
            std::fill(d + w_hi, d + g.Wph, T(0));
          }
          std::fill(dplane + g.Hph * g.Wph, dplane + plane, T(0));
        }
      });
    }
  }
  const int64_t end = g.sh * g.sw * g.C * plane;
  std::fill(buf + end, buf + g.buf_len, T(0));
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& row_ptr_in, const at::Tensor& col_in,
                             const at::Tensor& values_in, at::IntArrayRef weight_shape,
                             const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool relu,
                             const std::optional<at::Tensor>& residual_in) {
  const ConvGeometry g = check_sparse_conv2d_inputs(input, row_ptr_in, col_in, values_in, weight_shape, bias_in, stride,
                                                    padding, dilation, groups, residual_in);
  const at::Tensor rp_t = row_ptr_in.contiguous(), col = col_in.contiguous(), values = values_in.contiguous();
  const int32_t* rp = rp_t.const_data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[g.O] == values.numel(), "sparse_conv2d: row_ptr must start at 0 and end at nnz");
  for (int64_t r = 0; r < g.O; ++r) TORCH_CHECK(rp[r] <= rp[r + 1], "sparse_conv2d: row_ptr must not decrease");
  at::Tensor out = at::empty({g.N, g.O, g.Hout, g.Wout}, input.options());
  if (out.numel() == 0) return out;
  // A 1x1, stride-1, unpadded conv on several samples is one product over all N * H * W positions:
  // the samples are laid side by side in each channel's plane (longer runs, fewer partial tiles).
  // Merging pays two copies, so only where a per-sample tail wastes over 10 % (7x7 planes: 15 of 64).
  // Otherwise, when H * W is a multiple of 16, each sample's input planes are the phase planes as
  // they are (no copy) and the output is written directly. (Reading unaligned planes in place, with
  // the tail's loads masked, measured no faster than copying them to aligned ones: split loads.)
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  const int64_t hw = g.H * g.W;
  const bool merge = g.N > 1 && pointwise && ((hw + 15) / 16 * 16 - hw) * 10 > hw;
  const bool in_place = pointwise && !merge && hw % 16 == 0;
  ConvGeometry gm = g;
  if (merge) {
    gm.N = 1, gm.H = 1, gm.W = g.N * g.H * g.W, gm.Hout = 1, gm.Wout = gm.W, gm.Hph = 1, gm.Wph = gm.W;
    gm.plane = (gm.W + 15) / 16 * 16;
    gm.buf_len = g.C * gm.plane + (gm.W + 127) / 128 * 128 + gm.W + 128;
    TORCH_CHECK(gm.buf_len < (int64_t(1) << 31), "sparse_conv2d: input too large for 32-bit offsets");
  }
  // per nonzero: the offset of its tap in the phase buffer, derived from this call's geometry and
  // cached per (packed weight, geometry): later calls with the same input shape reuse it
  const std::shared_ptr<const Derived> derived = conv_derived(col_in, row_ptr_in, rp, col, gm);
  const std::vector<int32_t>& off = derived->off;
  const int32_t* runs = derived->runs.data();
  const int64_t q_len = gm.Hout * gm.Wph;
  // no junk columns (1x1 convs, unpadded, even sizes under stride 2): results go straight into the
  // output, bias, ReLU and residual applied on the way (one pass over the output, not three).
  // Otherwise the vector loops write a wide buffer that is then copied out, and the generated code
  // (float32 on AVX-512: rows of a block share each input load) packs each tile's output lanes
  // together and stores them where they go (compress: the same single pass, no wide buffer).
  const bool direct = !merge && gm.Wph == g.Wout;
  const bool compress = !merge && !direct;
  // Only with enough positions per sample (the code is fetched once per call and reused once per 16
  // positions: on 7x7 planes fetching it costs more than the loads it saves) and enough nonzeros per
  // row (each row's result costs a store, and its bias / residual / ReLU, per 16 positions: with 6
  // nonzeros a row, as in ResNet's 1x1 64 -> 256 convs, that traffic outweighs the loads saved).
  // Not for inference tensors: their derived data is not cached (no version counter, so no change
  // of the values the code holds could be seen), and code made afresh at every call would cost more
  // than it saves.
  const bool cached = !col_in.is_inference() && !row_ptr_in.is_inference() && !values_in.is_inference();
  // Nor for 1x1 stride-1 convs on several samples (unless forced): each sample's input was written
  // before the previous ones were read and comes from beyond L2, and there the vector loops took it
  // better. ResNet-50 at 90 / 95 %, batch 8, 1 thread, Xeon (AVX-512), one process: the whole model
  // 1.09x / 1.08x faster with those convs on the loops (the fused bottlenecks keep their code);
  // alone, on fresh inputs, 256 -> 64 at 56 x 56 6.5 vs 11.9 ms, 512 -> 128 at 28 x 28 4.3 vs 5.3, 64
  // -> 256 5.5 vs 7.6. (Prefetching the next span of input in the tile-major order did not help.)
  const bool use_jit = input.scalar_type() == at::kFloat && cached && jit::enabled() &&
                       (jit::forced() || (q_len >= kJitMinPositions && rp[g.O] >= kJitMinRowNnz * g.O &&
                                          !(pointwise && g.N > 1)));
  const int flags = merge ? 0  // (merged samples: the wide buffer, copied out per sample)
                         : (compress ? jit::kCompress : 0) | (bias_in.has_value() ? jit::kBias : 0) |
                               (residual_in.has_value() ? jit::kResidual : 0) | (relu ? jit::kRelu : 0);
  const std::shared_ptr<const jit::ConvCode> code_held =
      use_jit ? derived->jit_code(rp, g.O, flags, values_in, values.const_data_ptr<float>()) : nullptr;
  const jit::ConvCode* code = code_held.get();
  // (run_jit: columns >= rows per group; wider kernels only with several threads, see there)
  const bool tile_major = g.Cg * g.kh * g.kw * g.groups >= g.O && (g.kh * g.kw == 1 || at::get_num_threads() > 1);
  note_kernel(KernelOp::kSparseConv2d, input.scalar_type() != at::kFloat ? KernelPath::kFloat64
                                       : code != nullptr                 ? KernelPath::kJit
                                                                         : path_of_isa(static_cast<int>(active_isa())));
  if (code != nullptr) {  // the first blocks' code travels while the input is laid out
    for (int64_t b = 0; b < std::min<int64_t>(code->blocks(), 2 * at::get_num_threads()); ++b) code->prefetch(b);
  }
  const int64_t ldo = (q_len + 127) / 128 * 128;  // whole tiles of up to 128 positions
  const std::vector<JitTile> tiles =
      compress && code != nullptr ? jit_tiles(g.Hout, gm.Wph, g.Wout) : std::vector<JitTile>();
  const auto chunks = balanced_chunks(rp, g.O, std::max<int64_t>(1, at::get_num_threads() * 4));
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  const at::Tensor x = input.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor res = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_conv2d", [&] {
    // ATen's CPU allocator returns 64-byte aligned memory: planes (multiples of 16 floats) stay aligned
    at::Tensor buf_t = at::empty({in_place ? 0 : gm.buf_len}, input.options());
    at::Tensor wide_t = at::empty({direct || (compress && code != nullptr) ? 0 : g.O * ldo}, input.options());
    scalar_t* buf = buf_t.data_ptr<scalar_t>();
    scalar_t* wide = wide_t.data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (merge) {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      std::fill(buf, buf + gm.buf_len, scalar_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t n = 0; n < g.N; ++n) std::copy(xp + (n * g.C + c) * hw, xp + (n * g.C + c + 1) * hw, buf + c * gm.plane + n * hw);
      }
      const ConvOut<scalar_t> wide_out{wide, ldo, q_len, nullptr, nullptr, false, false};
      if (code != nullptr) {
        run_jit<scalar_t>(code, buf, g.O, wide_out, tile_major);
      } else {
        at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
          conv_rows_any(rp, runs, off.data(), v, buf, chunks[c0], chunks[c1], wide_out);
        });
      }
      scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* rs = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, g.O, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t bb = b != nullptr ? b[r] : scalar_t(0);
          for (int64_t n = 0; n < g.N; ++n) {
            const scalar_t* src = wide + r * ldo + n * hw;
            const int64_t base = (n * g.O + r) * hw;
            for (int64_t p = 0; p < hw; ++p) {
              scalar_t y = src[p] + bb;
              if (rs != nullptr) y += rs[base + p];
              o[base + p] = (relu && y < scalar_t(0)) ? scalar_t(0) : y;
            }
          }
        }
      });
      return;
    }
    for (int64_t n = 0; n < g.N; ++n) {
      const scalar_t* xn = x.const_data_ptr<scalar_t>() + n * g.C * g.H * g.W;
      const scalar_t* xin = xn;
      if (!in_place) {
        build_phases<scalar_t>(xn, g, buf);
        xin = buf;
      }
      scalar_t* o = out.data_ptr<scalar_t>() + n * g.O * g.Hout * g.Wout;
      const scalar_t* rs = res.defined() ? res.const_data_ptr<scalar_t>() + n * g.O * g.Hout * g.Wout : nullptr;
      if (direct) {  // the wide grid is the output grid: the kernel writes the output itself
        const ConvOut<scalar_t> final_out{o, q_len, q_len, b, rs, relu, true};
        if (code != nullptr) {
          run_jit<scalar_t>(code, xin, g.O, final_out, tile_major);
          continue;
        }
        at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
          conv_rows_any(rp, runs, off.data(), v, xin, chunks[c0], chunks[c1], final_out);
        });
        continue;
      }
      if (code != nullptr) {  // (compress)
        run_jit<scalar_t>(code, xin, g.O, ConvOut<scalar_t>{o, g.Hout * g.Wout, q_len, b, rs, relu, true}, tile_major,
                         &tiles);
        continue;
      }
      const ConvOut<scalar_t> wide_out{wide, ldo, q_len, nullptr, nullptr, false, false};
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        conv_rows_any(rp, runs, off.data(), v, xin, chunks[c0], chunks[c1], wide_out);
      });
      at::parallel_for(0, g.O, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t bb = b != nullptr ? b[r] : scalar_t(0);
          for (int64_t oh = 0; oh < g.Hout; ++oh) {
            const scalar_t* src = wide + r * ldo + oh * g.Wph;
            const int64_t base = (r * g.Hout + oh) * g.Wout;
            for (int64_t ow = 0; ow < g.Wout; ++ow) {
              scalar_t y = src[ow] + bb;
              if (rs != nullptr) y += rs[base + ow];
              o[base + ow] = (relu && y < scalar_t(0)) ? scalar_t(0) : y;
            }
          }
        }
      });
    }
  });
  return out;
}


// fastprune.ops.sparse_bottleneck: y = relu(conv3(relu(conv2(relu(conv1(x) + b1)) + b2)) + b3 + x),
// conv1 and conv3 1x1, conv2 k x k with stride 1 and "same" padding (a ResNet bottleneck without
// downsampling). Depth-first where the generated code runs every conv: each work item (a sample, or
// a range of its rows when there are fewer samples than threads) goes down the image in bands of
// about 256 positions, and each band runs conv1 on the rows it needs next, conv2 on its rows, then
// conv3 with the residual, while the band's intermediate rows are in L2 (the 64- and 256-channel
// activations of one 56x56 sample, 0.8 and 3.2 MB, are not). conv1's and conv2's outputs go to
// buffers of the work item's own, so that threads share nothing but the output (each writes its own
// rows). Elsewhere (float64, no generated code, planes not a multiple of 16): the three convs one
// after the other, as three sparse_conv2d calls compute them. Same values either way (the same code
// or loops compute each output).
at::Tensor sparse_bottleneck_cpu(const at::Tensor& input, const at::Tensor& rp1_in, const at::Tensor& col1_in,
                                 const at::Tensor& val1_in, const std::optional<at::Tensor>& b1_in,
                                 const at::Tensor& rp2_in, const at::Tensor& col2_in, const at::Tensor& val2_in,
                                 const std::optional<at::Tensor>& b2_in, at::IntArrayRef ws2,
                                 at::IntArrayRef padding2, const at::Tensor& rp3_in, const at::Tensor& col3_in,
                                 const at::Tensor& val3_in, const std::optional<at::Tensor>& b3_in) {
  TORCH_CHECK(input.dim() == 4, "sparse_bottleneck: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(ws2.size() == 4 && padding2.size() == 2, "sparse_bottleneck: weight_shape2 takes four values, padding2 two");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t C1 = rp1_in.numel() - 1, C2 = ws2[0];
  TORCH_CHECK(C1 >= 0 && rp3_in.numel() - 1 == C, "sparse_bottleneck: the last conv must give the input's ", C,
              " channels (the residual), its row_ptr has ", rp3_in.numel() - 1, " rows");
  TORCH_CHECK(ws2[1] == C1, "sparse_bottleneck: conv2 takes ", ws2[1], " channels, conv1 gives ", C1);
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  const std::vector<int64_t> ws1{C1, C, 1, 1}, ws3{C, C2, 1, 1};
  const at::Tensor h1 = at::empty({N, C1, H, W}, input.options());
  const ConvGeometry g1 = check_sparse_conv2d_inputs(input, rp1_in, col1_in, val1_in, ws1, b1_in, one, zero, one, 1,
                                                     std::nullopt);
  const ConvGeometry g2 = check_sparse_conv2d_inputs(h1, rp2_in, col2_in, val2_in, ws2, b2_in, one, padding2, one, 1,
                                                     std::nullopt);
  TORCH_CHECK(g2.Hout == H && g2.Wout == W, "sparse_bottleneck: conv2 must keep the size (", H, "x", W, "), gives ",
              g2.Hout, "x", g2.Wout);
  const at::Tensor h2 = at::empty({N, C2, H, W}, input.options());
  const ConvGeometry g3 = check_sparse_conv2d_inputs(h2, rp3_in, col3_in, val3_in, ws3, b3_in, one, zero, one, 1, input);
  (void)g1, (void)g3;
  auto compose = [&] {
    const at::Tensor a = sparse_conv2d_cpu(input, rp1_in, col1_in, val1_in, ws1, b1_in, one, zero, one, 1, true,
                                           std::nullopt);
    const at::Tensor b = sparse_conv2d_cpu(a, rp2_in, col2_in, val2_in, ws2, b2_in, one, padding2, one, 1, true,
                                           std::nullopt);
    return sparse_conv2d_cpu(b, rp3_in, col3_in, val3_in, ws3, b3_in, one, zero, one, 1, true, input);
  };
  const int64_t HW = H * W;
  const bool cached = !col1_in.is_inference() && !rp1_in.is_inference() && !val1_in.is_inference() &&
                      !col2_in.is_inference() && !rp2_in.is_inference() && !val2_in.is_inference() &&
                      !col3_in.is_inference() && !rp3_in.is_inference() && !val3_in.is_inference();
  // (each conv then runs the code or loops its own sparse_conv2d call would: the same values)
  if (input.scalar_type() != at::kFloat || !cached || !jit::enabled() || HW % 16 != 0 || N * C * HW == 0 ||
      C1 == 0 || C2 == 0 || (!jit::forced() && HW < kJitMinPositions)) {
    return compose();
  }
  const at::Tensor rp1 = rp1_in.contiguous(), col1 = col1_in.contiguous(), v1 = val1_in.contiguous();
  const at::Tensor rp2 = rp2_in.contiguous(), col2 = col2_in.contiguous(), v2 = val2_in.contiguous();
  const at::Tensor rp3 = rp3_in.contiguous(), col3 = col3_in.contiguous(), v3 = val3_in.contiguous();
  const int32_t* p1 = rp1.const_data_ptr<int32_t>();
  const int32_t* p2 = rp2.const_data_ptr<int32_t>();
  const int32_t* p3 = rp3.const_data_ptr<int32_t>();
  check_row_ptr(p1, C1, v1.numel());
  check_row_ptr(p2, C2, v2.numel());
  check_row_ptr(p3, C, v3.numel());
  const auto d1 = conv_derived(col1_in, rp1_in, p1, col1, g1);
  const auto d2 = conv_derived(col2_in, rp2_in, p2, col2, g2);
  const auto d3 = conv_derived(col3_in, rp3_in, p3, col3, g3);
  const bool use1 = jit::forced() || p1[C1] >= kJitMinRowNnz * C1, use3 = jit::forced() || p3[C] >= kJitMinRowNnz * C;
  if (!jit::forced() && p2[C2] < kJitMinRowNnz * C2) return compose();  // (conv2 has no vector-loop band path)
  const int fb1 = b1_in.has_value() ? jit::kBias : 0, fb2 = b2_in.has_value() ? jit::kBias : 0;
  const int fb3 = b3_in.has_value() ? jit::kBias : 0;
  const bool compress2 = g2.Wph != W;
  const auto c1 = use1 ? d1->jit_code(p1, C1, fb1 | jit::kRelu, val1_in, v1.const_data_ptr<float>()) : nullptr;
  const auto c2 = d2->jit_code(p2, C2, fb2 | jit::kRelu | (compress2 ? jit::kCompress : 0), val2_in,
                               v2.const_data_ptr<float>());
  const auto c3 = use3 ? d3->jit_code(p3, C, fb3 | jit::kResidual | jit::kRelu, val3_in, v3.const_data_ptr<float>())
                       : nullptr;
  if (c2 == nullptr || (use1 && c1 == nullptr) || (use3 && c3 == nullptr)) return compose();
  note_kernel(KernelOp::kSparseBottleneckBands, KernelPath::kJit);
  const auto& kern = sparse_kernels(Isa::kAvx512);
  const auto& vkern = sparse_kernels(active_isa());
  const std::vector<JitTile> tiles2 = compress2 ? jit_tiles(H, g2.Wph, W) : std::vector<JitTile>();
  // conv2's tiles: the listed ones (compress), else the direct grid's (row stride W)
  const int64_t nt2 = compress2 ? static_cast<int64_t>(tiles2.size()) : HW / 16;
  auto tile_q0 = [&](int64_t i) { return compress2 ? tiles2[i].q0 : 16 * i; };
  // the first conv2 tile holding a position of wide row r or later; the first starting at or past it
  auto search = [&](int64_t q, int64_t slack) {
    int64_t lo = 0, hi = nt2;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tile_q0(mid) + slack <= q) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  auto first_tile = [&](int64_t r) { return search(r * g2.Wph, 16); };
  auto tiles_before = [&](int64_t r) { return search(r * g2.Wph - 1, 1); };
  // Work items: a sample, or (fewer samples than threads) a range of its positions; each goes on in
  // bands of about 256 positions. Items and bands start on whole tiles of the 1x1 convs: 16
  // positions for the generated code, 64 for the vector loops (whose steps of 4 vectors sum in
  // another order than their last partial step: a band must split the positions where the whole
  // plane's run does). Bands of rows instead split 28-row planes 12 / 16 between two threads.
  const int64_t align = c1 != nullptr && c3 != nullptr ? 16 : 64;
  const int64_t units = (HW + align - 1) / align, threads = at::get_num_threads();
  // (ResNet-50 at 90 %, whole model, 1 thread, Xeon: bands of 128 / 256 / 512 / 1024 positions and
  // whole planes measured within 3 % of each other at batch 1, 256 the best at batch 8 with 128)
  const int64_t band = std::max<int64_t>(1, 256 / align) * align;
  const int64_t parts = std::min<int64_t>(units, std::max<int64_t>(1, threads / std::max<int64_t>(N, 1)));
  at::Tensor out = at::empty({N, C, H, W}, input.options());
  const at::Tensor xc = input.contiguous();
  const at::Tensor b1c = b1_in.has_value() ? b1_in->contiguous() : at::Tensor();
  const at::Tensor b2c = b2_in.has_value() ? b2_in->contiguous() : at::Tensor();
  const at::Tensor b3c = b3_in.has_value() ? b3_in->contiguous() : at::Tensor();
  const float* xp = xc.const_data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const float* bias1 = b1c.defined() ? b1c.const_data_ptr<float>() : nullptr;
  const float* bias2 = b2c.defined() ? b2c.const_data_ptr<float>() : nullptr;
  const float* bias3 = b3c.defined() ? b3c.const_data_ptr<float>() : nullptr;
  const int64_t kh = g2.kh, ph = g2.ph, pw = g2.pw, Wph = g2.Wph;
  at::parallel_for(0, N * parts, 1, [&](int64_t w0, int64_t w1) {
    // this thread's conv1 output (unpadded), conv2 input (padded: zero borders written once) and
    // conv2 output
    // (rows of h1 no tile of this item reads are never written: nothing reads them either)
    at::Tensor h1t = at::empty({C1 * HW}, input.options()), h2t = at::empty({C2 * HW}, input.options());
    at::Tensor padt = at::empty({g2.buf_len}, input.options());
    float* h1 = h1t.data_ptr<float>();
    float* h2 = h2t.data_ptr<float>();
    float* pad = padt.data_ptr<float>();
    // the zeros of conv2's padding: border rows and columns of every plane, and the slack past the
    // last (interior rows are copied in before any tile reads them)
    for (int64_t c = 0; c < C1; ++c) {
      float* pl = pad + c * g2.plane;
      std::fill(pl, pl + ph * Wph, 0.0f);
      for (int64_t h = ph; h < ph + H; ++h) {
        std::fill(pl + h * Wph, pl + h * Wph + pw, 0.0f);
        std::fill(pl + h * Wph + pw + W, pl + (h + 1) * Wph, 0.0f);
      }
      std::fill(pl + (ph + H) * Wph, pl + g2.plane, 0.0f);
    }
    std::fill(pad + C1 * g2.plane, pad + g2.buf_len, 0.0f);
    alignas(64) float scratch[kJitScratch];
    alignas(64) float scratch_res[kJitScratch] = {};
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = w / parts, part = w % parts;
      const int64_t P0 = units * part / parts * align, P1 = std::min(HW, units * (part + 1) / parts * align);
      if (P0 >= P1) continue;
      const float* xn = xp + n * C * HW;
      float* yn = yp + n * C * HW;
      // conv2's tiles: from the start of the row of the first position; up to the first past the row
      // of the last (the last item: all)
      int64_t t2 = first_tile(P0 / W);
      const int64_t t2_end = P1 == HW ? nt2 : tiles_before((P1 + W - 1) / W);
      // conv1 from the first row that tile t2 reads
      int64_t done1 = std::max<int64_t>(0, tile_q0(t2) / Wph - ph) * W / align * align, copied = done1 / W;
      for (int64_t q0 = P0; q0 < P1; q0 += band) {
        const int64_t q1 = std::min(P1, q0 + band);
        // conv2's tiles for the rows of these positions
        const int64_t e2 = q1 == P1 ? t2_end : std::max(t2, tiles_before((q1 + W - 1) / W));
        if (e2 > t2) {
          const int64_t oh_max = std::min(H - 1, (tile_q0(e2 - 1) + 15) / Wph);
          const int64_t need = std::min(H, oh_max + kh - ph);  // conv1 rows < need
          const int64_t end1 = std::min(HW, (need * W + align - 1) / align * align);
          if (end1 > done1) {
            const ConvOut<float> o1{h1, HW, HW, bias1, nullptr, true, true};
            if (c1 != nullptr) {
              for (int64_t b = 0; b < c1->blocks(); ++b) run_block_tiles(kern, c1.get(), b, xn, C1, o1, nullptr, done1 / 16, end1 / 16, scratch, scratch_res);
            } else {
              const ConvOut<float> o1s{h1 + done1, HW, end1 - done1, bias1, nullptr, true, true};
              vkern.conv_rows(p1, d1->runs.data(), d1->off.data(), v1.const_data_ptr<float>(), xn + done1, 0, C1, o1s);
            }
            done1 = end1;
          }
          const int64_t rows_done = done1 == HW ? H : done1 / W;
          if (rows_done > copied) {
            for (int64_t c = 0; c < C1; ++c) {
              for (int64_t h = copied; h < rows_done; ++h) {
                std::memcpy(pad + c * g2.plane + (h + ph) * Wph + pw, h1 + c * HW + h * W, W * sizeof(float));
              }
            }
            copied = rows_done;
          }
          const ConvOut<float> o2{h2, HW, H * Wph, bias2, nullptr, true, true};
          for (int64_t b = 0; b < c2->blocks(); ++b) {
            run_block_tiles(kern, c2.get(), b, pad, C2, o2, compress2 ? &tiles2 : nullptr, t2, e2, scratch, scratch_res);
          }
          t2 = e2;
        }
        // conv3 and the residual on positions [q0, q1)
        if (c3 != nullptr) {
          const ConvOut<float> o3{yn, HW, HW, bias3, xn, true, true};
          for (int64_t b = 0; b < c3->blocks(); ++b) run_block_tiles(kern, c3.get(), b, h2, C, o3, nullptr, q0 / 16, (q1 + 15) / 16, scratch, scratch_res);
        } else {
          const ConvOut<float> o3s{yn + q0, HW, q1 - q0, bias3, xn + q0, true, true};
          vkern.conv_rows(p3, d3->runs.data(), d3->off.data(), v3.const_data_ptr<float>(), h2 + q0, 0, C, o3s);
        }
      }
    }
  });
  return out;
}
}  // namespace

int64_t derived_computed() { return g_derived_computed.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("pack_sparse", &pack_sparse_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_ffn", &sparse_ffn_cpu);
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_bottleneck", &sparse_bottleneck_cpu);
}

}  // namespace sparse
}  // namespace fastprune
