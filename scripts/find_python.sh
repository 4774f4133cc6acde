# Sourced by scripts/bootstrap.sh and scripts/bootstrap_vllm.sh: find_python prints a
# working Python 3.12 (MEGATRON_ALP_PYTHON, PATH, pyenv, the usual places) or explains.

is_py312() {
    # A working interpreter whose version is 3.12 (pyenv shims can exist and still fail).
    [ -n "$1" ] && [ "$("$1" -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null)" = "True" ]
}

find_python() {
    if [ -n "${MEGATRON_ALP_PYTHON:-}" ]; then
        if is_py312 "$MEGATRON_ALP_PYTHON"; then echo "$MEGATRON_ALP_PYTHON"; return 0; fi
        echo "error: MEGATRON_ALP_PYTHON=$MEGATRON_ALP_PYTHON is not a working Python 3.12" >&2
        return 1
    fi
    local candidates=()
    candidates+=("$(command -v python3.12 2>/dev/null || true)")
    if command -v pyenv >/dev/null 2>&1; then
        local root; root=$(pyenv root 2>/dev/null || true)
        [ -n "$root" ] && candidates+=("$root"/versions/3.12*/bin/python3.12)
    fi
    candidates+=("${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12)
    candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12 /opt/homebrew/bin/python3.12)
    candidates+=("$(command -v python3 2>/dev/null || true)")
    local c
    for c in "${candidates[@]}"; do
        if is_py312 "$c"; then echo "$c"; return 0; fi
    done
    cat >&2 <<MSG
error: Python 3.12 not found (megatron-core 0.19 needs Python 3.12).
  looked for: python3.12 on PATH, pyenv versions 3.12.*, /usr/local/bin, /usr/bin, python3
  install it (e.g. 'pyenv install 3.12' or your distribution's python3.12 package),
  or point MEGATRON_ALP_PYTHON at a Python 3.12 interpreter.
MSG
    return 1
}
