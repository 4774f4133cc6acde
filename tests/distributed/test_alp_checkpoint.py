"""ALP models through megatron-core's ``dist_checkpointing`` (torch_dist) across layouts.

sigma exists only on the perturbed layers (a partial layer range, or the last layer
with ``placement="logits"``, the paper's ablations). Each case saves a model under one
layout (TP2 x PP2, or TP2 with DP = 2 on 4 ranks) and loads it under others; the
oracle is the state that was saved: every weight and every sigma comes back
bit-exact, and sigma is a parameter on the perturbed layers only. A second test
resumes model + Adam state of a partial range at another layout. Saves run in RankGroup's
daemonic ranks with a synchronous torch_dist strategy (``ckpt_bodies.sync_save``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_alp.launch import RankGroup
from megatron_alp.perturbation import ALPConfig
from tests.distributed import ckpt_bodies as bodies

_RANGE = ALPConfig(init_std=bodies.SIGMA0, layer_start=1, layer_end=3)
_LOGITS = ALPConfig(init_std=bodies.SIGMA0, placement="logits")
CASES = {
    # case: (ALP config, save layout, load layouts); "tp2" on 4 ranks is TP2 x DP2
    "range_1_3_tp2pp2": (_RANGE, "tp2_pp2", ["tp1", "pp2"]),
    "range_1_3_tp2_dp2": (_RANGE, "tp2", ["pp2"]),
    "logits_tp2pp2": (_LOGITS, "tp2_pp2", ["tp1"]),
    "logits_fixed_tp2_dp2": (dataclasses.replace(_LOGITS, learnable=False), "tp2", ["pp2_vpp2"]),
    "full_range_tp2pp2": (ALPConfig(init_std=bodies.SIGMA0), "tp2_pp2", ["pp2"]),
}


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=300) as g:
        yield g


@pytest.mark.parametrize("case", list(CASES))
def test_sigma_survives_dist_checkpoint_across_layouts(group, tmp_path, case):
    cfg, save_layout, load_layouts = CASES[case]
    saved = bodies.saved_state(cfg)
    active = [l for l in range(bodies.N_LAYERS) if cfg.perturbs_layer(l, bodies.N_LAYERS)]
    want_sigma = [bodies.sigma_name(l) for l in active]
    assert sorted(n for n in saved if n.endswith("alp_log_sigma")) == sorted(want_sigma)
    per_rank = group.run(
        bodies.save_and_load, str(tmp_path / "ckpt"), save_layout, load_layouts, cfg, timeout_s=120
    )
    for layout in load_layouts:
        got = per_rank[0][layout]
        assert all(r[layout]["sigmas"] == got["sigmas"] for r in per_rank), "ranks disagree"
        # Every sigma comes back bit-exact, on the perturbed layers only.
        assert got["sigmas"] == {n: float(saved[n]) for n in want_sigma}, f"{case} -> {layout}"
        # A learnable sigma is a parameter of the perturbed layers only (out-of-range
        # layers are never perturbed and never trained); a fixed one is a buffer.
        assert got["sigma_params"] == (sorted(want_sigma) if cfg.learnable else []), f"{case} -> {layout}"
        params = {n: t for n, t in saved.items() if cfg.learnable or not n.endswith("alp_log_sigma")}
        model = got["model"]
        assert sorted(model) == sorted(params), f"{case} -> {layout}: parameter names"
        for name, ref in params.items():
            torch.testing.assert_close(
                model[name], ref.to(model[name].dtype), rtol=0, atol=0,
                msg=lambda m, name=name: f"{case} -> {layout}: {name}: {m}",
            )


RESUME = {
    # case: (save layout, load layout)
    "range_1_3_tp2_dp2_to_pp2": ("tp2", "pp2"),
    "range_1_3_tp2pp2_to_tp1": ("tp2_pp2", "tp1"),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_optimizer_state_of_a_partial_range_resumes(group, tmp_path, case):
    """Model + Adam state of a partial ALP range through a dist checkpoint (the optimizer's
    sharded state derives its keys from the model's): one more step after loading equals
    one more step without the checkpoint (sigma to 1e-5 relative, the layout-invariance
    tolerance); a fresh optimizer is the control that must differ."""
    save_layout, load_layout = RESUME[case]
    cfg = ALPConfig(init_std=bodies.SIGMA0, layer_start=1, layer_end=3, lr=0.05)
    per_rank = group.run(bodies.optimizer_resume, str(tmp_path / "ckpt"), save_layout, load_layout,
                         cfg, timeout_s=180)
    r = per_rank[0]
    names = [bodies.sigma_name(l) for l in (1, 2)]
    assert sorted(r["continued"]) == sorted(r["resumed"]) == names
    for n in names:
        cont, res, fresh = r["continued"][n], r["resumed"][n], r["fresh_optimizer"][n]
        tol = 1e-5 * abs(cont)
        assert abs(res - cont) <= tol, (case, n, res, cont)
        assert abs(fresh - cont) > 10 * tol, (case, n, "control too close", fresh, cont)
