"""tools/convert/gguf_to_hf.py on a tiny GGUF written here with the ``gguf`` package (the
oracle: the HF tensors the GGUF was made from, with llama.cpp's Q / K row permutation
applied on the way in, so the converter must undo it to match bit for bit)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_convert_roundtrip import REPO, hf_tensors, random_hf_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")


def _tool(name):
    sys.path.insert(0, str(REPO / "tools" / "convert"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


g2h, h2m = _tool("gguf_to_hf"), _tool("hf_to_megatron")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet (256 printable symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for Q / K (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, path: Path) -> None:
    """A llama-architecture F32 GGUF (with a byte-level BPE vocabulary) from an HF folder."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    t = hf_tensors(hf_dir)
    H, KV, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(cfg["hidden_size"] // H)
    w.add_vocab_size(cfg["vocab_size"])
    syms = _bytes_to_unicode()[: cfg["vocab_size"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(syms)
    w.add_token_types([1] * len(syms))
    w.add_token_scores([0.0] * len(syms))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if "lm_head.weight" in t:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(L):
        names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in per_layer.items()})
    for hf_name, g_name in names.items():
        a = t[hf_name].numpy()
        if ".attn_q." in g_name:
            a = _permute(a, H)
        elif ".attn_k." in g_name:
            a = _permute(a, KV)
        w.add_tensor(g_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_to_hf_is_bit_exact_and_feeds_hf_to_megatron(tmp_path, capsys, tie):
    src = random_hf_model(tmp_path / "hf", model_type="llama", tie=tie)
    (tmp_path / "g").mkdir()
    write_gguf(src, tmp_path / "g" / "tiny.gguf")
    out = tmp_path / "from_gguf"
    assert g2h.main(["--gguf", str(tmp_path / "g" / "tiny.gguf"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"gguf_to_hf: llama, {38 + (not tie)} tensors, ")
    got, want = hf_tensors(out), hf_tensors(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] == tie
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert h2m.main(["--hf", str(out), "--out", str(tmp_path / "mg")]) == 0


def test_gguf_bad_input(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    fake = tmp_path / "g" / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert g2h.main(["--gguf", str(fake), "--out", str(tmp_path / "o")]) == 2
    assert f"--gguf {fake} is not a GGUF file (starts with b'PK\\x03\\x04'" in capsys.readouterr().err
    assert g2h.main(["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist or is not a file" in capsys.readouterr().err
    src = random_hf_model(tmp_path / "hf", model_type="llama", tie=True)
    write_gguf(src, fake)
    assert g2h.main(["--gguf", str(fake), "--out", str(tmp_path / "g"), "--force"]) == 2  # the folder of the input
    assert f"contains the input {fake}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "hf"] and [p.name for p in (tmp_path / "g").iterdir()] == ["model.gguf"]
