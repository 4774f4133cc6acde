"""Rollout-vs-trainer mismatch for FP32, BF16 and FP8 rollouts on the same first step.

    python benchmarks/rollout_mismatch.py --assets runs/tiny_cpu-assets [--steps 1] [--out DIR]

Runs the trainer's CLI (``python -m megatron_alp.train``, GRPO, one rank, the tiny CPU
example's model and task) once per ``--rl-rollout-dtype`` from the same weights and seed,
with ``--rl-mismatch-by-layer-interval 1``, and prints a Markdown table of the step's
``rollout_corr/*`` (the engine's log-probs against the trainer's FP32 forward on the
sampled tokens) and ``mismatch/layer_NN``. Each dtype samples its own tokens (its own
numerics), from the same policy with the same per-completion seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = ("rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/abs_logp_diff_max",
        "rollout_corr/token_mult_prob_error", "rollout_corr/log_ppl_diff", "rollout_corr/chi2_token",
        "rollout_corr/ess_token", "is_ratio/q999", "is_ratio/max", "mismatch/logits")


def run(assets: Path, out: Path, dtype: str, steps: int) -> list[dict]:
    run_dir = out / dtype
    cmd = [sys.executable, "-m", "megatron_alp.train", "--hf-model", str(assets / "model"),
           "--rl-prompt-data", str(assets / "train.jsonl"), "--rl-reward", "exact-match",
           "--rl-loss", "grpo", "--micro-batch-size", "16", "--global-batch-size", "64",
           "--grpo-prompts-per-step", "16", "--grpo-group-size", "16", "--lr", "3e-4",
           "--lr-decay-style", "constant", "--rl-max-new-tokens", "8", "--rl-max-prompt-length", "24",
           "--seed", "1234", "--train-iters", str(steps), "--rl-rollout-dtype", dtype,
           "--rl-mismatch-by-layer-interval", "1", "--rl-run-dir", str(run_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"error: the {dtype} run failed (rc {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", required=True, help="examples/tiny_cpu/prepare.py --out DIR")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    ns = ap.parse_args()
    out = Path(ns.out) if ns.out else Path(tempfile.mkdtemp(prefix="rollout_mismatch_"))
    res = {}
    for dtype in ("fp32", "bf16", "fp8"):
        print(f"[rollout_mismatch] {dtype} ...", file=sys.stderr, flush=True)
        res[dtype] = run(Path(ns.assets), out, dtype, ns.steps)[0]
    layers = sorted(k for k in res["fp8"] if k.startswith("mismatch/layer_"))
    print("| metric (step 1) | fp32 | bf16 | fp8 |\n|---|---|---|---|")
    for k in (*KEYS, *layers):
        print(f"| `{k}` | " + " | ".join(f"{res[d].get(k, float('nan')):.3g}" for d in res) + " |")
    print(f"\nrun folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
