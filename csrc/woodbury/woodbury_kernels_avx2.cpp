// avx2 copy of the Woodbury GEMM loop nest (see woodbury_kernels_impl.h); tile 4x8 doubles.
#define FP_ISA_NS avx2
#define FP_ISA_NAME "avx2"
#define FP_MR 4
#define FP_NR 8
#include "woodbury/woodbury_kernels_impl.h"
