#!/usr/bin/env bash
# Compile-only check of every csrc/**/*.cu for sm_80, sm_86 and sm_90a against the installed torch's headers, with
# ptxas's resource report (registers, spills, stack, shared memory) of each kernel printed per architecture.
#
#   PY=.venv/bin/python bash tools/check_cuda_compile.sh      (what `make cuda-check` runs)
#
# A CPU torch wheel ships the CUDA headers of c10 but not the CMake-generated cuda_cmake_macros.h, hence
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE; nothing is linked, so the CPU wheel is enough. The flags mirror setup.py's
# (torch's cpp_extension compiles with -std=c++20). Exits 0 with a message when nvcc is absent, non-zero on any
# compile error, and non-zero when ptxas reports that it serialised wgmma (C7510, C7520) or ignored setmaxnreg (C7508)
# in the sm_90a kernel: those are silent slowdowns, not errors, to ptxas. NVCC and CUDA_ARCHS override the compiler
# and the targets. sm_86 stands for the consumer GPUs (sm_86 /
# sm_89: 99 KB of shared memory per block, the small tile configuration); their default build runs the sm_80 code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
NVCC="${NVCC:-nvcc}"
CUDA_ARCHS="${CUDA_ARCHS:-80 86 90a}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda-check: skipped: nvcc not found (install the CUDA toolkit or set NVCC=/path/to/nvcc)"
  exit 0
fi

mapfile -t TORCH_INCLUDES < <("$PY" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
if [ "${#TORCH_INCLUDES[@]}" -eq 0 ]; then
  echo "cuda-check: $PY could not report torch's include paths" >&2
  exit 1
fi

mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "cuda-check: no .cu files under csrc/"
  exit 0
fi

FLAGS=(-std=c++20 --expt-relaxed-constexpr -O3 --use_fast_math -lineinfo
       -DLATENTSEEK_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -I "$ROOT/csrc/include" -Werror all-warnings -Xptxas -v)
for inc in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$inc"); done
GENCODE=()
for arch in $CUDA_ARCHS; do GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done

echo "cuda-check: $("$NVCC" --version | tail -1)"
echo "cuda-check: torch $("$PY" -c 'import torch; print(torch.__version__)'), archs: $CUDA_ARCHS"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
for src in "${SOURCES[@]}"; do
  start=$(date +%s)
  if "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" -c "$ROOT/$src" -o "$TMP/$(basename "$src").o" >"$TMP/log" 2>&1; then
    echo "cuda-check: ok    $src ($(( $(date +%s) - start ))s)"
    # ptxas: one "Compiling entry function" line per kernel and arch, then its registers / spills / stack.
    awk '/Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); fn = substr($0, RSTART, RLENGTH);
                                     match($0, /sm_[0-9a-z]+/); arch = substr($0, RSTART, RLENGTH) }
         /bytes stack frame/ { sub(/^ptxas info *: */, ""); frame = $0 }
         /Used [0-9]+ registers/ { sub(/^ptxas info *: */, ""); print "  " arch " " fn ": " $0 "; " frame }' \
      "$TMP/log" | (command -v c++filt >/dev/null && c++filt || cat) | sort
    if grep -E "\((C7508|C7510|C7520)\)" "$TMP/log" >&2; then
      echo "cuda-check: FAIL  $src: ptxas serialised wgmma or ignored setmaxnreg (messages above)" >&2
      status=1
    fi
  else
    echo "cuda-check: FAIL  $src" >&2
    cat "$TMP/log" >&2
    status=1
  fi
done
exit $status
