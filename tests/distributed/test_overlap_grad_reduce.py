"""Megatron DDP's overlapped grad reduction (on by default with CUDA) changes no number.

``wrap_ddp(overlap_grad_reduce=True)`` all-reduces grad buckets from backward hooks and,
with pipelining, launches the reductions from the schedule (``grad_sync_func``). Run on
4 gloo ranks (DP=4, and PP=2 x DP=2 with the interleaved schedule) against the same runs
without overlap: same losses after two optimizer steps, same grads.
"""

import pytest
import torch

from megatron_alp.launch import RankGroup
from megatron_alp.models.tiny import tiny_batches, tiny_hf_config
from tests.layouts import LAYOUTS, canonical_state, merge_ranks, run_layout

RUNS = {name: (layout, overlap) for layout in ("tp1", "pp2_vpp2") for overlap, name in
        ((False, f"{layout}_sync"), (True, f"{layout}_overlap"))}


def body() -> dict:
    hf = tiny_hf_config()
    full = canonical_state(hf, seed=1)
    batches = tiny_batches(4, seed=2)
    return {
        name: run_layout(hf, LAYOUTS[layout], full, batches, steps=2, overlap_grad_reduce=overlap)
        for name, (layout, overlap) in RUNS.items()
    }


@pytest.mark.slow  # kept out of the default suite's 15-minute budget (scripts/test.sh -m slow)
def test_overlap_grad_reduce_matches_the_synchronous_reduction():
    with RankGroup(4, timeout_s=600) as group:
        per_rank = group.run(body)
    for layout in ("tp1", "pp2_vpp2"):
        ref = merge_ranks(per_rank, f"{layout}_sync")
        got = merge_ranks(per_rank, f"{layout}_overlap")
        assert len(ref["grads"]) > 10 and got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=0, msg=f"{layout}: {name}")
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                                   atol=1e-6, rtol=0, msg=layout)
