"""Tiny models and data for tests and benchmarks (no downloads).

``tiny_hf_config`` returns a real ``transformers`` config of a supported architecture at
toy size; ``random_full_state`` gives canonical (TP=1, PP=1) Megatron weights drawn from a
seeded generator per tensor name, so every layout and process sees the same numbers.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

__all__ = ["random_full_state", "tiny_batches", "tiny_hf_config"]


def tiny_hf_config(model_type: str = "qwen2", *, tie: bool = False, **overrides: Any) -> Any:
    """A small HF config: 4 layers, hidden 64, 4 heads / 2 KV heads, vocab 250."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=250,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    if model_type == "qwen2":
        cls = transformers.Qwen2Config
    elif model_type == "qwen3":
        cls = transformers.Qwen3Config
        common["head_dim"] = 16
    elif model_type == "llama":
        cls = transformers.LlamaConfig
        common["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    else:
        raise ValueError(f"tiny_hf_config: unknown model_type {model_type!r}")
    common.update(overrides)
    return cls(**common)


def random_full_state(
    chunks: Any, seed: int = 0, *, std: float = 0.05
) -> dict[str, torch.Tensor]:
    """Overwrite the params of a TP=1, PP=1 model with seeded noise; return them, canonical.

    Norm weights are drawn around 1 so that they matter; biases and matrices around 0.
    """
    from megatron_alp.models.sharding import iter_named_local_params

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in iter_named_local_params(chunks):
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            value = torch.randn(param.shape, generator=g, dtype=torch.float32) * std
            if "layernorm" in name or name.endswith("norm.weight"):
                value += 1.0
            param.copy_(value.to(param.dtype))
            out[name] = param.detach().clone()
    return out


def tiny_batches(
    n: int, *, batch: int = 2, seq: int = 16, vocab: int = 250, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` micro-batches of random tokens with next-token labels and a loss mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        mask = torch.ones(batch, seq)
        mask[:, : seq // 4] = 0.0  # a "prompt" that carries no loss
        out.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                loss_mask=mask,
                position_ids=torch.arange(seq).unsqueeze(0).expand(batch, -1).contiguous(),
            )
        )
    return out
