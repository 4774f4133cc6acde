#!/usr/bin/env bash
# The main job (scripts/run.sh runs this): build the tiny example's assets offline
# (tokenizer, task, model, warm-up; skipped when already built), run Token-ALP RL on two
# gloo ranks (TP = 2) with BF16 rollouts, then draw the plots. Extra arguments go to the
# trainer (e.g. --train-iters 10, --rl-loss grpo, --tensor-model-parallel-size 1).
#
#   RUN_DIR     where checkpoints, metrics and plots go (default: runs/tiny_cpu)
#   ASSETS_DIR  the built tokenizer, task and model (default: RUN_DIR-assets; outside
#               RUN_DIR, since the trainer refuses a run directory that contains its inputs)
#   PYTHON      the interpreter (default: python)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run_dir=${RUN_DIR:-runs/tiny_cpu}
run_dir=${run_dir%/}
assets=${ASSETS_DIR:-$run_dir-assets}
py=${PYTHON:-python}
"$py" "$here/prepare.py" --out "$assets"
"$py" -m megatron_alp.train --config "$here/config.yaml" \
    --hf-model "$assets/model" \
    --rl-prompt-data "$assets/train.jsonl" \
    --rl-eval-data "$assets/eval.jsonl" \
    --save "$run_dir/checkpoints" --rl-run-dir "$run_dir" "$@"
"$py" -m megatron_alp.plot "$run_dir"
