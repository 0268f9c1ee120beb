#!/usr/bin/env bash
# Compile-only check of the CUDA sources in cuda/ (no GPU needed):
#   every .cu  with nvcc -c for one architecture (default sm_90), the flags torch's JIT build uses;
#   every .cpp with the host compiler (-fsyntax-only) against the installed torch's extension headers.
# Exits non-zero on the first failure; exits 0 with a SKIP line when nvcc is absent.
# Env: PYTHON (default python), NVCC, CXX (default g++), CUDA_ARCH (default 90), CUDA_STD (default c++17).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
CXX=${CXX:-g++}
CUDA_ARCH=${CUDA_ARCH:-90}
CUDA_STD=${CUDA_STD:-c++17}
if [ -z "${NVCC:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"
  else NVCC=$(command -v nvcc || true); fi
fi
if [ -z "$NVCC" ]; then
  echo "compile_cuda: SKIP: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
  exit 0
fi
# The toolkit's include dir (nvcc may be a wrapper script): ask nvcc where its TOP is.
CUDA_TOP=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
CUDA_INC="${CUDA_TOP:-$(dirname "$(readlink -f "$NVCC")")/..}/include"

# Include paths, ABI flag and the C++ standard torch's own extension build uses, from the installed torch.
mapfile -t TORCH_FLAGS < <("$PYTHON" - <<'PY'
import sysconfig, torch
from torch.utils import cpp_extension
for p in cpp_extension.include_paths():
    print(f"-I{p}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
NVCC_FLAGS=(-std="$CUDA_STD" -O3 -gencode="arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -Wall)
# torch >= 2.10 headers need C++20 (torch's JIT build passes -std=c++20 as well).
CXX_FLAGS=(-fsyntax-only -std=c++20 -Wall -DTORCH_EXTENSION_NAME=hf_mfac_cuda_ci -DTORCH_API_INCLUDE_EXTENSION_H)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=() names=()
shopt -s nullglob
for f in cuda/*.cu; do
  "$NVCC" -c "${NVCC_FLAGS[@]}" "${TORCH_FLAGS[@]}" -Icuda "$f" -o "$out/$(basename "$f").o" \
    >"$out/$(basename "$f").log" 2>&1 &
  pids+=($!) names+=("$f")
done
for f in cuda/*.cpp; do
  "$CXX" "${CXX_FLAGS[@]}" "${TORCH_FLAGS[@]}" -I"$CUDA_INC" -Icuda "$f" >"$out/$(basename "$f").log" 2>&1 &
  pids+=($!) names+=("$f")
done
status=0
for i in "${!pids[@]}"; do
  f=${names[$i]}
  if wait "${pids[$i]}"; then
    echo "compile_cuda: ok   $f"
  else
    echo "compile_cuda: FAIL $f"; status=1
  fi
  if [ -s "$out/$(basename "$f").log" ]; then sed 's/^/    /' "$out/$(basename "$f").log"; fi
done
[ "${#names[@]}" -gt 0 ] || { echo "compile_cuda: FAIL no sources in cuda/"; exit 1; }
exit $status
