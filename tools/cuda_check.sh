#!/usr/bin/env bash
# Compiles every .cu file under csrc/ with nvcc against the installed (CPU) torch headers, for
# sm_90, to prove the CUDA sources build. Nothing is linked or run: no GPU is needed.
# Objects are cached under build/cuda-check and rebuilt only when a source or header changed.
# Without nvcc it skips, except under CI=true, where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! command -v nvcc >/dev/null 2>&1; then
  # Under CI the check must run: a missing compiler is a failure, not a pass.
  if [[ "${CI:-}" == "true" ]]; then
    echo "cuda-check: FAILED (nvcc is not on PATH, and CI=true requires the compile check)"
    exit 1
  fi
  echo "cuda-check: skipped (nvcc is not on PATH; under CI=true this fails)"
  exit 0
fi
TI=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
out=build/cuda-check
mkdir -p "$out"
newest_header=$(find csrc -name '*.h' -printf '%T@\n' | sort -n | tail -1)
status=0
for cu in $(find csrc -name '*.cu' | sort); do
  obj="$out/$(echo "${cu#csrc/}" | tr '/' '_').o"
  if [[ -f $obj && $obj -nt $cu ]] && awk -v h="$newest_header" -v o="$(stat -c %Y "$obj")" 'BEGIN{exit !(o > h)}'; then
    echo "cuda-check: $cu up to date"
    continue
  fi
  echo "cuda-check: nvcc $cu"
  if ! nvcc -c -std=c++20 -arch=sm_90 --expt-relaxed-constexpr -O2 \
      -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Icsrc -Icsrc/common/cuda_stub \
      -I"$TI" -I"$TI/torch/csrc/api/include" "$cu" -o "$obj"; then
    status=1
  fi
done
if [[ $status -ne 0 ]]; then
  echo "cuda-check: FAILED"
  exit 1
fi
echo "cuda-check: all .cu files compile (sm_90, nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
