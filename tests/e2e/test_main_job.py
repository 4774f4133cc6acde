"""The README's main job end to end (slow: ~5 min on 2 cores): it learns, logs, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_example_learns(tmp_path):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "examples/tiny_cpu/run.sh")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    rewards = [row["critic/score/mean"] for row in rows]
    assert len(rows) == 50
    assert sum(rewards[:5]) / 5 <= 0.3, rewards[:5]
    assert sum(rewards[-5:]) / 5 >= 0.6, rewards[-5:]
    assert all("rollout_corr/kl" in row and "is_ratio/q999" in row for row in rows)
    assert "[train] summary: 50 steps" in r.stdout
    for png in ("reward", "response_length", "mismatch", "sigma", "eval"):
        assert (tmp_path / f"run/plots/{png}.png").stat().st_size > 1000
