#!/usr/bin/env bash
# Tiny CPU example of the conversion tools (no downloads): make a random 4-layer Qwen2
# model, convert it to a Megatron dist checkpoint, check its logits against HF
# transformers at TP=2 x PP=2 on 4 gloo ranks, and convert it back to HF.
#   examples/tiny_convert_roundtrip.sh [WORKDIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/bootstrap.sh"
py=${MEGATRON_ALP_VENV:-$repo/.venv}/bin/python
work=${1:-$(mktemp -d)}
echo "[example] working in $work"
"$py" - "$work/hf" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
from megatron_alp.models.tiny import tiny_hf_config
torch.manual_seed(0)
AutoModelForCausalLM.from_config(tiny_hf_config("qwen2")).save_pretrained(sys.argv[1])
print(f"[example] random tiny Qwen2 saved to {sys.argv[1]}")
PY
"$py" "$repo/tools/convert/hf_to_megatron.py" --hf "$work/hf" --out "$work/megatron" --force
"$py" "$repo/tools/convert/verify.py" --hf "$work/hf" --megatron "$work/megatron" --tp 2 --pp 2
"$py" "$repo/tools/convert/megatron_to_hf.py" --megatron "$work/megatron" --out "$work/hf_back" --dtype fp32 --force
echo "[example] done: $work/megatron (dist checkpoint), $work/hf_back (HF again)"
