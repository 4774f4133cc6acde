"""Signals and dying ranks, with the real trainer on CPU (issue 18, items 7-9).

* SIGTERM under torchrun during a slow rollout: the trainer saves the last completed
  step within torchrun's grace period (torch's default 30 s) and exits 0 — before, the
  signal was looked at only at the end of the step and torchrun's SIGKILL came first.
* kill -9 of rank 0 under the trainer's launcher: the launcher names rank 0, its exit
  (killed by SIGKILL) and the tail of its log — before, it said nothing.
* SIGINT: exit 130 and one line naming the last checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_alp.launch import run_on_ranks
from tests.e2e.train_bodies import (
    base_argv,
    build_assets,
    signal_after_first_update_body,
    sigterm_during_slow_rollout,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


def _wait_for(pred, proc, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def test_sigterm_during_a_slow_rollout_saves_within_torchruns_grace(assets, tmp_path):
    said, elapsed, code = sigterm_during_slow_rollout(
        assets, tmp_path, nproc=2, flags=("--tensor-model-parallel-size", "2"))
    print(f"SIGTERM -> checkpoint saved {said:.1f} s (trainer's count); torchrun exited after "
          f"{elapsed:.1f} s with {code}")


def test_signal_between_mini_batches_ends_the_step_after_one(assets, tmp_path):
    """4 mini-batches planned in step 1 (2 iterations x 2); SIGTERM on rank 0 during the
    first: every rank stops after it, step 1 is saved with one optimizer step."""
    save = tmp_path / "ckpt"
    argv = base_argv(assets, tmp_path / "run", "--rl-loss", "grpo", "--grpo-iterations", "2",
                     "--train-iters", "3", "--save", str(save), "--exit-signal-handler")
    results = run_on_ranks(2, signal_after_first_update_body, argv, 2, force_cpu=True, timeout_s=600)
    (out, updates0), (_, updates1) = results
    assert (updates0, updates1) == (1, 1)
    assert out["exit_reason"] == "signal" and out["step"] == 1
    assert [h["step"] for h in out["history"]] == [1]
    state = pickle.loads((save / "iter_0000001" / "trainer_state.pt").read_bytes())
    assert (state["step"], state["opt_step"]) == (1, 1)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def _launcher(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_alp.train", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's child process running ``rank`` (from its environment)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no child of {launcher} runs rank {rank}: {children}")


def test_kill9_of_rank0_names_rank0_its_signal_and_log(assets, tmp_path):
    import threading

    run_dir = tmp_path / "run"
    p = _launcher(base_argv(assets, run_dir, "--rl-loss", "grpo", "--tensor-model-parallel-size", "2",
                            "--train-iters", "50", "--nproc", "2"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: any("[train] step 1/50" in ln for ln in lines), p, 300, "rank 0's first step")
        os.kill(_rank_pid(p.pid, 0), signal.SIGKILL)
        p.wait(120)
        reader.join(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines)
    assert p.returncode == 1
    line = next((ln for ln in out.splitlines() if ln.startswith("[train] rank 0 ")), None)
    assert line is not None, out[-4000:]
    log0 = run_dir / "logs" / "rank_0.log"
    assert "killed by SIGKILL" in line and str(log0) in line
    tail = out[out.index(line):]
    assert "  | [train] step 1/50" in tail  # rank 0's own last lines, from its log


@pytest.mark.slow
def test_sigint_exits_130_naming_the_last_checkpoint(assets, tmp_path):
    save = tmp_path / "ckpt"
    p = _launcher(base_argv(assets, tmp_path / "run", "--rl-loss", "grpo", "--tensor-model-parallel-size",
                            "2", "--train-iters", "50", "--save", str(save), "--save-interval", "1",
                            "--nproc", "2"))
    try:
        _wait_for(lambda: (save / "iter_0000002").exists(), p, 600, "the second checkpoint")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, out[-4000:]
    last = int((save / "latest_checkpointed_iteration.txt").read_text())
    lines = [ln for ln in out.splitlines() if ln.startswith("[train] interrupted")]
    assert lines == [f"[train] interrupted; last checkpoint iter_{last:07d} in {save} "
                     "(Ctrl-C saves nothing; SIGTERM with --exit-signal-handler saves)"], out[-4000:]
    assert "Traceback" not in out
    assert json.loads((save / f"iter_{last:07d}" / "config.json").read_text())  # a complete checkpoint
