"""Bad input is refused before anything is written, with the file / tensor / value named;
an interrupted conversion leaves nothing that looks complete."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_alp.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_alp.convert import safetensors_io
from tests.unit.test_convert_roundtrip import REPO, random_hf_model


def no_output(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def test_missing_shard(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2", max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (src / lost).unlink()
    with pytest.raises(ValueError, match=f"missing shard: .*{lost}.*model.safetensors.index.json"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    assert no_output(tmp_path, "out")


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch: tensor model.layers.1.mlp.up_proj.weight "
                                         r"in .*model.safetensors has shape \(100, 64\), config.json implies \(128, 64\)"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    assert no_output(tmp_path, "out")


def test_missing_and_unknown_tensors(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen3")
    tensors = load_file(src / "model.safetensors")
    q_norm = tensors.pop("model.layers.2.self_attn.q_norm.weight")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.2.self_attn.q_norm.weight'"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    tensors["model.layers.2.self_attn.q_norm.weight"] = q_norm
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not know, e.g. 'model.layers.0.mlp.extra_proj.weight' in .*model.safetensors"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)


def test_truncated_file_and_no_weights(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors: tensor .* the file is truncated"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \*.safetensors weights in .*pytorch_model.bin"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)


def test_unsupported_model_type(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' has no conversion mapping; supported: llama, qwen2, qwen3"):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)


def test_non_empty_target_needs_force(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    # A folder this tool did not write is never replaced, with or without --force.
    for force in (False, True):
        with pytest.raises(ValueError, match=f"--out {out} is not empty and it has no "
                                             r"\.megatron_alp_output\.json of hf_to_megatron.*even with --force"):
            convert_hf_to_megatron(src, out, progress=False, force=force)
    assert (out / "keep.txt").read_text() == "precious" and no_output(tmp_path, "hf_tmp")
    with pytest.raises(ValueError, match="is the input"):
        convert_hf_to_megatron(src, src, progress=False, force=True)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = random_hf_model(tmp_path / "hf", model_type="llama", tie=True)
    calls = {"n": 0}
    real = safetensors_io.HFSafetensors.read_into

    def flaky(self, name, out, rows=None):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through (in a reading thread)
        return real(self, name, out, rows)

    monkeypatch.setattr(safetensors_io.HFSafetensors, "read_into", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    assert no_output(tmp_path, "out")
    # A previous complete checkpoint survives a failed --force run.
    monkeypatch.setattr(safetensors_io.HFSafetensors, "read_into", real)
    convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    calls["n"] = 0
    monkeypatch.setattr(safetensors_io.HFSafetensors, "read_into", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_megatron(src, tmp_path / "out", progress=False, force=True)
    assert (tmp_path / "out" / "metadata.json").exists() and not list(tmp_path.glob(".out.*"))


def test_megatron_side_errors(tmp_path):
    src = random_hf_model(tmp_path / "hf", model_type="llama", tie=False)
    ckpt = tmp_path / "mg"
    convert_hf_to_megatron(src, ckpt, progress=False)
    with pytest.raises(ValueError, match="is not a Megatron dist checkpoint"):
        convert_megatron_to_hf(tmp_path / "hf", tmp_path / "o1", progress=False)
    # A config that ties embeddings does not explain the checkpoint's output layer.
    other = tmp_path / "tied_cfg"
    random_hf_model(other, model_type="llama", tie=True)
    with pytest.raises(ValueError, match=r"does not export: \['output_layer.weight'\]"):
        convert_megatron_to_hf(ckpt, tmp_path / "o2", hf_config=other, progress=False)
    # A config with another FFN size: shape mismatch naming the key.
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch: checkpoint tensor decoder.layers.mlp.linear_fc1.weight .* \(4, 256, 64\), the HF config implies \(4, 192, 64\)"):
        convert_megatron_to_hf(ckpt, tmp_path / "o3", hf_config=other, progress=False)
    with pytest.raises(ValueError, match="no HF config beside checkpoint"):
        import shutil

        shutil.rmtree(ckpt / "hf")
        convert_megatron_to_hf(ckpt, tmp_path / "o4", progress=False)
    for name in ("o1", "o2", "o3", "o4"):
        assert no_output(tmp_path, name)


def test_layout_the_model_cannot_be_split_into(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools" / "convert"))
    try:
        import verify
    finally:
        sys.path.pop(0)
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")  # 4 heads, 2 KV heads, 4 layers
    ckpt = tmp_path / "mg"
    convert_hf_to_megatron(src, ckpt, progress=False)
    assert verify.main(["--hf", str(src), "--megatron", str(ckpt), "--tp", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in capsys.readouterr().err
    assert verify.main(["--hf", str(src), "--megatron", str(ckpt), "--tp", "4"]) == 2
    assert "num_key_value_heads (query groups)=2 is not divisible by tensor_model_parallel_size=4" in capsys.readouterr().err
    assert verify.main(["--hf", str(src), "--megatron", str(ckpt), "--pp", "3"]) == 2
    assert "num_hidden_layers=4 is not divisible by pipeline x virtual pipeline stages = 3" in capsys.readouterr().err
