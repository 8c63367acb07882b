// Shared by host and device code: every *_core.h template is FP_HOST_DEVICE so that the CPU
// loops (tested here) and the CUDA kernels (compiled in CI) run the same arithmetic.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FP_HOST_DEVICE __host__ __device__
#define FP_RESTRICT __restrict__
#else
#define FP_HOST_DEVICE
#define FP_RESTRICT __restrict
#endif

#if defined(__CUDACC__)
#define FP_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define FP_UNROLL _Pragma("GCC unroll 64")
#else
#define FP_UNROLL
#endif
