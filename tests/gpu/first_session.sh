#!/usr/bin/env bash
# The first H100 session, in order, in under 15 minutes of one GPU (docs/gpu.md,
# "The first GPU session"). Run from the repository root in the GPU environment:
#
#   bash tests/gpu/first_session.sh [OUT_DIR]        # default runs/gpu-first-session
#
# Each step has its own time limit (13 minutes in all) and its output in
# OUT_DIR/<step>.log; a failing step does not stop the later ones. The summary at the end
# is what to paste into BENCHMARKS.md ("GPU results"), with the machine line it prints.
set -uo pipefail
OUT=${1:-runs/gpu-first-session}
PY=${PYTHON:-python}
mkdir -p "$OUT"
declare -a SUMMARY

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  local took=$((SECONDS - t0))
  local last
  last=$(grep -E "passed|failed|skipped|error" "$OUT/$name.log" | tail -1)
  [ "$code" = 124 ] && last="TIMED OUT after ${limit} s; $last"
  SUMMARY+=("$name: exit $code in ${took} s; ${last:-see $OUT/$name.log}")
  echo "   exit $code in ${took} s; ${last}"
}

# 1. The machine and what the trainer will build (TE spec or a loud reason why not).
step environment 60 "$PY" -c "
import torch, megatron.core
from megatron_alp.models.builder import layer_spec_report
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')
print('megatron-core', megatron.core.__version__)
for mod in ('transformer_engine', 'triton', 'vllm'):
    try:
        m = __import__(mod); print(mod, getattr(m, '__version__', '?'))
    except Exception as e:
        print(mod, 'unavailable:', type(e).__name__, e)
print(layer_spec_report()[0])
"
MACHINE='^(torch|megatron-core|transformer_engine|triton|vllm|layer spec|\[train\])'
grep -E "$MACHINE" "$OUT/environment.log"

# 2. The GPU tier (kernels, the TE spec, host syncs in the update, signals under
#    torchrun on CUDA, and the scale checks that live in tests/gpu); two-GPU tests skip.
step gpu_tier 480 "$PY" -m pytest tests/gpu -v -rs -s -p no:cacheprovider

# 3. vLLM end to end, if vLLM is installed (weight sync into real engines, sleep levels).
if "$PY" -c "import vllm" 2>/dev/null; then
  step vllm_e2e 240 "$PY" -m pytest tests/e2e/test_vllm_gpu.py -v -rs -p no:cacheprovider -x
else
  SUMMARY+=("vllm_e2e: not run (vllm is not installed)")
fi

# 4. Machine line + summary.
echo
echo "== summary ($OUT)"
grep -E "$MACHINE" "$OUT/environment.log"
printf '%s\n' "${SUMMARY[@]}"
