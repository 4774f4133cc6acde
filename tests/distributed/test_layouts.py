"""Same tiny model, same weights, every layout: same logits, grads and losses as TP=1.

One group of 4 gloo ranks runs all layouts (TP=1 runs with DP=4, TP=2 with DP=2, ...),
one architecture per test; the TP=1 run inside the same group is the oracle.
"""

import pytest
import torch

from megatron_alp.launch import RankGroup
from tests.layouts import LAYOUTS, canonical_state, merge_ranks, run_layout
from megatron_alp.models.tiny import tiny_batches, tiny_hf_config

ARCHS = {
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "llama_tied": dict(model_type="llama", tie=True),
}


def sweep(arch: dict, layouts: list[str]) -> dict:
    hf = tiny_hf_config(**arch)
    full = canonical_state(hf, seed=1)
    batches = tiny_batches(4, seed=2)
    return {name: run_layout(hf, LAYOUTS[name], full, batches, steps=2) for name in layouts}


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=600) as g:
        yield g


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layouts_match_tp1(group, arch):
    per_rank = group.run(sweep, ARCHS[arch], list(LAYOUTS))
    ref = merge_ranks(per_rank, "tp1")
    assert ref["logits"].shape == (2, 16, 256)
    assert len(ref["grads"]) > 10
    for layout in LAYOUTS:
        if layout == "tp1":
            continue
        got = merge_ranks(per_rank, layout)
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0, msg=layout)
        assert got["grads"].keys() == ref["grads"].keys(), layout
        for name, g in ref["grads"].items():
            torch.testing.assert_close(
                got["grads"][name], g, atol=1e-5, rtol=0, msg=f"{layout}: grad of {name}"
            )
        # Four micro-batches through the layout's schedule; the second step's losses
        # also check the optimizer update.
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0,
            msg=layout,
        )
    # The optimizer moved the model: step 2 differs from step 1.
    assert abs(ref["losses"][1][0] - ref["losses"][0][0]) > 1e-3
