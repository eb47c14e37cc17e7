#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/gpu_session.sh installs on the GPU machine, which reaches no
# package registry: the two baselines of the benchmark (Liger's fused linear cross-entropy, Cut Cross-Entropy; pure
# Python + Triton, and triton ships with torch) and the test runner with its pure-Python dependencies, none of
# which a bare torch environment has. Run it here (PyPI reachable) before a GPU session; .whl/ is git-ignored and
# travels with the working tree (the device tool's `carry`).
#
#   bash benchmarks/fetch_gpu_wheels.sh     # PYTHON_VERSION=3.12, PLATFORMS="manylinux_2_28_x86_64 manylinux_2_17_x86_64"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
# pip matches an explicit --platform exactly, so the older manylinux tag is named too (ninja ships only that one).
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64}"
PIP="${PIP:-python3 -m pip}"

# Pinned where requirements.txt pins them (one fact in one place); the baselines at the versions benchmarked.
pin() { grep -E "^$1==" "$ROOT/requirements.txt" | head -1 || true; }
PACKAGES=(
  "liger-kernel==0.8.5"
  "cut-cross-entropy==25.1.1"
  "$(pin pytest)" pluggy iniconfig packaging pygments
  "$(pin hypothesis)" attrs sortedcontainers
  "$(pin numpy)" "$(pin ninja)"
)
PLATFORM_ARGS=()
for p in $PLATFORMS; do PLATFORM_ARGS+=(--platform "$p"); done
mkdir -p "$DEST"
# --no-deps: torch and triton are on the GPU machine already, and every other dependency is listed above.
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" "${PLATFORM_ARGS[@]}" \
  --dest "$DEST" "${PACKAGES[@]}"
echo "fetch_gpu_wheels: $(ls "$DEST" | wc -l) wheels in $DEST"
ls -1 "$DEST"
