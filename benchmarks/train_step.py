"""The trainer's step time: split by phase, and ALP on vs off inside the real trainer.

    python benchmarks/train_step.py [--rounds 5] [--steps 6] [--tp 2]

Builds the tiny example's assets (no warm-up needed for timing), starts one group of
``--tp`` gloo ranks, then runs the real trainer (``megatron_alp.train.loop.run``) in
paired, interleaved rounds A B A B ...: A = Token-ALP (noise in the update forward), B =
the same token-level objective over rollout log-probs with ALP off (``seq-bypass`` with
``--rl-loss-ratio-level token``: identical passes, no noise). Per run, the mean of each
``timing_s/*`` over steps 2..N (step 1 warms up); per round, the ratio A / B. Prints the
min and median of the per-round ratios and the phase split of A.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("gen", "old_log_prob", "update_actor", "update_weights", "step")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    p.add_argument("--steps", type=int, default=6, help="RL steps per run (default 6)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size = ranks (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model (default 64)")
    ns = p.parse_args(argv)
    if ns.rounds < 1 or ns.steps < 2:
        p.error("--rounds must be >= 1 and --steps >= 2")

    from megatron_alp.launch import RankGroup
    from tests.e2e.train_bodies import base_argv, prepare_module, train_body

    tmp = Path(tempfile.mkdtemp(prefix="train-step-bench-"))
    assets = tmp / "assets"
    assets.mkdir()
    prepare_module().build(assets, seed=0, target=0.2, layers=2, hidden=ns.hidden, warmup_max_steps=0)
    common = ["--tensor-model-parallel-size", str(ns.tp), "--train-iters", str(ns.steps),
              "--micro-batch-size", "16", "--global-batch-size", "32", "--grpo-prompts-per-step", "16",
              "--grpo-group-size", "8"]
    configs = {
        "A alp": ["--rl-loss", "token-alp", "--alp-init-std", "1e-3"],
        "B off": ["--rl-loss", "seq-bypass", "--rl-loss-ratio-level", "token"],
    }
    ratios: dict[str, list[float]] = {k: [] for k in PHASES}
    split_a: dict[str, list[float]] = {k: [] for k in PHASES}
    print(f"[bench] {ns.rounds} rounds x (A, B) x {ns.steps} steps, TP={ns.tp}, hidden {ns.hidden}", flush=True)
    with RankGroup(ns.tp, timeout_s=1200) as group:
        for r in range(ns.rounds):
            means = {}
            for name, flags in configs.items():
                argv = base_argv(assets, tmp / f"run-{r}-{name[0]}", *common, *flags)
                hist = group.run(train_body, argv, ns.tp)[0]["history"][1:]
                means[name] = {k: statistics.fmean(h[f"timing_s/{k}"] for h in hist) for k in PHASES}
            for k in PHASES:
                ratios[k].append(means["A alp"][k] / means["B off"][k])
                split_a[k].append(means["A alp"][k])
            print(f"[bench] round {r + 1}: step A {means['A alp']['step']:.3f} s, B "
                  f"{means['B off']['step']:.3f} s, ratio {ratios['step'][-1]:.3f}; update A/B "
                  f"{ratios['update_actor'][-1]:.3f}", flush=True)
    print("[bench] ALP on / off inside the trainer (per-round ratios):")
    for k in ("update_actor", "step"):
        print(f"[bench]   {k:<14} min {min(ratios[k]):.3f}  median {statistics.median(ratios[k]):.3f}")
    print("[bench] phase split of the ALP run (median seconds per step):")
    for k in PHASES:
        print(f"[bench]   {k:<14} {statistics.median(split_a[k]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
