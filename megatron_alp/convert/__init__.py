"""HF <-> Megatron conversion: per-architecture mappings, streaming converters, loading.

* :mod:`~megatron_alp.convert.mapping` / :mod:`~megatron_alp.convert.architectures`:
  one declarative table per HF ``model_type`` (qwen2, qwen3, llama) and the layout
  transforms (QKV per query group, gate/up, vocabulary padding). ``ModelMapping.to_hf``
  is shared with the live weight export.
* :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf`: streaming converters
  between HF safetensors folders and Megatron dist checkpoints (torch_dist).
* :func:`load_megatron_checkpoint`: load a checkpoint into GPTModel chunks of any layout.
* :mod:`~megatron_alp.convert.verify`: logits against HF transformers.
"""

from megatron_alp.convert.hf_to_megatron import ConversionReport, convert_hf_to_megatron
from megatron_alp.convert.load import load_megatron_checkpoint
from megatron_alp.convert.mapping import (
    ArchMapping,
    ModelMapping,
    TensorRule,
    get_mapping,
    is_alp_param,
    model_mapping,
    register_mapping,
    registered_model_types,
)
from megatron_alp.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = [
    "ArchMapping",
    "ConversionReport",
    "ModelMapping",
    "TensorRule",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "get_mapping",
    "is_alp_param",
    "load_megatron_checkpoint",
    "model_mapping",
    "register_mapping",
    "registered_model_types",
]
