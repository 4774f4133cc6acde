"""Samples -> padded tensors -> this rank's mini-batches and micro-batches.

Layout of one sequence (``P`` prompt and ``R`` response tokens, right padding to ``S``)::

    tokens   p0 .. p{P-1} r0 .. r{R-1} pad ..
    labels   tokens shifted left by one (label t is token t + 1), 0 at the end
    mask     1 where the label is a response token: t in [P-1, P+R-2]; for a multi-turn
             sample, the sample's ``loss_mask`` there (0 on observation tokens)

``rollout_logp`` / ``old_logp`` / ``ref_logp`` are aligned with the labels. ``S`` is the
step's longest sequence rounded up to a multiple of ``multiple`` (TP under sequence
parallelism), the same on every rank.

The step's ``N`` samples are permuted once (seeded by the step) and cut into mini-batches
of ``global_batch_size`` (one optimizer step each, the same order in every
``--grpo-iterations`` pass); DP rank ``d`` takes the ``d``-th contiguous slice of each
mini-batch and splits it into micro-batches of ``micro_batch_size``. Every row carries its
position in the mini-batch (``sample_offset`` of the micro-batch + row), which is the
global sample id of ALP's noise: the same for any DP / micro-batch layout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_alp.train.rollouts import Sample

__all__ = ["MiniBatch", "StepTensors", "plan_minibatches", "scatter_step_tensors", "step_tensors"]


@dataclasses.dataclass(slots=True)
class StepTensors:
    """The whole step's samples as ``[N, S]`` tensors (``advantages``: ``[N]``)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    position_ids: torch.Tensor


def step_tensors(samples: Sequence[Sample], *, multiple: int = 1) -> StepTensors:
    """Pad every sample to the step's sequence length (see the module docstring)."""
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    S = -(-longest // multiple) * multiple
    N = len(samples)
    tokens = torch.zeros((N, S), dtype=torch.long)
    labels = torch.zeros((N, S), dtype=torch.long)
    mask = torch.zeros((N, S), dtype=torch.float32)
    roll = torch.zeros((N, S), dtype=torch.float32)
    for i, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        assert s.loss_mask is None or len(s.loss_mask) == R, (i, len(s.loss_mask), R)
        seq = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        tokens[i, : P + R] = seq
        labels[i, : P + R - 1] = seq[1:]
        if R:
            lp = torch.tensor(s.rollout_logp, dtype=torch.float32)
            if s.loss_mask is None:
                mask[i, P - 1 : P + R - 1] = 1.0
            else:  # multi-turn: observation tokens have no engine log-prob; 0 and masked
                m = torch.tensor(s.loss_mask, dtype=torch.float32)
                mask[i, P - 1 : P + R - 1] = m
                lp = torch.where(m > 0, lp, torch.zeros_like(lp))
            roll[i, P - 1 : P + R - 1] = lp
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    pos = torch.arange(S).unsqueeze(0).expand(N, -1).contiguous()
    return StepTensors(tokens, labels, mask, roll, adv, pos)


@dataclasses.dataclass(frozen=True, slots=True)
class MiniBatch:
    """This DP rank's part of one mini-batch: micro-batches of sample indices."""

    index: int
    micro: tuple[tuple[int, ...], ...]
    """Sample indices (into the step's list) of each micro-batch."""
    offsets: tuple[int, ...]
    """Position of each micro-batch's first row within the mini-batch (ALP sample id)."""


def plan_minibatches(
    n_samples: int,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
    seed: int,
    step: int,
) -> list[MiniBatch]:
    """This rank's mini-batches of the step (see the module docstring)."""
    perm = np.random.default_rng([seed, step, 0xBA7C]).permutation(n_samples).tolist()
    local = global_batch_size // dp_size
    out = []
    for m in range(n_samples // global_batch_size):
        start = m * global_batch_size + dp_rank * local
        rows = perm[start : start + local]
        micro, offsets = [], []
        for k in range(0, local, micro_batch_size):
            micro.append(tuple(rows[k : k + micro_batch_size]))
            offsets.append(dp_rank * local + k)
        out.append(MiniBatch(m, tuple(micro), tuple(offsets)))
    return out


def local_sample_ids(plan: Sequence[MiniBatch]) -> list[int]:
    """Every sample index this rank trains on, in plan order."""
    return [i for mb in plan for mic in mb.micro for i in mic]


def scatter_step_tensors(
    full: StepTensors | None,
    shape: tuple[int, int],
    rows_by_dp: Sequence[Sequence[int]],
    *,
    device: torch.device,
) -> StepTensors:
    """Each data-parallel replica gets its own rows of rank 0's step tensors (collective).

    ``full`` is the step's ``[N, S]`` tensors on global rank 0 (None elsewhere), ``shape``
    is ``(N, S)`` on every rank, ``rows_by_dp[d]`` the sample ids DP rank ``d`` trains on
    (``local_sample_ids`` of its plan, the same lists on every rank). Returns this rank's
    rows, in that order, on the host. Three tensor collectives instead of a pickled copy
    of every sample to every rank: a scatter over rank 0's data-parallel group (the
    first tensor/pipeline rank of each replica), then a broadcast over the tensor- and
    the pipeline-parallel group. A replica receives ``N / DP`` rows of ``[tokens, labels,
    positions]`` (int32 on the wire) and ``[mask, rollout log-prob, advantage]`` (fp32).
    """
    from megatron.core import parallel_state as ps

    n_local = len(rows_by_dp[ps.get_data_parallel_rank()])
    if any(len(r) != n_local for r in rows_by_dp):
        raise ValueError(f"every DP rank must train on as many samples; got {[len(r) for r in rows_by_dp]}")
    S = shape[1]
    ints = torch.empty((n_local, 3, S), dtype=torch.int32, device=device)  # ids < 2**31
    floats = torch.empty((n_local, 3, S), dtype=torch.float32, device=device)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True):
        dp_group = ps.get_data_parallel_group()
        src = dist.get_global_rank(dp_group, 0)
        int_parts = float_parts = None
        if dist.get_rank() == src:
            assert full is not None and dist.get_rank() == 0, "global rank 0 holds the step"
            packed_i = torch.stack([full.tokens, full.labels, full.position_ids], dim=1).to(torch.int32)
            adv = full.advantages[:, None].expand(-1, S)
            packed_f = torch.stack([full.loss_mask, full.rollout_logp, adv], dim=1)
            int_parts = [packed_i[list(r)].to(device) for r in rows_by_dp]
            float_parts = [packed_f[list(r)].to(device) for r in rows_by_dp]
        dist.scatter(ints, int_parts, src=src, group=dp_group)
        dist.scatter(floats, float_parts, src=src, group=dp_group)
    if ps.get_tensor_model_parallel_world_size() > 1 and ps.is_pipeline_first_stage(ignore_virtual=True):
        for t in (ints, floats):
            dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        for t in (ints, floats):
            dist.broadcast(t, src=ps.get_pipeline_model_parallel_first_rank(),
                           group=ps.get_pipeline_model_parallel_group())
    ints, floats = ints.cpu().long(), floats.cpu()
    return StepTensors(
        tokens=ints[:, 0].contiguous(), labels=ints[:, 1].contiguous(),
        loss_mask=floats[:, 0].contiguous(), rollout_logp=floats[:, 1].contiguous(),
        advantages=floats[:, 2, 0].contiguous(), position_ids=ints[:, 2].contiguous(),
    )
