#!/usr/bin/env bash
# Set up (first time) and run the test suite. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m slow          # the slow checks
#   scripts/test.sh tests/unit -x    # one tier (still without the slow checks)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/bootstrap.sh"
venv=${MEGATRON_ALP_VENV:-$repo/.venv}
cd "$repo"
# The default marker selection stays unless the arguments choose one (-m EXPR / -mEXPR).
has_marker=0
for arg in "$@"; do
    case "$arg" in
        -m|-m*) has_marker=1 ;;
    esac
done
if [ "$has_marker" -eq 0 ]; then
    set -- -m "not slow" "$@"
fi
exec "$venv/bin/python" -m pytest "$@"
