"""HF safetensors folder -> Megatron dist checkpoint (torch_dist), streamed.

    report = convert_hf_to_megatron("Qwen2.5-7B/", "ckpt/qwen2.5-7b", dtype=None)

Every check runs before anything is written: the model type has a mapping, every
expected tensor exists with the expected shape, no tensor is left unmapped. The
checkpoint is then written chunk by chunk (one layer's tensor, or a row block of the
embedding / output layer, at a time) into a temporary folder that is renamed into place
at the end. Beside the weights: ``hf/`` (config, tokenizer, generation config) and
``megatron_alp_convert.json`` (provenance). The result loads with
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` under any TP / PP /
virtual PP whose vocabulary padding matches (see :func:`load_megatron_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_alp.convert.dist_ckpt import (
    ChunkWrite,
    checkpoint_key,
    extra_state_keys,
    write_dist_checkpoint,
)
from megatron_alp.convert.checks import check_hf_folder
from megatron_alp.convert.io_utils import (
    HF_ASSETS_DIR,
    PROVENANCE_FILE,
    copy_hf_assets,
    dtype_name,
    load_hf_config,
    parse_dtype,
)
from megatron_alp.convert.mapping import ModelMapping, get_mapping
from megatron_alp.convert.safetensors_io import HFSafetensors
from megatron_alp.io_safety import atomic_output_dir, check_output
from megatron_alp.models.hf import gpt_args_from_hf

__all__ = ["ConversionReport", "all_finite", "check_weights", "convert_hf_to_megatron", "plan_chunks"]

TOOL = "hf_to_megatron"
"""Name in the output marker: ``--force`` replaces only a folder this tool wrote."""

DEFAULT_BLOCK_BYTES = 64 * 1024**2
"""Row blocks of the embedding / output layer are at most this big (bounds memory)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ConversionReport:
    """What a conversion did (returned by both converters)."""

    source: str
    target: str
    model_type: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Where the time went, where the converter measures it (HF -> Megatron: ``fill``,
    ``wait``, ``write``, ``fsync`` of the writer, ``setup`` before it, ``finish`` after)."""

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


def _check_model_type(folder: Path, *, flag: str = "--hf") -> None:
    get_mapping(check_hf_folder(folder, flag=flag)["model_type"])  # ValueError listing the supported types


def check_weights(
    t: torch.Tensor, name: str, where: str, *, allow_non_float: bool, allow_non_finite: bool
) -> None:
    """Refuse a weight that is not floating point, or holds NaN / inf, unless allowed:
    either is almost always a broken or quantised checkpoint, not a model to train."""
    if not t.is_floating_point():
        if not allow_non_float:
            raise ValueError(
                f"tensor {name} in {where} is {dtype_name(t.dtype)}, expected a floating-point "
                "weight (a quantised checkpoint? dequantise it first, e.g. tools/convert/"
                "gguf_to_hf.py); pass --allow-non-float to convert it anyway"
            )
        return
    if allow_non_finite or all_finite(t):
        return
    finite = torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    inf = int(t.numel() - finite.sum()) - nan
    raise ValueError(
        f"tensor {name} in {where} holds {nan} NaN and {inf} inf values (expected finite "
        "weights); pass --allow-non-finite to convert it anyway"
    )


def all_finite(t: torch.Tensor) -> bool:
    """True if no element of floating-point ``t`` is NaN or +-inf.

    ``aminmax`` propagates NaN and returns +-inf when either is present, and reads the
    tensor once without allocating (``isfinite(t).all()`` writes a bool tensor as large as
    ``t``: 5x slower on bf16). Dtypes without a CPU ``aminmax`` (float8) use ``isfinite``.
    """
    if t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def validate_hf_checkpoint(mapping: ModelMapping, hf: HFSafetensors) -> None:
    """Every tensor the model needs exists with its shape; nothing is left unmapped."""
    for name in mapping.hf_names():
        if name not in hf:
            raise ValueError(
                f"HF checkpoint {hf.folder} lacks tensor {name!r}, which a "
                f"{mapping.model_type} model of this config.json needs"
            )
        info = hf.info(name)
        want = mapping.hf_shape(name)
        if info.shape != want:
            raise ValueError(
                f"shape mismatch: tensor {name} in {info.file} has shape {info.shape}, "
                f"config.json implies {want}"
            )
    unknown = []
    for name in hf.names():
        try:
            mapping.hf_target(name)
        except KeyError:
            unknown.append(name)
    if unknown:
        where = hf.info(unknown[0]).file
        raise ValueError(
            f"HF checkpoint {hf.folder} has {len(unknown)} tensor(s) that the "
            f"{mapping.model_type} mapping does not know, e.g. {unknown[0]!r} in {where}: "
            f"{unknown[:5]} (wrong config.json, or an architecture variant that is not supported)"
        )


def plan_chunks(
    mapping: ModelMapping,
    read_into: Callable[[str, torch.Tensor, tuple[int, int]], None],
    dtype_of: Callable[[str], torch.dtype],
    *,
    dtype: torch.dtype | None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> list[ChunkWrite]:
    """The dist-checkpoint chunks of a whole model, each filled from HF tensors on demand.

    ``read_into(hf_name, out, (r0, r1))`` reads rows ``[r0, r1)`` of an HF tensor into
    ``out`` (contiguous, the stored dtype); ``dtype_of(hf_name)`` is that stored dtype
    (kept when ``dtype`` is None). A canonical tensor that is a stack of whole HF tensors
    (:meth:`ModelMapping.row_pieces`: gate / up, copies, the vocabulary) becomes one chunk
    per HF tensor, in row blocks of at most ``block_bytes`` outside the layers, plus a zero
    chunk for the vocabulary padding; QKV is one chunk per layer. Every chunk is filled by
    reading the HF rows straight into their place (:meth:`ModelMapping.row_map`: QKV is
    three runs of rows per query group), so nothing is concatenated or copied twice.
    """
    L = mapping.args.num_layers
    chunks: list[ChunkWrite] = []
    for name in mapping.megatron_names():
        key, layer = checkpoint_key(name)
        shape = mapping.megatron_shape(name)
        sources = mapping.hf_sources(name)
        out_dtype = dtype or dtype_of(sources[0])
        runs = mapping.row_map(name)
        # Layers are stacked along a leading axis of size L.
        lead = (layer,) if layer is not None else ()
        global_shape = (L, *shape) if layer is not None else shape
        rest0 = (0,) * (len(shape) - 1)

        def add(row0: int, rows: int) -> None:
            chunks.append(
                ChunkWrite(
                    key=key,
                    global_shape=global_shape,
                    offsets=(*lead, row0, *rest0),
                    sizes=(*((1,) if lead else ()), rows, *shape[1:]),
                    dtype=out_dtype,
                    fill=functools.partial(
                        _fill_rows, row0=row0, runs=runs, lead=bool(lead),
                        read_into=read_into, dtype_of=dtype_of,
                    ),
                )
            )

        pieces = mapping.row_pieces(name)
        if pieces is None:  # QKV: interleaved per query group, one chunk
            add(0, shape[0])
            continue
        row_bytes = torch.empty((), dtype=out_dtype).element_size()
        for s in shape[1:]:
            row_bytes *= s
        step = max(1, block_bytes // row_bytes) if not lead else None
        end = 0
        for hf_name, row0 in pieces:
            n = mapping.hf_shape(hf_name)[0]
            block = n if step is None else step
            for r in range(0, n, block):
                add(row0 + r, min(r + block, n) - r)
            end = row0 + n
        if end < shape[0]:  # vocabulary padding: zeros
            add(end, shape[0] - end)
    return chunks


CAST_BLOCK_BYTES = 16 * 1024**2
"""A cast reads the source dtype through a scratch tensor of at most this size."""


def _fill_rows(
    out: torch.Tensor,
    *,
    row0: int,
    runs: list[tuple[str, int, int, int]],
    lead: bool,
    read_into: Callable[[str, torch.Tensor, tuple[int, int]], None],
    dtype_of: Callable[[str], torch.dtype],
) -> None:
    """Fill ``out`` = canonical rows ``[row0, row0 + len)`` (under a leading layer axis of
    1 if ``lead``) from the HF row runs that overlap them; rows no run covers are zeros."""
    if lead:
        out = out[0]
    rows, rest = out.shape[0], tuple(out.shape[1:])
    covered = 0
    for hf_name, a, b, dst in runs:
        covered = max(covered, dst + b - a)
        lo, hi = max(dst, row0), min(dst + b - a, row0 + rows)
        if lo >= hi:
            continue
        dest = out[lo - row0 : hi - row0]
        s0, s1 = a + lo - dst, a + hi - dst
        src_dtype = dtype_of(hf_name)
        if src_dtype == out.dtype:
            read_into(hf_name, dest, (s0, s1))
            continue
        row_bytes = torch.empty((), dtype=src_dtype).element_size()
        for s in rest:
            row_bytes *= s
        step = max(1, CAST_BLOCK_BYTES // max(row_bytes, 1))
        for r in range(s0, s1, step):
            r1 = min(r + step, s1)
            tmp = torch.empty((r1 - r, *rest), dtype=src_dtype)
            read_into(hf_name, tmp, (r, r1))
            dest[r - s0 : r1 - s0].copy_(tmp)
    if covered < row0 + rows:  # vocabulary padding
        out[max(covered, row0) - row0 :].zero_()


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
    thread_count: int = 1,
    make_vocab_size_divisible_by: int = 128,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    allow_non_float: bool = False,
    allow_non_finite: bool = False,
    direct_io: str = "auto",
    say: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert an HF folder into a Megatron dist checkpoint at ``out_dir`` (see module doc).

    ``dtype`` None keeps each tensor's stored dtype; ``"bf16"`` / ``"fp32"`` / ``"fp16"``
    cast. ``force`` replaces an earlier output of this converter (never anything else; see
    :mod:`megatron_alp.io_safety`). ``thread_count`` threads read and assemble chunks
    while the calling thread writes (``thread_count + 1`` chunk buffers). Integer / NaN / inf weights are refused unless ``allow_non_float`` /
    ``allow_non_finite``. ``direct_io``: ``"auto"`` writes with O_DIRECT where the file
    system accepts it, ``"on"`` requires it, ``"off"`` always writes through the page cache
    (for file systems whose O_DIRECT misbehaves). ``say`` receives notes (stale temporary folders removed).
    Raises ValueError naming the file / tensor / value for bad input.
    """
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    out_dtype = parse_dtype(dtype)
    if not isinstance(thread_count, int) or thread_count < 1:
        raise ValueError(f"--threads={thread_count!r}: expected a positive integer")
    direct = {"auto": None, "on": True, "off": False}.get(direct_io, "bad")
    if direct == "bad":
        raise ValueError(f"--direct-io={direct_io!r}: expected auto, on or off")
    if not isinstance(make_vocab_size_divisible_by, int) or make_vocab_size_divisible_by < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by={make_vocab_size_divisible_by!r}: expected a positive integer"
        )
    _check_model_type(hf_dir)
    target = check_output(out_dir, tool=TOOL, inputs=[hf_dir], force=force)
    config = load_hf_config(hf_dir, flag="--hf", plain=True)
    args = gpt_args_from_hf(config)
    mapping = ModelMapping(
        get_mapping(args.model_type), args, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    hf = HFSafetensors(hf_dir)
    validate_hf_checkpoint(mapping, hf)
    if not allow_non_float:  # from the headers, before anything is written
        for name in mapping.hf_names():
            info = hf.info(name)
            check_weights(torch.empty(0, dtype=info.dtype), name, str(info.file),
                          allow_non_float=False, allow_non_finite=True)

    read_bytes = 0
    count_lock = threading.Lock()

    def read_into(name: str, out: torch.Tensor, rows: tuple[int, int]) -> None:
        nonlocal read_bytes
        hf.read_into(name, out, rows)
        check_weights(out, name, str(hf.info(name).file),
                      allow_non_float=allow_non_float, allow_non_finite=allow_non_finite)
        with count_lock:  # called from the writer's producer threads
            read_bytes += out.numel() * out.element_size()

    chunks = plan_chunks(
        mapping, read_into, lambda n: hf.info(n).dtype, dtype=out_dtype, block_bytes=block_bytes
    )
    objects = {k: None for k in extra_state_keys(mapping.megatron_names(), args.num_layers)}
    total = sum(c.nbytes for c in chunks)
    with atomic_output_dir(target, expected_bytes=total, say=say) as tmp:
        bar = _progress(total, f"hf->megatron {hf_dir.name}", progress)
        try:
            with _single_threaded_torch():
                t_write = time.perf_counter()
                timings = write_dist_checkpoint(
                    tmp, chunks, objects, thread_count=thread_count, direct=direct,
                    on_chunk=(lambda c: bar.update(c.nbytes)) if bar is not None else None,
                )
        finally:
            hf.close()
            if bar is not None:
                bar.close()
        t_written = time.perf_counter()
        copy_hf_assets(hf_dir, tmp / HF_ASSETS_DIR)
        provenance = {
            "format": "megatron_alp.convert/1",
            "direction": "hf_to_megatron",
            "source": str(hf_dir.absolute()),
            "model_type": args.model_type,
            "dtype": dtype_name(out_dtype) if out_dtype else "source",
            "stored_dtypes": sorted({dtype_name(c.dtype) for c in chunks}),
            "num_layers": args.num_layers,
            "vocab_size": args.vocab_size,
            "padded_vocab_size": mapping.padded_vocab,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "tie_word_embeddings": args.tie_word_embeddings,
            "hf_assets": HF_ASSETS_DIR,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return ConversionReport(
        source=str(hf_dir),
        target=str(target.path),
        model_type=args.model_type,
        tensors=len(mapping.megatron_names()),
        bytes_read=read_bytes,
        bytes_written=total,
        seconds=time.perf_counter() - t0,
        timings={"setup": t_write - t0, **timings, "finish": time.perf_counter() - t_written},
    )


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """torch ops on one thread each while converting: the checks and casts run on chunks
    of 1-50 MB in producer threads beside the writing thread, where intra-op threads only
    contend (measured on 2 cores: ``aminmax`` of an 8 MB bf16 tensor at 0.7 GB/s with 2
    threads, 24 GB/s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("megatron-core", "torch", "transformers", "megatron-alp"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


PROGRESS_MIN_BYTES = 256 * 1024**2
"""Smaller conversions take a second or two: no progress bar."""


class _Bar:
    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         leave=False)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress(total: int, desc: str, enabled: bool) -> _Bar | None:
    """A byte progress bar on stderr for conversions of at least PROGRESS_MIN_BYTES."""
    return _Bar(total, desc) if enabled and total >= PROGRESS_MIN_BYTES else None
