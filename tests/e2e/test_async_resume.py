"""kill -9 during a fully-async deterministic run, then ``--load``: the continued metrics
equal an uninterrupted run's (the checkpoint carries the buffer and the requests in
flight). Real CLI runs in subprocesses against two CPU-twin engine processes (one slow,
one fast simulated device) that outlive the killed trainer, as a fleet on its own GPUs
would. Slow tier: three trainer runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_alp.launch import free_port
from megatron_alp.rollout.fleet_backends import EngineDown, TwinEndpoint
from tests.e2e.train_bodies import REPO, base_argv, build_assets


def _cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "megatron_alp.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {h["step"]: h for h in rows}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    assets = build_assets(tmp_path_factory.mktemp("async_resume_assets"))
    procs, urls = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for rate in ("60", "400"):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_alp.rollout.engine_server", "--model", str(assets / "model"),
             "--port", str(port), "--dtype", "float32", "--simulate-tokens-per-s", rate],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        for url in urls:
            while True:
                try:
                    TwinEndpoint(url).health(timeout=5)
                    break
                except EngineDown:
                    assert time.monotonic() < deadline, f"engine {url} did not start"
                    time.sleep(0.5)
        yield assets, ",".join(urls)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_kill9_during_deterministic_fully_async_then_load_equals_uninterrupted(engines, tmp_path):
    assets, urls = engines
    common = ["--rl-loss", "token-alp", "--alp-init-std", "0.01", "--rl-rollout-dtype", "fp32",
              "--rl-rollout-engine", "fleet", "--rl-fleet-endpoints", urls,
              "--rl-async-mode", "fully-async", "--rl-async-deterministic", "--rl-partial-rollouts",
              "--rl-partial-rollout-tokens", "2", "--rl-max-staleness", "1",
              "--train-iters", "6", "--save-interval", "2", "--nproc", "1"]
    full = _cli(base_argv(assets, tmp_path / "full", "--save", str(tmp_path / "full_ckpt"), *common))
    out, _ = full.communicate(timeout=900)
    assert full.returncode == 0, out[-3000:]
    ref = _metrics(tmp_path / "full")

    save = tmp_path / "ckpt"
    victim = _cli(base_argv(assets, tmp_path / "run", "--save", str(save), *common))
    deadline = time.monotonic() + 900
    while not (save / "iter_0000004").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # mid-run: groups in flight, segments on the wire
    victim.wait()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    resumed = _cli(base_argv(assets, tmp_path / "run", "--save", str(save), "--load", str(save), *common))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming after step 4" in out
    got = _metrics(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step]["rollout/checksum"] == ref[step]["rollout/checksum"], step
        assert got[step]["critic/score/mean"] == ref[step]["critic/score/mean"]
        assert got[step]["async/staleness_mean"] == ref[step]["async/staleness_mean"]
        for k in ("actor/pg_loss", "actor/loss", "alp/sigma_mean"):
            assert abs(got[step][k] - ref[step][k]) <= 1e-6, (step, k, got[step][k], ref[step][k])
