"""GPTModel from Hugging Face configs (Qwen2/2.5, Qwen3, Llama 3.x) and its sharding."""

from megatron_alp.models.builder import (
    build_model,
    layer_spec,
    te_available,
    transformer_config,
    validate_layout,
)
from megatron_alp.models.hf import GPTArgs, gpt_args_from_hf, padded_vocab_size, supported_model_types

__all__ = [
    "GPTArgs",
    "build_model",
    "gpt_args_from_hf",
    "layer_spec",
    "padded_vocab_size",
    "supported_model_types",
    "te_available",
    "transformer_config",
    "validate_layout",
]
