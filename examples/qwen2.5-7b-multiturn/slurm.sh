#!/usr/bin/env bash
# Multi-node multi-turn run from a login node: sandbox service node(s) first
# (examples/slurm/sandbox.sbatch), then trainer + vLLM fleet nodes in one job
# (examples/slurm/fleet.sbatch) pointed at them. Extra arguments go to the trainer.
#
#   MODEL=/data/Qwen2.5-7B TRAIN=/data/train.parquet SAVE=/shared/runs/mt \
#       TRAIN_NODES=2 FLEET_NODES=2 SANDBOX_NODES=1 examples/qwen2.5-7b-multiturn/slurm.sh
set -euo pipefail
MODEL=${MODEL:?set MODEL to the HF folder of Qwen2.5-7B (same path on every node)}
TRAIN=${TRAIN:?set TRAIN to the training prompts (JSONL or Parquet with prompt, answer)}
EVAL=${EVAL:-}
SAVE=${SAVE:-runs/qwen2.5-7b-multiturn}
export MODEL TRAIN_NODES=${TRAIN_NODES:-1} FLEET_NODES=${FLEET_NODES:-1}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
slurm=$here/../slurm
out=${SANDBOX_OUT:-runs/sandbox}
n_sandbox=${SANDBOX_NODES:-1}

jid=$(OUT=$out sbatch --parsable --nodes="$n_sandbox" "$slurm/sandbox.sbatch")
echo "[multiturn] sandbox job $jid; waiting for its service(s) to answer ..."
for _ in $(seq 1800); do
  if [ -f "$out/$jid.url" ] && [ "$(wc -l < "$out/$jid.url")" -ge "$n_sandbox" ]; then break; fi
  sleep 2
done
[ -f "$out/$jid.url" ] || { echo "sandbox job $jid did not come up (see its log)" >&2; exit 1; }
urls=$(paste -sd, "$out/$jid.url")
echo "[multiturn] sandbox: $urls"

sbatch --nodes=$((TRAIN_NODES + FLEET_NODES)) "$slurm/fleet.sbatch" \
    --config "$here/config.yaml" \
    --hf-model "$MODEL" --rl-prompt-data "$TRAIN" ${EVAL:+--rl-eval-data "$EVAL"} \
    --rl-sandbox "$urls" --save "$SAVE" --load "$SAVE" --exit-signal-handler "$@"
echo "[multiturn] stop the sandbox when the run ends: scancel $jid"
