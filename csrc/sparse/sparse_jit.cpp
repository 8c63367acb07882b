// The code generator of sparse_jit.h: a small EVEX encoder for the few instructions the block
// functions use, and executable memory from mmap (written, then made read+execute: never both).
#include "sparse/sparse_jit.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#include "common/cpu_features.h"

#if defined(__x86_64__) && defined(__linux__) && defined(FP_HAVE_X86_KERNELS)
#define FP_JIT_SUPPORTED 1
#include <sys/mman.h>
#endif

namespace fastprune {
namespace sparse {
namespace jit {
namespace {

// System V arguments: out = rdi, x = rsi, row stride in bytes = rdx, bias = rcx, residual = r8,
// lane masks = r9. r10 (free) points into the block's values, which follow its code
// (lea r10, [rip + ...]).
constexpr int kRcx = 1, kRsi = 6, kRdi = 7, kR8 = 8, kR10 = 10;
constexpr int kKeep = 1, kFirst = 2;  // k1: the lanes kept (kCompress), k2: as many lanes from lane 0
// the input vector (loaded, or shifted out of two chunks of the input in zmm28..30), then the
// ReLU's zero (sparse_jit.h, ConvCode::kRowsPerBlock)
constexpr int kFirstChunk = 28, kInput = 31, kZero = 31;
// r10 points 128 values past the next value: every value within reach of a signed 8-bit (times 4)
// displacement until r10 moves on by 256 values
constexpr int64_t kValueReach = 128;

struct Emitter {
  std::vector<uint8_t>& c;

  void u8(uint8_t b) { c.push_back(b); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) c.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  // The 4-byte EVEX prefix of a 512-bit instruction: reg = ModRM.reg (0..31), vvvv = the second
  // source (-1: none), rm = a register in ModRM.rm (0..31) or -1 for a [base + disp] operand.
  // base: the memory operand's base register when rm < 0 (r8..r15 set EVEX.B). k: the opmask
  // (0: none), zeroing: masked-off lanes become 0 (else they keep the destination's).
  void evex(int mm, int pp, int reg, int vvvv, int rm, bool broadcast, int base = 0, int k = 0, bool zeroing = false) {
    const int v = vvvv < 0 ? 0 : vvvv;
    const int b3 = rm >= 0 ? (rm >> 3) & 1 : (base >> 3) & 1, x4 = rm >= 0 ? (rm >> 4) & 1 : 0;
    u8(0x62);
    u8(static_cast<uint8_t>((!((reg >> 3) & 1) << 7) | (!x4 << 6) | (!b3 << 5) | (!((reg >> 4) & 1) << 4) | mm));
    u8(static_cast<uint8_t>(((~v & 15) << 3) | 0x4 | pp));  // W0
    u8(static_cast<uint8_t>((zeroing ? 0x80 : 0) | (2 << 5) | (broadcast ? 0x10 : 0) | (!((v >> 4) & 1) << 3) |
                            k));  // L'L = 512 bits
  }
  // ModRM (+ displacement) of [base + disp]: EVEX's compressed 8-bit displacement (disp / n, n the
  // memory operand's size: 64 for a vector, 4 for a broadcast float) when it fits, else 32 bits.
  // (No base is rsp / r12, which would need a SIB byte.)
  void mem(int reg, int base, int64_t disp, int64_t n) {
    if (disp % n == 0 && disp / n >= -128 && disp / n <= 127) {
      u8(static_cast<uint8_t>(0x40 | ((reg & 7) << 3) | (base & 7)));  // mod 01: [base + disp8 * n]
      u8(static_cast<uint8_t>(static_cast<int8_t>(disp / n)));
      return;
    }
    u8(static_cast<uint8_t>(0x80 | ((reg & 7) << 3) | (base & 7)));  // mod 10: [base + disp32]
    u32(static_cast<uint32_t>(static_cast<int32_t>(disp)));
  }
  // vmovups zmm(reg), [rsi + disp]
  void load(int reg, int64_t disp) {
    evex(1, 0, reg, -1, -1, false);
    u8(0x10);
    mem(reg, kRsi, disp, 64);
  }
  // vmovups [rdi + disp]{k}, zmm(reg) (k = 0: every lane)
  void store(int reg, int64_t disp, int k) {
    evex(1, 0, reg, -1, -1, false, 0, k);
    u8(0x11);
    mem(reg, kRdi, disp, 64);
  }
  // vfmadd231ps zmm(acc), zmm(x), dword [r10 + disp]{1to16}
  void fma_bcast(int acc, int x, int64_t disp) {
    evex(2, 1, acc, x, -1, true, kR10);
    u8(0xB8);
    mem(acc, kR10, disp, 4);
  }
  // vmulps zmm(acc), zmm(x), dword [r10 + disp]{1to16}: a row's first product (no zeroing needed)
  void mul_bcast(int acc, int x, int64_t disp) {
    evex(1, 0, acc, x, -1, true, kR10);
    u8(0x59);
    mem(acc, kR10, disp, 4);
  }
  // vpxord zmm(r), zmm(r), zmm(r)
  void zero(int r) {
    evex(1, 1, r, r, r, false);
    u8(0xEF);
    u8(static_cast<uint8_t>(0xC0 | ((r & 7) << 3) | (r & 7)));
  }
  // vaddps zmm(a){k}, zmm(a), [base + disp] (broadcast: one float to all lanes; k = 0: every lane;
  // a masked-off lane's memory is not read)
  void add_mem(int a, int base, int64_t disp, bool broadcast, int k = 0) {
    evex(1, 0, a, a, -1, broadcast, base, k);
    u8(0x58);
    mem(a, base, disp, broadcast ? 4 : 64);
  }
  // vcompressps zmm(a){k1}{z}, zmm(a): the kept lanes moved down to lanes 0.., the rest 0
  void compress(int a) {
    evex(2, 1, a, -1, a, false, 0, kKeep, true);
    u8(0x8A);
    u8(static_cast<uint8_t>(0xC0 | ((a & 7) << 3) | (a & 7)));
  }
  // kmovw k1, r9d; shr r9d, 16; kmovw k2, r9d: the two lane masks from the masks argument
  void load_masks() {
    u8(0xC4), u8(0xC1), u8(0x78), u8(0x92), u8(0xC9);
    u8(0x41), u8(0xC1), u8(0xE9), u8(0x10);
    u8(0xC4), u8(0xC1), u8(0x78), u8(0x92), u8(0xD1);
  }
  // valignd zmm(dst), zmm(hi), zmm(lo), s: lanes s..15 of lo, then lanes 0..s-1 of hi
  void align(int dst, int hi, int lo, int s) {
    evex(3, 1, dst, hi, lo, false);
    u8(0x03);
    u8(static_cast<uint8_t>(0xC0 | ((dst & 7) << 3) | (lo & 7)));
    u8(static_cast<uint8_t>(s));
  }
  // vmaxps zmm(a), zmm(a), zmm31
  void relu(int a) {
    evex(1, 0, a, a, kZero, false);
    u8(0x5F);
    u8(static_cast<uint8_t>(0xC0 | ((a & 7) << 3) | (kZero & 7)));
  }
  // add rdi, rdx / add r8, rdx: the next row of out / of the residual
  void next_row() {
    u8(0x48), u8(0x01), u8(0xD7);
  }
  void next_residual_row() {
    u8(0x49), u8(0x01), u8(0xD0);
  }
  // lea r10, [rip + disp32]; returns where disp32 is, to be patched once the values' place is known
  size_t lea_r10_rip() {
    u8(0x4C), u8(0x8D), u8(0x15);
    const size_t at = c.size();
    u32(0);
    return at;
  }
  // add r10, imm32
  void add_r10(int32_t imm) {
    u8(0x49), u8(0x81), u8(0xC2);
    u32(static_cast<uint32_t>(imm));
  }
  void ret() {
    u8(0xC5), u8(0xF8), u8(0x77);  // vzeroupper
    u8(0xC3);
  }
};

constexpr int64_t kMaxDisp = (int64_t(1) << 31) - 64;

}  // namespace

std::vector<uint8_t> block_code(const int32_t* rp, const int32_t* off, const float* val, int64_t r0, int64_t r1,
                                int flags, size_t at) {
  std::vector<uint8_t> code;
  Emitter e{code};
  // the block's nonzeros by tap offset (then row): one load per distinct offset
  struct Nz {
    int32_t off;
    int32_t row;
    int64_t k;
  };
  std::vector<Nz> nz;
  nz.reserve(rp[r1] - rp[r0]);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) nz.push_back({off[k], static_cast<int32_t>(r - r0), k});
  }
  std::stable_sort(nz.begin(), nz.end(), [](const Nz& a, const Nz& b) { return a.off < b.off; });
  const size_t lea_disp = e.lea_r10_rip();
  if (flags & kCompress) e.load_masks();
  std::vector<float> vals;  // in the order the code reads them
  vals.reserve(nz.size());
  int64_t centre = kValueReach;  // the value index r10 points at
  std::vector<char> started(r1 - r0, 0);  // a row's first product sets its accumulator
  // The input vector at offset o. Every offset a multiple of 16 (a 1x1 conv): one aligned load.
  // Otherwise the 16-float chunks of the input (aligned: x + q0 is, and planes are multiples of 16
  // floats) are loaded into zmm28..30, a small cache (the least recently used replaced), and an
  // offset inside a chunk is shifted out of two of them (valignd). A misaligned load spans two
  // cache lines, and the taps (c, ky, 0..2) of a 3x3 conv share their chunks: 3x3 convs 8-22 %
  // faster than with one misaligned load per offset.
  const bool aligned = std::all_of(nz.begin(), nz.end(), [](const Nz& z) { return z.off % 16 == 0; });
  TORCH_CHECK(aligned || r1 - r0 <= ConvCode::kRowsPerBlock, "sparse_jit: too many rows for a block");
  int64_t chunk[3] = {-1, -1, -1}, used[3] = {0, 0, 0}, clock = 0;
  auto chunk_reg = [&](int64_t k, int64_t keep) {
    int slot = -1;
    for (int t = 0; t < 3; ++t) {
      if (chunk[t] == k) slot = t;
    }
    if (slot < 0) {
      for (int t = 0; t < 3; ++t) {
        if (chunk[t] != keep && (slot < 0 || used[t] < used[slot])) slot = t;
      }
      chunk[slot] = k;
      e.load(kFirstChunk + slot, k * 64);
    }
    used[slot] = ++clock;
    return kFirstChunk + slot;
  };
  for (size_t i = 0; i < nz.size();) {
    const int32_t o = nz[i].off;
    int x = kInput;
    if (aligned) {
      e.load(x, int64_t(o) * 4);
    } else {
      const int64_t k = o / 16, shift = o % 16;
      x = chunk_reg(k, k + 1);
      if (shift != 0) {
        e.align(kInput, chunk_reg(k + 1, k), x, static_cast<int>(shift));
        x = kInput;
      }
    }
    for (; i < nz.size() && nz[i].off == o; ++i) {
      const int64_t j = static_cast<int64_t>(vals.size());
      if (j - centre >= kValueReach) {
        e.add_r10(static_cast<int32_t>(8 * kValueReach));
        centre += 2 * kValueReach;
      }
      vals.push_back(val[nz[i].k]);
      if (started[nz[i].row]) {
        e.fma_bcast(nz[i].row, x, (j - centre) * 4);
      } else {
        e.mul_bcast(nz[i].row, x, (j - centre) * 4);
        started[nz[i].row] = 1;
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    if (!started[r - r0]) e.zero(static_cast<int>(r - r0));  // an empty row
  }
  if (flags & kRelu) e.zero(kZero);
  // kCompress: the kept lanes are packed down before the residual (read under k2, as stored)
  const int k = (flags & kCompress) ? kFirst : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int a = static_cast<int>(r - r0);
    if (flags & kBias) e.add_mem(a, kRcx, int64_t(a) * 4, true);
    if (flags & kCompress) e.compress(a);
    if (flags & kResidual) {
      if (r > r0) e.next_residual_row();
      e.add_mem(a, kR8, 0, false, k);
    }
    if (flags & kRelu) e.relu(a);
    if (r > r0) e.next_row();
    e.store(a, 0, k);
  }
  e.ret();
  // the values, on the next 64-byte boundary of the mapping (at: where this block starts in it)
  while ((at + code.size()) % 64 != 0) e.u8(0xCC);  // int3: never reached
  const int64_t target = static_cast<int64_t>(code.size()) + kValueReach * 4;
  const int64_t rel = target - static_cast<int64_t>(lea_disp + 4);
  for (int i = 0; i < 4; ++i) code[lea_disp + i] = static_cast<uint8_t>(static_cast<uint32_t>(rel) >> (8 * i));
  const size_t vb = code.size();
  code.resize(vb + vals.size() * sizeof(float));
  if (!vals.empty()) std::memcpy(code.data() + vb, vals.data(), vals.size() * sizeof(float));
  return code;
}

bool built() {
#if defined(FP_JIT_SUPPORTED)
  return true;
#else
  return false;
#endif
}

bool enabled() {
  const char* env = std::getenv("FASTPRUNE_JIT");
  TORCH_CHECK(env == nullptr || env[0] == '\0' || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0 ||
                  std::strcmp(env, "always") == 0,
              "FASTPRUNE_JIT must be 0, 1 or always; got '", env, "'");
#if defined(FP_JIT_SUPPORTED)
  return active_isa() == Isa::kAvx512 && (env == nullptr || std::strcmp(env, "0") != 0);
#else
  return false;
#endif
}

bool forced() {
  const char* env = std::getenv("FASTPRUNE_JIT");
  return env != nullptr && std::strcmp(env, "always") == 0;
}

void ConvCode::prefetch(int64_t b) const {
#if defined(FP_JIT_SUPPORTED)
  if (b < 0 || b >= blocks()) return;
  const uint8_t* p = static_cast<const uint8_t*>(mem_) + entry_[b];
  const size_t n = (b + 1 < blocks() ? entry_[b + 1] : size_) - entry_[b];
  for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 2);
#else
  (void)b;
#endif
}

ConvCode::~ConvCode() {
#if defined(FP_JIT_SUPPORTED)
  if (mem_ != nullptr) munmap(mem_, size_);
#endif
}

std::unique_ptr<ConvCode> ConvCode::build(const int32_t* rp, const int32_t* off, const float* val, int64_t rows,
                                          int flags, int64_t max_bytes) {
#if defined(FP_JIT_SUPPORTED)
  if (!enabled() || rows <= 0) return nullptr;
  const int64_t nnz = rp[rows];
  // every input offset must fit a 31-bit displacement
  for (int64_t k = 0; k < nnz; ++k) {
    if (off[k] < 0 || int64_t(off[k]) * 4 > kMaxDisp) return nullptr;
  }
  // at least 11 bytes per nonzero (7 of FMA, 4 of value): refuse before generating what is too big
  if (nnz * 11 > max_bytes) return nullptr;
  std::vector<uint8_t> all;
  std::vector<size_t> entry;
  const bool aligned = std::all_of(off, off + nnz, [](int32_t o) { return o % 16 == 0; });
  const int rpb = aligned ? kRowsPerBlockAligned : kRowsPerBlock;
  for (int64_t r0 = 0; r0 < rows; r0 += rpb) {
    const int64_t r1 = std::min<int64_t>(rows, r0 + rpb);
    entry.push_back(all.size());
    const std::vector<uint8_t> b = block_code(rp, off, val, r0, r1, flags, all.size());
    all.insert(all.end(), b.begin(), b.end());
    if (static_cast<int64_t>(all.size()) > max_bytes) return nullptr;
  }
  void* mem = mmap(nullptr, all.size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  std::memcpy(mem, all.data(), all.size());
  if (mprotect(mem, all.size(), PROT_READ | PROT_EXEC) != 0) {
    munmap(mem, all.size());
    return nullptr;
  }
  std::unique_ptr<ConvCode> code(new ConvCode());
  code->mem_ = mem;
  code->size_ = all.size();
  code->rows_per_block_ = rpb;
  code->entry_ = std::move(entry);
  for (size_t p : code->entry_) code->fns_.push_back(reinterpret_cast<TileFn>(static_cast<uint8_t*>(mem) + p));
  return code;
#else
  (void)rp, (void)off, (void)val, (void)rows, (void)flags, (void)max_bytes;
  return nullptr;
#endif
}

}  // namespace jit
}  // namespace sparse
}  // namespace fastprune
