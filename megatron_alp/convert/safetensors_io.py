"""Streaming safetensors I/O: read an HF folder one tensor (or row range) at a time, and
write a sharded HF folder with every header laid out in advance.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page touched
stays in the process's resident set until the map is closed, so "peak RSS" of a
conversion would be the size of the checkpoint. The format is simple (8-byte header
length, JSON header, raw little-endian data), so both directions here use plain
positional reads and writes: resident memory is the tensor being converted, nothing more.
Files written here are read back by ``safetensors`` / ``transformers`` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "HFSafetensors",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "plan_shards",
]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5")


def dtype_from_safetensors(code: str, *, where: str = "") -> torch.dtype:
    if code not in _DTYPES:
        raise ValueError(f"{where}: safetensors dtype {code!r} is not supported ({sorted(_DTYPES)})")
    return _DTYPES[code]


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    return _NAMES[dtype]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset in the file."""
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def _tensor_info(path: Path, name: str, meta: object, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked: dtype, shape and ``data_offsets`` present and consistent
    with each other and with the file's size."""
    where = f"{path}: tensor {name}"
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: header entry is {meta!r}, expected an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise ValueError(f"{where}: header entry lacks {missing} (expected dtype, shape, data_offsets)")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    dtype = dtype_from_safetensors(meta["dtype"], where=where) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where}: dtype {meta['dtype']!r} is not a safetensors dtype name")
    b, e = offsets
    want = _numel(shape) * _itemsize(dtype)
    if e - b != want:
        raise ValueError(
            f"{where}: data_offsets {offsets} give {e - b} bytes, but shape {tuple(shape)} of "
            f"{meta['dtype']} needs {want} bytes"
        )
    if data_start + e > size:
        raise ValueError(
            f"{where} ends at byte {data_start + e}, beyond the end of the file ({size} bytes): "
            "the file is truncated"
        )
    return TensorInfo(name=name, file=path, dtype=dtype, shape=tuple(shape), begin=data_start + b, nbytes=want)


def _as_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class HFSafetensors:
    """The safetensors weights of an HF model folder (single file or sharded with an index).

    Construction checks that every file the index names exists and holds the tensors it
    claims, and that no file is truncated: errors name the file and tensor.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        if not self.folder.is_dir():
            raise ValueError(f"HF checkpoint folder {self.folder} does not exist")
        index = self.folder / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if index.exists():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                lost = [n for n, f in weight_map.items() if f == missing[0]]
                raise ValueError(
                    f"missing shard: {self.folder / missing[0]} is listed in {index} "
                    f"(for {len(lost)} tensors, e.g. {lost[:3]}) but does not exist"
                    + (f"; also missing: {missing[1:]}" if len(missing) > 1 else "")
                )
        elif (self.folder / SINGLE_NAME).exists():
            files = [SINGLE_NAME]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                others = [n for n in _OTHER_WEIGHTS if (self.folder / n).exists()]
                hint = (
                    f" (found {others}: only safetensors are read; re-save the model with "
                    "save_pretrained(..., safe_serialization=True))"
                    if others
                    else ""
                )
                raise ValueError(f"no *.safetensors weights in {self.folder}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = self.folder / fname
            header, data_start = _read_header(path)
            size = path.stat().st_size
            if not isinstance(header, dict):
                raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                info = _tensor_info(path, name, meta, data_start, size)
                if name in self.tensors:
                    raise ValueError(
                        f"tensor {name} appears in both {self.tensors[name].file} and {path}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                got = self.tensors.get(name)
                if got is None or got.file.name != fname:
                    raise ValueError(
                        f"{index} places tensor {name} in {fname}, but that file does not "
                        "contain it"
                    )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"HF checkpoint {self.folder} has no tensor {name!r}")
        return self.tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[r0, r1)`` along dim 0), freshly allocated."""
        info = self.info(name)
        shape = list(info.shape)
        if rows is not None:
            self._check_rows(name, rows)
            shape[0] = rows[1] - rows[0]
        out = torch.empty(shape, dtype=info.dtype)
        self.read_into(name, out, rows)
        return out

    def _check_rows(self, name: str, rows: tuple[int, int]) -> None:
        shape = self.info(name).shape
        r0, r1 = rows
        if not shape or not 0 <= r0 <= r1 <= shape[0]:
            raise ValueError(f"{name}: rows {rows} outside shape {tuple(shape)}")

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read tensor ``name`` (or its rows ``[r0, r1)``) straight into ``out``: a
        contiguous CPU tensor of the stored dtype and the matching shape. No temporary:
        the bytes go from the file into ``out``'s memory (positional reads, safe to call
        from several threads)."""
        info = self.info(name)
        offset, nbytes = info.begin, info.nbytes
        shape = list(info.shape)
        if rows is not None:
            self._check_rows(name, rows)
            r0, r1 = rows
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += r0 * row_bytes
            nbytes = (r1 - r0) * row_bytes
            shape[0] = r1 - r0
        if out.dtype != info.dtype or list(out.shape) != shape or not out.is_contiguous():
            raise AssertionError(
                f"read_into {name}: out is {out.dtype} {tuple(out.shape)} (contiguous="
                f"{out.is_contiguous()}), expected contiguous {info.dtype} {tuple(shape)}"
            )
        if not nbytes:
            return
        buf = _as_bytes(out)
        fd = self._fd(info.file)
        got = 0
        while got < nbytes:  # one read(2) returns at most ~2 GiB on Linux: loop
            n = os.preadv(fd, [buf[got:]], offset + got)
            if not n:
                break
            got += n
        if got != nbytes:
            raise ValueError(
                f"{info.file}: short read of tensor {name}: expected {nbytes} bytes at offset "
                f"{offset}, got {got} (the file changed or is truncated)"
            )

    def _fd(self, path: Path) -> int:
        """One read-only descriptor per file, opened on first use (closed by :meth:`close`)."""
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):  # larger read-ahead for streaming reads
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        """Close the file descriptors :meth:`read` opened (reading again reopens them)."""
        with self._fd_lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> "HFSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def plan_shards(
    sizes: Sequence[tuple[str, int]], max_shard_bytes: int
) -> list[list[str]]:
    """Split tensors (in order) into shards of at most ``max_shard_bytes`` (HF's rule: a
    tensor larger than the limit gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_bytes} bytes")
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


class ShardedSafetensorsWriter:
    """Writes an HF folder's weights tensor by tensor, with all headers fixed up front.

    ``tensors`` gives every (name, shape, dtype) in file order. Files are created at
    their final size when the writer opens; :meth:`write` places bytes at their offset, in
    any order, whole tensors or row ranges. :meth:`close` checks that every byte was
    written and writes ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        specs = list(tensors)
        self._spec = {n: (tuple(s), d) for n, s, d in specs}
        if len(self._spec) != len(specs):
            raise ValueError("ShardedSafetensorsWriter: duplicate tensor names")
        nbytes = {n: _numel(s) * _itemsize(d) for n, s, d in specs}
        shards = plan_shards([(n, nbytes[n]) for n, _, _ in specs], max_shard_bytes)
        count = len(shards)
        self.files: list[Path] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (file idx, begin, nbytes)
        self._written: dict[str, int] = {}
        self._header_lens: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = sum(nbytes.values())
        for idx, names in enumerate(shards):
            fname = SINGLE_NAME if count == 1 else f"model-{idx + 1:05d}-of-{count:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
            pos = 0
            for n in names:
                shape, dtype = self._spec[n]
                header[n] = {
                    "dtype": dtype_to_safetensors(dtype),
                    "shape": list(shape),
                    "data_offsets": [pos, pos + nbytes[n]],
                }
                pos += nbytes[n]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            path = self.folder / fname
            with open(path, "wb") as f:
                # Header length 0 until close(): a file left by a killed run is not a
                # valid safetensors file, whatever its size.
                f.write(struct.pack("<Q", 0))
                f.write(raw)
                f.truncate(start + pos)
            self._header_lens.append(len(raw))
            for n in names:
                b, _ = header[n]["data_offsets"]  # type: ignore[index]
                self._where[n] = (idx, start + b, nbytes[n])
                self.weight_map[n] = fname
            self.files.append(path)
        self._handles = [open(p, "r+b", buffering=0) for p in self.files]

    def write(self, name: str, tensor: torch.Tensor, *, row_offset: int | None = None) -> None:
        """Write ``tensor`` as ``name`` (cast to the planned dtype), or rows of it.

        With ``row_offset``, ``tensor`` holds rows ``[row_offset, row_offset + len)``.
        """
        if name not in self._spec:
            raise KeyError(f"ShardedSafetensorsWriter: {name!r} was not planned")
        shape, dtype = self._spec[name]
        idx, begin, nbytes = self._where[name]
        t = tensor.detach().to(dtype)
        if row_offset is None:
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, planned {shape}")
            offset = begin
        else:
            if tuple(t.shape[1:]) != shape[1:] or row_offset + t.shape[0] > shape[0]:
                raise ValueError(
                    f"{name}: rows [{row_offset}, {row_offset + t.shape[0]}) of shape "
                    f"{tuple(t.shape)} do not fit planned shape {shape}"
                )
            offset = begin + row_offset * (nbytes // shape[0])
        data = _as_bytes(t)
        f = self._handles[idx]
        f.seek(offset)
        done = 0
        while done < len(data):
            done += f.write(data[done:])
        self._written[name] = self._written.get(name, 0) + len(data)

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error wins; the folder is discarded by the caller
            for f in self._handles:
                f.close()
            self._handles = []

    def close(self) -> list[Path]:
        """Check completeness, write the header lengths (0 until now), fsync, write the
        index; returns the files written."""
        short = [n for n, (_, _, nb) in self._where.items() if self._written.get(n, 0) != nb]
        if short:
            for f in self._handles:
                f.close()
            self._handles = []
            raise RuntimeError(f"safetensors writer: {len(short)} tensors not fully written, e.g. {short[:3]}")
        for f, n in zip(self._handles, self._header_lens):
            f.seek(0)
            f.write(struct.pack("<Q", n))
            os.fsync(f.fileno())
            f.close()
        self._handles = []
        out = list(self.files)
        if len(self.files) > 1:
            index = self.folder / INDEX_NAME
            index.write_text(
                json.dumps(
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map},
                    indent=2,
                )
                + "\n"
            )
            out.append(index)
        return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
