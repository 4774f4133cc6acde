"""``--rl-mismatch-by-layer-interval`` through the trainer on gloo ranks: the FP32 export it
measures on is collective over TP and PP, so TP = 2 x PP = 2 must log exactly the numbers
of one rank (with --lr 0 both keep the initial weights, so the engines' tokens and the
measured weights are the same)."""

from __future__ import annotations

import pytest

from megatron_alp.launch import RankGroup
from tests.e2e.train_bodies import base_argv, build_assets, train_body


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


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
