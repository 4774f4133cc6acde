"""Build Megatron GPTModel chunks for this rank from a Hugging Face config.

    args = gpt_args_from_hf(AutoConfig.from_pretrained(path))
    validate_layout(args, parallel_cfg)               # before any process group exists
    info = parallel.initialize(parallel_cfg)
    config = transformer_config(args, parallel_cfg)
    chunks = build_model(args, config)               # one GPTModel per virtual stage

The layer spec is Transformer Engine's where TE is importable on CUDA, the local
megatron-core spec otherwise (with :class:`~megatron_alp.models.norms.RMSNorm`, which
also serves sequence parallelism on the CPU). Extensions such as ALP wrap the spec
(``layer_spec_transform``); nothing here patches Megatron.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import Any, Callable

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_alp import platform
from megatron_alp.models.hf import GPTArgs, activation, padded_vocab_size
from megatron_alp.models.norms import RMSNorm
from megatron_alp.parallel import ParallelConfig

__all__ = [
    "build_model",
    "default_fusions",
    "layer_spec",
    "layer_spec_report",
    "te_available",
    "transformer_config",
    "validate_layout",
]

RECOMPUTE_GRANULARITIES = (None, "full", "selective")

# How to install TE so that its PyTorch extension is built against the torch in use
# (TE's installation guide: the PyTorch extension ships as a source distribution; with
# build isolation pip would build it against a different, freshly downloaded torch).
TE_INSTALL = "pip install --no-build-isolation 'transformer_engine[pytorch]'"
_te_problem: str | None = None  # why the last _te_works() said no (None: it did not)


def te_available() -> bool:
    """True when Transformer Engine can be used: CUDA present and TE's PyTorch side works.

    ``import transformer_engine`` alone succeeds on a broken install (a wheel built for
    another CUDA or torch, a missing shared library); what the TE layer spec needs is
    ``transformer_engine.pytorch`` and megatron-core's TE extension, so those are imported
    (once per process; a failure is reported once, with its reason).
    """
    return platform.cuda_available() and _te_works()


@functools.cache
def _te_works() -> bool:
    global _te_problem
    _te_problem = None
    try:
        importlib.import_module("transformer_engine")
    except ImportError:
        _te_problem = "Transformer Engine is not installed"
        return False  # the local spec; layer_spec_report() says so at start-up
    try:
        importlib.import_module("transformer_engine.pytorch")
        ext = importlib.import_module("megatron.core.extensions.transformer_engine")
        if not getattr(ext, "HAVE_TE", False):
            raise ImportError("megatron.core.extensions.transformer_engine reports HAVE_TE=False")
    except Exception as exc:  # noqa: BLE001 - a broken extension raises OSError, RuntimeError...
        _te_problem = f"Transformer Engine is installed but does not work ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"Transformer Engine is installed but does not work ({type(exc).__name__}: {exc}); "
            "using megatron-core's local layer spec",
            stacklevel=2,
        )
        return False
    return True


def layer_spec_report() -> tuple[str, bool]:
    """The layer spec this process builds and why, for the start-up log: ``(line, loud)``.

    ``loud`` is True where CUDA is present but the local spec is used (Transformer
    Engine missing or broken, e.g. an extension built for another torch: an ABI
    mismatch) — slower, without TE's fused kernels, and easy to miss in a warning.
    """
    if not platform.cuda_available():
        return "layer spec: megatron-core local (no CUDA; Transformer Engine needs a GPU)", False
    if te_available():
        te = importlib.import_module("transformer_engine")
        return f"layer spec: Transformer Engine (transformer_engine {getattr(te, '__version__', '?')})", False
    return (
        f"layer spec: megatron-core LOCAL spec although CUDA is present: {_te_problem or 'TE unusable'}. "
        f"Install TE against this torch: {TE_INSTALL} (docs/gpu.md, Transformer Engine)",
        True,
    )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken extension is as good as a missing one
        return False
    return True


def default_fusions() -> dict[str, bool]:
    """The TransformerConfig fusion switches for this machine (see docs/gpu.md).

    Without CUDA all are off (the fused kernels are CUDA kernels). With CUDA each is on
    where its kernel is present: ``bias_activation_fusion`` (SwiGLU, torch.jit) and
    ``bias_dropout_fusion`` (bias-dropout-add, torch.jit) always; ``apply_rope_fusion``
    with a working Transformer Engine; ``masked_softmax_fusion`` (local spec only) with
    megatron's softmax CUDA extensions; ``gradient_accumulation_fusion`` with apex's
    ``fused_weight_gradient_mlp_cuda`` (megatron-core's output layer refuses it without).
    ``persist_layer_norm`` stays off (apex LayerNorm only; these models use RMSNorm).
    Each is a TransformerConfig field that :func:`transformer_config` ``overrides`` set.
    """
    if not platform.cuda_available():
        return dict(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )
    return dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=te_available(),
        masked_softmax_fusion=_importable("scaled_masked_softmax_cuda")
        and _importable("scaled_upper_triang_masked_softmax_cuda"),
        gradient_accumulation_fusion=_importable("fused_weight_gradient_mlp_cuda"),
        persist_layer_norm=False,
    )


def validate_layout(
    args: GPTArgs,
    parallel_cfg: ParallelConfig,
    *,
    world_size: int | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> None:
    """Check that the model can be split as asked; ValueError naming the value otherwise.

    Runs without any process group, so a bad layout fails before ranks start waiting.
    """
    tp = parallel_cfg.tensor_model_parallel_size
    if world_size is not None:
        parallel_cfg.data_parallel_size(world_size)
    checks = [
        ("num_attention_heads", args.num_attention_heads),
        ("num_key_value_heads (query groups)", args.num_query_groups),
        ("intermediate_size", args.ffn_hidden_size),
    ]
    for name, value in checks:
        if value % tp:
            raise ValueError(
                f"HF config {name}={value} is not divisible by tensor_model_parallel_size={tp}; "
                f"use a TP size that divides {value}"
            )
    if args.num_attention_heads % args.num_query_groups:
        raise ValueError(
            f"HF config num_attention_heads={args.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={args.num_query_groups}"
        )
    stages = parallel_cfg.pipeline_model_parallel_size * (
        parallel_cfg.virtual_pipeline_model_parallel_size or 1
    )
    if args.num_layers % stages:
        raise ValueError(
            f"HF config num_hidden_layers={args.num_layers} is not divisible by pipeline x "
            f"virtual pipeline stages = {stages}"
        )
    padded = padded_vocab_size(args.vocab_size, make_vocab_size_divisible_by, tp)
    if padded % tp:  # cannot happen by construction; kept as an internal invariant
        raise AssertionError(padded)
    if parallel_cfg.context_parallel_size > 1 and not te_available():
        raise ValueError(
            f"context_parallel_size={parallel_cfg.context_parallel_size} needs Transformer "
            "Engine attention on CUDA; megatron-core's local attention supports only 1"
        )


def transformer_config(
    args: GPTArgs,
    parallel_cfg: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute_granularity: str | None = None,
    recompute_num_layers: int | None = None,
    fusions: bool | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``args`` under ``parallel_cfg``.

    ``params_dtype`` float32 trains with fp32 weights; bfloat16 turns on Megatron's bf16
    mode (fp32 main params live in the optimizer). ``recompute_granularity`` is None,
    ``"full"`` (every layer, uniform, one layer per checkpoint unless
    ``recompute_num_layers``) or ``"selective"`` (core attention). ``fusions``: None
    (default) takes :func:`default_fusions` (on with CUDA where the kernels exist), False
    turns every fusion off (e.g. to rule them out when chasing train/rollout mismatch:
    docs/gpu.md lists which ones change bf16 numerics). ``overrides`` are TransformerConfig
    fields, passed through unchanged and applied last, so one fusion can be switched
    alone (``apply_rope_fusion=False``, ``bias_activation_fusion=False``, ...).
    """
    if recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(
            f"recompute_granularity={recompute_granularity!r} is not one of "
            f"{RECOMPUTE_GRANULARITIES}"
        )
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"params_dtype={params_dtype} is not one of torch.float32, torch.bfloat16, "
            "torch.float16"
        )
    recompute: dict[str, Any] = {}
    if recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=recompute_num_layers or 1,
        )
    elif recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    on_cpu = not platform.cuda_available()
    kwargs: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        layernorm_epsilon=args.layernorm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=activation(),
        add_bias_linear=False,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        attention_softmax_in_fp32=True,
        # Fusions: on with CUDA where the kernels exist, off on the CPU (default_fusions)
        **(default_fusions() if fusions is None or fusions else {
            k: False for k in default_fusions()
        }),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=on_cpu,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        # gloo matches point-to-point messages between two ranks in posting order; with
        # PP=2 the previous and next stage are the same peer and the batched p2p path posts
        # send-to-prev before send-to-next, so interleaved 1F1B swaps activations and grads.
        # The unbatched path splits the two directions over two groups (megatron-core does
        # this for 2-rank pipelines) and is exact.
        batch_p2p_comm=not on_cpu,
        **recompute,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(args: GPTArgs, *, use_te: bool | None = None) -> ModuleSpec:
    """The TransformerLayer spec: TE's when available (or asked), else the local one."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        if not te_available():
            raise ValueError("use_te=True but Transformer Engine is not usable (needs TE + CUDA)")
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    sub = specs.get_gpt_layer_local_submodules(
        qk_layernorm=args.qk_layernorm, normalization="RMSNorm"
    )
    attn = sub.self_attention
    attn_sub = attn.submodules
    if args.qk_layernorm:
        attn_sub = dataclasses.replace(attn_sub, q_layernorm=RMSNorm, k_layernorm=RMSNorm)
    sub = dataclasses.replace(
        sub,
        input_layernorm=RMSNorm,
        pre_mlp_layernorm=RMSNorm,
        self_attention=ModuleSpec(module=attn.module, params=attn.params, submodules=attn_sub),
    )
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return ModuleSpec(module=TransformerLayer, submodules=sub)


def _block_spec(
    spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None, use_te: bool
) -> TransformerBlockSubmodules:
    # A block spec (rather than a layer spec) lets us choose the final norm: megatron-core
    # would otherwise pick apex's or WrappedTorchNorm, which refuses sequence parallelism.
    final_norm: Any = RMSNorm
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=final_norm)


def build_model(
    args: GPTArgs,
    config: TransformerConfig,
    *,
    use_te: bool | None = None,
    layer_spec_transform: Callable[[ModuleSpec], ModuleSpec] | None = None,
    make_vocab_size_divisible_by: int = 128,
    parallel_output: bool = True,
    device: torch.device | str | None = None,
) -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage; one without VPP).

    Call after :func:`megatron_alp.parallel.initialize`. Models are on ``device``
    (default :func:`megatron_alp.platform.device`; ``"meta"`` builds the shapes only, no
    memory: build under ``with torch.device("meta"):`` too) and in ``config.params_dtype``;
    ``layer_spec_transform`` wraps the layer spec (e.g. ``functools.partial(with_alp,
    cfg=alp_cfg)``). Logits stay vocab-parallel (``parallel_output=True``).
    """
    from megatron.core import parallel_state as ps

    if use_te is None:
        use_te = te_available()
    spec = layer_spec(args, use_te=use_te)
    if layer_spec_transform is not None:
        spec = layer_spec_transform(spec)
    vpp = config.virtual_pipeline_model_parallel_size
    vocab = padded_vocab_size(
        args.vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(spec, config, stage, use_te),
            vocab_size=vocab,
            max_sequence_length=args.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=args.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=args.rotary_base,
            vp_stage=stage,
        )
        _apply_rope_scaling(model, args)
        model.to(platform.device() if device is None else device)
        chunks.append(model)
    return chunks


def _apply_rope_scaling(model: GPTModel, args: GPTArgs) -> None:
    """Llama-3 rope scaling with all four of the config's parameters.

    GPTModel forwards only ``rope_scaling_factor`` and keeps megatron's defaults for the
    low/high frequency factors and original context (1, 4, 8192); configs that differ
    would silently get other frequencies. ``RotaryEmbedding._apply_scaling`` takes them
    all, so the frequencies are recomputed here, in one place.
    """
    rs = args.rope_scaling
    if rs is None or not hasattr(model, "rotary_pos_emb"):
        return
    rope = model.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=rs.factor,
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_max_position_embeddings,
    )
