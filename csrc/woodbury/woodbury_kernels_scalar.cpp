// scalar copy of the Woodbury GEMM loop nest (see woodbury_kernels_impl.h); tile 4x4 doubles.
#define FP_ISA_NS scalar
#define FP_ISA_NAME "scalar"
#define FP_MR 4
#define FP_NR 4
#include "woodbury/woodbury_kernels_impl.h"
