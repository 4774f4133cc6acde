"""A DCP storage writer that fills the next chunk while it writes the current one.

torch's ``FileSystemWriter`` (one file per rank, ``torch.save`` items) asks the planner
for one item after another and writes it through a buffered stream. With a planner that
*produces* its chunks (reads HF tensors, interleaves QKV) nothing overlaps: reading,
checking and writing take turns on one core, every chunk lands in freshly mapped memory
(the kernel zeroes each page first), and torch 2.x's writer keeps the last tensor of
every key alive (for its safetensors mode), so peak memory grows with the number of
distinct keys.

:class:`PipelinedFileSystemWriter` writes the same format: one ``__0_0.distcp`` whose
items are ``torch.save(tensor)`` records (or a byte object's raw bytes) at recorded
offsets, and ``.metadata`` from ``FileSystemWriter.finish``, so ``FileSystemReader`` and
megatron-core's ``dist_checkpointing.load`` (``torch_dist``) read it unchanged, resharding
included. How it writes:

* ``producers`` threads fill chunks into a pool of ``producers + 1`` reusable buffers, each
  the size of the largest chunk, while the calling thread writes a filled one and hands
  its buffer back. Peak memory is the pool: 2 chunks by default, whatever the model.
* Every tensor is written from its buffer to the file without a copy in user space
  (``torch.save`` to an unbuffered stream passes the storage as one memoryview). Where
  the file system allows it, with ``O_DIRECT`` (:class:`_DirectStream`: tensor items
  start on 4 KiB boundaries, so the tensor bytes go to the disk from the buffer itself
  and the page cache is skipped). The open is followed by one aligned probe write: some
  file systems accept ``O_DIRECT`` at open and refuse the writes (EINVAL).
* ``torch.save`` leaves out the zip CRC-32 of its records (``crc32=False``, the default):
  ``torch.load`` never checks it (``tests/unit/test_convert_pipeline.py`` shows a flipped
  byte loading silently either way), and it costs one core ~0.2 s per GB.
* Otherwise (tmpfs, ...) write-back to the disk is started every ``sync_bytes`` written
  (``sync_file_range``), so it overlaps the conversion instead of all of it waiting in
  the final fsync.

The planner must offer ``fill_item(write_item, out)`` (fill the tensor ``out``, of the item's
chunk shape and dtype) and ``item_written(write_item)`` (progress); see
:mod:`megatron_alp.convert.dist_ckpt`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.futures import Future
from torch.utils.serialization import config as serialization_config
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

__all__ = ["PipelinedFileSystemWriter", "chunk_nbytes"]

DEFAULT_SYNC_BYTES = 256 * 1024**2
"""Start write-back of what was written after this many bytes."""

_POLL_S = 0.1
"""How often a waiting thread looks whether the other side gave up."""


def chunk_nbytes(item: WriteItem) -> int:
    """Bytes of a tensor write item's chunk (not of its global tensor)."""
    assert item.tensor_data is not None
    n = torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
    for s in item.tensor_data.chunk.sizes:
        n *= int(s)
    return n


class _FdStream:
    """The minimal file object ``torch.save`` needs: ``write`` (all of it) and ``flush``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.failed: BaseException | None = None
        """The first error of a write: torch.save's zip writer calls :meth:`write` from
        C++ and reports a failed write as its own "unexpected pos" RuntimeError."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # os.write may write less (at most ~2 GiB per call)
                done += os.write(self.fd, view[done:])
        except BaseException as e:
            self.failed = self.failed or e
            raise
        self.pos += done
        return done

    def flush(self) -> None:
        pass

    def align(self) -> None:
        """Nothing to align through the page cache."""

    def close(self) -> None:
        os.fsync(self.fd)


BLOCK = 4096
"""O_DIRECT transfers: file offsets, lengths and memory addresses are multiples of this."""


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose memory starts at a multiple of :data:`BLOCK`."""
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % BLOCK
    return raw[skip : skip + nbytes]


class _DirectStream:
    """Writes through ``O_DIRECT``: from the chunk buffers straight to the disk, no page
    cache. Small writes (zip headers, byte objects, tails) are staged in an aligned buffer
    and go out in whole blocks; a large write whose memory and file position are both
    block-aligned goes out from its own memory. ``torch.save`` is run with
    ``storage_alignment`` = :data:`BLOCK` and every tensor item starts at a block boundary
    (:meth:`align` pads with zeros between items, outside any item), so each tensor's bytes
    are such a write. :meth:`close` writes the last partial block and truncates the file
    to its logical end.

    Why: on this project's VM a buffered write of fresh pages ran at 0.5-1 GB/s (the page
    cache's memory is first touched on the host), O_DIRECT at 2.2 GB/s, steadily."""

    STAGE = 4 * 1024**2

    def __init__(self, fd: int, path: Path | None = None) -> None:
        self.fd, self.path = fd, path
        self.pos = 0
        """Logical end of the file (what the next byte's offset is)."""
        self._stage = aligned_empty(self.STAGE)
        self._stage_view = memoryview(self._stage.numpy())
        self._staged = 0
        """Bytes in the stage; it holds file bytes ``[pos - staged, pos)``, starting on a block."""
        self.failed: BaseException | None = None
        """The first error of a write (see :attr:`_FdStream.failed`)."""

    def write(self, data: Any) -> int:
        try:
            return self._write(data)
        except BaseException as e:
            self.failed = self.failed or e
            raise

    def _write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self._staged % BLOCK == 0 and n >= BLOCK and _address(view) % BLOCK == 0:
            self._flush_blocks()
            whole = n - n % BLOCK
            self._write_all(view[:whole])
            self.pos += whole
            view = view[whole:]
        while len(view):
            k = min(len(view), self.STAGE - self._staged)
            self._stage_view[self._staged : self._staged + k] = view[:k]
            self._staged += k
            self.pos += k
            view = view[k:]
            if self._staged == self.STAGE:
                self._flush_blocks()
        return n

    def flush(self) -> None:
        pass

    def align(self) -> None:
        """Pad with zeros to the next block boundary (the next item starts there)."""
        pad = (-self.pos) % BLOCK
        if pad:
            self.write(bytes(pad))

    def _flush_blocks(self) -> None:
        """Write the stage's whole blocks; keep the partial one at its start."""
        whole = self._staged - self._staged % BLOCK
        if whole:
            self._write_all(self._stage_view[:whole])
            rest = self._staged - whole
            self._stage_view[:rest] = self._stage_view[whole : self._staged]
            self._staged = rest

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except OSError as e:  # past the open-time probe: say what to do about it
                if e.errno != errno.EINVAL:
                    raise
                raise _direct_refused(self.path, e) from None

    def close(self) -> None:
        """Write the last partial block (zero-padded), cut the file to ``pos``, fsync."""
        end = self.pos
        self.align()
        self._flush_blocks()
        os.ftruncate(self.fd, end)
        os.fsync(self.fd)


def _address(view: memoryview) -> int:
    """Memory address of a contiguous buffer (where O_DIRECT will read from)."""
    import numpy as np  # torch's own dependency; reads the address of read-only buffers too

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _open_output(path: Path, direct: bool | None) -> tuple[int, bool]:
    """Create ``path`` for writing: (fd, O_DIRECT?). ``direct`` None tries O_DIRECT and
    falls back where the file system refuses it (tmpfs, some network file systems),
    at open or at the first aligned write (:func:`_probe_direct`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if direct is not False and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if direct or e.errno != errno.EINVAL:
                raise
        else:
            try:
                _probe_direct(fd)
                return fd, True
            except OSError as e:
                os.close(fd)
                os.unlink(path)  # created just now (O_EXCL), empty: ours to remove
                if e.errno != errno.EINVAL:
                    raise
                if direct:
                    raise _direct_refused(path, e) from None
    return os.open(path, flags, 0o644), False


def _probe_direct(fd: int) -> None:
    """Write one aligned block and take it back: some file systems (FUSE, some network
    ones) accept ``O_DIRECT`` at open and refuse the writes (EINVAL) only later."""
    block = aligned_empty(BLOCK)
    block.zero_()
    if os.write(fd, memoryview(block.numpy())) != BLOCK:
        raise OSError(errno.EINVAL, "short O_DIRECT write of one block")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)


def _direct_refused(path: Path | None, e: OSError) -> Exception:
    """The error for a file system that refuses this writer's O_DIRECT writes."""
    from megatron_alp.io_safety import OutputError

    return OutputError(
        f"{path}: the file system refuses O_DIRECT writes aligned to {BLOCK} bytes "
        f"({e.strerror or e}); write through the page cache instead "
        "(hf_to_megatron --direct-io off, or direct=False)"
    )


class _WriteBehind:
    """Start write-back of every ``step`` bytes written, without waiting for it
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; Linux). Otherwise the kernel starts only
    at its dirty-memory threshold (10% of RAM), and all of a smaller checkpoint waits in
    the final fsync: 0.5 s of 1.4 s for 2 GB here. A thread calling ``fdatasync``
    instead was slower than nothing (it stalls the writes). Best effort: the final
    fsync is what makes the file durable."""

    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, fd: int, step: int) -> None:
        self._fd, self._step = fd, step
        self._done = 0
        self._call = _sync_file_range()

    def written(self, pos: int) -> None:
        if self._call is not None and pos - self._done >= self._step:
            self._call(self._fd, self._done, pos - self._done, self._SYNC_FILE_RANGE_WRITE)
            self._done = pos


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (not in :mod:`os`), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class PipelinedFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` (single file, fsync) whose items are filled ahead of writing
    by ``producers`` threads into reusable buffers (see module doc)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        producers: int = 1,
        sync_bytes: int = DEFAULT_SYNC_BYTES,
        crc32: bool = False,
        direct: bool | None = None,
    ) -> None:
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
        if producers < 1:
            raise ValueError(f"producers={producers!r}: expected a positive integer")
        self.producers = producers
        self.sync_bytes = sync_bytes
        self.crc32 = crc32
        self.direct = direct
        """O_DIRECT: None = where the file system allows it; True = required; False = never."""
        self.used_direct: bool | None = None
        self.error: BaseException | None = None
        """What :meth:`write_data` raised, unwrapped (DCP re-wraps it)."""
        self.timings: dict[str, float] = {}
        """Seconds spent, after a save: ``fill`` (filling threads, summed), ``wait`` (the
        writing thread waiting for a filled chunk), ``write`` (torch.save + write(2)),
        ``fsync`` (the final one)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = Path(self.path) / name
        config = serialization_config.save
        # torch's config overrides are per thread (a ContextVar): this changes torch.save
        # in this thread only, where the items are written; other threads keep theirs.
        previous = config.compute_crc32, config.storage_alignment
        config.compute_crc32 = self.crc32
        try:
            results = self._write_file(path, name, plan.items, planner)
        except BaseException as e:
            self.error = e  # DCP wraps it in a CheckpointException with a traceback text
            raise
        finally:
            config.compute_crc32, config.storage_alignment = previous
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(
        self, path: Path, name: str, items: list[WriteItem], planner: Any
    ) -> list[WriteResult]:
        tensors = [i for i in items if i.type != WriteItemType.BYTE_IO]
        objects = [i for i in items if i.type == WriteItemType.BYTE_IO]
        results: list[WriteResult] = []
        fd, self.used_direct = _open_output(path, self.direct)
        if self.used_direct:  # every tensor's bytes start on a block (see _DirectStream)
            serialization_config.save.storage_alignment = BLOCK
        try:
            stream = _DirectStream(fd, path) if self.used_direct else _FdStream(fd)
            for item in objects:
                data = planner.resolve_data(item)
                offset = stream.pos
                stream.write(data.getbuffer())
                results.append(_result(item, name, offset, stream.pos - offset))
            behind = None if self.used_direct else _WriteBehind(fd, self.sync_bytes)
            pipeline = _Pipeline(tensors, planner, self.producers)
            write_s = 0.0
            try:
                for item, tensor in pipeline:
                    t0 = time.perf_counter()
                    stream.align()
                    offset = stream.pos
                    try:
                        torch.save(tensor, stream)
                    except BaseException:
                        if stream.failed is not None:  # the write's own error (disk full...),
                            raise stream.failed from None  # not torch's "unexpected pos"
                        raise
                    results.append(_result(item, name, offset, stream.pos - offset))
                    if behind is not None:
                        behind.written(stream.pos)
                    write_s += time.perf_counter() - t0
                    planner.item_written(item)
            finally:  # a write error or a signal: stop the fillers before the caller cleans up
                pipeline.close()
            t0 = time.perf_counter()
            stream.close()
            self.timings = {"fill": pipeline.fill_s, "wait": pipeline.wait_s, "write": write_s,
                            "fsync": time.perf_counter() - t0}
        finally:
            os.close(fd)
        return results


def _result(item: WriteItem, name: str, offset: int, length: int) -> WriteResult:
    return WriteResult(
        index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length)
    )


class _Pipeline:
    """Iterates ``(item, filled tensor)`` in completion order; the tensor's buffer goes back
    to the pool when the next one is requested. Producer errors (also KeyboardInterrupt
    raised inside a fill) are re-raised in the consuming thread."""

    def __init__(self, items: list[WriteItem], planner: Any, producers: int) -> None:
        self._items = iter(items)
        self._count = len(items)
        self._planner = planner
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        size = max((chunk_nbytes(i) for i in items), default=0)
        for _ in range(min(producers, max(len(items), 1)) + 1):
            self._free.put(aligned_empty(size))  # aligned: O_DIRECT writes from it
        self.fill_s = 0.0
        """Seconds the fillers spent filling (summed over threads)."""
        self.wait_s = 0.0
        """Seconds the consumer waited for a filled chunk."""
        self._threads = [
            threading.Thread(target=self._produce, name=f"dcp-fill-{k}", daemon=True)
            for k in range(min(producers, max(len(items), 1)))
        ]

    def __iter__(self):
        for t in self._threads:
            t.start()
        held = None
        try:
            for _ in range(self._count):
                t0 = time.perf_counter()
                got = self._get(self._ready)
                self.wait_s += time.perf_counter() - t0
                if isinstance(got, BaseException):
                    raise got
                if held is not None:
                    self._free.put(held)
                item, tensor, held = got
                yield item, tensor
        finally:
            self.close()

    def close(self) -> None:
        """Stop the fillers and wait for them (each finishes the chunk it is filling)."""
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join()

    def _get(self, q: queue.Queue) -> Any:
        """The next entry of ``q``; None once the consumer stopped (producers' side), or
        an AssertionError if every producer ended without leaving one (consumer's side)."""
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if q is self._free and self._stop.is_set():
                    return None
                if q is self._ready and not any(t.is_alive() for t in self._threads):
                    try:
                        return q.get_nowait()
                    except queue.Empty:
                        raise AssertionError("producer threads ended without a result") from None

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    item = next(self._items, None)
                if item is None:
                    return
                buf = self._get(self._free)
                if buf is None:
                    return
                out = _chunk_view(buf, item)
                t0 = time.perf_counter()
                self._planner.fill_item(item, out)
                with self._lock:
                    self.fill_s += time.perf_counter() - t0
                self._ready.put((item, out, buf))
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._ready.put(e)  # before stopping the others: the consumer must see it
            self._stop.set()


def _chunk_view(buf: torch.Tensor, item: WriteItem) -> torch.Tensor:
    """A tensor over the first bytes of ``buf`` whose *storage* is exactly the chunk
    (``torch.save`` writes a tensor's whole storage, so a plain view would not do)."""
    td = item.tensor_data
    assert td is not None
    n = chunk_nbytes(item)
    shape = tuple(int(s) for s in td.chunk.sizes)
    if n == 0:
        return torch.empty(shape, dtype=td.properties.dtype)
    flat = torch.frombuffer(memoryview(buf.numpy())[:n], dtype=td.properties.dtype)
    return flat.view(shape)
