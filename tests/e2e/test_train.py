"""The RL trainer end to end on gloo ranks: presets, parity, layout invariance, checkpoints.

One group of 4 ranks runs many short trainer runs in-process (``loop.run``); resume
after kill -9 and the command line's exit codes run the real CLI in subprocesses.
Oracles: the rollout engine's own fp32 log-probs (parity), a TP=1 run (layouts), an
uninterrupted run (resume).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_alp.launch import RankGroup
from tests.e2e.train_bodies import base_argv, build_assets, sleepy_train_body, train_body

PRESETS = [
    "grpo", "gspo", "seq-bypass", "token-tis", "seq-tis", "token-mis", "seq-mis",
    "token-alp", "seq-alp", "cum-token-alp",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=600) as g:
        yield g


def _run(group, argv, world_size=4):
    return group.run(train_body, argv, world_size)[0]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ every preset
@pytest.mark.parametrize(
    "name,extra",
    [(p, ()) for p in PRESETS]
    + [
        ("seq-alp-layer-range", ("--rl-loss", "seq-alp", "--alp-layer-start", "1", "--alp-layer-end", "2")),
        ("token-alp-logits", ("--rl-loss", "token-alp", "--alp-placement", "logits")),
    ],
)
def test_every_preset_runs_three_steps_and_checkpoints(group, assets, tmp_path, name, extra):
    extra = tuple(extra) or ("--rl-loss", name)
    save = tmp_path / "ckpt"
    out = _run(group, base_argv(
        assets, tmp_path / "run", "--tensor-model-parallel-size", "2", "--train-iters", "3",
        "--save", str(save), "--save-interval", "3", "--config", name.split("-layer")[0].replace("-logits", ""),
        *extra,
    ))
    hist = out["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert math.isfinite(h["actor/pg_loss"]) and math.isfinite(h["actor/grad_norm"])
        assert "rollout_corr/kl" in h and "is_ratio/q999" in h
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (save / "iter_0000003" / ".metadata").is_file()
    if "alp" in name:
        sig = [k for k in hist[-1] if k.startswith("alp/sigma/layer_")]
        expect = 1 if ("layer-range" in name or "logits" in name) else 2
        assert len(sig) == expect, sig


# ------------------------------------------------------------------------ parity
def test_fp32_rollouts_match_trainer_logprobs_tp2_pp2(group, assets, tmp_path):
    """ALP off, fp32 engine: trainer and engine log-probs agree at step 1 and after 5 updates."""
    out = _run(group, base_argv(
        assets, tmp_path / "run", "--rl-loss", "grpo", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--train-iters", "6",
    ))
    hist = out["history"]
    for h in (hist[0], hist[5]):
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]
        assert abs(h["actor/ppo_kl_first_minibatch"]) <= 1e-5
    # and the policy did move between the two checks
    assert hist[5]["rollout/checksum"] != hist[0]["rollout/checksum"]


# ------------------------------------------------------------------------ layouts
def test_whole_step_is_layout_invariant(group, assets, tmp_path):
    """Same seed: TP1 (DP4), TP2 (DP2), PP2 (DP2), TP2xPP2: same rollouts, rewards, losses."""
    layouts = {
        "tp1_dp4": (),
        "tp2_dp2": ("--tensor-model-parallel-size", "2"),
        "pp2_dp2": ("--pipeline-model-parallel-size", "2"),
        "tp2_pp2": ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"),
    }
    runs = {}
    for name, flags in layouts.items():
        out = _run(group, base_argv(
            assets, tmp_path / name, "--rl-loss", "token-alp", "--alp-init-std", "0.01",
            "--rl-rollout-dtype", "fp32", "--train-iters", "3", *flags,
        ))
        runs[name] = out["history"]
    ref = runs["tp1_dp4"]
    assert any(h["critic/score/mean"] > 0 for h in ref), "no reward at all: the test would be vacuous"
    for name, hist in runs.items():
        for a, b in zip(ref, hist):
            assert a["rollout/checksum"] == b["rollout/checksum"], (name, a["step"])
            assert a["critic/score/mean"] == b["critic/score/mean"], (name, a["step"])
            for k in ("actor/pg_loss", "actor/loss", "actor/ppo_kl"):
                assert abs(a[k] - b[k]) <= 1e-5, (name, a["step"], k, a[k], b[k])


# ------------------------------------------------------------------------ epochs, stale tmp
def test_resume_at_epoch_boundary_continues(group, assets, tmp_path):
    save = tmp_path / "ckpt"
    small = ["--rl-prompt-data", str(assets / "small.jsonl")]  # 16 prompts: an epoch is 2 steps
    common = ["--rl-loss", "token-alp", "--tensor-model-parallel-size", "2", "--save", str(save),
              "--save-interval", "2", *small]
    first = _run(group, base_argv(assets, tmp_path / "run", "--train-iters", "2", *common))
    assert [h["step"] for h in first["history"]] == [1, 2]
    # a checkpoint write killed half-way: a temporary folder with our marker and no rename
    stale = save / ".tmp-iter_0000004-deadbeef"
    stale.mkdir()
    (stale / ".megatron-alp-checkpoint").write_text("partial\n")
    second = _run(group, base_argv(assets, tmp_path / "run", "--train-iters", "4", "--load", str(save), *common))
    assert [h["step"] for h in second["history"]] == [1, 2, 3, 4]
    assert second["history"][-1]["data/epoch"] == 2.0
    assert not stale.exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


# ------------------------------------------------------------------------ kill -9 and resume (CLI)
def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_alp.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow  # kept out of the default suite's 15-minute budget (scripts/test.sh -m slow)
def test_kill9_then_resume_equals_uninterrupted_run(assets, tmp_path):
    """ALP noise and --rl-generation-lag 2: the resumed run continues exactly."""
    common = ["--rl-loss", "token-alp", "--alp-init-std", "0.01", "--rl-generation-lag", "2",
              "--tensor-model-parallel-size", "2", "--train-iters", "6", "--save-interval", "2",
              "--nproc", "2"]
    full = _cli(base_argv(assets, tmp_path / "full", "--save", str(tmp_path / "full_ckpt"), *common))
    full_out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, full_out[-3000:]
    ref = {h["step"]: h for h in _metrics(tmp_path / "full")}

    save = tmp_path / "ckpt"
    victim = _cli(base_argv(assets, tmp_path / "run", "--save", str(save), *common))
    deadline = time.monotonic() + 600
    while not (save / "iter_0000004").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    resumed = _cli(base_argv(assets, tmp_path / "run", "--save", str(save), "--load", str(save), *common))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming after step 4" in out
    got = {h["step"]: h for h in _metrics(tmp_path / "run")}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step]["rollout/checksum"] == ref[step]["rollout/checksum"]
        assert got[step]["critic/score/mean"] == ref[step]["critic/score/mean"]
        for k in ("actor/pg_loss", "actor/loss", "alp/sigma_mean"):
            assert abs(got[step][k] - ref[step][k]) <= 1e-6, (step, k, got[step][k], ref[step][k])


# ------------------------------------------------------------------------ bad configuration
@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--rl-loss", "nope"), "valid names"),
        (("--rl-loss", "token-alp", "--no-alp"), "contradicts --rl-loss token-alp"),
        (("--rl-loss", "grpo", "--alp"), "contradicts --rl-loss grpo"),
        (("--global-batch-size", "12"), "must be a multiple of --global-batch-size=12"),
        (("--micro-batch-size", "3"), "must be a multiple of --micro-batch-size"),
        (("--tensor-model-parallel-size", "3", "--nproc", "3"), "not divisible by tensor_model_parallel_size=3"),
        (("--rl-prompt-data", "/nonexistent/p.jsonl"), "/nonexistent/p.jsonl"),
        (("--load", "/nonexistent/ckpt"), "--load /nonexistent/ckpt: no checkpoint"),
        (("--rl-default-top-p", "0.9"), "truncated sampling is refused"),
        (("--rl-default-temperature", "2.5"), "above 2.0, which vLLM (0.33) rejects"),
        (("--rl-fleet-max-in-flight", "16"), "--rl-fleet-max-in-flight applies to --rl-rollout-engine fleet"),
        (("--rl-rollout-engine", "fleet", "--rl-fleet-rows-per-request", "0"), "--rl-fleet-rows-per-request=0 is invalid"),
        (("--rl-default-temperature", "0.005"), "below 0.01: vLLM clamps it"),
        (("--alp-init-std", "-1", "--rl-loss", "token-alp"), "ALPConfig.init_std=-1.0"),
        (("--save", "{assets}"), "overlaps --hf-model"),
        (("--save", "{assets}/model/ckpt"), "overlaps --hf-model"),
        (("--save", "{assets}/model"), "overlaps --hf-model"),
        (("--rl-run-dir", "{assets}/model"), "--rl-run-dir {assets}/model overlaps --hf-model"),
    ],
)
def test_bad_configuration_is_one_clear_error(assets, tmp_path, extra, needle):
    from megatron_alp.train.arguments import parse_args

    extra = [e.replace("{assets}", str(assets)) for e in extra]
    needle = needle.replace("{assets}", str(assets))
    argv = base_argv(assets, tmp_path / "run", "--train-iters", "2", *extra)
    with pytest.raises(ValueError) as e:
        parse_args(argv, world_size=None)
    assert needle in str(e.value), str(e.value)


def test_bad_configuration_exits_2_before_ranks_start(assets, tmp_path):
    p = _cli(base_argv(assets, tmp_path / "run", "--train-iters", "2", "--hf-model", str(tmp_path / "missing")))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2
    assert f"--hf-model {tmp_path / 'missing'}: no config.json" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "logs").exists()  # no rank was started


# ------------------------------------------------------------------------ Megatron features, sinks, exits
def test_distributed_optimizer_bf16_recompute_sp_wandb_tensorboard(group, assets, tmp_path):
    """DP = 2 with Megatron's DistributedOptimizer, bf16, full recompute, sequence parallel,
    ALP; wandb (offline) and TensorBoard get the metrics; --exit-interval saves and stops."""
    save = tmp_path / "ckpt"
    out = _run(group, base_argv(
        assets, tmp_path / "run", "--rl-loss", "seq-alp", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--use-distributed-optimizer", "--bf16",
        "--recompute-granularity", "full", "--train-iters", "5", "--exit-interval", "2",
        "--save", str(save), "--wandb-project", "alp-test", "--wandb-save-dir", str(tmp_path / "wandb"),
        "--tensorboard-dir", str(tmp_path / "tb"),
    ))
    assert out["exit_reason"] == "exit-interval" and out["step"] == 2
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for h in out["history"]:
        assert math.isfinite(h["actor/pg_loss"]) and math.isfinite(h["actor/grad_norm"])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").rglob("*.wandb"))
    # ... and the distributed optimizer's state loads back (resharded by DP rank)
    again = _run(group, base_argv(
        assets, tmp_path / "run", "--rl-loss", "seq-alp", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--use-distributed-optimizer", "--bf16",
        "--recompute-granularity", "full", "--train-iters", "3", "--save", str(save), "--load", str(save),
    ))
    assert [h["step"] for h in again["history"]] == [1, 2, 3]
    assert math.isfinite(again["history"][-1]["actor/pg_loss"])


@pytest.mark.slow  # kept out of the default suite's 15-minute budget (scripts/test.sh -m slow)
def test_finetune_from_converted_checkpoint_and_export(group, assets, tmp_path):
    """hf_to_megatron -> --load --finetune trains from those weights; the trainer's
    checkpoint exports back to HF with megatron_to_hf (no sigma)."""
    conv = tmp_path / "converted"
    r = subprocess.run([sys.executable, "tools/convert/hf_to_megatron.py", "--hf", str(assets / "model"),
                        "--out", str(conv)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    save = tmp_path / "ckpt"
    out = _run(group, base_argv(
        assets, tmp_path / "run", "--rl-loss", "token-alp", "--tensor-model-parallel-size", "2",
        "--train-iters", "1", "--load", str(conv), "--finetune", "--save", str(save),
    ))
    assert [h["step"] for h in out["history"]] == [1]
    hf_out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "tools/convert/megatron_to_hf.py", "--megatron",
                        str(save / "iter_0000001"), "--hf-config", str(assets / "model"), "--out", str(hf_out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    from safetensors import safe_open

    names = set()
    for f in hf_out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names |= set(s.keys())
    assert "model.embed_tokens.weight" in names
    assert not any("alp" in n or "sigma" in n for n in names)


def test_sigterm_saves_and_exits_zero(assets, tmp_path):
    save = tmp_path / "ckpt"
    p = _cli(base_argv(assets, tmp_path / "run", "--rl-loss", "grpo", "--tensor-model-parallel-size", "2",
                       "--train-iters", "50", "--save", str(save), "--exit-signal-handler", "--nproc", "2"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    step = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= step < 50
    assert f"stopped after step {step} (signal)" in out


# ------------------------------------------------------------------------ a colocated engine sleeps
def test_colocated_engine_sleeps_during_updates_and_gets_every_weight_back(group, assets, tmp_path):
    """--rl-engine-sleep-level auto: an engine that can sleep (its weights are zeroed, as vLLM's
    level 2 drops them) sleeps after every rollout and the next sync restores all of them:
    fp32 rollouts keep matching the trainer's log-probs at every step."""
    out = group.run(sleepy_train_body, base_argv(
        assets, tmp_path / "run", "--rl-loss", "grpo", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "2", "--train-iters", "3",
        "--rl-rollout-engine", "sleepy-local",
    ), 4)[0]
    hist = out["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert "timing_s/engine_sleep" in h
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]


def test_fleet_request_flags_reach_the_fleet_client(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args

    cfg = parse_args(base_argv(
        assets, tmp_path / "run", "--train-iters", "2", "--rl-rollout-engine", "fleet",
        "--rl-fleet-max-in-flight", "256", "--rl-fleet-rows-per-request", "4",
    ), world_size=None)
    assert cfg.run.engine_kwargs["max_in_flight"] == 256
    assert cfg.run.engine_kwargs["rows_per_request"] == 4
    cfg = parse_args(base_argv(assets, tmp_path / "run", "--train-iters", "2",
                               "--rl-rollout-engine", "fleet"), world_size=None)
    assert "max_in_flight" not in cfg.run.engine_kwargs  # the client's per-backend default


def test_sleep_level_for_an_engine_that_cannot_sleep_is_refused(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args

    argv = base_argv(assets, tmp_path / "run", "--train-iters", "2", "--rl-engine-sleep-level", "2")
    with pytest.raises(ValueError, match="--rl-engine-sleep-level 2: the 'local' engine cannot sleep"):
        parse_args(argv, world_size=None)
    cfg = parse_args(base_argv(assets, tmp_path / "run", "--train-iters", "2"), world_size=None)
    assert cfg.run.engine_sleep_level == 0  # auto: the local engine keeps its memory


# ------------------------------------------------------------------------ the fleet (CPU twin)
def test_trainer_with_a_fleet_of_two_twin_engines(group, assets, tmp_path):
    """--rl-rollout-engine fleet: 2 engine processes (HTTP + gloo weight group); fp32
    twins agree with the trainer after every sync, as the local engine does."""
    out = _run(group, base_argv(
        assets, tmp_path / "run", "--rl-loss", "grpo", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "2", "--train-iters", "3",
        "--rl-rollout-engine", "fleet", "--rl-fleet-engines", "2",
        "--rl-verify-model-weights-swap",  # twins: sha256 per tensor after every sync
    ))
    hist = out["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]
        assert h["rollout_corr/n_seqs"] == 32  # 8 prompts x 4 samples, each exactly once
