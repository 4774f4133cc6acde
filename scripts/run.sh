#!/usr/bin/env bash
# Set up (first time) and run the main job: the tiny CPU RL example (examples/tiny_cpu):
# a small Qwen2-shaped model with a real HF tokenizer, Token-ALP, TP = 2 on two gloo
# ranks through megatron-core, BF16 rollouts from the local engine, then the plots.
# Extra arguments go to the trainer (python -m megatron_alp.train --help).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/bootstrap.sh"
venv=${MEGATRON_ALP_VENV:-$repo/.venv}
cd "$repo"
PYTHON="$venv/bin/python" exec "$repo/examples/tiny_cpu/run.sh" "$@"
