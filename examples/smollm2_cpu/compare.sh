#!/usr/bin/env bash
# Issue 21's pretrained-model check: SmolLM2-135M-Instruct, GRPO vs Seq-ALP, FP8 rollouts,
# generation lag K = 4, the same seed and steps for both; prints both runs' reward,
# importance-ratio tail and KL side by side.
#
#   RUN_DIR (default runs/smollm2_compare), PYTHON (default python), STEPS (default 20),
#   SEED (default 1); extra args -> both trainer runs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RUN_DIR=${RUN_DIR:-runs/smollm2_compare}
py=${PYTHON:-python}
steps=${STEPS:-20}
seed=${SEED:-1}
for preset in grpo seq-alp; do
  if [ -f "$RUN_DIR/$preset/metrics.jsonl" ] && \
     [ "$("$py" -c "import json,sys; print(max(json.loads(l)['step'] for l in open(sys.argv[1])))" "$RUN_DIR/$preset/metrics.jsonl")" -ge "$steps" ]; then
    echo "[smollm2_compare] $preset: finished earlier ($RUN_DIR/$preset), kept"
    continue
  fi
  echo "[smollm2_compare] $preset: $steps steps, fp8 rollouts, K = 4, seed $seed"
  PRESET=$preset RUN_NAME=$preset "$here/run.sh" --rl-rollout-dtype fp8 --rl-generation-lag 4 \
      --train-iters "$steps" --seed "$seed" "$@"
done
"$py" "$here/compare_table.py" "$RUN_DIR/grpo/metrics.jsonl" "$RUN_DIR/seq-alp/metrics.jsonl"
