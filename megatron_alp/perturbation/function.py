"""The autograd function ``h + exp(log_sigma) * eps`` that saves no activation.

Forward computes ``h + sigma * eps`` with ``eps`` generated from its coordinates; the
context keeps only those coordinates (python ints) and the scalar ``log_sigma``.
Backward: ``grad_h = grad`` (the perturbation is additive) and, when sigma is learnable,
``grad_log_sigma = sigma * sum(grad * eps)`` with ``eps`` *regenerated* from the same
coordinates. Nothing of activation size is kept between forward and backward.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_alp.perturbation.kernels import NoiseKernel
from megatron_alp.perturbation.noise import local_positions, row_keys

__all__ = ["NoiseSite", "add_noise", "site_noise"]


@dataclasses.dataclass(frozen=True, slots=True)
class NoiseSite:
    """Every coordinate of one perturbation call except the channel and the hidden values.

    ``positions`` are described by the layout (``local_positions`` arguments), not
    stored, so the backward can rebuild them from ints.
    """

    key: int
    step: int
    layer: int
    sample_offset: int
    batch: int
    s_local: int
    tp_rank: int = 0
    tp_size: int = 1
    sequence_parallel: bool = False
    cp_rank: int = 0
    cp_size: int = 1

    def row_keys(self, device: torch.device) -> torch.Tensor:
        """Row keys ([s_local, batch] int64 bit patterns) of this site."""
        samples = torch.arange(
            self.sample_offset, self.sample_offset + self.batch, dtype=torch.int64, device=device
        )
        positions = local_positions(
            self.s_local,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            sequence_parallel=self.sequence_parallel,
            cp_rank=self.cp_rank,
            cp_size=self.cp_size,
            device=device,
        )
        return row_keys(self.key, self.step, self.layer, samples, positions)


def site_noise(site: NoiseSite, hidden: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 noise ``[s_local, batch, hidden]`` of a site (eager reference)."""
    from megatron_alp.perturbation.noise import gaussian_noise

    return gaussian_noise(site.row_keys(torch.device(device)), hidden)


class _AddNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, log_sigma, site, kernel):  # type: ignore[override]
        if kernel.add_at is not None:  # the kernel derives the row keys from the site itself
            out = kernel.add_at(h, log_sigma.exp(), site)
        else:
            out = kernel.add(h, log_sigma.exp(), site.row_keys(h.device))
        ctx.site = site
        ctx.kernel = kernel
        ctx.save_for_backward(log_sigma)  # a scalar: the only tensor kept
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_log_sigma = None
        if ctx.needs_input_grad[1]:
            (log_sigma,) = ctx.saved_tensors
            if ctx.kernel.dot_at is not None:
                dot = ctx.kernel.dot_at(grad, ctx.site)
            else:
                dot = ctx.kernel.dot(grad, ctx.site.row_keys(grad.device))
            sigma = log_sigma.detach().exp().to(dot.dtype)
            grad_log_sigma = (sigma * dot).to(log_sigma.dtype)
        return grad, grad_log_sigma, None, None


def add_noise(h: torch.Tensor, log_sigma: torch.Tensor, site: NoiseSite, kernel: NoiseKernel) -> torch.Tensor:
    """``(h + exp(log_sigma) * eps(site)).to(h.dtype)``, summed in fp32, differentiable in both inputs.

    ``h`` is ``[s_local, batch, hidden]`` (Megatron's sequence-first layout).
    """
    if h.dim() != 3 or h.shape[0] != site.s_local or h.shape[1] != site.batch:
        raise ValueError(
            f"ALP expects hidden states [s={site.s_local}, b={site.batch}, h], got {tuple(h.shape)}"
        )
    return _AddNoise.apply(h, log_sigma, site, kernel)
