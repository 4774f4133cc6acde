"""Megatron dist checkpoints (``torch_dist``) written and read one chunk at a time.

A Megatron dist checkpoint is a torch.distributed.checkpoint (DCP) folder (``.metadata``
plus ``__*_*.distcp`` data files) and Megatron's ``metadata.json``. Keys are the
``ShardedTensor`` keys of ``GPTModel.sharded_state_dict()``: the decoder layers are
stacked, ``decoder.layers.<module>.<param>`` with a leading layer axis of size
``num_layers``, and the pre-attention / pre-MLP norms carry their Transformer Engine
names (``self_attention.linear_qkv.layer_norm_weight``, megatron-core's
``sharded_state_dict_keys_map``). Every global tensor is stored as chunks; DCP reshards
on load, so one set of chunks serves any TP / PP / virtual-PP layout.

The writer drives DCP with a planner that *fills* each chunk into a buffer when the
storage writer (:class:`~megatron_alp.convert.dcp_stream.PipelinedFileSystemWriter`) asks
for it, one chunk ahead of the one being written, so a conversion holds two chunks, not
the model; the reader asks DCP for chunk-sized regions of one key. No process group is
needed for either (``no_dist``), and nothing starts a process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_alp.convert.checks import (
    MEGATRON_METADATA,
    check_dist_checkpoint_files,
    resolve_checkpoint_dir,
)
from megatron_alp.convert.dcp_stream import PipelinedFileSystemWriter
from megatron_alp.convert.mapping import TE_FUSED_NORMS

__all__ = [
    "ChunkWrite",
    "DistCheckpoint",
    "MEGATRON_METADATA",
    "checkpoint_key",
    "extra_state_keys",
    "resolve_checkpoint_dir",
    "write_dist_checkpoint",
]

COMMON_STATE_KEY = "common_state/shard_0_1"
"""Megatron keeps the non-sharded part of a state dict as one object under this key."""

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """Canonical parameter name -> (dist-checkpoint key, global layer index or None).

    ``decoder.layers.3.input_layernorm.weight`` ->
    ``("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)``.
    """
    m = _LAYER_RE.match(name)
    if not m:
        return name, None
    rest = m.group(2)
    for local, te in TE_FUSED_NORMS.items():
        if rest.startswith(local):
            rest = te + rest[len(local):]
            break
    return f"decoder.layers.{rest}", int(m.group(1))


def extra_state_keys(canonical_names: Iterable[str], num_layers: int) -> list[str]:
    """Unique keys of the ``_extra_state`` objects of the local spec's linear layers.

    megatron-core's Linear layers (``linear_qkv / linear_proj / linear_fc1 / linear_fc2``)
    each contribute a ``ShardedObject`` (value None outside FP8) stacked over layers.
    """
    modules: list[str] = []
    for name in canonical_names:
        key, layer = checkpoint_key(name)
        if layer is None or not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if module.rsplit(".", 1)[-1].startswith("linear_") and module not in modules:
            modules.append(module)
    return [
        f"{m}._extra_state/shard_{i}_{num_layers}" for i in range(num_layers) for m in modules
    ]


def _torch_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkWrite:
    """One chunk of one global tensor, filled on demand."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    fill: Callable[[torch.Tensor], None]
    """Writes the chunk's data into the given contiguous tensor (shape ``sizes``, dtype
    ``dtype``; a reused buffer: every element must be written)."""

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.sizes:
            n *= s
        return n


class _ProducingSavePlanner(DefaultSavePlanner):
    """A DCP save planner over :class:`ChunkWrite` s instead of a state dict of tensors."""

    def __init__(
        self,
        chunks: Sequence[ChunkWrite],
        objects: dict[str, Any],
        on_chunk: Callable[[ChunkWrite], None] | None,
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self._chunks) != len(chunks):
            raise AssertionError("duplicate (key, offsets) among chunks")
        self._order = list(chunks)
        self._objects = objects
        self._on_chunk = on_chunk
        self.error: BaseException | None = None
        """The producer's own exception (DCP re-wraps whatever a producer raises)."""

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects
        ]
        for c in self._order:
            items.append(
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(
                            offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)
                        ),
                        properties=TensorProperties(dtype=c.dtype),
                        size=torch.Size(c.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> io.BytesIO:
        if write_item.type != WriteItemType.BYTE_IO:
            raise AssertionError("tensor chunks are filled with fill_item, not resolve_data")
        return _torch_bytes(self._objects[write_item.index.fqn])

    def _chunk(self, write_item: WriteItem) -> ChunkWrite:
        return self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]

    def fill_item(self, write_item: WriteItem, out: torch.Tensor) -> None:
        """Fill ``out`` (the chunk's shape and dtype) with the chunk's data."""
        c = self._chunk(write_item)
        if tuple(out.shape) != tuple(c.sizes) or out.dtype != c.dtype:
            raise AssertionError(f"{c.key}@{c.offsets}: buffer {out.dtype} {tuple(out.shape)}, planned {c.dtype} {c.sizes}")
        try:
            c.fill(out)
        except BaseException as e:
            self.error = e
            raise

    def item_written(self, write_item: WriteItem) -> None:
        if self._on_chunk is not None:
            self._on_chunk(self._chunk(write_item))


def write_dist_checkpoint(
    path: str | os.PathLike,
    chunks: Sequence[ChunkWrite],
    objects: dict[str, Any],
    *,
    thread_count: int = 1,
    on_chunk: Callable[[ChunkWrite], None] | None = None,
    direct: bool | None = None,
) -> dict[str, float]:
    """Write a Megatron torch_dist checkpoint into the (existing, empty) folder ``path``.

    ``objects`` maps ShardedObject unique keys to their values (stored as
    ``torch.save([value])`` like megatron-core does); the common state is added here.
    ``thread_count`` threads fill chunks (in the order given) while the calling thread
    writes them: ``thread_count + 1`` buffers of the largest chunk are alive at most.
    ``direct``: O_DIRECT writes (None: where the file system allows them). Returns where
    the time went (:attr:`PipelinedFileSystemWriter.timings`).
    """
    import torch.distributed.checkpoint as dcp

    objs = {k: [v] for k, v in objects.items()}
    objs.setdefault(COMMON_STATE_KEY, [{}])
    planner = _ProducingSavePlanner(chunks, objs, on_chunk)
    writer = PipelinedFileSystemWriter(path, producers=thread_count, direct=direct)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException:
        if planner.error is not None:  # a bad tensor, Ctrl-C...: surface it as itself
            raise planner.error from None
        if writer.error is not None:  # a write error (disk full, O_DIRECT refused...) too
            raise writer.error from None
        raise
    Path(path, MEGATRON_METADATA).write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    return dict(writer.timings)


class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions of keys into preallocated tensors (DCP reshards)."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, (offsets, dest) in self.requests.items():
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("byte objects are read with DistCheckpoint.read_object")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][1]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, off, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class DistCheckpoint:
    """Read access to a Megatron dist checkpoint (any layout it was saved from)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_checkpoint_dir(path)
        check_dist_checkpoint_files(self.path)
        self._reader = FileSystemReader(str(self.path))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:  # a pickle / format error from torch: name the file
            raise ValueError(
                f"dist checkpoint {self.path}: .metadata cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the file is corrupt or incomplete"
            ) from None
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self._check_data_files()

    def _check_data_files(self) -> None:
        """Every data file ``.metadata`` points into exists and is long enough."""
        need: dict[str, int] = {}
        for info in (self.metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is None:
                continue
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
        for rel, end in sorted(need.items()):
            f = self.path / rel
            if not f.is_file():
                raise ValueError(
                    f"dist checkpoint {self.path}: data file {rel} is missing (listed in .metadata)"
                )
            size = f.stat().st_size
            if size < end:
                raise ValueError(
                    f"dist checkpoint {self.path}: data file {rel} has {size} bytes, .metadata "
                    f"expects at least {end}: the file is truncated"
                )

    def tensor_keys(self) -> list[str]:
        return [
            k for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        ]

    def object_keys(self) -> list[str]:
        return [
            k for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)
        ]

    def has(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"dist checkpoint {self.path} has no tensor {key!r}")
        return md

    def read(
        self,
        key: str,
        offsets: Sequence[int] | None = None,
        sizes: Sequence[int] | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of global tensor ``key`` (all of it
        by default), in the stored dtype unless ``dtype`` is given."""
        shape = self.global_shape(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        if any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, shape)):
            raise ValueError(f"{key}: region {offsets}+{sizes} outside global shape {shape}")
        dest = torch.empty(sizes, dtype=dtype or self.dtype(key))
        planner = _RegionLoadPlanner({key: (offsets, dest)})
        planner.set_up_planner({}, self.metadata, True)
        plan = self._reader.prepare_local_plan(planner.create_local_plan())
        plan = self._reader.prepare_global_plan([plan])[0]
        covered = sum(_numel(r.lengths) for r in plan.items)
        if covered != dest.numel():
            raise ValueError(
                f"dist checkpoint {self.path}: key {key} region {offsets}+{sizes} is only "
                f"partly stored ({covered} of {dest.numel()} elements)"
            )
        try:
            self._reader.read_data(plan, planner).wait()
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # torch.load of a damaged .distcp region, an I/O error...
            files = sorted({str(self.metadata.storage_data[i.storage_index].relative_path)
                            for i in plan.items if i.storage_index in self.metadata.storage_data})
            raise ValueError(
                f"dist checkpoint {self.path}: tensor {key} cannot be read from {files} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the data "
                "file is corrupt"
            ) from None
        return dest

    def read_layer(self, key: str, layer: int | None, *, dtype: torch.dtype | None = None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One layer of a stacked key (``layer`` None: an unstacked key), optionally rows
        ``[r0, r1)`` of it."""
        shape = self.global_shape(key)
        inner = shape[1:] if layer is not None else shape
        r0, r1 = rows if rows is not None else (0, inner[0] if inner else 0)
        region_off = [0] * len(inner)
        region_size = list(inner)
        if rows is not None:
            region_off[0], region_size[0] = r0, r1 - r0
        if layer is not None:
            t = self.read(key, (layer, *region_off), (1, *region_size), dtype=dtype)
            return t[0]
        return self.read(key, tuple(region_off), tuple(region_size), dtype=dtype)

    def read_object(self, unique_key: str) -> Any:
        """A ShardedObject's value (megatron-core stores a one-element list)."""
        import torch.distributed.checkpoint as dcp

        sd = {unique_key: io.BytesIO()}
        dcp.load(sd, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        value = sd[unique_key]
        if isinstance(value, io.BytesIO):
            value.seek(0)
            value = torch.load(value, weights_only=True)
        return value[0] if isinstance(value, list) and len(value) == 1 else value


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
