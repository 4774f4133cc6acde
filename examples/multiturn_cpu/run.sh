#!/usr/bin/env bash
# A few multi-turn Seq-ALP steps on CPU, end to end: build the tiny example's assets
# (examples/tiny_cpu/prepare.py; skipped when already built), then run the trainer on two
# gloo ranks (TP = 2) under torchrun with the local bubblewrap sandbox, then draw the plots.
# Extra arguments go to the trainer (e.g. --train-iters 10, --rl-max-turns 5).
#
#   RUN_DIR     where checkpoints, metrics and plots go (default: runs/multiturn_cpu)
#   ASSETS_DIR  the built tokenizer, task and model (default: RUN_DIR-assets; outside
#               RUN_DIR, since the trainer refuses a run directory that contains its inputs)
#   PYTHON      the interpreter (default: python)
#   NPROC     ranks (default 2 = TP 2)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# train.py is run as a script (torchrun): put this checkout's package first on the path
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
run_dir=${RUN_DIR:-runs/multiturn_cpu}
run_dir=${run_dir%/}
assets=${ASSETS_DIR:-$run_dir-assets}
py=${PYTHON:-python}
"$py" "$here/../tiny_cpu/prepare.py" --out "$assets"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" -m torch.distributed.run --standalone \
    --nproc-per-node "${NPROC:-2}" "$here/train.py" --config "$here/config.yaml" \
    --hf-model "$assets/model" \
    --rl-prompt-data "$assets/train.jsonl" \
    --rl-eval-data "$assets/eval.jsonl" \
    --save "$run_dir/checkpoints" --rl-run-dir "$run_dir" "$@"
"$py" -m megatron_alp.plot "$run_dir"
