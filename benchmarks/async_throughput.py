"""Steps per hour of synchronous vs one-step-off vs fully-async RL over a twin fleet.

    python benchmarks/async_throughput.py [--rounds 3] [--steps 8] [--tokens-per-s 200]

A **simulation of engines on their own GPUs**: on a CPU machine trainer and engines share
the cores, so overlap cannot show as wall time. Each twin engine is given a simulated
device (``--rl-fleet-simulate-tokens-per-s``: a decode batch of n tokens holds the engine
n / R seconds, sleeping), so generation costs wall time but not the trainer's CPU, as an
engine on its own GPU would.

The real trainer (``megatron_alp.train.loop.run``, one gloo rank) runs, in paired and
interleaved rounds, at equal samples per step (``--grpo-prompts-per-step`` x
``--grpo-group-size``): ``sync`` (``--rl-async-mode off``), ``one-step-off``,
``fully-async`` (``--rl-partial-rollouts``, S = 1) and ``fully-async-det`` (the same,
``--rl-async-deterministic``). Per run: steps per hour from the mean ``timing_s/step`` of
steps 2..N (step 1 warms up), the mean trainer and engine idle fractions, the mean
staleness; per round, each mode's throughput / sync's. Prints the min and median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {
    "sync": ["--rl-async-mode", "off"],
    "one-step-off": ["--rl-async-mode", "one-step-off"],
    "fully-async": ["--rl-async-mode", "fully-async", "--rl-partial-rollouts", "--rl-max-staleness", "1"],
    "fully-async-det": ["--rl-async-mode", "fully-async", "--rl-partial-rollouts", "--rl-max-staleness", "1",
                        "--rl-async-deterministic"],
}


def _mean(hist: list[dict], key: str) -> float:
    vals = [h[key] for h in hist if key in h and h[key] == h[key]]  # NaN: not measured
    return sum(vals) / len(vals) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (default 3)")
    p.add_argument("--steps", type=int, default=8, help="RL steps per run (default 8)")
    p.add_argument("--tokens-per-s", type=float, default=200.0,
                   help="each simulated engine's decode throughput, tokens/s (default 200)")
    p.add_argument("--engines", type=int, default=2, help="twin engines (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="response tokens (default 16)")
    ns = p.parse_args(argv)
    if ns.rounds < 1 or ns.steps < 3 or not ns.tokens_per_s > 0:
        p.error("--rounds must be >= 1, --steps >= 3 and --tokens-per-s > 0")

    from megatron_alp.launch import RankGroup
    from tests.e2e.train_bodies import base_argv, prepare_module, train_body

    tmp = Path(tempfile.mkdtemp(prefix="async-bench-"))
    assets = tmp / "assets"
    assets.mkdir()
    prepare_module().build(assets, seed=0, target=0.2, layers=2, hidden=32, warmup_max_steps=0)
    common = ["--train-iters", str(ns.steps), "--rl-max-new-tokens", str(ns.max_new_tokens),
              "--rl-loss", "token-tis", "--rl-rollout-engine", "fleet", "--rl-fleet-engines", str(ns.engines),
              "--rl-fleet-simulate-tokens-per-s", str(ns.tokens_per_s)]
    print(f"[bench] {ns.rounds} rounds x {len(MODES)} modes x {ns.steps} steps; 8 prompts x 4 samples a "
          f"step; {ns.engines} simulated engines at {ns.tokens_per_s:g} tokens/s each", flush=True)
    rows: dict[str, dict[str, list[float]]] = {m: {"sph": [], "ratio": [], "t_idle": [], "e_idle": [],
                                                  "stale": []} for m in MODES}
    names = list(MODES)
    with RankGroup(1, timeout_s=1800) as group:
        for r in range(ns.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # interleaved, rotated
            sph = {}
            for name in order:
                argv = base_argv(assets, tmp / f"run-{r}-{name}", *common, *MODES[name])
                hist = group.run(train_body, argv, 1)[0]["history"][1:]
                step_s = _mean(hist, "timing_s/step")
                sph[name] = 3600.0 / step_s
                rows[name]["sph"].append(sph[name])
                rows[name]["t_idle"].append(_mean(hist, "async/trainer_idle_frac"))
                rows[name]["e_idle"].append(_mean(hist, "async/engine_idle_frac"))
                rows[name]["stale"].append(_mean(hist, "async/staleness_mean") if name != "sync" else 0.0)
                print(f"[bench] round {r + 1} {name:16s} {sph[name]:8.0f} steps/h  trainer idle "
                      f"{rows[name]['t_idle'][-1]:.2f}  engine idle {rows[name]['e_idle'][-1]:.2f}", flush=True)
            for name in names:
                rows[name]["ratio"].append(sph[name] / sph["sync"])
    print("\n| mode | steps/h, median | x sync per round: min | median | trainer idle | engine idle | "
          "staleness mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        d = rows[name]
        print(f"| {name} | {statistics.median(d['sph']):.0f} | {min(d['ratio']):.2f} | "
              f"{statistics.median(d['ratio']):.2f} | {statistics.median(d['t_idle']):.2f} | "
              f"{statistics.median(d['e_idle']):.2f} | {statistics.median(d['stale']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
