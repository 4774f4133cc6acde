#!/usr/bin/env bash
# Set up (first time) and run the test suite. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m slow          # the slow checks
#   scripts/test.sh tests/unit -x    # one tier
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/bootstrap.sh"
venv=${MEGATRON_ALP_VENV:-$repo/.venv}
cd "$repo"
if [ $# -eq 0 ]; then
    set -- -m "not slow"
fi
exec "$venv/bin/python" -m pytest "$@"
