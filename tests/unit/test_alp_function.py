"""The perturbation's autograd function: exact gradients, nothing of activation size saved."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_alp.perturbation.function import NoiseSite, add_noise, site_noise
from megatron_alp.perturbation.kernels import get_kernel

SITE = NoiseSite(key=99, step=2, layer=3, sample_offset=4, batch=3, s_local=10)
EAGER = get_kernel("torch", torch.device("cpu"))


def test_forward_is_h_plus_sigma_eps_and_grad_h_is_identity():
    h = torch.randn(10, 3, 32, requires_grad=True)
    log_sigma = torch.tensor(math.log(0.2), requires_grad=True)
    out = add_noise(h, log_sigma, SITE, EAGER)
    eps = site_noise(SITE, 32)
    torch.testing.assert_close(out, h + 0.2 * eps, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(h.grad, g)
    torch.testing.assert_close(log_sigma.grad, 0.2 * (g * eps).sum(), rtol=1e-5, atol=0)


def test_log_sigma_grad_matches_central_finite_difference_float64():
    torch.manual_seed(0)
    h = torch.randn(10, 3, 32, dtype=torch.float64)
    w = torch.randn(32, 32, dtype=torch.float64)

    def loss(log_sigma: torch.Tensor) -> torch.Tensor:
        y = add_noise(h, log_sigma, SITE, EAGER)
        return torch.tanh(y @ w).pow(2).mean()

    for sigma in (1e-2, 0.3, 2.0):
        x0 = math.log(sigma)
        p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        loss(p).backward()
        step = 1e-4
        with torch.no_grad():
            fd = (loss(torch.tensor(x0 + step, dtype=torch.float64))
                  - loss(torch.tensor(x0 - step, dtype=torch.float64))) / (2 * step)
        assert abs(p.grad.item() - fd.item()) <= 1e-3 * abs(fd.item()), (sigma, p.grad.item(), fd.item())


def test_only_the_scalar_log_sigma_is_saved():
    h = torch.randn(10, 3, 64, requires_grad=True)
    log_sigma = torch.tensor(-2.0, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = add_noise(h, log_sigma, SITE, EAGER)
    assert saved == [1]
    out.sum().backward()
    assert log_sigma.grad is not None


def test_fixed_sigma_buffer_needs_no_regeneration_in_backward():
    calls = []
    kernel = EAGER._replace(dot=lambda *a: calls.append(1) or EAGER.dot(*a))
    h = torch.randn(10, 3, 16, requires_grad=True)
    out = add_noise(h, torch.tensor(-1.0), SITE, kernel)  # a buffer: no grad
    out.sum().backward()
    assert calls == [] and torch.equal(h.grad, torch.ones_like(h))


@pytest.mark.parametrize("kernel", ["torch", pytest.param("compile", marks=pytest.mark.slow)])
def test_bf16_noise_is_added_in_fp32_and_rounded_once(kernel):
    """Defect 13.7: ``bf16(h + sigma * eps)`` with one rounding, not bf16(h + bf16(bf16(sigma) * eps)).

    Rounding sigma (0.02 -> 0.02002) and the product to bf16 before the sum changes the
    noise the forward adds against the fp32 sigma * eps the backward differentiates.
    """
    torch.manual_seed(3)
    h = (0.5 + torch.rand(10, 3, 256) / 2).bfloat16()  # bf16 step 2**-8 here
    log_sigma = torch.tensor(math.log(0.02))
    k = get_kernel(kernel, torch.device("cpu"))
    out = add_noise(h, log_sigma, SITE, k)
    eps = site_noise(SITE, 256)
    if kernel == "compile":  # its own log/cos may differ from eager's by float32 ulps
        keys = SITE.row_keys(torch.device("cpu"))
        eps_k = k.add(torch.zeros(10, 3, 256), torch.tensor(1.0), keys)
        torch.testing.assert_close(eps_k, eps, rtol=0, atol=1e-5)
    else:
        eps_k = eps
    want = (h.float() + log_sigma.exp() * eps_k).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    twice = h + log_sigma.exp().bfloat16() * eps.bfloat16()
    assert not torch.equal(out, twice)  # the oracle tells the two apart on these inputs
    # fp32 activations: unchanged by the fix (h + sigma * eps in fp32)
    h32 = torch.randn(10, 3, 256)
    torch.testing.assert_close(add_noise(h32, log_sigma, SITE, k), h32 + log_sigma.exp() * eps_k,
                               rtol=0, atol=0 if kernel == "torch" else 1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"hidden states \[s=10, b=3, h\]"):
        add_noise(torch.zeros(3, 10, 8), torch.tensor(0.0), SITE, EAGER)
