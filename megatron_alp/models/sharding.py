"""Full (TP=1, PP=1) Megatron parameters <-> this rank's shards.

The *canonical* form of a model is the state of a TP=1, PP=1 GPTModel: Megatron names
with global layer indices (``decoder.layers.{global}...``), full tensors, padded
vocabulary, and no ``output_layer.weight`` when embeddings are tied. This module maps it
onto the shards of any TP / PP / virtual-PP layout and back:

* a tensor-parallel parameter (``param.tensor_model_parallel``) is split along
  ``param.partition_dim`` in TP-rank order;
* ``linear_fc1`` of a gated MLP (SwiGLU) holds ``[gate; up]``: each half is split
  separately, so TP rank r holds ``[gate_r; up_r]``;
* ``linear_qkv`` needs nothing special: Megatron lays it out per query group
  (``[q_g, k_g, v_g]`` for each group g), so a plain split hands whole groups to ranks;
* the layer index moves by the chunk's offset (``layer_number - 1`` of its first layer).

Used to give every layout the same weights in tests, and by the exporters, which gather
the other way.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "assemble_tp_parts",
    "canonical_name",
    "gather_tp_full",
    "gather_vocab",
    "is_gated_fc1",
    "iter_named_local_params",
    "load_full_state",
    "shard_full_tensor",
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _layer_offset(chunk: torch.nn.Module) -> int:
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def canonical_name(local_name: str, offset: int) -> str:
    """``decoder.layers.{i}.x`` of a chunk whose first layer is global ``offset`` -> global."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + offset}.{local_name[m.end():]}"


def _is_tied_replica(chunk: torch.nn.Module, name: str) -> bool:
    # With tied embeddings and PP > 1 the last stage owns a copy of the word embeddings
    # as output_layer.weight; the canonical form has only the embedding.
    return name == "output_layer.weight" and bool(
        getattr(chunk, "share_embeddings_and_output_weights", False)
    )


def iter_named_local_params(
    chunks: Iterable[torch.nn.Module],
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) for every parameter of this rank's chunks.

    Accepts bare GPTModels or wrappers with a ``.module`` (Megatron DDP).
    """
    for chunk in chunks:
        inner = chunk
        while hasattr(inner, "module") and not hasattr(inner, "decoder"):
            inner = inner.module
        offset = _layer_offset(inner)
        for name, param in inner.named_parameters():
            if _is_tied_replica(inner, name):
                yield "embedding.word_embeddings.weight", param
            else:
                yield canonical_name(name, offset), param


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def is_gated_fc1(name: str) -> bool:
    """True for the ``[gate; up]`` fused ``linear_fc1`` of a gated (SwiGLU) MLP."""
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def assemble_tp_parts(name: str, parts: list[torch.Tensor], dim: int, *, gated_mlp: bool = True) -> torch.Tensor:
    """Full tensor from its TP shards in rank order (each gated shard is ``[gate_r; up_r]``)."""
    if gated_mlp and is_gated_fc1(name):
        gates, ups = zip(*(torch.chunk(p, 2, dim=dim) for p in parts))
        parts = [*gates, *ups]
    return torch.cat(parts, dim=dim)


def shard_full_tensor(
    name: str, full: torch.Tensor, param: torch.Tensor, *, gated_mlp: bool = True
) -> torch.Tensor:
    """This TP rank's slice of the full tensor ``full`` for local parameter ``param``."""
    if not getattr(param, "tensor_model_parallel", False):
        if full.shape != param.shape:
            raise ValueError(
                f"tensor {name}: full shape {tuple(full.shape)} != local shape "
                f"{tuple(param.shape)} of a replicated parameter"
            )
        return full
    rank, size = _tp()
    dim = int(param.partition_dim)
    if gated_mlp and is_gated_fc1(name):
        halves = torch.chunk(full, 2, dim=dim)
        out = torch.cat([torch.chunk(h, size, dim=dim)[rank] for h in halves], dim=dim)
    else:
        if full.shape[dim] % size:
            raise ValueError(
                f"tensor {name}: dim {dim} of size {full.shape[dim]} is not divisible by "
                f"tensor_model_parallel_size={size}"
            )
        out = torch.chunk(full, size, dim=dim)[rank]
    if out.shape != param.shape:
        raise ValueError(
            f"tensor {name}: shard shape {tuple(out.shape)} != local shape {tuple(param.shape)}"
        )
    return out


@torch.no_grad()
def load_full_state(
    chunks: Iterable[torch.nn.Module],
    full_state: dict[str, torch.Tensor],
    *,
    gated_mlp: bool = True,
    strict: bool = True,
) -> list[str]:
    """Copy canonical full tensors into this rank's shards; return the names loaded.

    With ``strict`` every local parameter must find its tensor (ValueError listing the
    missing names); extra names in ``full_state`` (other stages' layers) are ignored.
    """
    loaded, missing = [], []
    for name, param in iter_named_local_params(chunks):
        full = full_state.get(name)
        if full is None:
            missing.append(name)
            continue
        param.copy_(shard_full_tensor(name, full.to(param.dtype), param, gated_mlp=gated_mlp))
        loaded.append(name)
    if strict and missing:
        raise ValueError(f"full state lacks tensors for local parameters: {missing}")
    return loaded


def _gather_tp(name: str, local: torch.Tensor, param: torch.Tensor, gated_mlp: bool) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return local
    _, size = _tp()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return assemble_tp_parts(name, parts, int(param.partition_dim), gated_mlp=gated_mlp)


@torch.no_grad()
def gather_tp_full(
    chunks: Iterable[torch.nn.Module], *, grads: bool = False, gated_mlp: bool = True
) -> dict[str, torch.Tensor]:
    """Canonical full tensors (TP gathered) of this rank's pipeline stage.

    Collective over the TP group: every TP rank must call it. With ``grads=True`` the
    gradients (``main_grad`` under Megatron DDP, else ``.grad``) are gathered instead of
    the weights; parameters without a gradient are skipped. Merge the dicts of all
    pipeline stages to get the whole model.
    """
    out: dict[str, torch.Tensor] = {}
    for name, param in iter_named_local_params(chunks):
        if grads:
            local = getattr(param, "main_grad", None)
            if local is None:
                local = param.grad
            if local is None:
                continue
        else:
            local = param.data
        out[name] = _gather_tp(name, local.detach(), param, gated_mlp).clone()
    return out


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., V/TP] over TP into [..., V] (no grad)."""
    from megatron.core import parallel_state as ps

    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return logits.detach().clone()
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
