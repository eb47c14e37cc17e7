#!/usr/bin/env bash
# Everything a GPU session does for the CUDA kernel, on a machine with torch (CUDA build), nvcc, compute-sanitizer
# and no package registry:
#
#   bash benchmarks/gpu_session.sh OUTDIR [STAGE ...]
#
# Stages, in order (default: all): env wheels build test sanitize bench profile
#   env       device, driver, toolkit and torch versions                          -> OUTDIR/env.txt
#   wheels    pip-installs .whl/*.whl offline (benchmarks/fetch_gpu_wheels.sh fills .whl/ on a machine with PyPI):
#             pytest and friends where missing, Liger and Cut Cross-Entropy for the benchmark
#   build     builds latentseek_ext._C in place against this torch, for this GPU's arch (TORCH_CUDA_ARCH_LIST
#             overrides), and checks that the CUDA kernel registered                  -> OUTDIR/build.log
#   test      pytest tests/test_op*.py (CUDA cases included), then the slow N*V > 2^31 case
#                                                                   -> OUTDIR/test*.log, OUTDIR/test*.xml
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck on benchmarks/sanitizer_case.py
#                                                                                     -> OUTDIR/sanitize-*.log
#   bench     benchmarks/bench_op.py --device cuda for the automatic kernel choice, and for each CUDA kernel
#             forced (LATENTSEEK_CUDA_KERNEL) that BENCH_KERNELS names          -> OUTDIR/bench-*/, bench-*.log
#   profile   Nsight Compute speed-of-light of the fused and chunked kernels at N=64 H=896 V=151936 bf16
#                                                                                       -> OUTDIR/profile.txt
# Each stage runs under a time limit (STAGE_TIMEOUT, default 240 s), and a failed stage does not stop the later
# ones; OUTDIR/summary.txt gets one line per stage and the exit status is non-zero if any stage failed.
# The defaults fit one call of a 15-minute lease (the device tool returns at most 8 files, so pack OUTDIR):
#   timeout 560 bash benchmarks/gpu_session.sh /tmp/gs; tar czf "$OUT/gs.tgz" -C /tmp gs
# Sized from the stage times of the 2026-11-29 H200 session: env 5 s, build 40-65 s, op tests about 2 min,
# memcheck + racecheck on the first calls 16 s, the bf16 benchmark of the 5 default shapes 72 s.
# Knobs: TEST_FILES (default tests/test_op*.py), PYTEST_ARGS (extra pytest arguments), SANITIZE_TOOLS (default
# "memcheck racecheck synccheck initcheck"), BENCH_KERNELS (default "auto"; "auto fused chunked" also forces each
# kernel), BENCH_ARGS (default: 5 shapes in bf16 and fp16; "--cases gpu --dtypes bf16,fp16,fp32" is the full grid,
# which needs a longer lease), LS_CC / LS_CXX (the host compilers of the build).
set -uo pipefail

if [ $# -lt 1 ]; then
  sed -n "2,$(($(grep -n "^set -uo pipefail" "$0" | cut -d: -f1) - 1))p" "$0"
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env wheels build test sanitize bench profile)
STAGE_TIMEOUT="${STAGE_TIMEOUT:-240}"
BENCH_KERNELS="${BENCH_KERNELS:-auto}"
LEASE_CASES="Qwen2.5-0.5B:64,Qwen2.5-0.5B:300,Qwen2.5-1.5B:2048,Llama-3.1-8B:2048,Qwen2.5-7B:4096"
BENCH_ARGS="${BENCH_ARGS:---cases $LEASE_CASES --dtypes bf16,fp16 --min-time 0.5 --max-runs 10}"
SANITIZE_TOOLS="${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}"
TEST_FILES="${TEST_FILES:-tests/test_op*.py}"
PYTEST_ARGS="${PYTEST_ARGS:-}"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The interpreter whose torch has CUDA.
PY="${PY:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      PY="$cand"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_session: no python with a CUDA torch found (set PY)" | tee -a "$OUT/summary.txt"
  exit 1
fi

FAILED=0
record() {  # stage, status, note
  local line
  line="$(date -u +%Y-%m-%dT%H:%M:%SZ) $1: $([ "$2" -eq 0 ] && echo ok || echo "FAILED (exit $2)")${3:+ - $3}"
  echo "$line" | tee -a "$OUT/summary.txt"
  [ "$2" -eq 0 ] || FAILED=1
}
run_logged() {  # log file, command...; the command's output goes to the log and its tail to the terminal
  local log="$1"
  shift
  timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  return $rc
}

stage_env() {
  {
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    nvidia-smi -q -d CLOCK,POWER 2>&1 | grep -E "Applications|Default|Power Limit|SM |Memory " | head -20
    (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not found"
    (command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2) || echo "compute-sanitizer: not found"
    (command -v ncu >/dev/null && ncu --version | tail -1) || echo "ncu: not found"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
  } >"$OUT/env.txt" 2>&1
  local rc=$?
  cat "$OUT/env.txt"
  return $rc
}

stage_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/ folder: run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable and bring .whl/ along"
    return 1
  fi
  local rc=0 whl dist module
  for whl in .whl/*.whl; do
    dist="$(basename "$whl" | cut -d- -f1)"
    module="$dist"
    # Keep what the environment has (its torch was built against it); add only what is missing.
    if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$module') else 1)" 2>/dev/null; then
      echo "wheels: $dist already importable, kept"
      continue
    fi
    if "$PY" -m pip install --quiet --no-index --no-deps "$whl" >>"$OUT/wheels.log" 2>&1; then
      echo "wheels: installed $(basename "$whl")"
    else
      echo "wheels: FAILED $(basename "$whl") (see wheels.log)"
      rc=1
    fi
  done
  return $rc
}

stage_build() {
  local arch="${TORCH_CUDA_ARCH_LIST:-}"
  if [ -z "$arch" ]; then
    arch="$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}" + ("a" if M == 9 else ""))')"
  fi
  # The H200 image's default CC/CXX (/opt/gcc) linked a private copy of libstdc++ into _C, which broke error
  # messages; setup.py now links the shared one explicitly and refuses a build that still carries a copy. The
  # system compilers, where present, are the ones that link it like torch does.
  local cc="${LS_CC:-}" cxx="${LS_CXX:-}"
  if [ -z "$cxx" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    cc=/usr/bin/gcc
    cxx=/usr/bin/g++
  fi
  echo "build: TORCH_CUDA_ARCH_LIST=$arch CC=${cc:-${CC:-default}} CXX=${cxx:-${CXX:-default}}"
  rm -rf latentseek_ext/_C*.so build/temp.*
  (
    [ -n "$cc" ] && export CC="$cc"
    [ -n "$cxx" ] && export CXX="$cxx"
    TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" run_logged "$OUT/build.log" \
      "$PY" setup.py build_ext --inplace
  ) || return $?
  "$PY" -c 'import latentseek_ext as m; assert "cuda" in m.EXTENSION_DEVICES, f"no CUDA kernel: {m.EXTENSION_ERROR}"; print("build: kernels for", sorted(m.EXTENSION_DEVICES))'
}

stage_test() {
  local files rc=0
  read -r -a files <<<"$(echo $TEST_FILES)"  # the glob expands here
  local extra
  read -r -a extra <<<"$PYTEST_ARGS"
  run_logged "$OUT/test.log" "$PY" -m pytest -q -rs -p no:cacheprovider -m "not slow" \
    --junitxml="$OUT/test.xml" "${extra[@]}" "${files[@]}" || rc=$?
  run_logged "$OUT/test-slow.log" "$PY" -m pytest -q -rs -p no:cacheprovider -m slow \
    --junitxml="$OUT/test-slow.xml" tests/test_op_cuda.py || rc=$?
  return $rc
}

stage_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"
    return 1
  fi
  local rc=0 tool
  # No caching allocator, so that memcheck sees the true end of each allocation.
  for tool in $SANITIZE_TOOLS; do
    local filter=()
    # memcheck checks every kernel (including the ATen / cuBLAS calls the launcher makes); the others only ours.
    [ "$tool" != memcheck ] && filter=(--kernel-name kns=latentseek)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_logged "$OUT/sanitize-$tool.log" compute-sanitizer --tool "$tool" \
      --error-exitcode 99 "${filter[@]}" "$PY" benchmarks/sanitizer_case.py
    local r=$?
    echo "sanitize: $tool exit $r"
    [ $r -eq 0 ] || rc=$r
  done
  return $rc
}

stage_bench() {
  if [ ! -f benchmarks/bench_op.py ]; then
    echo "benchmarks/bench_op.py is missing"
    return 1
  fi
  local tag rc=0 k args
  read -r -a args <<<"$BENCH_ARGS"
  tag="$("$PY" -c 'import torch, re; n = torch.cuda.get_device_name(0); m = re.search(r"(H100|H200|A100|L40S|B200)", n); print((m.group(1) if m else n.split()[-1]).lower())')"
  for k in $BENCH_KERNELS; do
    LATENTSEEK_CUDA_KERNEL="$k" run_logged "$OUT/bench-$k.log" "$PY" benchmarks/bench_op.py --device cuda \
      "${args[@]}" --out-dir "$OUT/bench-$k" --tag "$tag-$k" || rc=$?
  done
  return $rc
}

stage_profile() {
  if ! command -v ncu >/dev/null; then
    echo "ncu not found"
    return 1
  fi
  local rc=0 k
  : >"$OUT/profile.txt"
  for k in fused chunked; do
    LATENTSEEK_CUDA_KERNEL="$k" timeout "$STAGE_TIMEOUT" ncu --clock-control none --section SpeedOfLight --section Occupancy \
      --section LaunchStats --kernel-name regex:'fused_mma|chunk_rows|merge_splits' --launch-skip 3 --launch-count 3 \
      "$PY" - >>"$OUT/profile.txt" 2>&1 <<'EOF' || rc=$?
import torch, latentseek_ext
z = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
w = torch.randn(151936, 896, device="cuda", dtype=torch.bfloat16) / 30
for _ in range(3):
    latentseek_ext.lm_head_policy_grad(z, w, impl="ext")
torch.cuda.synchronize()
EOF
  done
  grep -E "fused_mma|chunk_rows|merge_splits|Duration|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per" \
    "$OUT/profile.txt" | head -60
  return $rc
}

for s in "${STAGES[@]}"; do
  echo "=== $s"
  case "$s" in
    env | wheels | build | test | sanitize | bench | profile) "stage_$s"; record "$s" $? ;;
    *) record "$s" 2 "unknown stage" ;;
  esac
done
exit $FAILED
