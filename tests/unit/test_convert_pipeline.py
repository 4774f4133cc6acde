"""The pipelined HF -> Megatron writer (``convert/dcp_stream.py``) and what feeds it: rows
read straight into place, the finiteness check, the transformers-free config route.

Oracles: ``ModelMapping.to_megatron`` on whole HF tensors (the tested layout transforms)
read back through torch's own ``dcp.load`` (not this project's reader); transformers'
``AutoConfig`` for the config route.
"""

import io
import json
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from megatron_alp.convert import convert_hf_to_megatron, model_mapping
from megatron_alp.convert.dcp_stream import _Pipeline
from megatron_alp.convert.dist_ckpt import ChunkWrite, checkpoint_key, write_dist_checkpoint
from megatron_alp.convert.hf_to_megatron import all_finite
from megatron_alp.convert.io_utils import load_hf_config
from megatron_alp.models.hf import explicit_hf_config, gpt_args_from_hf
from megatron_alp.models.tiny import tiny_hf_config


def write_hf(folder, model_type, *, tie=False, dtype=torch.float32, shards=1, seed=0):
    """A random HF folder written straight to safetensors (no transformers model)."""
    cfg = tiny_hf_config(model_type, tie=tie)
    folder.mkdir()
    cfg.save_pretrained(folder)
    m = model_mapping(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(m.hf_shape(n), generator=g) * 0.05).to(dtype) for n in m.hf_names()}
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return cfg, tensors


def expected_megatron(cfg, tensors, dtype=None):
    """{dist-checkpoint key: global tensor} from the mapping's own transforms."""
    m = model_mapping(cfg)
    stacked: dict[str, list] = {}
    out = {}
    for name in m.megatron_names():
        t = m.to_megatron(name, [tensors[h] for h in m.hf_sources(name)])
        t = t.to(dtype) if dtype is not None else t
        key, layer = checkpoint_key(name)
        if layer is None:
            out[key] = t
        else:
            stacked.setdefault(key, []).append(t)
    out.update({k: torch.stack(v) for k, v in stacked.items()})
    return out


def load_with_torch_dcp(ckpt, like):
    """Every tensor of ``like`` read back by torch's stock DCP load (resharding reader)."""
    state = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(state, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return state


@pytest.mark.parametrize("model_type,tie,dtype,threads,block,shards", [
    ("qwen2", False, None, 1, 4096, 1),            # QKV bias, row-blocked vocab, padding
    ("qwen3", False, "bf16", 2, 4096, 2),          # q/k norm, cast fp32 -> bf16, 2 fillers
    ("llama", True, None, 3, 1 << 20, 3),          # tied, one block per tensor, 3 fillers
])
def test_pipelined_checkpoint_equals_mapping(tmp_path, model_type, tie, dtype, threads, block, shards):
    cfg, tensors = write_hf(tmp_path / "hf", model_type, tie=tie, shards=shards)
    report = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", dtype=dtype, progress=False,
                                    thread_count=threads, block_bytes=block)
    want = expected_megatron(cfg, tensors, torch.bfloat16 if dtype else None)
    got = load_with_torch_dcp(tmp_path / "mg", want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert report.bytes_read == sum(t.numel() * t.element_size() for n, t in tensors.items()
                                    if model_mapping(cfg).hf_target(n) is not None)


def test_row_map_is_to_megatron():
    """Filling rows from ``row_map`` builds what ``to_megatron`` builds, every layout."""
    cfg = tiny_hf_config("qwen2", num_attention_heads=8, num_key_value_heads=2)
    m = model_mapping(cfg)
    g = torch.Generator().manual_seed(1)
    for name in m.megatron_names():
        srcs = {h: torch.randn(m.hf_shape(h), generator=g) for h in m.hf_sources(name)}
        out = torch.full(m.megatron_shape(name), float("nan"))
        covered = 0
        for h, a, b, dst in m.row_map(name):
            out[dst:dst + b - a] = srcs[h][a:b]
            covered += b - a
        out[covered:] = 0
        assert torch.equal(out, m.to_megatron(name, [srcs[h] for h in m.hf_sources(name)])), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere(dtype):
    """One NaN / +inf / -inf at any position (vector body and tail) is found."""
    t = torch.randn(1037, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for pos in [*range(0, 70), 500, 1023, 1024, 1035, 1036]:
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[pos] = bad
            assert not all_finite(u), (pos, bad)
            assert not all_finite(u.view(17, 61)), (pos, bad)


def test_pipeline_holds_at_most_producers_plus_one_buffers():
    """However slow the writer, the fillers never get more than ``producers + 1``
    buffers, and a buffer is not refilled while its tensor is being written."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    items = [WriteItem(index=MetadataIndex(f"t{i}", torch.Size([0])), type=WriteItemType.SHARD,
                       tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size([0]), torch.Size([1000 + i])),
                                                   properties=TensorProperties(dtype=torch.float32),
                                                   size=torch.Size([1000 + i])))
             for i in range(12)]
    lock = threading.Lock()
    in_use: set[int] = set()
    seen: set[int] = set()

    class Planner:
        def fill_item(self, item, out):
            with lock:
                assert out.data_ptr() not in in_use  # never the buffer being written
                seen.add(out.data_ptr())
            out.fill_(float(item.index.fqn[1:]))

    for producers in (1, 2):
        seen.clear()
        for item, t in _Pipeline(items, Planner(), producers):
            with lock:
                in_use.add(t.data_ptr())
            assert t.untyped_storage().nbytes() == t.numel() * 4  # torch.save writes no more
            assert torch.all(t == float(item.index.fqn[1:]))
            threading.Event().wait(0.01)  # a slow writer
            with lock:
                in_use.discard(t.data_ptr())
        assert len(seen) <= producers + 1, (producers, len(seen))


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_files_hold_the_same_items(tmp_path, direct):
    """O_DIRECT (aligned items, staged headers and tails, zero padding between items)
    and plain writes give checkpoints that torch's DCP loads to the same tensors; sizes
    chosen to hit every case: below a block, a block plus a tail, exact blocks, empty."""
    g = torch.Generator().manual_seed(0)
    sizes = [(3,), (1024,), (1025,), (4096, 3), (0,), (70000,), (2048, 2)]
    data = {f"t{i}": torch.randn(s, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i, s in enumerate(sizes)}
    chunks = [ChunkWrite(key=k, global_shape=tuple(v.shape), offsets=(0,) * v.dim(), sizes=tuple(v.shape),
                         dtype=v.dtype, fill=lambda out, v=v: out.copy_(v)) for k, v in data.items()]
    (tmp_path / "ck").mkdir()
    write_dist_checkpoint(tmp_path / "ck", chunks, {"obj/shard_0_1": None}, direct=direct)
    got = load_with_torch_dcp(tmp_path / "ck", data)
    for k in data:
        assert torch.equal(got[k], data[k]), k


def test_filler_error_surfaces_as_itself(tmp_path):
    def boom(out):
        raise ValueError("tensor x is broken")

    ok = lambda out: out.fill_(1)  # noqa: E731
    chunks = [ChunkWrite(key=f"k{i}", global_shape=(4,), offsets=(0,), sizes=(4,), dtype=torch.float32,
                         fill=boom if i == 3 else ok) for i in range(6)]
    (tmp_path / "ck").mkdir()
    with pytest.raises(ValueError, match="tensor x is broken"):
        write_dist_checkpoint(tmp_path / "ck", chunks, {})
    assert torch.serialization.get_crc32_options()  # the writer's settings were undone
    from torch.utils.serialization import config
    assert config.save.storage_alignment == 64


def test_torch_load_ignores_zip_crc():
    """Why the writer may skip torch.save's CRC-32: torch.load never checks it (a flipped
    data byte loads silently with or without it), so it protects nothing on this path."""
    t = torch.arange(1000, dtype=torch.float32)
    before = torch.serialization.get_crc32_options()
    try:
        for crc in (True, False):
            torch.serialization.set_crc32_options(crc)
            buf = io.BytesIO()
            torch.save(t, buf)
            raw = bytearray(buf.getvalue())
            raw[raw.find(t.numpy().tobytes()[:64]) + 100] ^= 0xFF
            got = torch.load(io.BytesIO(bytes(raw)), weights_only=True)
            assert not torch.equal(got, t)
    finally:
        torch.serialization.set_crc32_options(before)


@pytest.mark.parametrize("model_type,tie,extra", [
    ("qwen2", False, {}),
    ("qwen2", True, {"use_sliding_window": False}),
    ("qwen3", False, {}),
    ("llama", True, {}),                                    # llama3 rope scaling
    ("llama", False, {"head_dim": None, "rope_parameters": None, "rope_theta": 123456.0}),
    ("llama", False, {"rope_parameters": None, "rope_theta": 5e5,
                      "rope_scaling": {"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_explicit_config_equals_transformers(tmp_path, model_type, tie, extra):
    tiny_hf_config(model_type, tie=tie).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k, v in extra.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = load_hf_config(tmp_path, plain=True)
    assert plain is explicit_hf_config(cfg) or plain.__dict__ == cfg  # the plain route was taken
    assert gpt_args_from_hf(plain) == gpt_args_from_hf(load_hf_config(tmp_path))


@pytest.mark.parametrize("drop", ["num_key_value_heads", "tie_word_embeddings", "rope_parameters", "head_dim"])
def test_config_without_an_explicit_field_goes_through_transformers(tmp_path, drop):
    model_type = "qwen3"  # transformers' head_dim default (128) is not hidden / heads
    tiny_hf_config(model_type).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop(drop)
    assert explicit_hf_config(cfg) is None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert type(load_hf_config(tmp_path, plain=True)).__module__.startswith("transformers")


def test_direct_io_flag_parses_and_a_bad_value_is_refused(tmp_path):
    """--direct-io auto|on|off parses (auto by default), and a bad
    value is one ValueError naming the flag."""
    import tools.convert.hf_to_megatron as cli

    assert cli.parse_args(["--hf", "a", "--out", "b"]).direct_io == "auto"
    assert cli.parse_args(["--hf", "a", "--out", "b", "--direct-io", "off"]).direct_io == "off"
    from megatron_alp.convert.hf_to_megatron import convert_hf_to_megatron

    with pytest.raises(ValueError, match="--direct-io='sometimes'"):
        convert_hf_to_megatron(tmp_path / "none", tmp_path / "out", direct_io="sometimes")
