#include "common/kernel_log.h"

#include <atomic>

#include "common/cpu_features.h"

namespace fastprune {
namespace {

constexpr int kOps = static_cast<int>(KernelOp::kCount);
constexpr int kPaths = static_cast<int>(KernelPath::kCount);
std::atomic<int64_t> g_counts[kOps][kPaths];

}  // namespace

void note_kernel(KernelOp op, KernelPath path) {
  g_counts[static_cast<int>(op)][static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed);
}

KernelPath path_of_isa(int isa) { return static_cast<KernelPath>(isa); }

int64_t kernel_count(KernelOp op, KernelPath path) {
  return g_counts[static_cast<int>(op)][static_cast<int>(path)].load(std::memory_order_relaxed);
}

void reset_kernel_counts() {
  for (auto& row : g_counts) {
    for (auto& c : row) c.store(0, std::memory_order_relaxed);
  }
}

const char* kernel_op_name(KernelOp op) {
  switch (op) {
    case KernelOp::kWoodburyUpdate: return "woodbury_update_";
    case KernelOp::kWoodburyInverseFisher: return "woodbury_inverse_fisher";
    case KernelOp::kSparseLinear: return "sparse_linear";
    case KernelOp::kSparseConv2d: return "sparse_conv2d";
    case KernelOp::kNispPropagate: return "nisp_propagate";
    case KernelOp::kSparseLinearPanels: return "sparse_linear_panels";
    case KernelOp::kSparseFfnBlocked: return "sparse_ffn_blocked";
    case KernelOp::kSparseConv2dTileMajor: return "sparse_conv2d_tile_major";
    case KernelOp::kSparseBottleneckBands: return "sparse_bottleneck_bands";
    case KernelOp::kMaxPool2d: return "max_pool2d";
    case KernelOp::kMaxPool2dChannelsLast: return "max_pool2d_channels_last";
    case KernelOp::kAttention: return "scaled_dot_product_attention";
    default: return "?";
  }
}

const char* kernel_path_name(KernelPath path) {
  switch (path) {
    case KernelPath::kScalar: return "scalar";
    case KernelPath::kAvx2: return "avx2";
    case KernelPath::kAvx512: return "avx512";
    case KernelPath::kJit: return "jit";
    case KernelPath::kFloat64: return "float64";
    default: return "?";
  }
}

int best_isa() { return static_cast<int>(detected_isa()); }

}  // namespace fastprune
