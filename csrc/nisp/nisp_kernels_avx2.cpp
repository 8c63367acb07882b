// avx2 copy of the NISP propagation loops (see nisp_kernels_impl.h).
#define FP_ISA_NS avx2
#define FP_ISA_NAME "avx2"
#include "nisp/nisp_kernels_impl.h"
