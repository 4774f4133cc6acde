#!/usr/bin/env bash
# The paper's multi-turn Seq-ALP recipe on one 8-GPU node (see README.md): a sandbox
# service on this node's CPUs, a vLLM rollout fleet on GPUs 4-7, the trainer on GPUs 0-3.
# Several nodes: examples/slurm/ (README.md, "Multi-node").
set -euo pipefail
MODEL=${MODEL:?set MODEL to the HF folder of Qwen2.5-7B}
TRAIN=${TRAIN:?set TRAIN to the training prompts (JSONL or Parquet with prompt, answer)}
EVAL=${EVAL:-}
SAVE=${SAVE:-runs/qwen2.5-7b-multiturn}
# Service logs beside the checkpoints, not inside: --load refuses a folder that holds
# other files but no checkpoint (the first run of a job chain).
LOGS=${LOGS:-$SAVE.logs}
FLEET_PORT=${FLEET_PORT:-8100}
SANDBOX_PORT=${SANDBOX_PORT:-8090}
SANDBOX_CONCURRENCY=${SANDBOX_CONCURRENCY:-32}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$LOGS"

# Sandbox service (bubblewrap; exits 1 saying what to install if isolation does not work).
python -m megatron_alp.sandbox.serve --host 127.0.0.1 --port "$SANDBOX_PORT" \
    --concurrency "$SANDBOX_CONCURRENCY" --queue 4096 --timeout-s 10 --memory-mb 2048 \
    > "$LOGS/sandbox.log" 2>&1 &
sandbox=$!
# Rollout fleet: four vLLM engines on GPUs 4-7.
python -m megatron_alp.rollout.fleet_launch --backend vllm --model "$MODEL" \
    --engines 4 --gpus 4,5,6,7 --base-port "$FLEET_PORT" --log-dir "$LOGS/fleet" &
fleet=$!
trap 'kill $fleet $sandbox 2>/dev/null || true' EXIT
endpoints=$(python -c "print(','.join(f'http://127.0.0.1:{$FLEET_PORT + k}' for k in range(4)))")

CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc-per-node 4 -m megatron_alp.train \
    --config "$here/config.yaml" \
    --hf-model "$MODEL" --rl-prompt-data "$TRAIN" ${EVAL:+--rl-eval-data "$EVAL"} \
    --rl-rollout-engine fleet --rl-fleet-backend vllm --rl-fleet-endpoints "$endpoints" \
    --rl-sandbox "http://127.0.0.1:$SANDBOX_PORT" \
    --save "$SAVE" --load "$SAVE" --exit-signal-handler "$@"
