"""The asynchronous-RL group: rollouts that overlap training (``--rl-async-mode``).

``--rl-partial-rollouts`` is Megatron's own flag (its RL group: "inference continues while
training updates the weights"), read here with that meaning; the rest are ours.
"""

from __future__ import annotations

import argparse

from megatron_alp.train.args.common import given

__all__ = ["add_async_flags", "async_config"]


def add_async_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("megatron-alp asynchronous RL (--rl-async-mode; fleet engines)")
    g.add_argument("--rl-async-mode", default="off", choices=("off", "one-step-off", "fully-async"),
                   help="off: synchronous (engines idle while the trainer trains and vice versa); "
                        "one-step-off: step t+1's rollouts are generated while step t trains "
                        "(weights synced after step t); fully-async: the engines generate "
                        "continuously into a bounded buffer and weights are pushed after every "
                        "step while generation goes on (in-flight update). Needs --rl-rollout-engine "
                        "fleet with the twin backend (docs/async.md; default off)")
    g.add_argument("--rl-max-staleness", type=int, default=1, metavar="S",
                   help="no update sees a token produced more than S policy versions ago; a "
                        "fully-async group that is older is regenerated (its prompt issued again "
                        "under the current weights; counted in async/regenerated_groups) "
                        "(default 1)")
    g.add_argument("--rl-partial-rollout-tokens", type=int, default=8, metavar="N",
                   help="with --rl-partial-rollouts (Megatron's flag): tokens per segment; a "
                        "sequence continues segment by segment under whatever weights the "
                        "engines serve, each token keeping the log-prob and version of the "
                        "policy that produced it (default 8)")
    g.add_argument("--rl-async-buffer-groups", type=int, default=0, metavar="N",
                   help="fully-async: prompt groups in flight or finished at once (the buffer "
                        "bound; 0: --grpo-prompts-per-step, the default)")
    g.add_argument("--rl-async-deterministic", action="store_true",
                   help="fully-async on a fixed schedule (segment k of step b's groups under "
                        "version clamp(b - S + k, 0, b)): a rerun, and a kill -9 + --load, give "
                        "the same metrics as an uninterrupted run; costs throughput (docs/async.md)")


def async_config(args: argparse.Namespace, argv: list[str]) -> "object":
    """The checked flags as an :class:`~megatron_alp.train.async_rollouts.AsyncConfig`."""
    from megatron_alp.train.async_rollouts import AsyncConfig

    mode = args.rl_async_mode
    partial = bool(args.rl_partial_rollouts)
    if mode == "off":
        ours = [f for f in ("--rl-max-staleness", "--rl-partial-rollout-tokens",
                            "--rl-async-buffer-groups", "--rl-async-deterministic") if given(argv, f)]
        if partial:
            ours.insert(0, "--rl-partial-rollouts")
        if ours:
            raise ValueError(f"{ours[0]} applies to --rl-async-mode one-step-off or fully-async; "
                             "add one, or drop the flag")
        return AsyncConfig()
    if args.rl_rollout_engine != "fleet":
        raise ValueError(
            f"--rl-async-mode {mode}: the {args.rl_rollout_engine!r} engine runs in the trainer's "
            "process and stays synchronous; use --rl-rollout-engine fleet (engines in their own "
            "processes) or --rl-async-mode off")
    if args.rl_fleet_backend != "twin":
        raise ValueError(f"--rl-async-mode {mode} with --rl-fleet-backend {args.rl_fleet_backend}: "
                         "not supported yet (its engines do not label completions with their "
                         "weight version); use --rl-fleet-backend twin")
    if args.rl_generation_lag:
        raise ValueError(f"--rl-generation-lag {args.rl_generation_lag} emulates staleness; with "
                         f"--rl-async-mode {mode} the staleness is real: drop one of them")
    if args.rl_max_turns > 1 and (mode != "fully-async" or partial or args.rl_async_deterministic):
        raise ValueError(f"--rl-max-turns {args.rl_max_turns} with --rl-async-mode {mode}"
                         f"{' --rl-partial-rollouts' if partial else ''}"
                         f"{' --rl-async-deterministic' if args.rl_async_deterministic else ''}: "
                         "multi-turn rollouts run under --rl-async-mode fully-async only (each turn "
                         "is one request, so a trajectory's turns may span versions), without "
                         "--rl-partial-rollouts or --rl-async-deterministic")
    if mode == "one-step-off" and (partial or args.rl_async_deterministic or given(argv, "--rl-async-buffer-groups")):
        flag = ("--rl-partial-rollouts" if partial else "--rl-async-deterministic"
                if args.rl_async_deterministic else "--rl-async-buffer-groups")
        raise ValueError(f"{flag} applies to --rl-async-mode fully-async (one-step-off generates "
                         "each step's batch whole, under one version, and is deterministic)")
    if given(argv, "--rl-partial-rollout-tokens") and not partial:
        raise ValueError("--rl-partial-rollout-tokens applies with --rl-partial-rollouts")
    return AsyncConfig(mode=mode, max_staleness=args.rl_max_staleness, partial_rollouts=partial,
                       segment_tokens=args.rl_partial_rollout_tokens,
                       buffer_groups=args.rl_async_buffer_groups,
                       deterministic=bool(args.rl_async_deterministic))
