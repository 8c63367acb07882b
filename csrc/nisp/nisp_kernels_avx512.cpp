// avx512 copy of the NISP propagation loops (see nisp_kernels_impl.h).
#define FP_ISA_NS avx512
#define FP_ISA_NAME "avx512"
#include "nisp/nisp_kernels_impl.h"
