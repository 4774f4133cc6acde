#!/usr/bin/env bash
# Set-up shared by scripts/run.sh and scripts/test.sh: find Python 3.12, create .venv,
# install megatron-alp with its dev extras. Idempotent: a second run with an unchanged
# pyproject.toml only checks a stamp (well under a second).
#
# Environment:
#   MEGATRON_ALP_PYTHON  a Python 3.12 interpreter to use (skips the search)
#   MEGATRON_ALP_VENV    where the venv lives (default: <repo>/.venv)
#   MEGATRON_ALP_EXTRAS  pip extras to install (default: dev)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MEGATRON_ALP_VENV:-$repo/.venv}
extras=${MEGATRON_ALP_EXTRAS:-dev}

# shellcheck source=find_python.sh
. "$repo/scripts/find_python.sh"

ensure_bubblewrap() {
    # The code sandbox (megatron_alp.sandbox) isolates untrusted programs with bubblewrap.
    # Install it where we can (root + apt-get); otherwise say what to install. Never fatal:
    # training without multi-turn tool use does not need it, and the sandbox itself refuses
    # to run code without it.
    command -v bwrap >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[bootstrap] installing bubblewrap (code sandbox isolation)" >&2
        if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } >/dev/null 2>&1; then
            return 0
        fi
        echo "[bootstrap] warning: 'apt-get install bubblewrap' failed; the code sandbox will refuse to run" >&2
    else
        echo "[bootstrap] note: bubblewrap (bwrap) is not installed; the code sandbox needs it" \
             "(Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora: sudo dnf install bubblewrap)" >&2
    fi
    return 0
}

stamp_of() {
    { cat "$repo/pyproject.toml"; echo "extras=$extras"; } | sha256sum | cut -d' ' -f1
}

ensure_bubblewrap || true

stamp_file=$venv/.megatron-alp-stamp
want=$(stamp_of)
if [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    exit 0
fi

py=$(find_python)
echo "[bootstrap] using $py ($("$py" --version 2>&1))" >&2
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating venv at $venv" >&2
    "$py" -m venv "$venv"
fi
echo "[bootstrap] installing megatron-alp[$extras] (first time: a few minutes, ~5 GB with torch)" >&2
# pip repeats one "WARNING: Location ... is ignored" line per package when a configured
# index folder is missing on this machine, and setuptools prints a 10-line boxed
# "BuildBackendWarning: Editable installation" for every editable install: noise, both
# filtered (the box is dropped up to its last line, at most 12 lines; real errors still show).
quiet_pip() {
    "$venv/bin/python" -m pip "$@" 2> >(awk '
        /^WARNING: Location .* is ignored: it is neither a file nor a directory\.$/ { next }
        /BuildBackendWarning: Editable installation\./ { box = 12; next }
        box > 0 { box--; if ($0 ~ /with strategy, WheelFile\(/) box = 0; next }
        { print; fflush() }' >&2)
}
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet -e "$repo[$extras]"
echo "$want" > "$stamp_file"
echo "[bootstrap] ready" >&2
