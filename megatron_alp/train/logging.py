"""Run output: one progress line per step, ``metrics.jsonl``, wandb / TensorBoard, a summary.

Only global rank 0 writes. ``metrics.jsonl`` (in the run directory) gets one JSON object
per step with every metric (verl's names where they exist), appended and flushed, so a
run killed at any point keeps every finished step; on resume, lines of steps beyond the
checkpoint are dropped first so the file stays one line per step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "progress_line", "say_layer_spec", "summary_table"]


def say_layer_spec(rank: int) -> None:
    """The start-up line naming the layer spec this run builds and why (rank 0); loud
    (WARNING, stderr) when CUDA is present but Transformer Engine is not used."""
    from megatron_alp.models.builder import layer_spec_report

    line, loud = layer_spec_report()
    if rank == 0:
        print(f"[train] {'WARNING: ' if loud else ''}{line}", file=sys.stderr if loud else sys.stdout, flush=True)


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    """The one line printed per step."""
    parts = [
        f"step {step}/{total}",
        f"reward {_fmt(m.get('critic/score/mean'), '.3f')}",
        f"len {_fmt(m.get('response_length/mean'), '.1f')}",
        f"kl {_fmt(m.get('rollout_corr/kl'), '.2e')}",
        f"ratio q99.9 {_fmt(m.get('is_ratio/q999'), '.3f')}",
    ]
    if "alp/sigma_mean" in m:
        parts.append(f"sigma {_fmt(m['alp/sigma_mean'], '.2e')}")
    parts.append(
        "s: gen {} old {} upd {} sync {}".format(
            *(_fmt(m.get(f"timing_s/{k}"), ".1f") for k in ("gen", "old_log_prob", "update_actor", "update_weights"))
        )
    )
    return "[train] " + " | ".join(parts)


def summary_table(history: list[dict[str, float]], elapsed_s: float) -> str:
    """First-5 / last-5 step means of the headline metrics."""
    keys = [
        ("critic/score/mean", "reward"),
        ("response_length/mean", "response length"),
        ("rollout_corr/kl", "rollout_corr/kl"),
        ("is_ratio/q999", "ratio q99.9"),
        ("actor/pg_loss", "pg loss"),
        ("actor/entropy", "entropy"),
        ("alp/sigma_mean", "sigma mean"),
        ("timing_s/step", "seconds / step"),
    ]
    first, last = history[:5], history[-5:]

    def mean(rows, k):
        vals = [r[k] for r in rows if k in r and r[k] is not None and not math.isnan(r[k])]
        return sum(vals) / len(vals) if vals else float("nan")

    lines = [f"[train] summary: {len(history)} steps in {elapsed_s:.0f} s",
             f"[train]   {'metric':<18} {'first 5':>12} {'last 5':>12}"]
    for k, label in keys:
        a, b = mean(first, k), mean(last, k)
        if math.isnan(a) and math.isnan(b):
            continue
        lines.append(f"[train]   {label:<18} {_fmt(a, '12.4g'):>12} {_fmt(b, '12.4g'):>12}")
    return "\n".join(lines)


class RunLogger:
    """Rank 0's sinks; every method is a no-op on other ranks."""

    def __init__(self, cfg: Any, *, active: bool, resume_step: int, wandb_id: str | None) -> None:
        self.active = active
        self.cfg = cfg
        self.history: list[dict[str, float]] = []
        self.wandb_id = wandb_id
        self._wandb = None
        self._tb = None
        if not active:
            return
        run_dir = Path(cfg.run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        kept: list[str] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if resume_step and row.get("step", 0) <= resume_step:
                    kept.append(line)
                    self.history.append(row)
        tmp = self.path.with_suffix(".jsonl.part")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        if cfg.wandb_project:
            self._start_wandb(run_dir)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(cfg.tensorboard_dir)

    def _start_wandb(self, run_dir: Path) -> None:
        import wandb

        if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"  # no credentials: keep the run locally
        self.wandb_id = self.wandb_id or uuid.uuid4().hex[:8]
        self._wandb = wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.wandb_exp_name,
            dir=self.cfg.wandb_save_dir or str(run_dir),
            id=self.wandb_id,
            resume="allow",
            config=self.cfg.describe(),
        )

    def say(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, "time": time.time(), **metrics}
        self.history.append(row)
        self._file.write(json.dumps(row, default=float) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        sys.stdout.flush()
