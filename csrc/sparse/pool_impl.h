// The loops of max_pool2d on the CPU, compiled once per ISA (sparse_kernels_<isa>.cpp, float32, each
// with its own -m flags: the compiler vectorises the contiguous loops) and once for float64
// (pool_cpu.cpp). The arithmetic (pool_max, pool_finish, pool_window) is sparse_core.h's, shared with
// the CUDA kernel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "sparse/sparse_core.h"

namespace fastprune {
namespace sparse {

// Channels per register block of the channels-last loop: 64 floats, four AVX-512 registers
constexpr int64_t kPoolChannelBlock = 64;

// Channels [c0, c0 + CB) of output position (oy, ox) from a channels-last image x (H, W, C), into r.
template <typename T, int64_t CB>
inline void pool_cl_block(const T* x, const PoolGeometry& g, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                          int64_t c0, bool relu, T* r) {
  T acc[CB];
  for (int64_t c = 0; c < CB; ++c) acc[c] = pool_init<T>();
  for (int64_t iy = y0; iy < y1; ++iy) {
    for (int64_t ix = x0; ix < x1; ++ix) {
      const T* p = x + (iy * g.W + ix) * g.C + c0;
      for (int64_t c = 0; c < CB; ++c) acc[c] = pool_max(acc[c], p[c]);
    }
  }
  for (int64_t c = 0; c < CB; ++c) r[c] = pool_finish(acc[c], relu);
}

// Output row oy of one channels-last image x (H, W, C) into row (Wout, C): every window's max
// along the channels, a block of kPoolChannelBlock accumulators at a time (the tail one by one).
template <typename T>
inline void max_pool_row_cl_t(const T* x, const PoolGeometry& g, int64_t oy, bool relu, T* row) {
  int64_t y0, y1;
  pool_window(oy, g.kh, g.sh, g.ph, g.H, &y0, &y1);
  const int64_t cfull = g.C / kPoolChannelBlock * kPoolChannelBlock;
  for (int64_t ox = 0; ox < g.Wout; ++ox) {
    int64_t x0, x1;
    pool_window(ox, g.kw, g.sw, g.pw, g.W, &x0, &x1);
    T* r = row + ox * g.C;
    for (int64_t c0 = 0; c0 < cfull; c0 += kPoolChannelBlock) {
      pool_cl_block<T, kPoolChannelBlock>(x, g, y0, y1, x0, x1, c0, relu, r + c0);
    }
    for (int64_t c = cfull; c < g.C; ++c) pool_cl_block<T, 1>(x, g, y0, y1, x0, x1, c, relu, r + c);
  }
}

// One NCHW plane x (H, W) into out (Hout, Wout): per output row, the max over its window's input
// rows (contiguous, vectorised) into tmp (W), then each output's columns of tmp.
template <typename T>
inline void max_pool_plane_t(const T* x, const PoolGeometry& g, bool relu, T* tmp, T* out) {
  for (int64_t oy = 0; oy < g.Hout; ++oy) {
    int64_t y0, y1;
    pool_window(oy, g.kh, g.sh, g.ph, g.H, &y0, &y1);
    std::copy(x + y0 * g.W, x + (y0 + 1) * g.W, tmp);
    for (int64_t iy = y0 + 1; iy < y1; ++iy) {
      const T* p = x + iy * g.W;
      for (int64_t i = 0; i < g.W; ++i) tmp[i] = pool_max(tmp[i], p[i]);
    }
    T* o = out + oy * g.Wout;
    for (int64_t ox = 0; ox < g.Wout; ++ox) {
      int64_t x0, x1;
      pool_window(ox, g.kw, g.sw, g.pw, g.W, &x0, &x1);
      T acc = tmp[x0];
      for (int64_t ix = x0 + 1; ix < x1; ++ix) acc = pool_max(acc, tmp[ix]);
      o[ox] = pool_finish(acc, relu);
    }
  }
}

}  // namespace sparse
}  // namespace fastprune
