"""The pipelined DCP writer's error paths (``convert/dcp_stream.py``): file systems that
accept ``O_DIRECT`` at open and refuse the writes, write errors surfacing as themselves,
torch.save's settings staying in the writing thread.

The file system's refusals are simulated at ``os.write`` (the system call's Python
wrapper), keyed on the file descriptor's real ``O_DIRECT`` flag; torch and DCP run as
they are. Oracle: torch's stock ``dcp.load`` reading the tensors back.
"""

import errno
import fcntl
import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.serialization import config as serialization_config

from megatron_alp.convert.dist_ckpt import ChunkWrite, write_dist_checkpoint
from megatron_alp.io_safety import OutputError

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


def _data():
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate((3, 5000, 70000))}


def _chunks(data, fill=None):
    return [ChunkWrite(key=k, global_shape=tuple(v.shape), offsets=(0,), sizes=tuple(v.shape),
                       dtype=v.dtype, fill=fill or (lambda out, v=v: out.copy_(v)))
            for k, v in data.items()]


def _load(ckpt, like):
    state = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(state, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return state


def _is_direct(fd):
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    except OSError:
        return False


@pytest.fixture
def refusing_direct_writes(monkeypatch):
    """A file system that opens with O_DIRECT but fails every O_DIRECT write (EINVAL)."""
    real = os.write

    def write(fd, data):
        if _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def _settings():
    return serialization_config.save.compute_crc32, serialization_config.save.storage_alignment


def test_auto_falls_back_when_the_file_system_refuses_direct_writes(tmp_path, refusing_direct_writes):
    data = _data()
    (tmp_path / "ck").mkdir()
    write_dist_checkpoint(tmp_path / "ck", _chunks(data), {}, direct=None)
    got = _load(tmp_path / "ck", data)
    for k in data:
        assert torch.equal(got[k], data[k]), k


def test_direct_on_refused_writes_say_what_to_do(tmp_path, refusing_direct_writes):
    (tmp_path / "ck").mkdir()
    before = _settings()
    with pytest.raises(OutputError, match="O_DIRECT.*--direct-io off"):
        write_dist_checkpoint(tmp_path / "ck", _chunks(_data()), {}, direct=True)
    assert _settings() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("dcp-fill")]


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_error_surfaces_as_itself_and_stops_the_fillers(tmp_path, monkeypatch, direct):
    """Disk full half-way: the OSError itself (not DCP's CheckpointException with a
    traceback text), every filler thread ended, torch.save's settings restored."""
    real = os.write
    written = [0]

    def write(fd, data):
        if fd > 2 and written[0] > 20000:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)
    data = {f"t{i}": torch.full((4000,), float(i)) for i in range(12)}
    (tmp_path / "ck").mkdir()
    before = _settings()
    with pytest.raises(OSError) as info:
        write_dist_checkpoint(tmp_path / "ck", _chunks(data), {}, thread_count=2, direct=direct)
    assert info.value.errno == errno.ENOSPC
    assert _settings() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("dcp-fill")]
    assert not (tmp_path / "ck" / ".metadata").exists()  # nothing looks complete


def test_torch_save_settings_stay_in_the_writing_thread(tmp_path):
    """The writer turns CRC-32 off and aligns records to 4 KiB for its own torch.save
    calls; torch's config overrides are per thread, so a torch.save in another thread
    meanwhile (a filler here) keeps that thread's settings, and so do two writers
    running side by side. (Verified behaviour of torch >= 2.14's config module.)"""
    before = _settings()
    seen = []
    a_filling, b_filling, a_done = threading.Event(), threading.Event(), threading.Event()

    def a_fill(out):
        seen.append(_settings())  # another thread than the writing one
        a_filling.set()
        b_filling.wait(3)  # A is writing while B starts
        out.fill_(1)

    def b_fill(out):
        b_filling.set()
        a_done.wait(3)  # B ends (and restores what it saw) after A ended
        out.fill_(2)

    a_data, b_data = {"a": torch.zeros(10)}, {"b": torch.zeros(10)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    errors = []

    def run(folder, data, fill):
        try:
            write_dist_checkpoint(tmp_path / folder, _chunks(data, fill), {})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        if folder == "a":
            a_done.set()

    ta = threading.Thread(target=run, args=("a", a_data, a_fill))
    ta.start()
    assert a_filling.wait(30)
    tb = threading.Thread(target=run, args=("b", b_data, b_fill))
    tb.start()
    ta.join(60)
    tb.join(60)
    assert not errors, errors
    assert seen == [before]
    assert _settings() == before
    assert torch.equal(_load(tmp_path / "a", a_data)["a"], torch.ones(10))
    assert torch.equal(_load(tmp_path / "b", b_data)["b"], torch.full((10,), 2.0))


def test_converter_with_direct_io_on_refused_leaves_nothing(tmp_path, refusing_direct_writes):
    """Through hf_to_megatron: a one-line error naming the flag, no output, no temporary
    folder left beside it."""
    from megatron_alp.convert import convert_hf_to_megatron
    from tests.unit.test_convert_pipeline import write_hf

    write_hf(tmp_path / "hf", "qwen2")
    with pytest.raises(OutputError, match="--direct-io off") as info:
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", direct_io="on", progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    report = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", direct_io="auto", progress=False)
    assert report.bytes_written > 0 and (tmp_path / "mg" / ".metadata").exists()
