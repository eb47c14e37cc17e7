#!/usr/bin/env bash
# The committed GSM8K comparisons on Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF) on the CPU, all through the CLI.
#
#   SET=30  the first 30 test problems (runs/gsm8k30-*, fp32): CoT, LatentSeek with the oracle reward (4 steps) and
#           with the self-reward (2 steps), best-of-3 (self-reward), self-consistency (5), the confidence reward,
#           K = 4 samples, SLOT;
#   SET=100 the first 100 test problems (runs/gsm8k100-*, bf16): CoT, self-consistency (5), best-of-3 (self-reward),
#           LatentSeek with the self-reward (2 steps) and with the oracle reward at the paper's 10 steps.
#
#   SET=30 MODEL=/path/qwen2.5-coder-0.5b-instruct-q4.gguf DATA=../shared/data/gsm8k_test.jsonl bash tools/gsm8k.sh
#
# tools/fetch_qwen_gguf.sh OUT.gguf fetches the GGUF.
# Runs are resumable: calling again continues where a run stopped (STAGES="cot oracle" picks runs; the report stage
# reports the set's runs that exist, finished or not).
# NPROC=2 runs each eval stage as 2 torchrun processes (one thread each) that share out the unfinished problems.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MODEL="${MODEL:?MODEL=path to the GGUF file}"
DATA="${DATA:-$ROOT/../shared/data/gsm8k_test.jsonl}"
OUT="${OUT:-$ROOT/runs}"
SET="${SET:?SET=30 or SET=100}"
case "$SET" in
    # The 30-problem runs are fp32 (explicit: --dtype auto picks bf16 on CPUs with bf16 units). The oracle run
    # allowed 4 steps, the self-reward 2 with 128-token verifications: what a 2-core CPU could afford in a session.
    30) DEFAULT_STAGES="cot oracle self bon sc confidence samples slot report"
        DEFAULT_DTYPE=fp32 DEFAULT_ORACLE_MAX_STEPS=4 ;;
    # The 100-problem runs are bf16 (a decode step costs about half of fp32's on a CPU with bf16 units) and give
    # the oracle the paper's 10 steps.
    100) DEFAULT_STAGES="cot sc bon self oracle report"
        DEFAULT_DTYPE=bf16 DEFAULT_ORACLE_MAX_STEPS=10 ;;
    *) echo "SET must be 30 or 100, got '$SET'" >&2; exit 2 ;;
esac
LIMIT="$SET"
PREFIX="$OUT/gsm8k$SET"
STAGES="${STAGES:-$DEFAULT_STAGES}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-512}"
ORACLE_MAX_STEPS="${ORACLE_MAX_STEPS:-$DEFAULT_ORACLE_MAX_STEPS}"
SELF_MAX_STEPS="${SELF_MAX_STEPS:-2}"
VERIFIER_TOKENS="${VERIFIER_TOKENS:-128}"
CONFIDENCE_MAX_STEPS="${CONFIDENCE_MAX_STEPS:-2}"
SAMPLES="${SAMPLES:-4}"
SAMPLES_MAX_STEPS="${SAMPLES_MAX_STEPS:-2}"
BATCH_SIZE="${BATCH_SIZE:-8}"
DTYPE="${DTYPE:-$DEFAULT_DTYPE}"
NPROC="${NPROC:-1}"

if [ "$NPROC" -gt 1 ]; then
    LATENTSEEK=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m latentseek)
else
    LATENTSEEK=("$PY" -m latentseek)
fi

# Each stage's run folder under PREFIX.
run_name() {
    case "$1" in
        cot) echo cot ;;
        oracle) echo latentseek-oracle ;;
        self) echo latentseek-self ;;
        bon) echo bon-self ;;
        sc) echo self-consistency ;;
        confidence) echo latentseek-confidence ;;
        samples) echo latentseek-samples ;;
        slot) echo slot ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
}

common=(--model "$MODEL" --dataset "$DATA" --limit "$LIMIT" --batch-size "$BATCH_SIZE"
    --max-new-tokens "$MAX_NEW_TOKENS" --dtype "$DTYPE")
for stage in $STAGES; do
    if [ "$stage" = report ]; then
        reported=()
        for other in $DEFAULT_STAGES; do
            [ "$other" = report ] && continue
            run="$PREFIX-$(run_name "$other")"
            if [ -d "$run" ]; then reported+=("$run"); else echo "report: $run not run yet, left out" >&2; fi
        done
        "$PY" -m latentseek report "${reported[@]}" --out "$PREFIX-report"
        continue
    fi
    out="$PREFIX-$(run_name "$stage")"
    case "$stage" in
        cot) "${LATENTSEEK[@]}" eval "${common[@]}" --method cot --out "$out" ;;
        # The paper's rho 0.2, lr 0.03 and threshold -0.2 (the method's defaults); the self-reward with shorter
        # verifications than its 512 tokens: each step costs 4 verifier generations per problem.
        oracle) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward oracle \
            --max-steps "$ORACLE_MAX_STEPS" --out "$out" ;;
        self) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward self \
            --max-steps "$SELF_MAX_STEPS" --verifier-max-new-tokens "$VERIFIER_TOKENS" --out "$out" ;;
        # The methods' default candidates (3 for best-of-N, as in the paper; 5 for self-consistency) and sampling.
        bon) "${LATENTSEEK[@]}" eval "${common[@]}" --method bon --reward self \
            --verifier-max-new-tokens "$VERIFIER_TOKENS" --out "$out" ;;
        sc) "${LATENTSEEK[@]}" eval "${common[@]}" --method self-consistency --out "$out" ;;
        # The confidence reward rarely passes the threshold, so the best-rewarded (most confident) answer is
        # returned (--keep-best); 2 steps, as for the self-reward. K = 4 draws per step with the oracle reward and
        # 2 steps (the first samples around the greedy answer, the second after one REINFORCE update): 8 drawn
        # answers per unsolved problem, what the shared 2-core CPU allowed beside the other runs.
        confidence) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward confidence --keep-best \
            --max-steps "$CONFIDENCE_MAX_STEPS" --out "$out" ;;
        samples) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward oracle --samples "$SAMPLES" \
            --max-steps "$SAMPLES_MAX_STEPS" --out "$out" ;;
        # SLOT with its defaults, the authors' 5 AdamW steps at lr 0.1 on each prompt's own delta.
        slot) "${LATENTSEEK[@]}" eval "${common[@]}" --method slot --out "$out" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
