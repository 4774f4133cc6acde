"""The README's main job end to end: 2 steps of the script in the default suite, the full run
(slow: ~5 min on 2 cores) learns, logs, plots."""

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


def test_main_job_script_runs_two_steps(tmp_path):
    """Not slow: the README's main job script itself (assets, trainer, plots) for 2 steps, so
    that a change to the script, its config or the trainer's checks cannot break the main
    job unnoticed (the full 50-step run above is `slow`)."""
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "examples/tiny_cpu/run.sh"), "--train-iters", "2"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert "[train] summary: 2 steps" in r.stdout
    assert (tmp_path / "run-assets/model/config.json").is_file()  # assets beside the run
    assert (tmp_path / "run/plots/reward.png").stat().st_size > 1000
