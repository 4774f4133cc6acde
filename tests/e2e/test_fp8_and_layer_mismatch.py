"""FP8 rollouts and ``--rl-mismatch-by-layer-interval`` through the trainer on gloo ranks.

The FP32 export that the per-layer measurement uses is collective over TP and PP, so
TP = 2 x PP = 2 must log exactly the numbers of one rank (with --lr 0 both keep the initial
weights, so the engines' tokens and the measured weights are the same); a twin fleet
engine in FP8 must sample exactly what the local FP8 engine samples."""

from __future__ import annotations

import pytest

from megatron_alp.launch import RankGroup
from tests.e2e.train_bodies import base_argv, build_assets, train_body


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.mark.slow  # kept out of the default suite's 15-minute budget (scripts/test.sh -m slow)
def test_layer_mismatch_is_layout_invariant_with_fp8_rollouts(assets, tmp_path):
    extra = ("--rl-loss", "grpo", "--lr", "0", "--train-iters", "1", "--rl-rollout-dtype", "fp8",
             "--rl-mismatch-by-layer-interval", "1")
    with RankGroup(4, timeout_s=600) as g:
        big = g.run(train_body, base_argv(assets, tmp_path / "tp2pp2", *extra,
                                          "--tensor-model-parallel-size", "2",
                                          "--pipeline-model-parallel-size", "2"), 4)[0]
    with RankGroup(1, timeout_s=600) as g:
        one = g.run(train_body, base_argv(assets, tmp_path / "one", *extra), 1)[0]
    pick = lambda h: {k: v for k, v in h["history"][0].items() if k.startswith("mismatch/")}  # noqa: E731
    got, want = pick(big), pick(one)
    assert sorted(want) == ["mismatch/layer_00", "mismatch/layer_01", "mismatch/logits"]
    assert all(v > 0 for v in want.values())  # fp8 numerics differ from fp32
    assert got == want
    assert big["history"][0]["rollout/checksum"] == one["history"][0]["rollout/checksum"]


@pytest.mark.slow  # kept out of the default suite's 15-minute budget (scripts/test.sh -m slow)
def test_fp8_twin_fleet_engine_follows_weight_updates_like_the_local_engine(assets, tmp_path):
    """A twin fleet engine receives weights by broadcast straight into its parameters
    (bypassing ``update_weights``): its FP8 quantised copies must still be rebuilt, so
    step 2 (after an update) samples the local engine's tokens and log-probs exactly.
    Without ``weights_loaded()`` at commit, step 2's |log-prob diff| max was 1.01."""
    extra = ("--rl-loss", "grpo", "--train-iters", "2", "--rl-rollout-dtype", "fp8")
    with RankGroup(1, timeout_s=600) as g:
        local = g.run(train_body, base_argv(assets, tmp_path / "local", *extra), 1)[0]
        fleet = g.run(train_body, base_argv(assets, tmp_path / "fleet", *extra, "--rl-rollout-engine", "fleet",
                                            "--rl-fleet-engines", "1", "--rl-fleet-backend", "twin"), 1)[0]
    for a, b in zip(local["history"], fleet["history"], strict=True):
        for k in ("rollout/checksum", "rollout_corr/abs_logp_diff_max", "rollout_corr/kl"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
