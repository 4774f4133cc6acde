"""The few collectives the RL objectives need, each a no-op when its group is None.

Every cross-rank quantity in the objectives is either a stop-gradient constant (sequence
log-ratio sums, sequence lengths, IS weights) or a plain count, so these helpers work on
detached tensors and need no autograd rules of their own: the loss stays a sum of
per-token terms, and each rank differentiates only its own tokens.

Context-parallel layout: Megatron's ``get_batch_on_this_cp_rank`` splits a sequence into
``2 * cp`` equal chunks and gives rank ``r`` chunks ``r`` and ``2 * cp - 1 - r``
("load-balanced"); ``"contiguous"`` means rank ``r`` holds chunk ``r`` of ``cp``. Only the
cumulative (prefix) sums depend on the layout; plain sums do not.

Devices: a tensor handed to an NCCL group must live on the GPU. Every helper here moves
its input to the group's communication device (:func:`comm_device`) when it is not
already there and returns the result on the input's device, so callers may pass host
tensors to an NCCL group or GPU tensors to a gloo group alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "CPLayout",
    "all_reduce_sum",
    "comm_device",
    "gather_cat",
    "group_rank",
    "group_size",
    "sequence_cumsum",
]

CPLayout = Literal["load-balanced", "contiguous"]
CP_LAYOUTS: tuple[str, ...] = ("load-balanced", "contiguous")


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``group``; 1 for None (a single process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index inside ``group``; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def comm_device(group: dist.ProcessGroup | None, like: torch.device) -> torch.device:
    """The device a tensor now on ``like`` must be on for a collective over ``group``.

    An NCCL-only group needs the current CUDA device; a gloo group needs host tensors
    (gloo's collectives used here are CPU-only); a mixed backend (``cpu:gloo,cuda:nccl``)
    takes either, so the tensor stays where it is.
    """
    if group is None:
        return like
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and like.type != "cuda" and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "nccl" not in backend and like.type == "cuda":
        return torch.device("cpu")
    return like


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of a detached tensor over ``group`` (returned as a new tensor; input untouched)."""
    if group_size(group) == 1:
        return x.detach().clone()
    out = x.detach().to(comm_device(group, x.device), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(x.device)


def gather_cat(x_N: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate 1-D (or ``[N, ...]``) tensors of possibly different lengths from all ranks.

    Used for exact quantiles over the global token set: every rank receives every value.
    Cost: one small all-gather of the lengths plus one all-gather of ``max_len * world``
    elements (the shorter ranks pad), i.e. O(global tokens) memory and bandwidth per call.
    """
    world = group_size(group)
    x_N = x_N.detach()
    if world == 1:
        return x_N.clone()
    home = x_N.device
    x_N = x_N.to(comm_device(group, home))
    n = torch.tensor([x_N.shape[0]], dtype=torch.long, device=x_N.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s.item()) for s in sizes]
    max_len = max(lengths)
    padded = x_N.new_zeros((max_len, *x_N.shape[1:]))
    padded[: x_N.shape[0]] = x_N
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:length] for p, length in zip(parts, lengths)], dim=0).to(home)


def _local_chunk_ids(layout: str, cp_rank: int, cp_size: int) -> list[int]:
    if layout == "load-balanced":
        return [cp_rank, 2 * cp_size - 1 - cp_rank]
    if layout == "contiguous":
        return [cp_rank]
    raise ValueError(f"cp_layout={layout!r} is not one of {CP_LAYOUTS}")


def sequence_cumsum(
    x_BT: torch.Tensor, cp_group: dist.ProcessGroup | None, *, cp_layout: CPLayout = "load-balanced"
) -> torch.Tensor:
    """Inclusive prefix sum along the (possibly context-parallel) sequence dim of a detached tensor.

    With a CP group, each local chunk is offset by the totals of all chunks that precede
    it in the full sequence (one all-gather of ``[B, chunks]`` totals). The result on each
    rank equals the matching slice of the unsplit ``cumsum``.
    """
    x_BT = x_BT.detach()
    cp_size = group_size(cp_group)
    if cp_size == 1:
        return torch.cumsum(x_BT, dim=-1)
    ids = _local_chunk_ids(cp_layout, group_rank(cp_group), cp_size)
    B, T = x_BT.shape
    k = len(ids)
    if T % k:
        raise ValueError(
            f"the local sequence length {T} is not divisible into {k} context-parallel "
            f"chunks (cp_layout={cp_layout!r})"
        )
    x_BkC = x_BT.reshape(B, k, T // k)
    local_cum = torch.cumsum(x_BkC, dim=-1)
    totals_Bk = local_cum[..., -1].contiguous()
    totals_Bk = totals_Bk.to(comm_device(cp_group, totals_Bk.device))
    gathered = [torch.empty_like(totals_Bk) for _ in range(cp_size)]
    dist.all_gather(gathered, totals_Bk, group=cp_group)
    gathered = [t.to(x_BT.device) for t in gathered]
    n_chunks = k * cp_size
    chunk_totals = x_BT.new_zeros((B, n_chunks))
    for r, tot in enumerate(gathered):
        for j, cid in enumerate(_local_chunk_ids(cp_layout, r, cp_size)):
            chunk_totals[:, cid] = tot[:, j]
    # exclusive prefix over chunks: offset of chunk c = sum of chunks < c
    offsets = torch.cumsum(chunk_totals, dim=-1) - chunk_totals
    local_off_Bk = offsets[:, ids]
    return (local_cum + local_off_Bk.unsqueeze(-1)).reshape(B, T)
