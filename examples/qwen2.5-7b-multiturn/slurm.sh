#!/usr/bin/env bash
# Multi-node multi-turn run from a login node: sandbox service node(s) first, then the
# trainer job (examples/slurm/train.sbatch) pointed at them. Extra arguments go to the
# trainer (the rollout fleet's flags, e.g. --rl-rollout-engine fleet --rl-fleet-endpoints ...).
#
#   MODEL=/data/Qwen2.5-7B TRAIN=/data/train.parquet TRAIN_NODES=4 SANDBOX_NODES=1 \
#       examples/qwen2.5-7b-multiturn/slurm.sh --rl-rollout-engine fleet ...
set -euo pipefail
MODEL=${MODEL:?set MODEL to the HF folder of Qwen2.5-7B}
TRAIN=${TRAIN:?set TRAIN to the training prompts (JSONL or Parquet with prompt, answer)}
EVAL=${EVAL:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
slurm=$here/../slurm
out=${SANDBOX_OUT:-runs/sandbox}

jid=$(OUT=$out sbatch --parsable --nodes="${SANDBOX_NODES:-1}" "$slurm/sandbox.sbatch")
echo "[multiturn] sandbox job $jid; waiting for its service(s) to answer ..."
for _ in $(seq 1800); do
  [ -f "$out/$jid.url" ] && [ "$(wc -l < "$out/$jid.url")" -ge "${SANDBOX_NODES:-1}" ] && break
  sleep 2
done
[ -f "$out/$jid.url" ] || { echo "sandbox job $jid did not come up (see its log)" >&2; exit 1; }
urls=$(paste -sd, "$out/$jid.url")
echo "[multiturn] sandbox: $urls"

sbatch --nodes="${TRAIN_NODES:-1}" "$slurm/train.sbatch" \
    --config "$here/config.yaml" \
    --hf-model "$MODEL" --rl-prompt-data "$TRAIN" ${EVAL:+--rl-eval-data "$EVAL"} \
    --rl-sandbox "$urls" "$@"
echo "[multiturn] stop the sandbox when the run ends: scancel $jid"
