// Which code path each CPU kernel call ran: a counter per (op, path), so that tests can check that
// the path they force (FASTPRUNE_ISA, FASTPRUNE_JIT) is the one that ran, instead of passing on a
// CPU that silently took another. One relaxed atomic increment per op call, outside every loop.
#pragma once
#include <cstdint>

namespace fastprune {

// kSparseLinearPanels: a sparse_linear call that ran the two-row panel loop (noted besides kSparseLinear);
// kSparseFfnBlocked: a sparse_ffn call that kept the hidden activations blocked (the panel loop);
// kSparseConv2dTileMajor: a generated-code sparse_conv2d that ran its tiles in the tile-major order;
// kSparseBottleneckBands: a sparse_bottleneck call that ran depth-first in bands of rows;
// kMaxPool2d / kMaxPool2dChannelsLast: a max_pool2d call (noted once), and one that read channels-last input
enum class KernelOp {
  kWoodburyUpdate = 0,
  kWoodburyInverseFisher,
  kSparseLinear,
  kSparseConv2d,
  kNispPropagate,
  kSparseLinearPanels,
  kSparseFfnBlocked,
  kSparseConv2dTileMajor,
  kSparseBottleneckBands,
  kMaxPool2d,
  kMaxPool2dChannelsLast,
  kAttention,
  kCount
};
// The vector ISA of the loops that ran (kScalar..kAvx512 as in cpu_features.h), the run-time
// generated conv code, or the float64 loops (portable C++, no ISA choice).
enum class KernelPath { kScalar = 0, kAvx2, kAvx512, kJit, kFloat64, kCount };

void note_kernel(KernelOp op, KernelPath path);
// The path for the loops of an ISA chosen by active_isa().
KernelPath path_of_isa(int isa);
int64_t kernel_count(KernelOp op, KernelPath path);
void reset_kernel_counts();
const char* kernel_op_name(KernelOp op);
const char* kernel_path_name(KernelPath path);
// The best ISA this CPU can run, whatever FASTPRUNE_ISA says (as an Isa value).
int best_isa();

}  // namespace fastprune
