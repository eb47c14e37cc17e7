#!/usr/bin/env bash
# The committed GSM8K run: the first 30 test problems, CoT vs LatentSeek with the oracle reward and with the
# self-reward, the sampling baselines best-of-3 (self-reward) and self-consistency (5 samples), and SLOT, on
# Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF, dequantised to fp32) on the CPU, all through the CLI.
#
#   MODEL=/path/qwen2.5-coder-0.5b-instruct-q4.gguf DATA=../shared/data/gsm8k_test.jsonl bash tools/gsm8k30.sh
#
# tools/fetch_qwen_gguf.sh OUT.gguf fetches the GGUF.
# Runs are resumable: calling again continues where a run stopped (STAGES="cot oracle" picks runs).
# NPROC=2 runs each eval stage as 2 torchrun processes (one thread each) that share out the unfinished problems.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MODEL="${MODEL:?MODEL=path to the GGUF file}"
DATA="${DATA:-$ROOT/../shared/data/gsm8k_test.jsonl}"
OUT="${OUT:-$ROOT/runs}"
LIMIT="${LIMIT:-30}"
STAGES="${STAGES:-cot oracle self bon sc confidence samples slot report}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-512}"
ORACLE_MAX_STEPS="${ORACLE_MAX_STEPS:-4}"
SELF_MAX_STEPS="${SELF_MAX_STEPS:-2}"
VERIFIER_TOKENS="${VERIFIER_TOKENS:-128}"
CONFIDENCE_MAX_STEPS="${CONFIDENCE_MAX_STEPS:-2}"
SAMPLES="${SAMPLES:-4}"
SAMPLES_MAX_STEPS="${SAMPLES_MAX_STEPS:-2}"
BATCH_SIZE="${BATCH_SIZE:-8}"
# The committed runs are fp32 (explicit: --dtype auto picks bf16 on CPUs with bf16 units).
DTYPE="${DTYPE:-fp32}"
NPROC="${NPROC:-1}"

if [ "$NPROC" -gt 1 ]; then
    LATENTSEEK=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m latentseek)
else
    LATENTSEEK=("$PY" -m latentseek)
fi
common=(--model "$MODEL" --dataset "$DATA" --limit "$LIMIT" --batch-size "$BATCH_SIZE"
    --max-new-tokens "$MAX_NEW_TOKENS" --dtype "$DTYPE")
for stage in $STAGES; do
    case "$stage" in
        cot) "${LATENTSEEK[@]}" eval "${common[@]}" --method cot --out "$OUT/gsm8k30-cot" ;;
        # The paper's rho 0.2, lr 0.03 and threshold -0.2, but fewer steps than its 10 (and, for the self-reward,
        # shorter verifications: each step costs 4 verifier generations per problem): what a 2-core CPU could
        # afford for 30 problems in one session.
        oracle) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward oracle \
            --max-steps "$ORACLE_MAX_STEPS" --out "$OUT/gsm8k30-latentseek-oracle" ;;
        self) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward self \
            --max-steps "$SELF_MAX_STEPS" --verifier-max-new-tokens "$VERIFIER_TOKENS" \
            --out "$OUT/gsm8k30-latentseek-self" ;;
        # The methods' default candidates (3 for best-of-N, as in the paper; 5 for self-consistency) and sampling.
        bon) "${LATENTSEEK[@]}" eval "${common[@]}" --method bon --reward self \
            --verifier-max-new-tokens "$VERIFIER_TOKENS" --out "$OUT/gsm8k30-bon-self" ;;
        sc) "${LATENTSEEK[@]}" eval "${common[@]}" --method self-consistency --out "$OUT/gsm8k30-self-consistency" ;;
        # The confidence reward rarely passes the threshold, so the best-rewarded (most confident) answer is
        # returned (--keep-best); 2 steps, as for the self-reward. K = 4 draws per step with the oracle reward and
        # 2 steps (the first samples around the greedy answer, the second after one REINFORCE update): 8 drawn
        # answers per unsolved problem, what the shared 2-core CPU allowed beside the other runs.
        confidence) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward confidence --keep-best \
            --max-steps "$CONFIDENCE_MAX_STEPS" --out "$OUT/gsm8k30-latentseek-confidence" ;;
        samples) "${LATENTSEEK[@]}" eval "${common[@]}" --method latentseek --reward oracle --samples "$SAMPLES" \
            --max-steps "$SAMPLES_MAX_STEPS" --out "$OUT/gsm8k30-latentseek-samples" ;;
        # SLOT with its defaults, the authors' 5 AdamW steps at lr 0.1 on each prompt's own delta.
        slot) "${LATENTSEEK[@]}" eval "${common[@]}" --method slot --out "$OUT/gsm8k30-slot" ;;
        report) "$PY" -m latentseek report "$OUT"/gsm8k30-cot "$OUT"/gsm8k30-latentseek-oracle \
            "$OUT"/gsm8k30-latentseek-self "$OUT"/gsm8k30-bon-self "$OUT"/gsm8k30-self-consistency \
            "$OUT"/gsm8k30-latentseek-confidence "$OUT"/gsm8k30-latentseek-samples "$OUT"/gsm8k30-slot \
            --out "$OUT/gsm8k30-report" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
