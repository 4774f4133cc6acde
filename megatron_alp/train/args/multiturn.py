"""The multi-turn group: tool-integrated rollouts (``--rl-max-turns`` > 1) and their sandbox."""

from __future__ import annotations

import argparse
import math
import os

from megatron_alp.train.args.common import positive

__all__ = ["add_multiturn_flags", "check_multiturn"]


def add_multiturn_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("megatron-alp multi-turn (--rl-max-turns N > 1)")
    g.add_argument("--rl-max-turns", type=int, default=1, metavar="N",
                   help="model turns per rollout: 1 = single-turn (default); N > 1 = multi-turn "
                        "tool-integrated reasoning: a fenced python block is run in the sandbox, "
                        "its output shown as an observation (masked from the loss), until a "
                        "\\boxed{} answer or N turns; --rl-max-new-tokens then bounds the whole "
                        "response (model + observation tokens)")
    g.add_argument("--rl-sandbox", default="local", metavar="local|URL",
                   help="where multi-turn code runs: local (an in-process bubblewrap pool on "
                        "the rollout rank) or http://HOST:PORT of `python -m "
                        "megatron_alp.sandbox.serve` (several, comma-separated: programs are "
                        "spread over them; default: local)")
    g.add_argument("--rl-sandbox-concurrency", type=int, default=8, metavar="N",
                   help="programs run at once (pool slots, or requests in flight per service; "
                        "default 8)")
    g.add_argument("--rl-sandbox-timeout-s", type=float, default=10.0, metavar="S",
                   help="wall-clock limit per program, local pool (the service has its own; "
                        "default 10)")
    g.add_argument("--rl-sandbox-memory-mb", type=int, default=1024, metavar="MB",
                   help="address-space limit per program in MiB, local pool (default 1024)")


def check_multiturn(args: argparse.Namespace) -> None:
    """Multi-turn flags; with a local sandbox, isolation must work here (its own message)."""
    positive("--rl-max-turns", args.rl_max_turns)
    positive("--rl-sandbox-concurrency", args.rl_sandbox_concurrency)
    positive("--rl-sandbox-memory-mb", args.rl_sandbox_memory_mb)
    t = args.rl_sandbox_timeout_s
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"--rl-sandbox-timeout-s={t} is invalid; expected seconds > 0")
    if args.rl_max_turns == 1:
        return
    from megatron_alp.sandbox import SandboxLimits, SandboxUnavailable

    try:
        SandboxLimits(timeout_s=args.rl_sandbox_timeout_s, memory_mb=args.rl_sandbox_memory_mb)
    except ValueError as e:
        raise ValueError(f"--rl-sandbox-timeout-s / --rl-sandbox-memory-mb: {e}") from None
    if args.rl_sandbox != "local":
        from megatron_alp.sandbox import sandbox_client

        try:
            sandbox_client(args.rl_sandbox, max_concurrency=1).close()
        except ValueError as e:
            raise ValueError(f"--rl-sandbox {args.rl_sandbox!r}: expected local or URL[,URL...]; {e}") from None
        return
    # Only the process that will own the pool (the launcher, or rank 0) runs the check:
    # one isolated program, so a broken bubblewrap fails here, before any rank starts.
    if os.environ.get("RANK", "0") != "0":
        return
    from megatron_alp.sandbox import SandboxPool

    try:
        SandboxPool(max_concurrency=1).close()
    except SandboxUnavailable as e:
        raise ValueError(f"--rl-max-turns={args.rl_max_turns} needs a working sandbox "
                         f"(--rl-sandbox local): {e}") from None
