// Run-time generated AVX-512 code for the sparse direct convolution (x86-64 Linux).
//
// Why: the loops of sparse_simd_impl.h load one input vector per nonzero and feed it to one FMA
// (rows rarely share a column), so they are bound by vector loads, not FMAs. Generated code holds
// the accumulators of a block of rows in registers and walks the union of the block's tap offsets:
// each input vector is loaded once and feeds the FMA of every row of the block that has that tap,
// its weight a broadcast memory operand (the offsets are the loads' displacements, so no index is
// loaded either). Input vectors are made from aligned loads (valignd of two chunks) shared by
// nearby offsets, not loaded misaligned.
//
// A block's weights are copied, in the order its code reads them, right after its code: each FMA
// then takes a 1-byte displacement (7-byte instructions instead of 10) and a block is one contiguous
// stretch of memory (code and values arrive together when a layer's code is cold, as it is at each
// call in a whole model). So the code depends on the values: it is made again when they change
// (sparse_cpu.cpp keys it on the values tensor and its version).
//
// One function per block of up to kRowsPerBlock rows: f(out, x, ldo_bytes, bias, res, masks)
// computes positions [0, 16) of those rows: out[i * ldo + t] = act(sum_k val[k] * x[off[k] + t] +
// bias[i] + res[i * ldo + t]) for the block's i-th row (the caller passes x advanced by q0, and out,
// bias and res at the block's first row and q0; ldo_bytes = 4 * ldo). Which of bias, residual and
// ReLU the code applies is fixed when it is generated (flags). The caller loops over the positions.
//
// kCompress, for a padded or strided conv whose grid of positions has columns the output has not
// (and a last tile past the end): masks = keep | (first << 16), keep the lanes that are outputs,
// first = (1 << popcount(keep)) - 1. The kept lanes are packed down and only they are stored (and
// their residual read), at out / res placed at the tile's first output; nothing else is touched.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace fastprune {
namespace sparse {
namespace jit {

using TileFn = void (*)(float* out, const float* x, int64_t ldo_bytes, const float* bias, const float* res,
                        uint64_t masks);
enum Flags { kBias = 1, kResidual = 2, kRelu = 4, kCompress = 8 };
constexpr int kFlagSets = 16;

// Generated code of every block of rows of one packed weight and input geometry (an executable
// mapping, freed with the object).
class ConvCode {
 public:
  ~ConvCode();
  ConvCode(const ConvCode&) = delete;
  ConvCode& operator=(const ConvCode&) = delete;

  // nullptr when code cannot be generated here (not x86-64 Linux, no AVX-512F, executable memory
  // refused, displacements past 31 bits, or more than max_bytes of code).
  static std::unique_ptr<ConvCode> build(const int32_t* row_ptr, const int32_t* off, const float* values,
                                         int64_t rows, int flags, int64_t max_bytes);
  int64_t blocks() const { return static_cast<int64_t>(entry_.size()); }
  TileFn fn(int64_t b) const { return fns_[b]; }
  int64_t row_begin(int64_t b) const { return b * rows_per_block_; }
  int rows_per_block() const { return rows_per_block_; }
  // Asks for block b's code and values to be brought into L2 (software prefetch: a layer's code is
  // cold at each call of a whole model, and instruction fetch waits on every miss).
  void prefetch(int64_t b) const;
  size_t bytes() const { return size_; }

  // Rows per block, their accumulators zmm0 on. Where some tap offset is off a 16-float boundary (a
  // kxk conv), 28: zmm28..30 hold aligned chunks of the input, zmm31 an input vector shifted out of
  // two of them. Where every one is on one (a 1x1 conv), 31: zmm31 is the input vector. zmm31 then
  // holds the ReLU's zero. (Fewer rows per block load more input vectors per FMA: 16 and 24 rows
  // measured slower end to end, 31 faster than 28 for 1x1 convs.)
  static constexpr int kRowsPerBlock = 28, kRowsPerBlockAligned = 31;

 private:
  ConvCode() = default;
  void* mem_ = nullptr;
  size_t size_ = 0;
  int rows_per_block_ = kRowsPerBlock;
  std::vector<size_t> entry_;
  std::vector<TileFn> fns_;
};

// One block's bytes: the code of rows [r0, r1) of the weight, padding to a 64-byte boundary of the
// mapping (the block starts at byte `at` of it), then the values in the order the code reads them.
// (Up to kRowsPerBlockAligned rows where every offset is a multiple of 16, else kRowsPerBlock.)
std::vector<uint8_t> block_code(const int32_t* row_ptr, const int32_t* off, const float* values, int64_t r0,
                                int64_t r1, int flags, size_t at);

// Whether this process can run generated code (x86-64 Linux, AVX-512 the active ISA) and
// FASTPRUNE_JIT is not 0. FASTPRUNE_JIT=always: for every float32 conv, whatever its size (tests);
// unset or 1: where it pays (sparse_cpu.cpp). Read on every call, like FASTPRUNE_ISA.
bool enabled();
bool forced();
// Whether this build has the code generator at all (x86-64 Linux with the x86 kernels).
bool built();

}  // namespace jit
}  // namespace sparse
}  // namespace fastprune
