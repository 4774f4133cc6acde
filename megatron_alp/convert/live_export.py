"""Live weight export: the running, sharded model as a stream of HF-named tensor buckets.

    buffers = ExportBuffers()                    # kept by the caller from sync to sync
    for bucket in export_hf_buckets(chunks, hf_config, bucket_bytes=512 << 20, buffers=buffers):
        engine.update_weights([bucket])          # only on the sending rank (non-empty)

Every rank of the job iterates the generator in lockstep (the TP and pipeline transfers
are point to point between ranks); the buckets are non-empty only on the sending rank
(``src_rank``, global rank 0 by default), which is the only rank that holds them.

**Layout.** A bucket is one flat buffer in the engine dtype on the model's device (NCCL
rejects CPU tensors); each canonical tensor owns a slot of it holding its HF tensors one
after the other (``q, k, v``; ``gate, up``; the vocabulary without its padding rows), and
the yielded ``(hf_name, tensor)`` pairs are views of that buffer. The plan (names, owners,
bucket boundaries, slot offsets) is computed by every rank before a byte moves.

**Transfers.** For each bucket, on every pipeline stage that owns tensors of it (virtual
stages included; the first data/context-parallel replica), tensor by tensor in streaming
order (embedding, layers, final norm, head):

1. TP ranks > 0 cast their shard to the engine dtype piece by piece (a QKV shard already
   split into its q, k, v rows, a gated ``linear_fc1`` shard into its gate and up rows, a
   row-parallel shard into row blocks) and send each piece to TP rank 0 (``isend``); they
   cast the next tensor while the previous one is in flight (two staging areas in turn);
2. TP rank 0 posts the receives as far ahead in the bucket as it can — straight into
   the pieces' places when those are contiguous (dim-0 shards: embedding, head, QKV,
   gate/up), into a few small temporaries otherwise (row blocks of dim-1, row-parallel
   shards, copied in when they arrive) — and casts its *own* shard into place while they
   are in flight;
3. the sending rank posts the receives of the other stages' tensors straight into their
   slots at the start of the bucket; those stages fill a staging buffer laid out the
   same way and send each slot as soon as it is complete.

Extra memory on the sending rank: one bucket buffer plus, with TP > 1, four receive
temporaries of 1/32 of a bucket each (1.125 x the largest bucket at most).

**Buffer contract.** By default every bucket gets a fresh buffer: the tensors stay
valid, and a kept tensor keeps its whole bucket's buffer alive. With an
:class:`ExportBuffers` (``buffers=``) one buffer serves every bucket and every later
export: *a bucket's tensors are valid only until the consumer asks for the next bucket*;
a consumer that keeps tensors must copy them (the engines' ``update_weights`` copy or
broadcast each bucket, synchronously, before taking the next one).

ALP parameters (``is_alp_param``) are never sent. A bucket is emitted before it would
exceed ``bucket_bytes`` (counted on the canonical tensor in the engine dtype, padded
vocabulary included: an upper bound of what the bucket holds); a single tensor larger
than the bound (a 7B model's embedding and output layer, 1.09 GB in bf16) travels
alone, in a bucket of its own size. The largest bucket is therefore
``max(bucket_bytes, largest tensor)``, and that is the bound of the memory above.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_alp.convert.mapping import ModelMapping, get_mapping, is_alp_param
from megatron_alp.models.hf import gpt_args_from_hf
from megatron_alp.models.sharding import iter_named_local_params

__all__ = ["DEFAULT_BUCKET_BYTES", "ExportBuffers", "ExportPlan", "export_hf_buckets", "plan_export"]

DEFAULT_BUCKET_BYTES = 512 << 20
"""The bucket bound the trainer's weight sync uses (a larger tensor gets a bucket of its own)."""


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
    """Upper bound of each tensor's bytes in the engine dtype (canonical, padded)."""
    offset: tuple[int, ...]
    """Element offset of each tensor's slot in its bucket's buffer."""
    numel: tuple[int, ...]
    """Elements of each tensor's slot: its HF tensors (vocabulary padding excluded)."""
    bucket_numel: tuple[int, ...]
    """Elements of each bucket's buffer."""


def _mapping(chunks: Sequence[torch.nn.Module], hf_config: Any) -> ModelMapping:
    args = gpt_args_from_hf(hf_config)
    inner = chunks[0]
    while hasattr(inner, "module") and not hasattr(inner, "vocab_size"):
        inner = inner.module
    return ModelMapping(get_mapping(args.model_type), args, padded_vocab=int(inner.vocab_size))


def _hf_numel(mapping: ModelMapping, name: str) -> int:
    return sum(math.prod(mapping.hf_shape(h)) for h in mapping.hf_sources(name))


def plan_export(
    chunks: Sequence[torch.nn.Module],
    mapping: ModelMapping,
    *,
    dtype: torch.dtype,
    bucket_bytes: int,
) -> tuple[ExportPlan, dict[str, torch.nn.Parameter]]:
    """Names, owners, bucket boundaries and slots (collective over the pipeline group)."""
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
    sizes, buckets, offsets, numels, bucket_numel = [], [], [], [], [0]
    used = 0
    if bucket_bytes < 1:
        raise ValueError(f"live export: bucket_bytes={bucket_bytes} is invalid; expected >= 1")
    for n in names:
        size = elem * math.prod(mapping.megatron_shape(n))
        # A tensor larger than the bound travels alone, in a bucket of its own size: a 7B
        # model's vocabulary tensors (1.09 GB in bf16) exceed the 512 MiB default.
        if used and used + size > bucket_bytes:
            used = 0
            bucket_numel.append(0)
        numel = _hf_numel(mapping, n)
        sizes.append(size)
        buckets.append(len(bucket_numel) - 1)
        offsets.append(bucket_numel[-1])
        numels.append(numel)
        bucket_numel[-1] += numel
        used += size
    plan = ExportPlan(
        tuple(names), tuple(owners_of[n] for n in names), tuple(buckets), tuple(sizes),
        tuple(offsets), tuple(numels), tuple(bucket_numel),
    )
    return plan, local


def _hf_views(mapping: ModelMapping, name: str, slot: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of ``name`` as views of its flat slot, one after the other."""
    out, at = [], 0
    for h in mapping.hf_sources(name):
        shape = mapping.hf_shape(h)
        n = math.prod(shape)
        out.append((h, slot[at : at + n].view(shape)))
        at += n
    assert at == slot.numel(), (name, at, slot.numel())
    return out


_CHUNKS_PER_BUCKET = 32
"""Receive temporaries are 1/32 of a bucket each; ``_TEMPS`` of them: 1/8 of a bucket."""
_TEMPS = 4


def _chunk_numel(bucket_bytes: int, dtype: torch.dtype) -> int:
    """Elements per receive temporary: a dim-1 shard travels in row blocks of at most this
    size (at least one row), so the temporaries stay a small fraction of a bucket."""
    elem = torch.empty((), dtype=dtype).element_size()
    return max(1, bucket_bytes // (_CHUNKS_PER_BUCKET * elem))


def _pieces(
    mapping: ModelMapping,
    name: str,
    views: Sequence[torch.Tensor],
    shard: torch.Tensor,
    rank: int,
    size: int,
    dim: int,
    chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs that put TP shard ``rank`` of ``size`` into the HF views.

    Either side may be a meta tensor of the right shape: the two ends of a transfer
    compute the same list, so the pieces pair up in order. Sources of the QKV and
    gate/up layouts are strided views of the shard; destinations are contiguous except
    for dim-1 (row-parallel) shards, which come in row blocks of at most ``chunk``
    elements (at least one row).
    """
    layout = mapping.layout(name)
    if layout == "qkv":
        # Megatron lays QKV out per query group ([q_g, k_g, v_g] for each g) and TP hands
        # whole groups to ranks, so a rank's q rows are one block of HF q (same for k, v).
        assert dim == 0, (name, dim)
        a = mapping.args
        ng, d = a.num_query_groups, a.kv_channels
        per = a.num_attention_heads // ng
        rest = tuple(shard.shape[1:])
        parts = shard.reshape(ng // size, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        out = []
        for view, part in zip(views, parts, strict=True):
            n = part.shape[0] * part.shape[1]
            out.append((view.narrow(0, rank * n, n).view(part.shape), part))
        return out
    if layout == "gate_up":
        # A shard is [gate_r; up_r]; the HF tensors are gate = [gate_0; gate_1; ...], up alike.
        assert dim == 0, (name, dim)
        half = shard.shape[0] // 2
        return [(v.narrow(0, rank * half, half), shard.narrow(0, i * half, half))
                for i, v in enumerate(views)]
    (view,) = views
    if dim == 1:
        assert layout == "copy" and shard.dim() == 2, (name, layout, tuple(shard.shape))
        rows, cols = shard.shape
        step = max(1, chunk // cols)
        dst = view.narrow(1, rank * cols, cols)
        return [(dst[a : a + step], shard[a : a + step]) for a in range(0, rows, step)]
    rows = shard.shape[0]
    lo = rank * rows
    hi = min(lo + rows, view.shape[0])  # vocabulary padding rows go nowhere
    return [(view[lo:hi], shard[: hi - lo])] if hi > lo else []


class ExportBuffers:
    """The live export's buffers, kept from one bucket to the next and from one call to
    the next.

    Pass one to :func:`export_hf_buckets` (``buffers=``): a single buffer, the size of the
    largest bucket, then serves every bucket — *a bucket's tensors are valid only until the
    consumer asks for the next bucket* — and it stays allocated, with the staging areas
    and receive temporaries, for the next export. That saves the first touch of fresh
    pages on every export on the CPU (about 0.35 s/GB on the project's machine); on the
    GPU the caching allocator would keep the blocks reserved anyway. One object serves
    one export at a time; :meth:`release` frees the memory.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The first ``numel`` elements of buffer ``key``, (re)allocated if too small or
        of another dtype or device."""
        t = self._bufs.get(key)
        if t is None or t.dtype != dtype or t.device != device or t.numel() < numel:
            self._bufs.pop(key, None)  # free the old one before making the new one
            t = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return t[:numel]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._bufs.values())

    def release(self) -> None:
        """Free every buffer (the next export allocates again)."""
        self._bufs.clear()


class _Exporter:
    """One rank's part of the transfers (see the module docstring)."""

    def __init__(self, mapping: ModelMapping, plan: ExportPlan, local: dict[str, torch.nn.Parameter],
                 *, dtype: torch.dtype, bucket_bytes: int, src_rank: int, bufs: ExportBuffers,
                 profile: dict[str, float] | None) -> None:
        from megatron.core import parallel_state as ps

        self.mapping, self.plan, self.local, self.dtype = mapping, plan, local, dtype
        self.src_rank, self.profile, self.bufs = src_rank, profile, bufs
        self.chunk = _chunk_numel(bucket_bytes, dtype)
        self.is_src = dist.get_rank() == src_rank
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_ranks = [dist.get_global_rank(self.tp_group, r) for r in range(self.tp_size)]
        self.pp_rank = pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        first_replica = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        # Every buffer lives where the model does (cuda under NCCL), not on the default
        # device: NCCL rejects CPU tensors.
        self.device = next(iter(local.values())).device
        # This rank's tensors per bucket: the ones its stage owns (first replica only).
        self.own: list[list[int]] = [[] for _ in plan.bucket_numel]
        for k, owner in enumerate(plan.owner_pp):
            if first_replica and owner == pp_rank:
                self.own[plan.bucket_of[k]].append(k)
        # A stage other than the sender's packs its tensors of a bucket into a staging
        # buffer of its own (offsets of its own), sent slot by slot to the sender.
        self.stage_offset: dict[int, int] = {}
        stage_numel = 0
        for ks in self.own:
            at = 0
            for k in ks:
                self.stage_offset[k] = at
                at += plan.numel[k]
            stage_numel = max(stage_numel, at)
        self.stage_numel = stage_numel
        self.stage_sends: list[Any] = []
        # TP ranks > 0: two areas of the largest shard, filled in turn while the other's
        # sends are in flight. TP rank 0: _TEMPS receive temporaries for the row blocks
        # of dim-1 shards, which cannot land in place.
        sharded = [local[plan.names[k]] for ks in self.own for k in ks
                   if self._split(local[plan.names[k]])[1] > 1]
        self.area_numel = max((p.numel() for p in sharded), default=0)
        self.area_sends: list[list[Any]] = [[], []]
        self.area_i = 0
        rows = [max(1, self.chunk // p.shape[1]) * p.shape[1] for p in sharded if self._split(p)[2] == 1]
        self.tmp_numel = max(rows, default=0)
        self.tmps: list[torch.Tensor] = []  # taken from bufs as the first bucket needs them

    def _split(self, param: torch.nn.Parameter) -> tuple[int, int, int]:
        """(TP rank, TP size, split dim) of a parameter; (0, 1, 0) if it is replicated."""
        if self.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
            return 0, 1, 0
        return self.tp_rank, self.tp_size, int(param.partition_dim)

    def tick(self, phase: str, t0: float) -> float:
        t = time.perf_counter()
        if self.profile is not None:
            self.profile[phase] = self.profile.get(phase, 0.0) + t - t0
        return t

    def slot_views(self, k: int, flat: torch.Tensor, offset: int) -> list[tuple[str, torch.Tensor]]:
        return _hf_views(self.mapping, self.plan.names[k], flat[offset : offset + self.plan.numel[k]])

    # -- TP ranks > 0 ------------------------------------------------------------------
    @torch.no_grad()
    def send_bucket(self, b: int) -> None:
        """Cast this rank's pieces of each tensor of bucket ``b`` and send them to TP rank 0
        (the next tensor is cast while the previous one's pieces are in flight)."""
        for k in self.own[b]:
            name = self.plan.names[k]
            param = self.local[name]
            rank, size, dim = self._split(param)
            if size == 1:
                continue  # replicated: TP rank 0 has it all
            t0 = time.perf_counter()
            meta = torch.empty(self.plan.numel[k], dtype=self.dtype, device="meta")
            views = [v for _, v in _hf_views(self.mapping, name, meta)]
            pieces = _pieces(self.mapping, name, views, param.detach(), rank, size, dim, self.chunk)
            self.area_i ^= 1
            for w in self.area_sends[self.area_i]:  # the area's previous sends are done
                w.wait()
            self.area_sends[self.area_i] = []
            t0 = self.tick("send_wait", t0)
            out, at = [], 0
            for _, src in pieces:
                if src.is_contiguous() and src.dtype == self.dtype:
                    out.append(src)  # already in the engine dtype: sent as it is
                    continue
                area = self.bufs.get(f"area{self.area_i}", self.area_numel, self.dtype, self.device)
                t = area[at : at + src.numel()].view(src.shape)
                t.copy_(src)  # cast (and split) in one pass
                at += src.numel()
                out.append(t)
            t0 = self.tick("send_cast", t0)
            self.area_sends[self.area_i] = [
                dist.isend(t, dst=self.tp_ranks[0], group=self.tp_group) for t in out
            ]
            self.tick("send_post", t0)

    # -- TP rank 0 ---------------------------------------------------------------------
    def fill_bucket(self, b: int, views_of: dict[int, list[torch.Tensor]]) -> None:
        """This stage's tensors of bucket ``b`` into their views: the other TP ranks'
        pieces are received (posted as far ahead in the bucket as the temporaries allow)
        while this rank casts its own shard into place; a stage other than the sender's
        then sends each finished slot to it."""
        ks = self.own[b]
        remote = self._remote_pieces(ks, views_of)
        nxt = next(remote, None)
        # (tensor, work, strided destination or None, temporary, its index)
        pending: list[tuple[int, Any, torch.Tensor | None, torch.Tensor | None, int]] = []
        free = list(range(len(self.tmps)))
        head = 0

        def post() -> None:
            nonlocal nxt
            t0 = time.perf_counter()
            while nxt is not None:
                k, r, dst, shape = nxt
                i = -1
                if dst.is_contiguous():
                    t, keep = dst, None
                else:
                    if not free and len(self.tmps) < _TEMPS:
                        self.tmps.append(self.bufs.get(f"tmp{len(self.tmps)}", self.tmp_numel,
                                                       self.dtype, self.device))
                        free.append(len(self.tmps) - 1)
                    if not free:
                        break  # posted in order: wait for a temporary to come back
                    i = free.pop()
                    t = keep = self.tmps[i][: math.prod(shape)].view(shape)
                work = dist.irecv(t, src=self.tp_ranks[r], group=self.tp_group)
                pending.append((k, work, None if keep is None else dst, keep, i))
                nxt = next(remote, None)
            self.tick("recv_post", t0)

        for k in ks:
            post()
            t0 = time.perf_counter()
            param = self.local[self.plan.names[k]]
            _, size, dim = self._split(param)
            for dst, src in _pieces(self.mapping, self.plan.names[k], views_of[k], param.detach(),
                                    0, size, dim, self.chunk):
                dst.copy_(src)  # cast into place while the other shards travel
            t0 = self.tick("cast", t0)
            while head < len(pending) and pending[head][0] == k:
                _, work, dst, t, i = pending[head]
                pending[head] = (k, None, None, None, -1)  # drop references as we go
                head += 1
                work.wait()
                t0 = self.tick("tp_wait", t0)
                if dst is not None:
                    dst.copy_(t)
                    free.append(i)
                    t0 = self.tick("tp_copy", t0)
                    post()
            if not self.is_src:
                slot = self.stage_buf()[self.stage_offset[k] : self.stage_offset[k] + self.plan.numel[k]]
                self.stage_sends.append(dist.isend(slot, dst=self.src_rank))
        assert nxt is None and head == len(pending), (b, head, len(pending))

    def _remote_pieces(self, ks: list[int], views_of: dict[int, list[torch.Tensor]]) -> Iterator[Any]:
        """(tensor, TP rank, destination, shape) of every piece other ranks send, in order."""
        for k in ks:
            name = self.plan.names[k]
            param = self.local[name]
            _, size, dim = self._split(param)
            if size == 1:
                continue
            shard = torch.empty(param.shape, dtype=self.dtype, device="meta")
            for r in range(1, size):
                for dst, src in _pieces(self.mapping, name, views_of[k], shard, r, size, dim, self.chunk):
                    yield k, r, dst, tuple(src.shape)

    @torch.no_grad()
    def stage_bucket(self, b: int) -> None:
        """TP rank 0 of a stage other than the sender's: fill and send its slots of ``b``."""
        if not self.own[b]:
            return
        views_of = {k: [v for _, v in self.slot_views(k, self.stage_buf(), self.stage_offset[k])]
                    for k in self.own[b]}
        self.fill_bucket(b, views_of)
        t0 = time.perf_counter()
        for w in self.stage_sends:  # the staging buffer is refilled by the next bucket
            w.wait()
        self.stage_sends = []
        self.tick("stage_wait", t0)

    @torch.no_grad()
    def src_bucket(self, b: int, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The sending rank: bucket ``b`` filled into ``flat``, as (HF name, view) pairs."""
        t0 = time.perf_counter()
        plan = self.plan
        bucket: list[tuple[str, torch.Tensor]] = []
        views_of: dict[int, list[torch.Tensor]] = {}
        received = []
        for k in (k for k, kb in enumerate(plan.bucket_of) if kb == b):
            views = self.slot_views(k, flat, plan.offset[k])
            bucket.extend(views)
            if plan.owner_pp[k] == self.pp_rank:
                views_of[k] = [v for _, v in views]
            else:
                # The holder is the owner stage's rank in src's own pipeline group (same
                # TP rank 0, same replica); its staging slot has this slot's layout.
                holder = dist.get_global_rank(self.pp_group, plan.owner_pp[k])
                slot = flat[plan.offset[k] : plan.offset[k] + plan.numel[k]]
                received.append(dist.irecv(slot, src=holder))
        self.tick("recv_post", t0)
        self.fill_bucket(b, views_of)
        t0 = time.perf_counter()
        for w in received:
            w.wait()
        self.tick("stage_wait", t0)
        return bucket

    def stage_buf(self) -> torch.Tensor:
        return self.bufs.get("stage", self.stage_numel, self.dtype, self.device)

    def drain(self) -> None:
        t0 = time.perf_counter()
        for sends in self.area_sends:
            for w in sends:
                w.wait()
        self.area_sends = [[], []]
        self.tick("drain", t0)


def export_hf_buckets(
    chunks: Sequence[torch.nn.Module],
    hf_config: Any,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    src_rank: int = 0,
    buffers: ExportBuffers | None = None,
    profile: dict[str, float] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (HF name, full tensor) pairs; see the module docstring.

    Collective: every rank must exhaust the generator, with the same arguments. Only
    ``src_rank`` gets non-empty buckets; their tensors are views of one flat buffer per
    bucket, on the model's device: a fresh one per bucket by default, the one kept in
    ``buffers`` if given — a bucket's tensors are then overwritten once the next bucket
    is asked for (copy what you keep; see :class:`ExportBuffers`). ``chunks`` are this
    rank's model chunks (bare or DDP-wrapped). ``profile``, if given, accumulates this
    rank's seconds per phase (casts, waits, ...).
    """
    from megatron.core import parallel_state as ps

    mapping = _mapping(chunks, hf_config)
    plan, local = plan_export(chunks, mapping, dtype=dtype, bucket_bytes=bucket_bytes)
    first_replica = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    is_src = dist.get_rank() == src_rank
    tp_first = ps.get_tensor_model_parallel_rank() == 0
    if is_src and not (first_replica and tp_first):
        raise ValueError(
            f"live export: src_rank={src_rank} must be a TP-rank-0 rank of the first "
            "data/context-parallel replica (global rank 0 always is)"
        )
    ex = _Exporter(mapping, plan, local, dtype=dtype, bucket_bytes=bucket_bytes, src_rank=src_rank,
                   bufs=buffers if buffers is not None else ExportBuffers(), profile=profile)
    for b, numel in enumerate(plan.bucket_numel):
        if not is_src:
            if tp_first:
                ex.stage_bucket(b)
            else:
                ex.send_bucket(b)
            if b == len(plan.bucket_numel) - 1:
                ex.drain()  # before the last yield: a consumer need not ask past it
            yield []
            continue
        t0 = time.perf_counter()
        if buffers is None:
            flat = torch.empty(numel, dtype=dtype, device=ex.device)
        else:
            flat = buffers.get("bucket", max(plan.bucket_numel), dtype, ex.device)[:numel]
        ex.tick("alloc", t0)
        bucket = ex.src_bucket(b, flat)
        del flat
        if b == len(plan.bucket_numel) - 1:
            ex.drain()
        yield bucket
        # The bucket is the only reference to its buffer here: a fresh buffer is made
        # only after the consumer let go of this one (1 bucket alive, not 2). For the same
        # reason the generator is not decorated with torch.no_grad(): its wrapper holds
        # the last value yielded while it makes the next one (the methods are).
        del bucket
