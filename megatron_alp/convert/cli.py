"""Command-line plumbing shared by ``tools/convert/*`` (standard library only).

* :func:`run_cli`: one line and exit 2 for bad input (``ValueError``), one line and exit
  130 / 143 for Ctrl-C / SIGTERM (after the output's clean-up), never a traceback for those.
* :func:`quiet_third_party`: the warnings megatron-core, torch and transformers print on
  import (Apex / Transformer Engine fall-backs, "No CUDA runtime", ...) are hidden unless
  ``--verbose``.
* argparse types that name the flag and the expected range.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable

from megatron_alp.io_safety import Interrupted, human_bytes, install_signal_cleanup

__all__ = [
    "dtype_choice",
    "finish_line",
    "non_negative_float",
    "positive_int",
    "quiet_third_party",
    "run_cli",
]

_QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL", "TQDM_DISABLE")
_DTYPE_NAMES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16",
                "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def dtype_choice(text: str) -> str:
    """argparse type: auto | fp32 | bf16 | fp16 (and their long names)."""
    key = text.lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, fp32, bf16, fp16")
    return _DTYPE_NAMES[key]



def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (expected >= 1)")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
    return value


def quiet_third_party(verbose: bool) -> None:
    """Hide third-party warnings and log lines (call before importing torch) unless
    ``verbose``; our own errors still print."""
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # torch configures its own loggers on import (levels set here would be reset), so
    # switch logging at WARNING and below off globally: these tools print, they do not log.
    logging.disable(logging.WARNING)


def finish_line(prog: str, what: str, nbytes: int, seconds: float, target: str) -> str:
    """``"hf_to_megatron: qwen2, 31 tensors, 708.6 KB in 0.3 s (2.4 MB/s) -> out"``."""
    rate = human_bytes(nbytes / max(seconds, 1e-6))
    return f"{prog}: {what}, {human_bytes(nbytes)} in {seconds:.1f} s ({rate}/s) -> {target}"


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run ``main`` with SIGTERM / Ctrl-C cleaned up and bad input reported in one line.

    Returns the exit code: ``main``'s, 2 for a ``ValueError`` (the message goes to stderr
    as ``prog: error: ...``), 128 + signal number when interrupted.
    """
    restore = install_signal_cleanup()
    # quiet_third_party changes process-wide state: put it back for in-process callers.
    env = {k: os.environ.get(k) for k in _QUIET_ENV}
    log_level = logging.root.manager.disable
    warn = warnings.catch_warnings()
    warn.__enter__()
    try:
        return main()
    except Interrupted as e:
        print(f"{prog}: interrupted by {e.args[0]}; partial output removed", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; partial output removed", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        restore()
        warn.__exit__(None, None, None)
        logging.disable(log_level)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
