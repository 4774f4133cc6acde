#!/usr/bin/env bash
# Set up (first time) and run the main job: the embedded default on this machine.
# Until the RL trainer lands this is the smoke job: a tiny Qwen2-style model trained for
# a few steps with TP=2 x PP=2 on 4 gloo ranks (CPU), through megatron-core's 1F1B
# schedule, checked against a TP=1 run of the same steps. Extra arguments go to
# `python -m megatron_alp.smoke` (see --help).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/bootstrap.sh"
venv=${MEGATRON_ALP_VENV:-$repo/.venv}
cd "$repo"
exec "$venv/bin/python" -m megatron_alp.smoke "$@"
