"""Megatron ``TransformerConfig`` + GPTModel arguments from a Hugging Face config.

One entry per supported HF ``model_type`` in :data:`ARCHITECTURES`; anything else is
refused with the list of supported types. What each architecture sets:

==========  ==========  ==========  =============  ==========================
model_type  QKV bias    q/k norm    rope            notes
==========  ==========  ==========  =============  ==========================
qwen2       yes         no          default         Qwen2 / Qwen2.5
qwen3       per config  RMSNorm     default         head_dim from config
llama       per config  no          default/llama3  Llama 3.x, SmolLM2 (tied)
==========  ==========  ==========  =============  ==========================

All are pre-norm RMSNorm decoders with SwiGLU MLPs (``gated_linear_unit=True``, silu),
rotary embeddings in the rotate-half convention, no dropout, GQA via
``num_key_value_heads``, optional tied input/output embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ARCHITECTURES",
    "GPTArgs",
    "RopeScaling",
    "explicit_hf_config",
    "gpt_args_from_hf",
    "padded_vocab_size",
    "supported_model_types",
]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency scaling of the rotary embedding (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GPTArgs:
    """Everything architecture-specific that GPTModel and TransformerConfig need."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    layernorm_epsilon: float
    add_qkv_bias: bool
    qk_layernorm: bool
    vocab_size: int
    """The true vocabulary size of the HF model (unpadded)."""
    max_position_embeddings: int
    rotary_base: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    init_method_std: float


def _get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default)


def _rope(hf: Any) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 keeps rope settings in `rope_parameters`; older ones use
    # `rope_theta` + `rope_scaling`.
    params = dict(_get(hf, "rope_parameters") or {})
    legacy = _get(hf, "rope_scaling") or {}
    if not params:
        params = dict(legacy)
    theta = params.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        try:
            return float(theta), RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ValueError(f"HF config rope_parameters of type llama3 lacks {e}") from None
    raise ValueError(
        f"HF config rope type {rope_type!r} is not supported; supported: 'default', 'llama3'"
    )


def _common(hf: Any, *, qkv_bias: bool, qk_norm: bool) -> dict[str, Any]:
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"HF config hidden_act={act!r} is not supported (expected 'silu')")
    if _get(hf, "use_sliding_window", False):
        raise ValueError("HF config use_sliding_window=True is not supported (expected False)")
    if _get(hf, "mlp_bias", False):
        raise ValueError("HF config mlp_bias=True is not supported (expected False)")
    heads = int(hf.num_attention_heads)
    head_dim = _get(hf, "head_dim") or hf.hidden_size // heads
    theta, scaling = _rope(hf)
    return dict(
        model_type=hf.model_type,
        num_layers=int(hf.num_hidden_layers),
        hidden_size=int(hf.hidden_size),
        ffn_hidden_size=int(hf.intermediate_size),
        num_attention_heads=heads,
        num_query_groups=int(_get(hf, "num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        layernorm_epsilon=float(hf.rms_norm_eps),
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        vocab_size=int(hf.vocab_size),
        max_position_embeddings=int(hf.max_position_embeddings),
        rotary_base=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        init_method_std=float(_get(hf, "initializer_range", 0.02)),
    )


def _qwen2(hf: Any) -> GPTArgs:
    return GPTArgs(**_common(hf, qkv_bias=True, qk_norm=False))


def _attention_bias(hf: Any) -> bool:
    # HF's attention_bias puts a bias on q, k, v *and* o; Megatron can only bias q/k/v
    # separately from the other linears (add_qkv_bias vs add_bias_linear).
    if _get(hf, "attention_bias", False):
        raise ValueError(
            f"HF config attention_bias=True ({hf.model_type}) is not supported: it also adds "
            "an o_proj bias, which Megatron cannot express without MLP biases (expected False)"
        )
    return False


def _qwen3(hf: Any) -> GPTArgs:
    return GPTArgs(**_common(hf, qkv_bias=_attention_bias(hf), qk_norm=True))


def _llama(hf: Any) -> GPTArgs:
    return GPTArgs(**_common(hf, qkv_bias=_attention_bias(hf), qk_norm=False))


ARCHITECTURES: dict[str, Callable[[Any], GPTArgs]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "llama": _llama,
}


_EXPLICIT_INT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings")
_FALSE_BY_DEFAULT = ("use_sliding_window", "mlp_bias", "attention_bias")


def explicit_hf_config(cfg: dict[str, Any]) -> Any | None:
    """``config.json``'s dict as a plain attribute object, *if* it states explicitly, with
    the right JSON types, every field that :func:`gpt_args_from_hf` reads and whose
    transformers default could differ from this module's; else None (load it with
    transformers). Saves importing transformers (~1 s) where the file says it all.

    Explicit: ``model_type`` (supported), the sizes, ``rms_norm_eps``, ``hidden_act``,
    ``tie_word_embeddings``, the rotary base (``rope_theta`` or
    ``rope_parameters.rope_theta``) and, for qwen3 (transformers' default 128),
    ``head_dim``. ``use_sliding_window`` / ``mlp_bias`` / ``attention_bias`` default to False
    in transformers and here. ``tests/unit/test_convert_pipeline.py`` checks that both
    routes give equal :class:`GPTArgs` for each architecture.
    """
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if cfg.get("model_type") not in ARCHITECTURES:
        return None
    if not all(is_int(cfg.get(k)) for k in _EXPLICIT_INT):
        return None
    if not is_num(cfg.get("rms_norm_eps")) or not isinstance(cfg.get("hidden_act"), str):
        return None
    if not isinstance(cfg.get("tie_word_embeddings"), bool):
        return None
    if not all(isinstance(cfg.get(k, False), bool) for k in _FALSE_BY_DEFAULT):
        return None
    if "initializer_range" in cfg and not is_num(cfg["initializer_range"]):
        return None
    head_dim = cfg.get("head_dim")
    if head_dim is not None and not is_int(head_dim):
        return None
    if cfg["model_type"] == "qwen3" and head_dim is None:
        return None
    params, legacy = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if params is not None and legacy is not None:
        return None  # transformers merges them; leave that to it
    if params is not None:
        if not isinstance(params, dict) or not is_num(params.get("rope_theta")):
            return None
    else:
        if legacy is not None and not isinstance(legacy, dict):
            return None
        if not is_num(cfg.get("rope_theta")):
            return None
    return _Attributes(cfg)


class _Attributes:
    """A JSON object read through attributes (absent keys are absent attributes)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


def supported_model_types() -> list[str]:
    """HF ``model_type`` values that :func:`gpt_args_from_hf` accepts."""
    return sorted(ARCHITECTURES)


def gpt_args_from_hf(hf_config: Any) -> GPTArgs:
    """Read the architecture out of an HF config object (``PretrainedConfig`` or alike)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"HF model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return ARCHITECTURES[model_type](hf_config)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by`` that TP also divides.

    The padding does not depend on TP when ``tp`` divides ``divisible_by`` (the default
    128 covers TP = 1, 2, 4, 8, ...), so one converted checkpoint loads under any of them.
    """
    if divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def activation() -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation of every supported architecture (SwiGLU's gate)."""
    return F.silu
