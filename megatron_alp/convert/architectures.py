"""The per-architecture tables: HF ``model_type`` -> canonical Megatron names.

Qwen2/2.5, Qwen3 and Llama 3.x share the decoder skeleton; they differ in QKV bias
(Qwen2), q/k RMSNorm (Qwen3) and nothing else the converters see. ``lm_head.weight``
exists only for untied models; a tied checkpoint that still carries it has it dropped
(HF ties it to the embedding on load). Rotary ``inv_freq`` buffers that old checkpoints
saved are dropped.
"""

from __future__ import annotations

from megatron_alp.convert.mapping import ArchMapping, TensorRule, register_mapping

__all__ = ["LLAMA", "QWEN2", "QWEN3"]

R = TensorRule
_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

_EMBED = (R(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",), layout="vocab"),)
_ATTN = (
    R(megatron=_L + "input_layernorm.weight", hf=(_H + "input_layernorm.weight",)),
    R(
        megatron=_L + "self_attention.linear_qkv.weight",
        hf=tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        layout="qkv",
    ),
)
_QKV_BIAS = (
    R(
        megatron=_L + "self_attention.linear_qkv.bias",
        hf=tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
        layout="qkv",
        when="qkv_bias",
    ),
)
_QK_NORM = (
    R(megatron=_L + "self_attention.q_layernorm.weight", hf=(_H + "self_attn.q_norm.weight",)),
    R(megatron=_L + "self_attention.k_layernorm.weight", hf=(_H + "self_attn.k_norm.weight",)),
)
_REST = (
    R(megatron=_L + "self_attention.linear_proj.weight", hf=(_H + "self_attn.o_proj.weight",)),
    R(megatron=_L + "pre_mlp_layernorm.weight", hf=(_H + "post_attention_layernorm.weight",)),
    R(
        megatron=_L + "mlp.linear_fc1.weight",
        hf=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        layout="gate_up",
    ),
    R(megatron=_L + "mlp.linear_fc2.weight", hf=(_H + "mlp.down_proj.weight",)),
    R(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",)),
    R(megatron="output_layer.weight", hf=("lm_head.weight",), layout="vocab", when="untied"),
    # Dropped: the tied head (HF re-ties it on load) and stale rotary buffers.
    R(megatron=None, hf=("lm_head.weight",), when="tied"),
    R(megatron=None, hf=("model.rotary_emb.inv_freq",)),
    R(megatron=None, hf=(_H + "self_attn.rotary_emb.inv_freq",)),
)

QWEN2 = register_mapping(ArchMapping(model_type="qwen2", rules=_EMBED + _ATTN + _QKV_BIAS + _REST))
QWEN3 = register_mapping(
    ArchMapping(model_type="qwen3", rules=_EMBED + _ATTN + _QKV_BIAS + _QK_NORM + _REST)
)
LLAMA = register_mapping(ArchMapping(model_type="llama", rules=_EMBED + _ATTN + _QKV_BIAS + _REST))
