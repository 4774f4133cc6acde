"""HF <-> Megatron conversion: per-architecture mappings, streaming converters, loading.

* :mod:`~megatron_alp.convert.mapping` / :mod:`~megatron_alp.convert.architectures`:
  one declarative table per HF ``model_type`` (qwen2, qwen3, llama) and the layout
  transforms (QKV per query group, gate/up, vocabulary padding). ``ModelMapping.to_hf``
  is shared with the live weight export.
* :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf`: streaming converters
  between HF safetensors folders and Megatron dist checkpoints (torch_dist).
* :func:`convert_gguf_to_hf`: a GGUF file -> HF safetensors folder (transformers' loader).
* :func:`load_megatron_checkpoint`: load a checkpoint into GPTModel chunks of any layout.
* :mod:`~megatron_alp.convert.verify`: logits against HF transformers.

The names are imported lazily, so ``megatron_alp.convert.checks`` and
``megatron_alp.convert.cli`` (standard library only) load without torch: a command-line
tool refuses a bad path in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConversionReport": "megatron_alp.convert.hf_to_megatron",
    "convert_hf_to_megatron": "megatron_alp.convert.hf_to_megatron",
    "convert_megatron_to_hf": "megatron_alp.convert.megatron_to_hf",
    "convert_gguf_to_hf": "megatron_alp.convert.gguf_to_hf",
    "load_megatron_checkpoint": "megatron_alp.convert.load",
    "ArchMapping": "megatron_alp.convert.mapping",
    "ModelMapping": "megatron_alp.convert.mapping",
    "TensorRule": "megatron_alp.convert.mapping",
    "get_mapping": "megatron_alp.convert.mapping",
    "is_alp_param": "megatron_alp.convert.mapping",
    "model_mapping": "megatron_alp.convert.mapping",
    "register_mapping": "megatron_alp.convert.mapping",
    "registered_model_types": "megatron_alp.convert.mapping",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_alp.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
