#include "common/cpu_features.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastprune {
namespace {

Isa detect() {
#if defined(FP_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

}  // namespace

Isa detected_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("FASTPRUNE_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) {
    want = Isa::kScalar;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "FASTPRUNE_ISA must be one of scalar, avx2, avx512; got '", env, "'");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace fastprune
