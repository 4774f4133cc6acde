"""The reward registry and the built-in rewards (see the package docstring)."""

from __future__ import annotations

import functools
from typing import Callable

from megatron_alp.registry import Registry

__all__ = ["available_rewards", "get_reward", "last_boxed", "register_reward"]

RewardFn = Callable[[str, str], float]
_REWARDS: Registry[RewardFn] = Registry("reward")
register_reward = _REWARDS.register


def available_rewards() -> list[str]:
    """Names accepted by ``--rl-reward``."""
    return _REWARDS.names()


def get_reward(name: str) -> RewardFn:
    """The reward function ``name``; ValueError listing the valid names otherwise."""
    return _REWARDS.get(name)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces balanced), None if absent."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


@register_reward("exact-match")
def exact_match(response: str, answer: str) -> float:
    """1.0 when the last boxed answer (or the stripped response) equals the answer."""
    got = last_boxed(response)
    got = response if got is None else got
    return 1.0 if got.strip() == str(answer).strip() else 0.0


@functools.cache
def _math_verify():
    from math_verify import parse, verify

    return parse, verify


@register_reward("math-verify")
def math_verify_reward(response: str, answer: str) -> float:
    """1.0 when math-verify finds the last boxed answer equal to the reference answer."""
    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    parse, verify = _math_verify()
    try:
        gold = parse(f"${answer}$" if "\\boxed" not in str(answer) else str(answer))
        pred = parse(f"\\boxed{{{boxed}}}")
        return 1.0 if verify(gold, pred) else 0.0
    except Exception:  # noqa: BLE001 - a malformed expression is a wrong answer, not a crash
        return 0.0
