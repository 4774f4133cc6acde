"""Rank 0 sends each data-parallel replica its own rows of the step, as tensors (issue 18.11).

The trainer used to pickle every sample of the step on rank 0 and broadcast the pickle
to every rank (100-200 MB per step at scale); now ``scatter_step_tensors`` scatters each
replica's rows over rank 0's DP group and broadcasts them over TP and PP. Oracle: every
rank rebuilds the whole step from the same seed (``step_tensors``) and its own rows
(``local_sample_ids`` of its plan) must come out equal, for TP2 x DP2 and PP2 x DP2
(4 gloo ranks), multi-turn loss masks included.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_alp.launch import RankGroup


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=300, start_timeout_s=300) as g:
        yield g


def _samples(n: int = 16):
    from megatron_alp.train.rollouts import Sample

    rng = random.Random(5)
    out = []
    for i in range(n):
        P, R = rng.randint(2, 7), rng.randint(1, 9)
        out.append(Sample(
            prompt_index=i // 4, group=i // 4, prompt_ids=[rng.randrange(1, 250) for _ in range(P)],
            response_ids=[rng.randrange(1, 250) for _ in range(R)],
            rollout_logp=[-rng.random() for _ in range(R)], finish_reason="stop", reward=rng.random(),
            advantage=rng.gauss(0, 1), loss_mask=[rng.randint(0, 1) for _ in range(R)] if i % 3 == 0 else None,
        ))
    return out


def scatter_body(tp: int, pp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_alp import parallel
    from megatron_alp.train.batches import (
        StepTensors,
        local_sample_ids,
        plan_minibatches,
        scatter_step_tensors,
        step_tensors,
    )

    with parallel.model_parallel(parallel.ParallelConfig(tensor_model_parallel_size=tp,
                                                         pipeline_model_parallel_size=pp)):
        samples = _samples()
        full = step_tensors(samples)
        dp = ps.get_data_parallel_world_size()
        rows_by_dp = [local_sample_ids(plan_minibatches(
            len(samples), global_batch_size=8, micro_batch_size=2, dp_size=dp, dp_rank=d, seed=1, step=3))
            for d in range(dp)]
        got = scatter_step_tensors(full if dist.get_rank() == 0 else None, tuple(full.tokens.shape),
                                   rows_by_dp, device=torch.device("cpu"))
        mine = torch.tensor(rows_by_dp[ps.get_data_parallel_rank()])
        ok = all(torch.equal(getattr(got, f), getattr(full, f)[mine])
                 for f in StepTensors.__dataclass_fields__)
        return dict(ok=ok, rows=len(mine), dp=dp, n=len(samples))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_each_replica_gets_exactly_its_rows(group, tp, pp):
    out = group.run(scatter_body, tp, pp)
    for r in out:
        assert r["ok"], r
        assert r["dp"] == 2 and r["rows"] == r["n"] // 2  # half the samples per replica
