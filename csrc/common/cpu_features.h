// Run-time choice of the CPU vector path. Every hot loop is compiled once per ISA (separate
// translation units with their own -m flags); this picks the best one the CPU supports.
// FASTPRUNE_ISA=scalar|avx2|avx512 caps the choice (tests force each path in turn); it is
// read on every call so that a test can change it without reloading the library.
#pragma once
#include <string>

namespace fastprune {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Best ISA this CPU supports, capped by FASTPRUNE_ISA when set. Unknown values are an error.
Isa active_isa();
// Best ISA this CPU supports (FASTPRUNE_ISA ignored).
Isa detected_isa();
const char* isa_name(Isa isa);

}  // namespace fastprune
