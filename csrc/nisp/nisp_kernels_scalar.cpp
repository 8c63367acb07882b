// scalar copy of the NISP propagation loops (see nisp_kernels_impl.h).
#define FP_ISA_NS scalar
#define FP_ISA_NAME "scalar"
#include "nisp/nisp_kernels_impl.h"
