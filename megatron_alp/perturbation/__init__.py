"""Adaptive Layerwise Perturbation (ALP) for Megatron-Core. See ``docs/alp.md``.

Build::

    chunks = build_model(args, config, layer_spec_transform=partial(with_alp, cfg=alp_cfg))

Train (policy-update forward only)::

    key = step_key(alp_cfg)                                    # once per step
    with perturbed(key=key, step=step, sample_offset=offset):  # per micro-batch forward
        logits = model(tokens, position_ids, None)

Optimizer: ``config_overrides=alp_config_overrides(alp_cfg, opt_cfg)``; logging:
``alp_metrics(model)``; exports drop every name with ``is_alp_param(name)``.
"""

from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.perturbation.context import (
    COORDS_STATE,
    NOISE_STATE,
    NoiseCoords,
    current_coords,
    perturbed,
    step_key,
)
from megatron_alp.perturbation.layer import (
    ALPTransformerLayer,
    ALPTransformerLayerSubmodules,
    LayerPerturbation,
    is_alp_param,
    with_alp,
)
from megatron_alp.perturbation.metrics import alp_metrics
from megatron_alp.perturbation.optim import alp_config_overrides

__all__ = [
    "ALPConfig",
    "ALPTransformerLayer",
    "ALPTransformerLayerSubmodules",
    "COORDS_STATE",
    "LayerPerturbation",
    "NOISE_STATE",
    "NoiseCoords",
    "alp_config_overrides",
    "alp_metrics",
    "current_coords",
    "is_alp_param",
    "perturbed",
    "step_key",
    "with_alp",
]
