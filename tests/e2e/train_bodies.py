"""Rank bodies and fixtures for the trainer tests (importable by spawned ranks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def prepare_module():
    """``examples/tiny_cpu/prepare.py`` as a module (the example's own asset builder)."""
    spec = importlib.util.spec_from_file_location("tiny_cpu_prepare", REPO / "examples/tiny_cpu/prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build_assets(out: Path) -> Path:
    """A tiny Qwen2 (2 layers, hidden 32) with the example's tokenizer and task, briefly warmed up."""
    out.mkdir(parents=True, exist_ok=True)
    prepare_module().build(out, seed=0, target=0.3, layers=2, hidden=32, warmup_max_steps=60)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    (out / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    return out


def build_vllm_assets(out: Path) -> Path:
    """``build_assets`` with a model vLLM's CPU attention runs (hidden 64, 2 heads of 32)."""
    out.mkdir(parents=True, exist_ok=True)
    prepare_module().build(out, seed=0, target=0.3, layers=2, hidden=64, heads=2, kv_heads=2,
                           warmup_max_steps=60)
    return out


def base_argv(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """Common trainer flags for the tests: 8 prompts x 4 samples, 2 mini-batches per step."""
    return [
        "--hf-model", str(assets / "model"),
        "--rl-prompt-data", str(assets / "train.jsonl"),
        "--rl-reward", "exact-match",
        "--micro-batch-size", "4",
        "--global-batch-size", "16",
        "--grpo-prompts-per-step", "8",
        "--grpo-group-size", "4",
        "--grpo-iterations", "1",
        "--lr", "1e-3",
        "--lr-decay-style", "constant",
        "--rl-max-new-tokens", "6",
        "--rl-max-prompt-length", "24",
        "--rl-run-dir", str(run_dir),
        "--seed", "7",
        *extra,
    ]


def train_body(argv: list[str], world_size: int) -> Any:
    """Parse and run on every rank; rank 0 returns the run's history (metrics per step)."""
    import torch.distributed as dist

    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.loop import run

    cfg = parse_args(argv, world_size=world_size)
    out = run(cfg)
    return out if dist.get_rank() == 0 else None


# ------------------------------------------------------------------------ multi-turn
def scripted_engine_module():
    """``examples/multiturn_cpu/scripted_engine.py`` (registers ``scripted-first-turn``), once
    per process: the CPU multi-turn example's engine, whose first turn is a forced code block."""
    import sys

    name = "multiturn_cpu_scripted_engine"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples/multiturn_cpu/scripted_engine.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return sys.modules[name]


def multiturn_argv(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """``base_argv`` for multi-turn runs: the scripted-first-turn engine, 3 turns, the local
    sandbox, and a response budget that holds code turn + observation + answer (~70 tokens)."""
    return base_argv(
        assets, run_dir,
        "--rl-rollout-engine", "scripted-first-turn",
        "--rl-max-turns", "3",
        "--rl-sandbox", "local",
        "--rl-sandbox-concurrency", "4",
        "--rl-max-new-tokens", "96",
        *extra,
    )


def multiturn_train_body(argv: list[str], world_size: int) -> Any:
    """``train_body`` with the scripted-first-turn engine registered in this rank."""
    scripted_engine_module()
    return train_body(argv, world_size)


# ------------------------------------------------------------------------ a colocated engine's sleep
def register_sleepy_engine() -> None:
    """Register ``sleepy-local`` once per process: the local engine with a sleep that behaves
    like vLLM's level 2 (its weights are gone: zeroed here) and refuses to generate asleep;
    ``update_weights`` wakes it. The trainer must therefore re-send every tensor after each
    sleep, or the next rollouts come from a zeroed model."""
    import torch

    from megatron_alp.rollout import LocalEngine, available_engines, register_engine

    if "sleepy-local" in available_engines():
        return

    @register_engine("sleepy-local")
    class SleepyLocalEngine(LocalEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sleep_level = 0
            self.sleeps = 0

        def sleep(self, level: int = 1) -> None:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.zero_()
            self.sleep_level = level
            self.sleeps += 1

        def update_weights(self, stream, **kw):  # type: ignore[override]
            self.sleep_level = 0
            return super().update_weights(stream, **kw)

        def generate(self, *args: Any, **kwargs: Any):  # type: ignore[override]
            if self.sleep_level:
                raise RuntimeError("sleepy-local: generate() while asleep")
            return super().generate(*args, **kwargs)


def sleepy_train_body(argv: list[str], world_size: int) -> Any:
    """``train_body`` with ``sleepy-local`` registered in this rank."""
    register_sleepy_engine()
    return train_body(argv, world_size)


# ------------------------------------------------------------------------ a signal mid-update
def signal_after_first_update_body(argv: list[str], world_size: int) -> Any:
    """``train_body`` where rank 0 sends itself SIGTERM right after its first optimizer step
    (the update of step 1 has more mini-batches to go). The handlers the run installed are
    reset afterwards: this rank process serves other tests."""
    import os
    import signal

    import torch.distributed as dist

    from megatron_alp.train.policy import Policy

    original = Policy.update
    calls = []

    def update(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    Policy.update = update
    try:
        out = train_body(argv, world_size)
    finally:
        Policy.update = original
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    return (out, len(calls))


# ------------------------------------------------------------------------ SIGTERM under torchrun
TORCHRUN_GRACE_S = 30  # torchrun's --shutdown-timeout default (torch 2.14.1, launcher/api.py)


def sigterm_during_slow_rollout(assets: Path, tmp_path: Path, *, nproc: int, flags=()) -> tuple[float, float, int]:
    """torchrun (``nproc`` ranks) runs the trainer with the ``slow-local`` engine
    (``tests/e2e/slow_rollout_train.py``); SIGTERM goes to torchrun's agent once step 2's
    rollouts have started. Asserts a complete checkpoint of step 1, saved before
    torchrun's SIGKILL, with the sampler where step 1 left it; returns the trainer's
    signal-to-saved seconds, the seconds to torchrun's exit and its exit code."""
    import os
    import pickle
    import signal
    import subprocess
    import sys
    import time

    from megatron_alp.data import PromptSampler

    save, marker = tmp_path / "ckpt", tmp_path / "slow-rollout-started"
    argv = base_argv(assets, tmp_path / "run", "--rl-loss", "grpo", "--train-iters", "5",
                     "--save", str(save), "--exit-signal-handler", "--rl-rollout-engine", "slow-local", *flags)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MEGATRON_ALP_TEST_MARKER=str(marker),
               MEGATRON_ALP_TEST_SLOW_S="600")
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         str(REPO / "tests/e2e/slow_rollout_train.py"), *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():  # step 2's (slow) rollouts have started
            assert p.poll() is None, p.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "step 2's rollouts never started"
            time.sleep(0.05)
        assert not (save / "latest_checkpointed_iteration.txt").exists()  # --save-interval 5
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)  # to torchrun's agent, as srun / scancel deliver it
        out, _ = p.communicate(timeout=TORCHRUN_GRACE_S + 60)  # it SIGKILLs the ranks at 30 s
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1", out[-4000:]
    assert (save / "iter_0000001" / ".metadata").is_file()
    assert "SIGTERM during rollouts of step 2: that step is dropped" in out, out[-4000:]
    assert "stopped after step 1 (signal)" in out
    said = float(out.split("SIGTERM to saved checkpoint: ")[1].split(" s")[0])
    # the budget: a complete checkpoint before torchrun's SIGKILL (what follows, the
    # interpreter's own exit, may be cut short by it without harm)
    assert said < TORCHRUN_GRACE_S and said < elapsed, (said, elapsed)
    # the dropped step's prompts come again: the sampler is where step 1 left it
    state = pickle.loads((save / "iter_0000001" / "trainer_state.pt").read_bytes())
    oracle = PromptSampler(len((assets / "train.jsonl").read_text().splitlines()), 7)
    oracle.next(8)  # step 1: --grpo-prompts-per-step 8, --seed 7
    assert state["sampler"] == oracle.state_dict() and state["step"] == 1
    return said, elapsed, p.returncode
