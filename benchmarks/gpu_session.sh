#!/usr/bin/env bash
# Everything a GPU session does for the CUDA kernel, in at most 8 minutes on a fresh machine with torch (CUDA
# build), nvcc, compute-sanitizer, ncu and no package registry:
#
#   bash benchmarks/gpu_session.sh OUTDIR [STAGE ...]
#   PLAN_ONLY=1 bash benchmarks/gpu_session.sh OUTDIR      (prints the stages and their time limits, runs nothing)
#
# Stages, in order of value (default: all), each under its own time limit (seconds, LIMIT_<stage> overrides) and
# all of them under BUDGET (default 480 s: a stage gets what is left when that is less than its own limit, and is
# skipped when that is under 15 s). A failed stage does not stop the later ones. All output goes under OUTDIR.
#   env        10  device, driver, toolkit and torch versions                                  -> env.txt
#   wheels     10  pip-installs .whl/*.whl offline where .whl/ exists (Liger, Cut CE for the benchmark; see
#                  benchmarks/fetch_gpu_wheels.sh), keeping what is already importable            -> wheels.log
#   build     150  latentseek_ext._C in place for this GPU's arch (TORCH_CUDA_ARCH_LIST overrides; 9.0a on an
#                  H100 / H200, which the sm90 kernel needs), and a check that the CUDA kernel registered -> build.log
#   test      100  the whole CUDA suite: tests/test_op_cuda.py (every kernel path forced in turn, the small-shared-
#                  memory tiles, the op options, the slow N*V > 2^31 case) and the CUDA cases of tests/test_op.py,
#                  with pytest-xdist where importable (PYTEST_WORKERS, default 4)             -> test.log, test.xml
#   sm90       40  tests/test_op_sm90.py: the sm_90a kernel forced (LATENTSEEK_CUDA_KERNEL=sm90): every cluster
#                  size, the near-tie agreement of a cluster's CTAs, determinism; its own stage so that a hang of
#                  the new kernel costs only this stage (on another GPU it checks the error)   -> sm90.log, sm90.xml
#   sanitize   65  compute-sanitizer memcheck, racecheck, synccheck and initcheck on benchmarks/sanitizer_case.py
#                  (every kernel forced in turn, both tile configurations, sm90 last on an H100 / H200), the four
#                  tools in parallel                                                       -> sanitize-<tool>.log
#   bench      45  benchmarks/bench_op.py --device cuda on BENCH_ARGS (default: the issue's 3 shapes, bf16),
#                  providers gemm-pair, reference, ext, and Liger / Cut CE where importable (BENCH_PROVIDERS
#                  overrides; not reference-compile, whose compilations would take the stage) -> bench/, bench.log
#   timesplit  35  benchmarks/time_split.py: per-kernel times, host gap, CUDA-graph replay, and the sweep over N
#                  at H = 896, 1536, 3584 of fused, chunked and (H100 / H200) sm90       -> timesplit/, timesplit.log
#   ncu        25  Nsight Compute at N=64 H=896 V=151936 bf16 on the fused kernel and its merge, then (H100 / H200)
#                  the sm90 kernel and its merge: speed of light, memory workload analysis (shared memory, L2,
#                  DRAM), occupancy, launch                  -> ncu-<kernel>.txt, ncu-<kernel>.ncu-rep
# Not in the default list, for a lease of its own (it needs the wheels stage's pytest where the image lacks it):
#   engine    420  the engine on CUDA: the CUDA cases of the engine, method and CLI tests (CUDA-graph capture
#                  included; at most ENGINE_TEST_LIMIT s, default 150), then benchmarks/bench_loop.py --device cuda
#                  with ENGINE_ARGS (default: its own defaults; not yet timed on a GPU, estimated at 5 minutes)
#                                                          -> engine-test.log, engine-test.xml, engine-bench.log, engine/
#   e.g. BUDGET=560 bash benchmarks/gpu_session.sh /tmp/gs env wheels build engine
# OUTDIR/summary.txt gets one line per stage; the exit status is non-zero if any stage failed. The device tool
# returns at most 8 files, so pack OUTDIR:
#   bash benchmarks/gpu_session.sh /tmp/gs; tar czf "$OUT/gs.tgz" -C /tmp gs
# Knobs: BUDGET, LIMIT_<stage>, PYTEST_WORKERS, PYTEST_ARGS (extra pytest arguments), SANITIZE_TOOLS (default
# "memcheck racecheck synccheck initcheck"), BENCH_ARGS, BENCH_PROVIDERS, TIMESPLIT_ARGS (default: 10 calls per split
# measurement, sweep points of 0.1 s and at most 20 calls, to fit the stage), LS_CC / LS_CXX (the host
# compilers of the build), PY (the interpreter whose torch has CUDA).
set -uo pipefail

if [ $# -lt 1 ]; then
  sed -n "2,$(($(grep -n "^set -uo pipefail" "$0" | cut -d: -f1) - 1))p" "$0"
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
STAGES=("$@")
ALL_STAGES=(env wheels build test sm90 sanitize bench timesplit ncu)
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
declare -A LIMIT=([env]=10 [wheels]=10 [build]=150 [test]=100 [sm90]=40 [sanitize]=65 [bench]=45 [timesplit]=35 [ncu]=25)
for s in "${ALL_STAGES[@]}"; do
  var="LIMIT_$s"
  [ -n "${!var:-}" ] && LIMIT[$s]="${!var}"
done
LIMIT[engine]="${LIMIT_engine:-420}"
BUDGET="${BUDGET:-480}"
KILL_GRACE=10  # seconds a timed-out command gets between SIGTERM and SIGKILL, counted inside the budget
MIN_STAGE=15
PYTEST_WORKERS="${PYTEST_WORKERS:-4}"
PYTEST_ARGS="${PYTEST_ARGS:-}"
SANITIZE_TOOLS="${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}"
BENCH_ARGS="${BENCH_ARGS:---cases Qwen2.5-0.5B:64,Qwen2.5-0.5B:300,Qwen2.5-7B:4096 --dtypes bf16 --min-runs 5 --max-runs 10 --min-time 0.5}"
BENCH_PROVIDERS="${BENCH_PROVIDERS:-}"
TIMESPLIT_ARGS="${TIMESPLIT_ARGS:---reps 10 --min-time 0.1 --max-reps 20}"
ENGINE_ARGS="${ENGINE_ARGS:-}"
ENGINE_TEST_LIMIT="${ENGINE_TEST_LIMIT:-150}"

if [ -n "${PLAN_ONLY:-}" ]; then
  total=0
  for s in "${STAGES[@]}"; do
    echo "plan: $s ${LIMIT[$s]:-?} s"
    total=$((total + ${LIMIT[$s]:-0}))
  done
  echo "plan: total ${total} s, budget ${BUDGET} s"
  exit 0
fi

cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEADLINE=$(($(date +%s) + BUDGET))

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
STAGE_END=0
record() {  # stage, status (0 ok, "skipped", else an exit code), note
  local state=ok
  [ "$2" = skipped ] && state=skipped
  [ "$2" != skipped ] && [ "$2" -ne 0 ] && state="FAILED (exit $2)"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $1: ${state}${3:+ - $3}" | tee -a "$OUT/summary.txt"
  [ "$state" = ok ] || FAILED=1
}
left_in_stage() { echo $((STAGE_END - $(date +%s))); }
run_logged() {  # log file, command...: under the stage's remaining time; output to the log, its tail to the terminal
  local log="$1" left
  shift
  left="$(left_in_stage)"
  if [ "$left" -lt 5 ]; then
    echo "gpu_session: no time left in the stage for: $*" | tee -a "$log"
    return 124
  fi
  timeout --kill-after="$KILL_GRACE" "$left" "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "gpu_session: stopped at the stage's time limit (${left} s left when it started)" >>"$log"
  tail -n 12 "$log"
  return $rc
}

stage_env() {
  {
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not found"
    (command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2) || echo "compute-sanitizer: not found"
    (command -v ncu >/dev/null && ncu --version | tail -1) || echo "ncu: not found"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
optin = getattr(p, "shared_memory_per_block_optin", None)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB",
      "smem/block opt-in", optin, "smem/SM", p.shared_memory_per_multiprocessor)
for mod in ("triton", "xdist", "liger_kernel", "cut_cross_entropy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except ImportError:
        print(mod + ": not installed")
EOF
  } >"$OUT/env.txt" 2>&1
  local rc=$?
  cat "$OUT/env.txt"
  return $rc
}

stage_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "wheels: no .whl/ folder, nothing to install (Liger and Cut CE are left out of the benchmark unless present)"
    return 0
  fi
  local rc=0 whl dist
  for whl in .whl/*.whl; do
    dist="$(basename "$whl" | cut -d- -f1)"
    # Keep what the environment has (its torch was built against it); add only what is missing.
    if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$dist') else 1)" 2>/dev/null; then
      echo "wheels: $dist already importable, kept"
      continue
    fi
    if timeout "$(left_in_stage)" "$PY" -m pip install --quiet --no-index --no-deps "$whl" >>"$OUT/wheels.log" 2>&1; then
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
  # messages; setup.py links the shared one explicitly and refuses a build that still carries a copy. The system
  # compilers, where present, are the ones that link it like torch does.
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
  local workers=() extra
  read -r -a extra <<<"$PYTEST_ARGS"
  if [ "$PYTEST_WORKERS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    workers=(-n "$PYTEST_WORKERS")
  fi
  # -k cuda: every test of test_op_cuda.py (marked cuda) and the cuda-device cases of test_op.py; the slow
  # N*V > 2^31 case included.
  run_logged "$OUT/test.log" "$PY" -m pytest -q -rs -p no:cacheprovider --durations=15 -k cuda "${workers[@]}" \
    --junitxml="$OUT/test.xml" "${extra[@]}" tests/test_op_cuda.py tests/test_op.py
}

stage_sm90() {
  local workers=() extra
  read -r -a extra <<<"$PYTEST_ARGS"
  if [ "$PYTEST_WORKERS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    workers=(-n "$PYTEST_WORKERS")
  fi
  # On a GPU other than compute capability 9.0 the file's one test there checks that forcing sm90 is an error.
  run_logged "$OUT/sm90.log" "$PY" -m pytest -q -rs -p no:cacheprovider --durations=10 "${workers[@]}" \
    --junitxml="$OUT/sm90.xml" "${extra[@]}" tests/test_op_sm90.py
}

stage_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"
    return 1
  fi
  local rc=0 tool pids=() left
  left="$(left_in_stage)"
  # The tools run side by side (each is host-bound); no caching allocator, so that memcheck sees the true end of
  # each allocation. memcheck checks every kernel (the ATen and cuBLAS calls of the launcher too), the others ours.
  for tool in $SANITIZE_TOOLS; do
    local filter=()
    [ "$tool" != memcheck ] && filter=(--kernel-name kns=latentseek)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after="$KILL_GRACE" "$left" compute-sanitizer --tool "$tool" \
      --error-exitcode 99 "${filter[@]}" "$PY" benchmarks/sanitizer_case.py >"$OUT/sanitize-$tool.log" 2>&1 &
    pids+=("$!:$tool")
  done
  local entry r
  for entry in "${pids[@]}"; do
    wait "${entry%%:*}"
    r=$?
    tool="${entry#*:}"
    echo "sanitize: $tool exit $r, $(grep -c ': ok$' "$OUT/sanitize-$tool.log") calls ok, $(grep -E 'ERROR SUMMARY' "$OUT/sanitize-$tool.log" | tail -1)"
    [ $r -eq 0 ] || rc=$r
  done
  return $rc
}

stage_bench() {
  local tag args providers="$BENCH_PROVIDERS" pair
  read -r -a args <<<"$BENCH_ARGS"
  if [ -z "$providers" ]; then
    providers="gemm-pair,reference,ext"
    for pair in liger:liger_kernel cce:cut_cross_entropy; do
      "$PY" -c "import ${pair#*:}" 2>/dev/null && providers+=",${pair%%:*}"
    done
  fi
  tag="$("$PY" -c 'import torch, re; n = torch.cuda.get_device_name(0); m = re.search(r"(H100|H200|A100|L40S|B200)", n); print((m.group(1) if m else n.split()[-1]).lower())')"
  run_logged "$OUT/bench.log" "$PY" benchmarks/bench_op.py --device cuda "${args[@]}" --providers "$providers" \
    --out-dir "$OUT/bench" --tag "op-$tag"
}

stage_timesplit() {
  local args
  read -r -a args <<<"$TIMESPLIT_ARGS"
  run_logged "$OUT/timesplit.log" "$PY" benchmarks/time_split.py --device cuda --out-dir "$OUT/timesplit" \
    --tag time-split "${args[@]}"
}

stage_ncu() {
  if ! command -v ncu >/dev/null; then
    echo "ncu not found"
    return 1
  fi
  local kernels=(fused) kernel regex rc=0
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.get_device_capability() == (9, 0) else 1)' && kernels+=(sm90)
  for kernel in "${kernels[@]}"; do
    regex='fused_mma|merge_splits'
    [ "$kernel" = sm90 ] && regex='sm90_kernel|merge_splits'
    # Three calls; skip the first call's two launches (kernel + merge), profile the second call's.
    LATENTSEEK_CUDA_KERNEL="$kernel" run_logged "$OUT/ncu-$kernel.txt" ncu --clock-control none \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Chart \
      --section MemoryWorkloadAnalysis_Tables --section Occupancy --section LaunchStats \
      --kernel-name regex:"$regex" --launch-skip 2 --launch-count 2 \
      --export "$OUT/ncu-$kernel" --force-overwrite \
      "$PY" -c '
import torch, latentseek_ext
z = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
w = torch.randn(151936, 896, device="cuda", dtype=torch.bfloat16) / 30
for _ in range(3):
    latentseek_ext.lm_head_policy_grad(z, w, 0.5, impl="ext")
torch.cuda.synchronize()
' || rc=$?
    grep -E "fused_mma|sm90_kernel|merge_splits|Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache|Shared Memory|Compute \(SM\)|Achieved Occupancy|Registers Per" \
      "$OUT/ncu-$kernel.txt" | head -40
  done
  return $rc
}

stage_engine() {
  local rc=0 tag args
  read -r -a args <<<"$ENGINE_ARGS"
  # only the CUDA cases (-k cuda: the device fixture's cuda parameter and the fp32-on-CUDA-equals-CPU tests)
  run_logged "$OUT/engine-test.log" timeout --kill-after=5 "$ENGINE_TEST_LIMIT" "$PY" -m pytest -q -rs \
    -p no:cacheprovider -k cuda --junitxml="$OUT/engine-test.xml" tests/test_generation.py tests/test_loop.py \
    tests/test_rewards.py tests/test_methods.py tests/test_cli.py || rc=$?
  tag="$("$PY" -c 'import torch, re; n = torch.cuda.get_device_name(0); m = re.search(r"(H100|H200|A100|L40S|B200)", n); print((m.group(1) if m else n.split()[-1]).lower())')"
  run_logged "$OUT/engine-bench.log" "$PY" benchmarks/bench_loop.py --device cuda "${args[@]}" --out-dir "$OUT/engine" \
    --tag "loop-$tag" || rc=$?
  return $rc
}

for s in "${STAGES[@]}"; do
  echo "=== $s"
  if [ -z "${LIMIT[$s]:-}" ]; then
    record "$s" 2 "unknown stage"
    continue
  fi
  left=$((DEADLINE - $(date +%s) - KILL_GRACE))
  limit="${LIMIT[$s]}"
  if [ "$left" -lt "$limit" ]; then  # the budget cuts the stage short: not worth starting under MIN_STAGE
    limit="$left"
    if [ "$limit" -lt "$MIN_STAGE" ]; then
      record "$s" skipped "${left} s of the ${BUDGET} s budget left"
      continue
    fi
  fi
  STAGE_END=$(($(date +%s) + limit))
  start=$(date +%s)
  "stage_$s"
  record "$s" $? "$(($(date +%s) - start)) s of ${limit}"
done
exit $FAILED
