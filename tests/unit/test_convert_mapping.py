"""Per-architecture HF <-> canonical mappings, layout transforms and the I/O primitives
(no Megatron model: single process, fast)."""

import json

import pytest
import torch

from megatron_alp.convert import (
    ArchMapping,
    TensorRule,
    get_mapping,
    model_mapping,
    register_mapping,
    registered_model_types,
)
from megatron_alp.convert.dist_ckpt import checkpoint_key, extra_state_keys
from megatron_alp.convert.io_utils import parse_dtype, parse_size
from megatron_alp.convert.safetensors_io import HFSafetensors, ShardedSafetensorsWriter, plan_shards
from megatron_alp.models import supported_model_types
from megatron_alp.models.tiny import tiny_hf_config

ARCHS = [("qwen2", False), ("qwen3", False), ("llama", True), ("llama", False)]


def hf_state(model_type, tie):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_hf_config(model_type, tie=tie)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if tie:  # save_pretrained drops the tied head; so does the mapping
        sd.pop("lm_head.weight")
    return cfg, sd


@pytest.mark.parametrize("model_type,tie", ARCHS)
def test_names_match_hf_and_round_trip_is_exact(model_type, tie):
    cfg, sd = hf_state(model_type, tie)
    m = model_mapping(cfg)
    assert m.hf_names() == [n for n in m.hf_names()]  # ordered, no duplicates
    assert sorted(m.hf_names()) == sorted(sd)
    back = {}
    for name in m.megatron_names():
        full = m.to_megatron(name, [sd[h] for h in m.hf_sources(name)])
        assert tuple(full.shape) == m.megatron_shape(name)
        back.update(m.to_hf(name, full))
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    assert ("output_layer.weight" in m.megatron_names()) == (not tie)


def test_qkv_is_laid_out_per_query_group():
    cfg = tiny_hf_config("qwen2")  # 4 heads, 2 groups, head_dim 16, hidden 64
    m = model_mapping(cfg)
    d, per = 16, 2
    # Row r of q belongs to head r // d; label every row with (kind, head).
    q = torch.arange(4).repeat_interleave(d).float()[:, None].expand(-1, 64) + 0.0
    k = 100 + torch.arange(2).repeat_interleave(d).float()[:, None].expand(-1, 64)
    v = 200 + torch.arange(2).repeat_interleave(d).float()[:, None].expand(-1, 64)
    full = m.to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", [q, k, v])
    rows = full[:, 0].reshape(2, (per + 2) * d)
    for g in range(2):
        want = torch.cat([q[g * per * d:(g + 1) * per * d, 0], k[g * d:(g + 1) * d, 0], v[g * d:(g + 1) * d, 0]])
        assert torch.equal(rows[g], want)
    # Biases use the same layout.
    b = m.to_megatron("decoder.layers.0.self_attention.linear_qkv.bias", [q[:, 0], k[:, 0], v[:, 0]])
    assert torch.equal(b, full[:, 0])


def test_gate_up_and_vocab_padding():
    cfg = tiny_hf_config("llama")
    m = model_mapping(cfg)
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fc1 = m.to_megatron("decoder.layers.1.mlp.linear_fc1.weight", [gate, up])
    assert torch.equal(fc1[:128], gate) and torch.equal(fc1[128:], up)
    emb = torch.randn(250, 64)
    padded = m.to_megatron("embedding.word_embeddings.weight", [emb])
    assert padded.shape == (256, 64) and m.padded_vocab == 256
    assert torch.equal(padded[:250], emb) and not padded[250:].any()
    [(name, out)] = m.to_hf("embedding.word_embeddings.weight", padded)
    assert name == "model.embed_tokens.weight" and torch.equal(out, emb)


def test_to_hf_accepts_te_names_and_drops_alp():
    m = model_mapping(tiny_hf_config("qwen3"))
    w = torch.randn(64)
    [(name, _)] = m.to_hf("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", w)
    assert name == "model.layers.2.input_layernorm.weight"
    [(name, _)] = m.to_hf("decoder.layers.2.mlp.linear_fc1.layer_norm_weight", w)
    assert name == "model.layers.2.post_attention_layernorm.weight"
    [(name, _)] = m.to_hf("decoder.layers.3.self_attention.q_layernorm.weight", torch.randn(16))
    assert name == "model.layers.3.self_attn.q_norm.weight"
    assert m.to_hf("decoder.layers.0.perturbation.alp_log_sigma", torch.zeros(())) == []
    with pytest.raises(KeyError, match="decoder.layers.9"):
        m.to_hf("decoder.layers.9.mlp.linear_fc2.weight", torch.zeros(64, 128))
    with pytest.raises(ValueError, match="shape"):
        m.to_hf("decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(64, 64))


def test_registry():
    assert registered_model_types() == supported_model_types()
    with pytest.raises(ValueError, match="already registered"):
        register_mapping(ArchMapping(model_type="llama", rules=get_mapping("llama").rules))
    with pytest.raises(ValueError, match="gpt2.*supported: llama, qwen2, qwen3"):
        get_mapping("gpt2")
    with pytest.raises(ValueError, match="takes 3 HF"):
        TensorRule(megatron="decoder.layers.{i}.x", hf=("a.{i}",), layout="qkv")


def test_checkpoint_keys():
    assert checkpoint_key("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert checkpoint_key("decoder.layers.0.pre_mlp_layernorm.weight") == (
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", 0)
    assert checkpoint_key("decoder.layers.11.mlp.linear_fc1.weight") == (
        "decoder.layers.mlp.linear_fc1.weight", 11)
    assert checkpoint_key("output_layer.weight") == ("output_layer.weight", None)
    m = model_mapping(tiny_hf_config("qwen2"))
    keys = extra_state_keys(m.megatron_names(), 4)
    assert len(keys) == 16 and "decoder.layers.self_attention.linear_proj._extra_state/shard_3_4" in keys


def test_local_spec_keys_map_is_what_checkpoint_keys_use():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    from megatron_alp.convert.mapping import TE_FUSED_NORMS

    sub = get_gpt_layer_local_submodules(qk_layernorm=True, normalization="RMSNorm")
    assert sub.sharded_state_dict_keys_map == TE_FUSED_NORMS


def test_safetensors_writer_reader_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(10, 3),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=130) as w:
        w.write("a", tensors["a"][4:], row_offset=4)  # rows in any order
        w.write("a", tensors["a"][:4], row_offset=0)
        w.write("c", tensors["c"])
        w.write("b", tensors["b"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}
    back = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        back.update(load_file(f))  # the reference reader accepts the files
    st = HFSafetensors(tmp_path)
    for n, t in tensors.items():
        assert torch.equal(back[n], t) and torch.equal(st.read(n), t)
    assert torch.equal(st.read("a", rows=(2, 5)), tensors["a"][2:5])
    (tmp_path / "partial").mkdir()
    with pytest.raises(RuntimeError, match="not fully written"):
        with ShardedSafetensorsWriter(tmp_path / "partial", plan, max_shard_bytes=10**6) as w:
            w.write("a", tensors["a"])


def test_sizes_and_dtypes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 5 * 10**8 and parse_size(123) == 123
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("lots")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(ValueError, match="--dtype='int8'"):
        parse_dtype("int8")
    assert plan_shards([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]
