"""Live export's point-to-point pairing (``convert/live_export.py``, ``_pieces``) at TP
sizes the gloo tests cannot afford on 2 cores (TP 4 and 8).

Every TP rank > 0 sends the pieces ``_pieces`` lists for its real shard; TP rank 0 posts
the receives ``_pieces`` lists for a *meta* shard of the same shape. This simulates the
transfers in that order, one send matched with one receive, and checks what a real
run relies on: the two lists pair up piece by piece with equal shapes (NCCL and gloo
match messages by order per peer, never by shape), every receive destination is
contiguous or fits the receive temporaries, and the pieces of all ranks rebuild every HF
tensor exactly once. Oracle: the HF tensors themselves, sharded the way Megatron shards
(``ModelMapping.to_megatron``, then TP chunks: QKV by query groups, ``[gate_r; up_r]``,
padded vocabulary rows, row-parallel columns).
"""

import math

import pytest
import torch

from megatron_alp.convert import model_mapping
from megatron_alp.convert.live_export import _hf_views, _pieces
from megatron_alp.models.tiny import tiny_hf_config


def _tp_dim(mapping, name):
    """Megatron's TP split dim of a canonical tensor; None if replicated."""
    layout = mapping.layout(name)
    if layout in ("qkv", "gate_up", "vocab"):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def _shard(mapping, name, full, rank, size, dim):
    if mapping.layout(name) == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
    return full.chunk(size, dim=dim)[rank].contiguous()


@pytest.mark.parametrize("model_type,size,heads,kv", [
    ("qwen2", 4, 8, 4),    # one query group per rank; QKV bias
    ("qwen2", 4, 8, 8),    # two groups per rank (strided q, k, v pieces)
    ("qwen3", 4, 8, 4),    # q/k norms (replicated), head_dim != hidden / heads
    ("llama", 8, 8, 8),
])
@pytest.mark.parametrize("chunk", [40, 1 << 20])  # row blocks (1-2 rows, several) / whole
def test_pieces_pair_up_and_rebuild_every_hf_tensor(model_type, size, heads, kv, chunk):
    cfg = tiny_hf_config(model_type, num_attention_heads=heads, num_key_value_heads=kv)
    mapping = model_mapping(cfg, make_vocab_size_divisible_by=128)
    g = torch.Generator().manual_seed(0)
    checked = set()
    for name in mapping.megatron_names():
        dim = _tp_dim(mapping, name)
        if dim is None or mapping.layer_of(name) not in (None, 0):
            continue
        hf = [torch.randn(mapping.hf_shape(h), generator=g) for h in mapping.hf_sources(name)]
        full = mapping.to_megatron(name, hf)
        numel = sum(t.numel() for t in hf)
        slot = torch.full((numel,), float("nan"))
        count = torch.zeros(numel)
        views = [v for _, v in _hf_views(mapping, name, slot)]
        counts = [v for _, v in _hf_views(mapping, name, count)]
        meta_views = [v for _, v in _hf_views(mapping, name, torch.empty(numel, device="meta"))]
        shard0 = _shard(mapping, name, full, 0, size, dim)
        meta_shard = torch.empty(shard0.shape, device="meta")
        for rank in range(size):
            shard = _shard(mapping, name, full, rank, size, dim)
            assert shard.shape == shard0.shape, name  # every rank's shard has one shape
            sent = _pieces(mapping, name, meta_views, shard, rank, size, dim, chunk)
            posted = _pieces(mapping, name, views, meta_shard, rank, size, dim, chunk)
            tally = _pieces(mapping, name, counts, meta_shard, rank, size, dim, chunk)
            assert len(sent) == len(posted), (name, rank)
            for (_, src), (dst, meta_src), (cnt, _) in zip(sent, posted, tally, strict=True):
                assert not src.is_meta and not dst.is_meta, name
                assert src.shape == meta_src.shape == dst.shape, (name, rank)
                if not dst.is_contiguous():  # lands in a temporary of the receiving rank
                    cols = shard.shape[1]
                    assert dim == 1 and dst.numel() <= max(1, chunk // cols) * cols, name
                dst.copy_(src)  # the transfer: send k of rank r meets receive k from r
                cnt.add_(1)
        assert torch.equal(count, torch.ones(numel)), f"{name}: elements not written exactly once"
        for (h, got), want in zip(_hf_views(mapping, name, slot), hf, strict=True):
            assert torch.equal(got, want), h
        checked.add(mapping.layout(name) + (":dim1" if dim == 1 else ""))
    assert checked >= {"qkv", "gate_up", "vocab", "copy:dim1"}, checked
