"""HF -> Megatron dist checkpoint -> HF in one process: bit-exact, for every architecture,
single-file and sharded inputs, fp32 and bf16; what the checkpoint holds; the CLIs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_alp.convert import convert_hf_to_megatron, convert_megatron_to_hf, model_mapping
from megatron_alp.convert.dist_ckpt import DistCheckpoint, checkpoint_key
from megatron_alp.convert.io_utils import PROVENANCE_FILE, load_hf_config
from megatron_alp.models.tiny import tiny_hf_config

REPO = Path(__file__).resolve().parents[2]


def random_hf_model(folder, *, model_type, tie=False, dtype=torch.float32, seed=0, **save_kw):
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(model_type, tie=tie)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(folder, **save_kw)
    (Path(folder) / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return Path(folder)


def hf_tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_exact(a, b):
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen3", False), ("llama", True), ("llama", False)])
def test_hf_megatron_hf_is_bit_exact_fp32(tmp_path, model_type, tie):
    src = random_hf_model(tmp_path / "hf", model_type=model_type, tie=tie)
    ckpt, out = tmp_path / "mg", tmp_path / "back"
    # Small blocks: the embedding / head are written and read in row blocks.
    convert_hf_to_megatron(src, ckpt, progress=False, block_bytes=10_000)
    convert_megatron_to_hf(ckpt, out, dtype="fp32", max_shard_size="200KB", progress=False, block_bytes=10_000)
    assert_bit_exact(hf_tensors(src), hf_tensors(out))
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] == tie
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads (no missing / unexpected keys)


def test_checkpoint_contents(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")
    ckpt = tmp_path / "mg"
    report = convert_hf_to_megatron(src, ckpt, progress=False, block_bytes=10_000)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in hf_tensors(src).values())
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    prov = json.loads((ckpt / PROVENANCE_FILE).read_text())
    assert prov["source"] == str(src.absolute()) and prov["dtype"] == "source"
    assert prov["padded_vocab_size"] == 256 and prov["model_type"] == "qwen2"
    assert (ckpt / "hf" / "config.json").exists() and (ckpt / "hf" / "tokenizer_config.json").exists()
    assert not list(tmp_path.glob(".mg.tmp-*"))
    dc = DistCheckpoint(ckpt)
    m = model_mapping(load_hf_config(ckpt / "hf"))
    hf = hf_tensors(src)
    emb = dc.read("embedding.word_embeddings.weight")
    assert emb.shape == (256, 64) and torch.equal(emb[:250], hf["model.embed_tokens.weight"])
    assert not emb[250:].any()
    assert dc.global_shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 128, 64)
    name = "decoder.layers.2.self_attention.linear_qkv.bias"
    key, layer = checkpoint_key(name)
    want = m.to_megatron(name, [hf[h] for h in m.hf_sources(name)])
    assert torch.equal(dc.read_layer(key, layer), want)
    assert dc.read_object("decoder.layers.mlp.linear_fc1._extra_state/shard_1_4") is None


def test_sharded_input_and_dtypes(tmp_path):
    single = random_hf_model(tmp_path / "single", model_type="qwen3", dtype=torch.bfloat16)
    sharded = random_hf_model(tmp_path / "sharded", model_type="qwen3", dtype=torch.bfloat16,
                              max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    convert_hf_to_megatron(single, tmp_path / "a", progress=False)
    convert_hf_to_megatron(sharded, tmp_path / "b", progress=False)
    a, b = DistCheckpoint(tmp_path / "a"), DistCheckpoint(tmp_path / "b")
    assert sorted(a.tensor_keys()) == sorted(b.tensor_keys())
    for k in a.tensor_keys():
        assert a.dtype(k) == torch.bfloat16 and torch.equal(a.read(k), b.read(k)), k
    # bf16 stays bit-exact on the way back; fp32 storage on request.
    convert_megatron_to_hf(tmp_path / "b", tmp_path / "back", progress=False)  # auto: the stored bf16
    assert_bit_exact(hf_tensors(single), hf_tensors(tmp_path / "back"))
    convert_hf_to_megatron(sharded, tmp_path / "c", dtype="fp32", progress=False)
    c = DistCheckpoint(tmp_path / "c")
    key = "decoder.layers.mlp.linear_fc2.weight"
    assert c.dtype(key) == torch.float32 and torch.equal(c.read(key), a.read(key).float())


def test_force_replaces_and_cli(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools" / "convert"))
    try:
        import hf_to_megatron as h2m
        import megatron_to_hf as m2h
    finally:
        sys.path.pop(0)
    src = random_hf_model(tmp_path / "hf", model_type="llama", tie=True)
    ckpt = tmp_path / "mg"
    assert h2m.main(["--hf", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert "llama" in capsys.readouterr().out
    assert h2m.main(["--hf", str(src), "--out", str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err and str(ckpt) in err
    (ckpt / "stale.txt").write_text("old")
    assert h2m.main(["--hf", str(src), "--out", str(ckpt), "--no-progress", "--force", "--dtype", "bf16"]) == 0
    assert not (ckpt / "stale.txt").exists()
    assert json.loads((ckpt / PROVENANCE_FILE).read_text())["dtype"] == "bfloat16"
    out = tmp_path / "back"
    assert m2h.main(["--megatron", str(ckpt), "--out", str(out), "--dtype", "bf16", "--no-progress"]) == 0
    back = hf_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in back.values()) and "lm_head.weight" not in back
    src_t = hf_tensors(src)
    for k, t in back.items():
        assert torch.equal(t, src_t[k].to(torch.bfloat16)), k
