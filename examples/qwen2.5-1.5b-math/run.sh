#!/usr/bin/env bash
# The paper's single-turn Token-ALP recipe on one 8-GPU node (see README.md).
set -euo pipefail
MODEL=${MODEL:?set MODEL to the HF folder of Qwen2.5-Math-1.5B}
TRAIN=${TRAIN:?set TRAIN to the training prompts (JSONL or Parquet with prompt, answer)}
EVAL=${EVAL:-}
SAVE=${SAVE:-runs/qwen2.5-1.5b-math}
# Engine logs beside the checkpoints, not inside: --load refuses a folder that holds
# other files but no checkpoint (the first run).
LOGS=${LOGS:-$SAVE.logs}
FLEET_PORT=${FLEET_PORT:-8100}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Rollout fleet: four vLLM engines on GPUs 4-7 (the trainer's GPUs 0-3 are reserved).
python -m megatron_alp.rollout.fleet_launch --backend vllm --model "$MODEL" \
    --engines 4 --gpus 4,5,6,7 --base-port "$FLEET_PORT" --log-dir "$LOGS/fleet" &
fleet=$!
trap 'kill $fleet 2>/dev/null || true' EXIT
endpoints=$(python -c "print(','.join(f'http://127.0.0.1:{$FLEET_PORT + k}' for k in range(4)))")

CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc-per-node 4 -m megatron_alp.train \
    --config "$here/config.yaml" \
    --hf-model "$MODEL" --rl-prompt-data "$TRAIN" ${EVAL:+--rl-eval-data "$EVAL"} \
    --rl-rollout-engine fleet --rl-fleet-backend vllm --rl-fleet-endpoints "$endpoints" \
    --save "$SAVE" --load "$SAVE" --exit-signal-handler "$@"
