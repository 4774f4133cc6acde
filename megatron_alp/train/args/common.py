"""Small helpers shared by the argument groups."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["dest", "given", "nonnegative", "positive"]


def given(argv: Sequence[str], flag: str) -> bool:
    """True if ``flag`` appears in ``argv`` (``--flag V`` or ``--flag=V``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def dest(flag: str) -> str:
    """argparse's attribute name for ``flag``."""
    return flag.lstrip("-").replace("-", "_")


def value(args: argparse.Namespace, flag: str) -> Any:
    return getattr(args, dest(flag))


def positive(name: str, value: Any, minimum: int = 1) -> None:
    """ValueError unless ``value`` is an integer >= ``minimum``."""
    if value is None or value < minimum:
        raise ValueError(f"{name}={value} is invalid; expected an integer >= {minimum}")


def nonnegative(name: str, value: Any) -> None:
    """ValueError unless ``value`` is >= 0 (None: not given, nothing to check)."""
    if value is not None and not value >= 0:  # `not >=` also refuses NaN
        raise ValueError(f"{name}={value} is invalid; expected a number >= 0")
