"""The Triton noise kernels on a GPU vs the eager torch kernel on the GPU and on the CPU.

Same counters everywhere: eps agrees to float32 ulps (device math library); bf16 output
is ``bf16(h + sigma * eps)`` rounded once (to nearest even, one ulp apart at most where
the kernel's fused multiply-add and torch's mul-then-add land on either side of a
rounding boundary); d loss / d sigma is bitwise deterministic.
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.perturbation.function import NoiseSite, add_noise
from megatron_alp.perturbation.kernels import eager_add, eager_dot, get_kernel
from tests.gpu.gpu_env import bf16_ulps, needs_cuda

pytestmark = needs_cuda

H = 2880  # gpt-oss hidden size: H/2 = 1440 is not a multiple of the 256-pair block
SITES = {
    "plain": dict(),
    "sp": dict(tp_rank=1, tp_size=2, sequence_parallel=True),
    "cp": dict(cp_rank=1, cp_size=2),
}


def _site(s: int = 12, b: int = 3, **kw) -> NoiseSite:
    return NoiseSite(key=0x0123456789ABCDEF, step=5, layer=7, sample_offset=11, batch=b, s_local=s, **kw)


@pytest.mark.parametrize("layout", list(SITES))
def test_triton_eps_matches_eager_on_gpu_and_cpu_reference(layout):
    from megatron_alp.perturbation import triton_noise

    site = _site(**SITES[layout])
    dev = torch.device("cuda")
    keys = site.row_keys(dev)
    zeros, one = torch.zeros(12, 3, H, device=dev), torch.tensor(1.0, device=dev)
    eps_triton = triton_noise.triton_add_at(zeros, one, site)
    eps_keys = triton_noise.triton_add(zeros, one, keys)
    eps_gpu = eager_add(zeros, one, keys)
    cpu_keys = site.row_keys(torch.device("cpu"))
    assert torch.equal(keys.cpu(), cpu_keys)  # int64 wrap-around is the same on CUDA
    eps_cpu = eager_add(torch.zeros(12, 3, H), torch.tensor(1.0), cpu_keys)
    assert torch.equal(eps_triton, eps_keys)  # in-kernel row keys == host row keys
    torch.testing.assert_close(eps_triton.cpu(), eps_cpu, rtol=0, atol=2e-5)
    torch.testing.assert_close(eps_gpu.cpu(), eps_cpu, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_fp32_and_bf16_one_rounding(dtype):
    from megatron_alp.perturbation import triton_noise

    site = _site()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    h = (0.5 + torch.rand(12, 3, H, device=dev) / 2).to(dtype)
    sigma = torch.tensor(0.02, device=dev)
    eps = triton_noise.triton_add_at(torch.zeros(12, 3, H, device=dev), torch.tensor(1.0, device=dev), site)
    out = triton_noise.triton_add_at(h, sigma, site)
    want = (h.float() + sigma * eps).to(dtype)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    else:
        ulps = bf16_ulps(out, want)
        assert int(ulps.max()) <= 1 and float((ulps == 0).float().mean()) > 0.999
        twice = h + sigma.to(dtype) * eps.to(dtype)  # the old double rounding
        assert not torch.equal(out, twice)


def test_non_contiguous_input_and_zero_rows():
    dev = torch.device("cuda")
    k = get_kernel("triton", dev)
    site = _site(s=12, b=3)
    base = torch.randn(3, 12, H, device=dev)
    h_nc = base.transpose(0, 1)  # [12, 3, H], not contiguous
    assert not h_nc.is_contiguous()
    log_sigma = torch.tensor(-3.0, device=dev)
    out = add_noise(h_nc, log_sigma, site, k)
    ref = add_noise(h_nc.contiguous(), log_sigma, site, k)
    assert torch.equal(out, ref)
    empty = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=0, s_local=12)
    h0 = torch.zeros(12, 0, H, device=dev, requires_grad=True)
    ls = torch.tensor(-3.0, device=dev, requires_grad=True)
    y = add_noise(h0, ls, empty, k)
    y.sum().backward()
    assert y.shape == (12, 0, H) and float(ls.grad) == 0.0


def test_sigma_grad_matches_eager_and_is_bitwise_deterministic():
    dev = torch.device("cuda")
    site = _site()
    torch.manual_seed(1)
    h = torch.randn(12, 3, H, device=dev)
    g = torch.randn(12, 3, H, device=dev)

    def grad(kernel: str) -> torch.Tensor:
        ls = torch.tensor(-2.0, device=dev, requires_grad=True)
        add_noise(h, ls, site, get_kernel(kernel, dev)).backward(g)
        return ls.grad.clone()

    first, second = grad("triton"), grad("triton")
    assert torch.equal(first, second)  # no atomics: the same bits every run
    keys = site.row_keys(dev)
    ref = torch.tensor(-2.0).exp() * eager_dot(g.cpu(), site.row_keys(torch.device("cpu")))
    torch.testing.assert_close(first.cpu(), ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad("torch"), first, rtol=1e-4, atol=1e-4)
    assert eager_dot(g, keys).device.type == "cuda"
