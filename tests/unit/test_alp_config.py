"""ALPConfig validation, the spec wrapper's refusals, gating context, the export rule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_alp.perturbation import (
    ALPConfig,
    ALPTransformerLayer,
    LayerPerturbation,
    current_coords,
    is_alp_param,
    perturbed,
    step_key,
    with_alp,
)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(init_std=-0.1), r"ALPConfig.init_std=-0.1 is invalid; allowed: a finite float > 0"),
        (dict(init_std=0.0), r"ALPConfig.init_std=0 is invalid with learnable=True.*allowed: init_std > 0"),
        (dict(init_std=float("nan")), r"ALPConfig.init_std=nan is invalid"),
        (dict(placement="residual"), r"ALPConfig.placement='residual' is unknown; allowed: hidden, logits"),
        (dict(kernel="cuda"), r"ALPConfig.kernel='cuda' is unknown; allowed: auto, torch, compile, triton"),
        (dict(layer_start=-1), r"ALPConfig.layer_start=-1 is invalid; allowed: an integer >= 0"),
        (dict(layer_start=3, layer_end=2), r"ALPConfig.layer_end=2 is invalid; allowed: None or an integer >= layer_start=3"),
        (dict(lr=-1.0), r"ALPConfig.lr=-1.0 is invalid; allowed: a finite float >= 0"),
        (dict(weight_decay=-0.01), r"ALPConfig.weight_decay=-0.01 is invalid"),
        (dict(min_lr=1.0, lr=0.1), r"ALPConfig.min_lr=1.0 is invalid; allowed: None or a float in \[0, lr=0.1\]"),
        (dict(placement="logits", layer_start=2), r"placement='logits' perturbs the final hidden states only"),
        (dict(seed=-3), r"ALPConfig.seed=-3 is invalid"),
        (dict(enabled=1), r"ALPConfig.enabled must be a bool, got 1"),
    ],
)
def test_bad_config_names_field_value_and_allowed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ALPConfig(**kwargs)


def test_fixed_zero_sigma_is_allowed_and_perturbs_nothing():
    cfg = ALPConfig(init_std=0.0, learnable=False)
    assert not any(cfg.perturbs_layer(i, 4) for i in range(4))


def test_layer_range_is_checked_against_the_model():
    with pytest.raises(ValueError, match=r"layer_start=4 is outside \[0, num_layers=4\)"):
        ALPConfig(layer_start=4).validate_for_model(4)
    with pytest.raises(ValueError, match=r"layer_end=5 is outside \[0, num_layers=4\]"):
        ALPConfig(layer_end=5).validate_for_model(4)
    ALPConfig(layer_start=2, layer_end=2).validate_for_model(4)  # empty, allowed
    cfg = ALPConfig(layer_start=1, layer_end=3)
    assert [cfg.perturbs_layer(i, 4) for i in range(4)] == [False, True, True, False]
    assert [ALPConfig(placement="logits").perturbs_layer(i, 4) for i in range(4)] == [False] * 3 + [True]


def _tconfig(**kw) -> TransformerConfig:
    return TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True, **kw
    )


def test_layer_perturbation_refuses_out_of_range_layers_at_build():
    with pytest.raises(ValueError, match=r"layer_end=6 is outside \[0, num_layers=4\]"):
        LayerPerturbation(_tconfig(), layer_number=1, alp_config=ALPConfig(layer_end=6))


def test_sigma_param_is_fp32_named_tagged_and_survives_half_casts():
    module = LayerPerturbation(_tconfig(), layer_number=2, alp_config=ALPConfig(init_std=0.02))
    (name, param), = module.named_parameters()
    assert name == "alp_log_sigma" and is_alp_param(f"decoder.layers.1.perturbation.{name}")
    assert param.shape == () and param.dtype == torch.float32
    assert float(param.exp()) == pytest.approx(0.02, rel=1e-6)
    assert getattr(param, "sequence_parallel") is False
    module.bfloat16()
    assert module.alp_log_sigma.dtype == torch.float32
    fixed = LayerPerturbation(_tconfig(), layer_number=2, alp_config=ALPConfig(learnable=False))
    assert list(fixed.named_parameters()) == [] and "alp_log_sigma" in fixed.state_dict()
    off = LayerPerturbation(_tconfig(), layer_number=1, alp_config=ALPConfig(layer_start=2))
    assert not off.active and off.state_dict() == {}


def test_half_casts_keep_log_sigmas_fp32_value_exactly():
    """Float16Module's model.bfloat16() must not round sigma: 0.02 became 0.020116 (issue 9)."""
    from megatron.core.transformer.module import Float16Module

    want = torch.tensor(math.log(0.02), dtype=torch.float32)
    assert want.bfloat16().float() != want  # the cast would change the value
    for learnable in (True, False):
        cfg = ALPConfig(init_std=0.02, learnable=learnable)
        inner = torch.nn.Sequential(
            torch.nn.Linear(4, 4), LayerPerturbation(_tconfig(), layer_number=2, alp_config=cfg)
        )
        wrapped = Float16Module(_tconfig(bf16=True), inner)
        assert inner[0].weight.dtype == torch.bfloat16  # the rest of the model was cast
        log_sigma = wrapped.module[1].alp_log_sigma
        assert log_sigma.dtype == torch.float32 and torch.equal(log_sigma.detach(), want)
        assert isinstance(log_sigma, torch.nn.Parameter) is learnable
        inner.half().float().bfloat16()  # repeated casts, fp16 included
        assert torch.equal(inner[1].alp_log_sigma.detach(), want)


def test_is_alp_param():
    assert is_alp_param("module.decoder.layers.3.perturbation.alp_log_sigma")
    assert is_alp_param("alp_log_sigma")
    assert not is_alp_param("decoder.layers.3.self_attention.linear_qkv.weight")
    assert not is_alp_param("decoder.layers.3.alp_log_sigma_other")


def _local_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()


def test_with_alp_wraps_transformer_layer_specs():
    spec = with_alp(_local_spec(), ALPConfig())
    assert spec.module is ALPTransformerLayer and issubclass(spec.module, TransformerLayer)
    assert spec.submodules.perturbation.module is LayerPerturbation
    assert isinstance(spec.submodules, TransformerLayerSubmodules)
    # A subclass (MoE) stays itself plus the slot; a lazy (path, name) module resolves.
    moe = with_alp(ModuleSpec(module=MoETransformerLayer, submodules=_local_spec().submodules), ALPConfig())
    assert issubclass(moe.module, MoETransformerLayer) and moe.module.__name__ == "ALPMoETransformerLayer"
    lazy = ModuleSpec(
        module=("megatron.core.transformer.transformer_layer", "TransformerLayer"),
        submodules=_local_spec().submodules,
    )
    assert with_alp(lazy, ALPConfig()).module is ALPTransformerLayer
    # Disabled: the spec itself, untouched.
    plain = _local_spec()
    assert with_alp(plain, ALPConfig(enabled=False)) is plain


def test_with_alp_fails_fast_on_specs_it_cannot_handle():
    spec = _local_spec()
    with pytest.raises(ValueError, match="already carries ALP"):
        with_alp(with_alp(spec, ALPConfig()), ALPConfig())
    with pytest.raises(ValueError, match=r"is not supported; allowed: TransformerLayer and its subclasses"):
        with_alp(ModuleSpec(module=torch.nn.Linear), ALPConfig())
    with pytest.raises(ValueError, match="expected a ModuleSpec of a TransformerLayer"):
        with_alp(TransformerLayer, ALPConfig())
    with pytest.raises(ValueError, match="submodules of type NoneType are not supported"):
        with_alp(ModuleSpec(module=TransformerLayer), ALPConfig())
    with pytest.raises(ValueError, match="cfg must be an ALPConfig"):
        with_alp(spec, {"init_std": 0.1})


def test_perturbed_context_nests_restores_and_validates():
    assert current_coords() is None
    with perturbed(key=2**63 + 5, step=7, sample_offset=torch.tensor(12)) as outer:
        assert current_coords() == outer
        assert (outer.key, outer.step, outer.sample_offset) == (2**63 + 5, 7, 12)
        with perturbed(key=1, step=8, sample_offset=0):
            assert current_coords().step == 8
        assert current_coords() == outer
    assert current_coords() is None
    with pytest.raises(ValueError, match=r"step=-1 is invalid; allowed: an integer in \[0, 2\*\*32\)"):
        with perturbed(key=1, step=-1, sample_offset=0):
            pass
    with pytest.raises(ValueError, match=r"key=.* is invalid"):
        with perturbed(key=2**64, step=0, sample_offset=0):
            pass
    assert current_coords() is None
    assert dataclasses.is_dataclass(outer)


def test_inference_rng_tracker_is_refused_not_silently_ignored():
    """Issue 13.4: Megatron's inference tracker ignores add / fork / set_states, so ALP
    would be silently off and the step key drawn from the default generator."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        assert tensor_parallel.get_cuda_rng_tracker().is_inference_rng_tracker
        with pytest.raises(RuntimeError, match=r"inference_rng_tracker=True.*ALP would be silently off"):
            with perturbed(key=1, step=0, sample_offset=0):
                pass
        with pytest.raises(RuntimeError, match=r"inference_rng_tracker=True"):
            step_key(0)
    finally:
        mpu_random.initialize_rng_tracker(force_reset=True)
    with perturbed(key=1, step=0, sample_offset=0):  # a training tracker works again
        assert current_coords() is not None
