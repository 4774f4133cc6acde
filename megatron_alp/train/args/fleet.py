"""The fleet group: ``--rl-rollout-engine fleet`` (engines in their own processes, over HTTP)."""

from __future__ import annotations

import argparse
from typing import Any

from megatron_alp.train.args.common import positive, value

__all__ = ["FLEET_ONLY", "add_fleet_flags", "engine_kwargs"]

FLEET_ONLY = ("--rl-fleet-endpoints", "--rl-fleet-sync-port", "--rl-fleet-max-in-flight",
              "--rl-fleet-rows-per-request", "--rl-fleet-simulate-tokens-per-s")
"""Flags that mean something only with ``--rl-rollout-engine fleet`` (refused otherwise)."""


def add_fleet_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("megatron-alp fleet (--rl-rollout-engine fleet)")
    g.add_argument("--rl-fleet-endpoints", default=None, metavar="URL[,URL...]",
                   help="--rl-rollout-engine fleet: engine base URLs (http://host:port, started by "
                        "python -m megatron_alp.rollout.fleet_launch); none: start --rl-fleet-engines "
                        "local engines")
    g.add_argument("--rl-fleet-backend", default="twin", choices=("twin", "vllm"),
                   help="fleet engine kind: twin (the CPU twin: LocalEngine served over HTTP + gloo "
                        "weight group) or vllm (vllm serve with our worker extension); default twin")
    g.add_argument("--rl-fleet-max-in-flight", type=int, default=None, metavar="N",
                   help="completions kept in flight per engine (default: what each engine "
                        "says, vLLM's max_num_seqs or the twin's batch size)")
    g.add_argument("--rl-fleet-rows-per-request", type=int, default=None, metavar="N",
                   help="completions per request, in whole prompt groups (a prompt's samples "
                        "go to one engine and share its prefix cache); default 16 for the twin, "
                        "one group for vLLM")
    g.add_argument("--rl-fleet-engines", type=int, default=2, metavar="N",
                   help="engines of a locally started fleet (no --rl-fleet-endpoints; default 2)")
    g.add_argument("--rl-fleet-sync-host", default="auto", metavar="HOST",
                   help="rank 0's address as the engines reach it (weight-sync rendezvous); "
                        "default auto: rank 0 finds its own (127.0.0.1 for engines on its machine, "
                        "else the interface routing to them) and shares it with every rank")
    g.add_argument("--rl-fleet-sync-port", type=int, default=None, metavar="PORT",
                   help="first weight-sync rendezvous port (default: a free one)")
    g.add_argument("--rl-fleet-simulate-tokens-per-s", default=None, metavar="R[,R...]",
                   help="a locally started twin fleet simulates engines on their own GPUs: a "
                        "decode batch that made n tokens holds its engine n / R seconds (a sleep, "
                        "not CPU work), so trainer and engines overlap on a shared CPU; one R for "
                        "all engines or one per engine (slow and fast engines; default off)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet's ``create_engine`` arguments; fleet flags with another engine are refused."""
    for flag in ("--rl-fleet-engines", "--rl-fleet-max-in-flight", "--rl-fleet-rows-per-request"):
        if value(args, flag) is not None:
            positive(flag, value(args, flag))
    port = args.rl_fleet_sync_port
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--rl-fleet-sync-port={port} is invalid; expected a TCP port 1..65535")
    if args.rl_rollout_engine != "fleet":
        given = [flag for flag in FLEET_ONLY if value(args, flag) is not None]
        if given:
            raise ValueError(
                f"{given[0]} applies to --rl-rollout-engine fleet, not "
                f"{args.rl_rollout_engine!r}; drop it or add --rl-rollout-engine fleet"
            )
        return {}
    if args.rl_fleet_engines < 1:
        raise ValueError(f"--rl-fleet-engines={args.rl_fleet_engines} is invalid; expected >= 1")
    endpoints = [e.strip() for e in args.rl_fleet_endpoints.split(",")] if args.rl_fleet_endpoints else None
    if endpoints is not None and not all(e.startswith(("http://", "https://")) for e in endpoints):
        raise ValueError(
            f"--rl-fleet-endpoints {args.rl_fleet_endpoints!r}: expected comma-separated http://host:port URLs"
        )
    kw: dict[str, Any] = dict(backend=args.rl_fleet_backend, sync_host=args.rl_fleet_sync_host,
                              sync_port=args.rl_fleet_sync_port)
    for flag, key in (("--rl-fleet-max-in-flight", "max_in_flight"),
                      ("--rl-fleet-rows-per-request", "rows_per_request")):
        v = value(args, flag)
        if v is not None:
            positive(flag, v)
            kw[key] = v
    if endpoints is None:
        kw["num_engines"] = args.rl_fleet_engines
    else:
        kw["endpoints"] = endpoints
    if args.rl_fleet_simulate_tokens_per_s is not None:
        kw["launch_kwargs"] = dict(engine_args=_simulated_rates(args, endpoints))
    return kw


def _simulated_rates(args: argparse.Namespace, endpoints: list | None) -> list[list[str]]:
    """``--rl-fleet-simulate-tokens-per-s`` as each engine's ``--simulate-tokens-per-s``."""
    flag, text = "--rl-fleet-simulate-tokens-per-s", args.rl_fleet_simulate_tokens_per_s
    if endpoints is not None or args.rl_fleet_backend != "twin":
        raise ValueError(f"{flag} applies to a twin fleet the trainer starts (no --rl-fleet-endpoints, "
                         "--rl-fleet-backend twin); give engines you start yourself "
                         "`engine_server --simulate-tokens-per-s R`")
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 for r in rates) or len(rates) not in (1, args.rl_fleet_engines):
        raise ValueError(f"{flag} {text!r} is invalid; expected tokens/s > 0, one for all engines or "
                         f"one per engine (--rl-fleet-engines {args.rl_fleet_engines})")
    rates = rates * args.rl_fleet_engines if len(rates) == 1 else rates
    return [["--simulate-tokens-per-s", repr(r)] for r in rates]
