"""Multi-turn tool-integrated RL end to end: Seq-ALP over trajectories with a real sandbox.

The policy is the CPU example's ``scripted-first-turn`` engine: turn 0 is a forced
``print(a+b)`` code block (with the model's own teacher-forced log-probs), the sandbox
(bubblewrap) runs it, the observation is appended in the chat format, and the tiny model
samples the next turn. Oracle for the masks and the whole-trajectory forward: with fp32
rollouts the trainer's unperturbed log-probs equal the engine's on every model token
(a mask or position off by one would put observation tokens or wrong positions into the
comparison and miss by far more than 1e-4).
"""

from __future__ import annotations

import math
import shutil

import pytest

from megatron_alp.launch import RankGroup
from tests.e2e.train_bodies import build_assets, multiturn_argv, multiturn_train_body, scripted_engine_module

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets_mt"))


@needs_bwrap
def test_three_step_multiturn_seq_alp_runs_tools_every_step(assets, tmp_path):
    argv = multiturn_argv(
        assets, tmp_path / "run", "--config", "seq-alp", "--rl-loss", "seq-alp",
        "--alp-init-std", "1e-4", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "2", "--train-iters", "3",
    )
    with RankGroup(2, timeout_s=600) as g:
        out = g.run(multiturn_train_body, argv, 2)[0]
    hist = out["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    n = 8 * 4  # prompts x group size
    for h in hist:
        # every trajectory ran its (forced) program in the sandbox, without error
        assert h["multiturn/tool_calls"] == n, h["multiturn/tool_calls"]
        assert h["multiturn/tool_errors"] == 0 and h["multiturn/tool_timeouts"] == 0
        assert h["multiturn/turns_mean"] >= 2.0
        # observation tokens are in the response but not in the loss
        assert h["multiturn/loss_tokens_mean"] < h["multiturn/response_tokens_mean"]
        assert math.isfinite(h["actor/pg_loss"]) and math.isfinite(h["actor/grad_norm"])
        assert len([k for k in h if k.startswith("alp/sigma/layer_")]) == 2
    # the unperturbed trainer forward over whole trajectories matches the engine on model
    # tokens (fp32), at the first step and after updates
    for h in (hist[0], hist[-1]):
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]
    # before the first update only ALP's small noise separates the perturbed policy from
    # the engine: the sequence-level KL over model tokens stays small
    assert abs(hist[0]["actor/ppo_kl_first_minibatch"]) < 0.05, hist[0]["actor/ppo_kl_first_minibatch"]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--rl-max-turns", "0"), "--rl-max-turns=0 is invalid"),
        (("--rl-sandbox", "ftp://x"), "--rl-sandbox 'ftp://x': expected local or URL[,URL...]"),
        (("--rl-sandbox-timeout-s", "0"), "--rl-sandbox-timeout-s=0.0 is invalid; expected seconds > 0"),
        (("--rl-sandbox-concurrency", "0"), "--rl-sandbox-concurrency=0 is invalid"),
    ],
)
def test_bad_multiturn_flags_are_one_clear_error(assets, tmp_path, extra, needle):
    from megatron_alp.train.arguments import parse_args

    scripted_engine_module()
    with pytest.raises(ValueError) as e:
        parse_args(multiturn_argv(assets, tmp_path / "run", "--train-iters", "1", *extra), world_size=1)
    assert needle in str(e.value), str(e.value)


def test_multiturn_without_bubblewrap_says_what_to_install(assets, tmp_path, monkeypatch):
    from megatron_alp.train.arguments import parse_args

    scripted_engine_module()
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError) as e:
        parse_args(multiturn_argv(assets, tmp_path / "run", "--train-iters", "1"), world_size=1)
    msg = str(e.value)
    assert "--rl-max-turns=3 needs a working sandbox" in msg and "apt-get install bubblewrap" in msg, msg


def test_single_turn_config_is_unchanged(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args
    from tests.e2e.train_bodies import base_argv

    run = parse_args(base_argv(assets, tmp_path / "run", "--train-iters", "1"), world_size=1).run
    assert run.max_turns == 1 and run.sandbox == "local"
