#!/usr/bin/env bash
# Create .venv-gptqmodel/ with GPTQModel 7.6.0 for CPU quantization.
# GPTQModel pins numpy 2.2.6, which clashes with the main .venv, hence a venv of its own.
# Idempotent: a marker file written last means the venv is complete.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv-gptqmodel"
marker="$venv/.lqtk-complete"

if [[ -f "$marker" ]]; then
    echo "gptqmodel venv already complete: $venv"
    exit 0
fi

python3.11 -m venv "$venv"

# Without this constraint pip resolves a CUDA torch (~2.5 GB) or gptqmodel 7.7, which needs torch >= 2.14.1.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

"$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
# optimum: transformers' GPTQ loader needs it to read the checkpoint back (used for the dequantization check);
# torchmetrics: lqtk's perplexity code, which scripts/gptq_serving_check.py runs on the loaded GPTQ export.
"$venv/bin/pip" install --constraint "$constraints" \
    "torch==2.13.0" "gptqmodel==7.6.0" "transformers==5.23.*" optimum accelerate safetensors "torchmetrics==1.9.0"

touch "$marker"
echo "gptqmodel venv ready: $venv"
