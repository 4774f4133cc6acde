"""Draw a run's curves from its ``metrics.jsonl``: ``python -m megatron_alp.plot RUN_DIR``.

Writes PNGs into ``RUN_DIR/plots/`` (replacing only the PNGs this command wrote; an existing
``plots/`` in a folder the trainer did not write, no ``.megatron-alp-run`` marker, is refused):
``reward.png`` (mean score), ``response_length.png``, ``mismatch.png`` (ratio tail
quantiles q99 / q99.9 / max and ``rollout_corr/kl`` / ``k3_kl`` on log scales),
``sigma.png`` (ALP sigma per layer), ``eval.png`` (validation mean@n and pass@k),
``layer_mismatch.png`` (``mismatch/layer_NN`` beside ``alp/sigma/layer_NN``, last
measured step; with ``--rl-mismatch-by-layer-interval``).
A metric that the run did not log is skipped; exit 2 with a message when there is no
``metrics.jsonl`` or it holds no step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["main", "plot_run"]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's metrics allow; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {run_dir} a run directory of megatron_alp.train?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not JSON") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    out_dir = run_dir / "plots"
    from megatron_alp.rundir import MARKER

    if out_dir.exists() and not (run_dir / MARKER).is_file():
        raise ValueError(
            f"{out_dir} exists but {run_dir} has no {MARKER}: the trainer did not write this folder, "
            "and this command replaces only plots of its runs; move plots/ away or copy "
            "metrics.jsonl to a folder of its own"
        )
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []

    def simple(name: str, title: str, keys: list[tuple[str, str]], *, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = False
        for key, label in keys:
            xs, ys = _series(rows, key)
            if log:
                xs, ys = zip(*[(x, abs(y)) for x, y in zip(xs, ys) if y != 0]) if any(ys) else ([], [])
            if xs:
                ax.plot(xs, ys, marker=".", label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            return
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)

    simple("reward.png", "reward (mean score per step)", [("critic/score/mean", "mean reward")])
    simple("response_length.png", "response length (tokens)",
           [("response_length/mean", "mean"), ("response_length/max", "max")])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    drawn = False
    for key, label in (("is_ratio/q99", "ratio q99"), ("is_ratio/q999", "ratio q99.9"), ("is_ratio/max", "ratio max")):
        xs, ys = _series(rows, key)
        if xs:
            a1.plot(xs, ys, marker=".", label=label)
            drawn = True
    for key, label in (("rollout_corr/kl", "|kl| (k1)"), ("rollout_corr/k3_kl", "k3 kl")):
        xs, ys = _series(rows, key)
        pts = [(x, abs(y)) for x, y in zip(xs, ys) if y != 0]
        if pts:
            a2.plot(*zip(*pts), marker=".", label=label)
            drawn = True
    if drawn:
        a1.set_yscale("log")
        a1.set_title("importance ratio tail (as the loss sees it)")
        a2.set_yscale("log")
        a2.set_title("rollout vs trainer mismatch")
        for a in (a1, a2):
            a.set_xlabel("RL step")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        _save(fig, out_dir / "mismatch.png")
        written.append(out_dir / "mismatch.png")
    plt.close(fig)
    sigma_keys = sorted({k for r in rows for k in r if k.startswith("alp/sigma/layer_")})
    simple("sigma.png", "ALP sigma per layer", [(k, k.rsplit("/", 1)[-1]) for k in sigma_keys], log=True)
    layer_mismatch_plot(plt, rows, out_dir / "layer_mismatch.png", written)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/")})
    simple("eval.png", "evaluation", [(k, k[4:]) for k in val_keys])
    return written


def layer_profiles(rows: list[dict]) -> tuple[int | None, list[float], list[float]]:
    """The last step that logged ``mismatch/layer_NN``, its per-layer mismatch and the
    ``alp/sigma/layer_NN`` of that step (empty when ALP is off)."""
    last = next((r for r in reversed(rows) if any(k.startswith("mismatch/layer_") for k in r)), None)
    if last is None:
        return None, [], []
    mm = [last[k] for k in sorted(k for k in last if k.startswith("mismatch/layer_"))]
    sg = [last[k] for k in sorted(k for k in last if k.startswith("alp/sigma/layer_"))]
    return int(last["step"]), mm, sg


def layer_mismatch_plot(plt, rows: list[dict], path: Path, written: list[Path]) -> None:
    """``layer_mismatch.png``: per-layer engine-vs-FP32 divergence (last measured step)
    beside the learned sigma profile of the same step."""
    step, mm, sg = layer_profiles(rows)
    if step is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    a1.bar(range(len(mm)), mm, color="tab:red")
    a1.set_title(f"engine vs FP32 divergence per layer (step {step})")
    a1.set_xlabel("decoder layer")
    a1.set_ylabel("||h_engine - h_fp32|| / ||h_fp32||")
    if sg:
        a2.bar(range(len(sg)), sg, color="tab:blue")
        a2.set_title(f"learned ALP sigma per layer (step {step})")
    else:
        a2.set_title("ALP off in this run: no sigma")
    a2.set_xlabel("layer")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    written.append(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_alp.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    ns = p.parse_args(argv)
    try:
        files = plot_run(ns.run_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[plot] wrote {len(files)} plot(s) to {Path(ns.run_dir) / 'plots'}: "
          + ", ".join(f.name for f in files), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
