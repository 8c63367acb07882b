// avx512 copy of the Woodbury GEMM loop nest (see woodbury_kernels_impl.h); tile 8x16 doubles.
#define FP_ISA_NS avx512
#define FP_ISA_NAME "avx512"
#define FP_MR 8
#define FP_NR 16
#include "woodbury/woodbury_kernels_impl.h"
