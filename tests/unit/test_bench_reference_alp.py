"""benchmarks/reference_alp.py: the benchmark's "reference" variants draw the reference's noise.

Oracle: an independently seeded ``torch.Generator`` (seed ``counter * 100003 + rank +
layer_idx``, 0-based layer) and the closed-form gradients of ``h + sigma * eps``:
``d/dh = g`` and ``d/d log_sigma = sigma * sum(g * eps)``. The checkpointed variant's
gradient is computed from the noise re-drawn in the recompute, so it matches only if the
recompute re-seeds the generator and draws the same noise.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_alp.perturbation import ALPConfig, perturbed

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "reference_alp.py"
_spec = importlib.util.spec_from_file_location("bench_reference_alp", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

SIGMA = 0.05


def _layer(cls, layer_number: int, learnable: bool = True):
    cfg = TransformerConfig(
        num_layers=4, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True
    )
    return cls(cfg, layer_number=layer_number, alp_config=ALPConfig(init_std=SIGMA, learnable=learnable))


def _oracle_eps(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen)


def test_seed_formula():
    assert ref.reference_micro_batch_seed(3, global_rank=2) == 3 * 100003 + 2
    assert ref.reference_micro_batch_seed(0) == 0


@pytest.mark.parametrize("cls", ["ReferencePerturbation", "ReferenceSTPerturbation"])
def test_noise_and_grads_match_an_independent_generator(cls):
    layer = _layer(getattr(ref, cls), layer_number=3)  # Megatron's 1-based 3 = layer_idx 2
    model = torch.nn.ModuleList([layer])
    seed = ref.reference_micro_batch_seed(7)
    assert ref.set_reference_seed(model, seed) == 1
    h = torch.randn(5, 2, 16, requires_grad=True)
    g = torch.randn(5, 2, 16)
    with perturbed(key=1, step=0, sample_offset=0):
        out = layer(h)
    eps = _oracle_eps(h.shape, seed + 2)
    sigma = layer.log_sigma.detach().exp()  # fp32 exp(log(0.05)), one ulp off 0.05
    torch.testing.assert_close(out, h + sigma * eps, rtol=0, atol=1e-7)
    out.backward(g)
    torch.testing.assert_close(h.grad, g, rtol=0, atol=0)
    want = sigma.double() * (g.double() * eps.double()).sum()
    assert layer.log_sigma.grad is not None
    assert math.isclose(layer.log_sigma.grad.item(), want.item(), rel_tol=1e-5)


def test_checkpointed_variant_saves_no_noise_but_holds_its_input():
    # The reference's checkpoint keeps its inputs (h, log_sigma, the seed) for the
    # recompute and nothing of the injection itself: exactly one [s, b, h] tensor, h.
    layer = _layer(ref.ReferencePerturbation, layer_number=1)
    h = torch.randn(5, 2, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with perturbed(key=1, step=0, sample_offset=0), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(h)
    big = [t for t in saved if t.numel() == h.numel()]
    assert len(big) == 1 and big[0] is h


def test_fixed_sigma_and_outside_perturbed():
    layer = _layer(ref.ReferencePerturbation, layer_number=1, learnable=False)
    ref.set_reference_seed(torch.nn.ModuleList([layer]), 11)
    h = torch.randn(3, 1, 16)
    assert layer(h) is h  # no perturbed() context: identity, like LayerPerturbation
    with perturbed(key=1, step=0, sample_offset=0):
        out = layer(h)
    sigma = layer.log_sigma.exp()
    torch.testing.assert_close(out, h + sigma * _oracle_eps(h.shape, 11), rtol=0, atol=1e-7)
