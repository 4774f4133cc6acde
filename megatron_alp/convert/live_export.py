"""Live weight export: the running, sharded model as a stream of HF-named tensor buckets.

    for bucket in export_hf_buckets(chunks, hf_config, bucket_bytes=512 << 20):
        engine.update_weights([bucket])          # only on the sending rank (non-empty)

Every rank of the job iterates the generator in lockstep (the TP gathers and pipeline
transfers are collectives); the buckets are non-empty only on the sending rank
(``src_rank``, global rank 0 by default), which is the only rank that holds them. For
each canonical tensor, in streaming order (embedding, layers, final norm, head):

1. the owning pipeline stage (virtual stages included; the first data/context-parallel
   replica) casts its shards to the engine dtype and gathers them onto its TP rank 0
   (``[gate; up]`` of ``linear_fc1`` re-assembled per half);
2. that rank sends the full tensor to the sending rank (point to point) unless it is it;
3. the sending rank maps it to HF names with the conversion tools' mapping
   (``ModelMapping.to_hf``: QKV and gate/up un-fused, vocabulary padding stripped) and
   adds it to the bucket.

ALP parameters (``is_alp_param``) are never sent. A bucket is emitted before it would
exceed ``bucket_bytes`` (counted on the canonical tensor in the engine dtype, an upper
bound of what the bucket holds); a single tensor larger than the bound is refused up
front with a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_alp.convert.mapping import ModelMapping, get_mapping, is_alp_param
from megatron_alp.models.hf import gpt_args_from_hf
from megatron_alp.models.sharding import assemble_tp_parts, is_gated_fc1, iter_named_local_params

__all__ = ["ExportPlan", "export_hf_buckets", "plan_export"]


@dataclasses.dataclass(frozen=True, slots=True)
class ExportPlan:
    """What every rank knows before the first byte moves."""

    names: tuple[str, ...]
    """Canonical names, in streaming order."""
    owner_pp: tuple[int, ...]
    """Pipeline rank that owns each tensor."""
    bucket_of: tuple[int, ...]
    """Bucket index of each tensor."""
    nbytes: tuple[int, ...]
    """Upper bound of each tensor's bytes in the engine dtype."""


def _mapping(chunks: Sequence[torch.nn.Module], hf_config: Any) -> ModelMapping:
    args = gpt_args_from_hf(hf_config)
    inner = chunks[0]
    while hasattr(inner, "module") and not hasattr(inner, "vocab_size"):
        inner = inner.module
    return ModelMapping(get_mapping(args.model_type), args, padded_vocab=int(inner.vocab_size))


def plan_export(
    chunks: Sequence[torch.nn.Module],
    mapping: ModelMapping,
    *,
    dtype: torch.dtype,
    bucket_bytes: int,
) -> tuple[ExportPlan, dict[str, torch.nn.Parameter]]:
    """Names, owners and bucket boundaries (collective over the pipeline group)."""
    from megatron.core import parallel_state as ps

    local: dict[str, torch.nn.Parameter] = {}
    for name, p in iter_named_local_params(chunks):
        if not is_alp_param(name):
            local.setdefault(mapping.canonical(name), p)
    owners_of: dict[str, int] = {}
    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size > 1:
        gathered: list[Any] = [None] * pp_size
        dist.all_gather_object(
            gathered, sorted(local), group=ps.get_pipeline_model_parallel_group()
        )
    else:
        gathered = [sorted(local)]
    for pp_rank, names in enumerate(gathered):
        for n in names:
            owners_of.setdefault(n, pp_rank)  # tied head on the last stage: the first wins
    names = mapping.megatron_names()
    missing = [n for n in names if n not in owners_of]
    if missing:
        raise ValueError(f"live export: no pipeline stage holds {missing[:4]}")
    elem = torch.empty((), dtype=dtype).element_size()
    sizes, buckets, b, used = [], [], 0, 0
    for n in names:
        size = elem
        for s in mapping.megatron_shape(n):
            size *= s
        if size > bucket_bytes:
            raise ValueError(
                f"live export: tensor {n} needs {size} bytes in {dtype}, more than "
                f"bucket_bytes={bucket_bytes}; raise bucket_bytes to at least {size}"
            )
        if used + size > bucket_bytes:
            b, used = b + 1, 0
        sizes.append(size)
        buckets.append(b)
        used += size
    plan = ExportPlan(tuple(names), tuple(owners_of[n] for n in names), tuple(buckets), tuple(sizes))
    return plan, local


def _gather_tp_to_first(name: str, param: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor | None:
    """Full tensor in ``dtype`` on TP rank 0 of this stage, None on the other TP ranks.

    Shards are cast before they travel (half the bytes for bf16, and the cast commutes
    with the gather); dim-0 shards (gate/up halves separately) are gathered straight into
    their slice of the result.
    """
    from megatron.core import parallel_state as ps

    data = param.detach().to(dtype)
    size = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return data if rank == 0 else None
    group = ps.get_tensor_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    dim = int(param.partition_dim)
    gated = is_gated_fc1(name)
    # A gated fc1 shard is [gate_r; up_r] and the full tensor [gate_0..; up_0..]: two
    # gathers, one per half, land each half straight in its slice (no parts, no cat).
    halves = list(data.chunk(2, dim=0)) if dim == 0 and gated else [data]
    if rank != 0:
        for h in halves:
            dist.gather(h.contiguous(), None, dst=first, group=group)
        return None
    if dim == 0:
        shape = list(data.shape)
        shape[0] *= size
        # On the shard's device: NCCL refuses CPU tensors (never the default device).
        full = torch.empty(shape, dtype=dtype, device=data.device)
        for h, dst in zip(halves, full.chunk(len(halves), dim=0)):
            parts = list(dst.chunk(size, dim=0))  # contiguous views: no extra copy
            dist.gather(h.contiguous(), parts, dst=first, group=group)
        return full
    parts = [torch.empty_like(data) for _ in range(size)]  # empty_like keeps data's device
    dist.gather(data.contiguous(), parts, dst=first, group=group)
    return assemble_tp_parts(name, parts, dim)


@torch.no_grad()
def export_hf_buckets(
    chunks: Sequence[torch.nn.Module],
    hf_config: Any,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bucket_bytes: int = 512 << 20,
    src_rank: int = 0,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (HF name, full tensor) pairs; see the module docstring.

    Collective: every rank must exhaust the generator. Only ``src_rank`` gets non-empty
    buckets. ``chunks`` are this rank's model chunks (bare or DDP-wrapped).
    """
    from megatron.core import parallel_state as ps

    mapping = _mapping(chunks, hf_config)
    plan, local = plan_export(chunks, mapping, dtype=dtype, bucket_bytes=bucket_bytes)
    me = dist.get_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    first_replica = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    is_src = me == src_rank
    if is_src and not (first_replica and ps.get_tensor_model_parallel_rank() == 0):
        raise ValueError(
            f"live export: src_rank={src_rank} must be a TP-rank-0 rank of the first "
            "data/context-parallel replica (global rank 0 always is)"
        )
    pp_group = ps.get_pipeline_model_parallel_group()
    # Receive buffers live where the model does (cuda under NCCL), not on the default
    # device: NCCL rejects CPU tensors.
    device = next(iter(local.values())).device
    bucket: list[tuple[str, torch.Tensor]] = []
    for k, name in enumerate(plan.names):
        if k > 0 and plan.bucket_of[k] != plan.bucket_of[k - 1]:
            yield bucket
            bucket = []
        owner = plan.owner_pp[k]
        full: torch.Tensor | None = None
        if first_replica and owner == pp_rank:
            full = _gather_tp_to_first(name, local[name], dtype)  # None unless TP rank 0
            if full is not None and not is_src:
                dist.send(full.contiguous(), dst=src_rank)
                full = None
        elif is_src:
            # The holder is the owner stage's rank in src's own pipeline group (same TP
            # rank 0, same replica).
            holder = dist.get_global_rank(pp_group, owner)
            full = torch.empty(mapping.megatron_shape(name), dtype=dtype, device=device)
            dist.recv(full, src=holder)
        if is_src:
            for hf_name, t in mapping.to_hf(name, full):
                bucket.append((hf_name, t.contiguous()))
            full = None
    yield bucket

