"""ALP on real megatron-core under every layout: the TP=1 run in the same group is the oracle.

One group of 4 gloo ranks. A single sweep (one ``group.run``) trains one step of a tiny
Qwen2 with ALP on under TP1, TP2, TP2+SP, PP2, TP2xPP2 and PP2+VPP2 (4 micro-batches of
2 samples), under TP1 with 8 micro-batches of 1 sample, and under full / selective
activation recompute (TP1, and PP2 with 1F1B over 4 micro-batches); the tests compare
its perturbed logits, losses, all gradients and sigma gradients. Further bodies check
bit-identity with ALP off, where the noise lands, sigma's pipeline ownership, the
finite-difference gradient, saved-tensor sizes, and sigma inside Megatron's optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_alp.launch import RankGroup
from tests.layouts import merge_ranks
from tests.distributed import alp_bodies as bodies

REL = 1e-5


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=900) as g:
        yield g


def assert_rel(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """max |got - ref| <= rel * max |ref| (relative to the tensor's scale)."""
    assert got.shape == ref.shape, what
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale + 1e-30, f"{what}: max err {err:.3e} > {rel} x scale {scale:.3e}"


def assert_runs_equal(got: dict, ref: dict, rel: float, what: str, *, logits: bool = True) -> None:
    if logits:
        assert_rel(got["logits"], ref["logits"], rel, f"{what}: logits")
    assert got["grads"].keys() == ref["grads"].keys(), what
    for name, g in ref["grads"].items():
        assert_rel(got["grads"][name], g, rel, f"{what}: grad of {name}")


@pytest.fixture(scope="module")
def sweep(group):
    per_rank = group.run(bodies.sweep, bodies.SWEEP)
    merged = {name: merge_ranks(per_rank, name) for name in bodies.SWEEP}
    return {name: dict(m, losses=torch.tensor(m["losses"])) for name, m in merged.items()}


def test_layouts_match_tp1(sweep):
    ref = sweep["tp1"]
    sigma_names = [n for n in ref["grads"] if n.endswith("alp_log_sigma")]
    assert sorted(sigma_names) == [f"decoder.layers.{i}.perturbation.alp_log_sigma" for i in range(4)]
    for n in sigma_names:
        assert ref["grads"][n].abs() > 1e-6, f"{n}: sigma grad is zero, noise not applied?"
    # The noise matters: perturbed logits are far from the unperturbed ones.
    assert (ref["logits"] - sweep["tp1_plain"]["logits"]).abs().max() > 1e-2
    for layout in ("tp2", "tp2_sp", "pp2", "tp2_pp2", "pp2_vpp2"):
        got = sweep[layout]
        assert_runs_equal(got, ref, REL, layout)
        assert_rel(got["losses"], ref["losses"], REL, f"{layout}: losses")


def test_micro_batch_size_1_vs_2(sweep):
    ref, got = sweep["tp1"], sweep["tp1_mbs1"]
    # Logits of the first sample (mbs 1 records one sample, mbs 2 two).
    assert_rel(got["logits"], ref["logits"][:1], REL, "mbs1: logits of sample 0")
    assert_runs_equal(got, ref, REL, "mbs1 vs mbs2", logits=False)
    assert_rel(got["losses"].mean(), ref["losses"].mean(), REL, "mbs1: mean loss")


@pytest.mark.parametrize(
    "run,ref",
    [("tp1_full", "tp1"), ("tp1_selective", "tp1"), ("pp2_full", "pp2"), ("tp2_sp_full", "tp2_sp")],
)
def test_recompute_matches_no_recompute(sweep, run, ref):
    assert_runs_equal(sweep[run], sweep[ref], 1e-6, run)
    assert_rel(sweep[run]["losses"], sweep[ref]["losses"], 1e-6, f"{run}: losses")


def test_recompute_needs_the_tracker_snapshot(group):
    res = group.run(bodies.recompute_control)[0]
    assert res["full"] == res["none"] and all(v for v in res["none"].values())
    # Control: the same mechanism with coordinates kept on the Python side only works
    # without recompute, and loses the noise (sigma gets no grad) under full recompute.
    assert res["python_side_none"] == res["none"]
    assert all(v is None for v in res["python_side_full"].values())


def test_disabled_and_empty_range_are_bit_identical(group):
    for res in group.run(bodies.bit_identity):
        for layout, cases in res.items():
            plain = cases["plain"]
            for case in ("disabled", "empty_range", "outside_context", "zero_fixed_sigma"):
                assert torch.equal(cases[case], plain), f"{layout}: {case} differs from plain"
            # Inside perturbed() the noise is on, in eval mode too (never keyed on .training).
            assert (cases["eval_perturbed"] - plain).abs().max() > 1e-2, layout
            assert cases["n_alp_params"] == {"disabled": 0, "empty_range": 0, "zero_fixed_sigma": 0}


def test_noise_lands_where_configured(group):
    res = group.run(bodies.placement)[0]
    # hidden: layer 0's input_layernorm sees embedding + sigma_0 * eps(layer 1), exactly.
    torch.testing.assert_close(res["hidden_delta"], res["hidden_expected"], rtol=0, atol=1e-7)
    assert res["hidden_delta"].abs().max() > 1e-3
    # range [1, 3): layer 0 untouched, layer 1 perturbed with layer-2 coordinates.
    assert torch.equal(res["range_delta0"], torch.zeros_like(res["range_delta0"]))
    torch.testing.assert_close(res["range_delta1"], res["range_expected1"], rtol=0, atol=1e-6)
    # logits: only the final norm's input (the last layer's output) moves, by sigma * eps.
    torch.testing.assert_close(res["logits_delta"], res["logits_expected"], rtol=0, atol=1e-6)
    assert torch.equal(res["logits_first_input_delta"], torch.zeros_like(res["logits_first_input_delta"]))
    assert res["logits_params"] == ["decoder.layers.3.perturbation.alp_log_sigma"]


def test_sigma_lives_on_owning_stage(group):
    want = {
        "pp2": [[0, 1], [2, 3]],
        "pp2_range_1_3": [[1], [2]],
        "pp2_logits": [[], [3]],
        "pp2_vpp2": [[0, 2], [1, 3]],
    }
    for r in group.run(bodies.ownership):
        for case, layers in want.items():
            assert r[case] == layers[r["pp_rank"]], (case, r["pp_rank"], r[case])
        # Metrics gathered across stages: every rank sees all four layers' sigma.
        sigmas = {k: v for k, v in r["metrics"].items() if "/sigma/layer_" in k}
        assert sorted(sigmas) == [f"alp/sigma/layer_{i:02d}" for i in range(4)]
        for i in range(4):
            assert math.isclose(sigmas[f"alp/sigma/layer_{i:02d}"], 0.05 * (i + 1), rel_tol=1e-6)
        # Checkpointed: one (1,)-tensor per layer, keyed by its global layer, never stacked
        # over layers (a partial range would leave holes; test_alp_checkpoint.py).
        assert sorted(r["sharded"]) == [
            (f"decoder.layers.perturbation.layer_{i}.alp_log_sigma", (1,), 0)
            for i in want["pp2"][r["pp_rank"]]
        ]


def test_log_sigma_grad_matches_finite_difference(group):
    res = group.run(bodies.finite_difference)[0]
    for layer, (autograd, fd) in res.items():
        assert abs(autograd) > 1e-6, layer
        assert abs(autograd - fd) <= 1e-3 * abs(fd), f"layer {layer}: autograd {autograd} vs FD {fd}"


def test_no_activation_sized_tensor_saved(group):
    res = group.run(bodies.saved_tensors)[0]
    # Same activation-sized saves with and without ALP; ALP adds only scalars.
    assert res["alp_large"] == res["plain_large"], res
    assert res["alp_small_extra"] <= res["n_layers"] * 1, res
    assert res["function_saved"] == [1], res


def test_sigma_in_megatron_optimizer(group):
    per_rank = group.run(bodies.optimizer)
    r = per_rank[0]
    plain, dist = r["plain"], r["dist"]
    # Own group: lr and weight decay from ALPConfig, the rest from OptimizerConfig.
    assert plain["sigma_group"] == {"lr": 0.5, "weight_decay": 0.1}
    assert dist["alp_group_lrs"] == [0.5]
    assert plain["other_lrs"] == {1e-3}
    # Included in grad-norm clipping: the optimizer's norm counts sigma's grads.
    assert math.isclose(plain["grad_norm"], plain["expected_norm"], rel_tol=1e-5)
    assert plain["expected_norm"] - plain["norm_without_sigma"] > 10 * 1e-5 * plain["expected_norm"]
    assert math.isclose(dist["grad_norm"], plain["grad_norm"], rel_tol=1e-5)
    # AdamW's first step: log_sigma <- log_sigma * (1 - lr * wd) - lr * g / (|g| + eps),
    # g the clipped grad (sigma's own lr 0.5 and weight decay 0.1 at work).
    for name, (before, g_unit, after) in plain["sigma_update"].items():
        expected = before * (1 - 0.5 * 0.1) - 0.5 * g_unit
        assert math.isclose(after, expected, rel_tol=1e-5, abs_tol=1e-6), name
        assert math.isclose(dist["sigma_after"][name], after, rel_tol=1e-6, abs_tol=1e-7), name
    # Metrics (grads read back under the distributed optimizer too).
    for k, v in plain["metrics"].items():
        assert math.isclose(dist["metrics"][k], v, rel_tol=1e-5, abs_tol=1e-9), k
    assert all(pr["plain"]["metrics"] == plain["metrics"] for pr in per_rank)
