"""The two operations ALP needs, per noise implementation: ``add`` and ``dot``.

* ``add(h, sigma, keys) = (h + sigma * eps).to(h.dtype)`` with the sum computed
  in float32 (float64 for float64 ``h``) and rounded once (one read and one write of ``h``
  when fused). Rounding ``sigma * eps`` to bf16 first and then the sum again would lose
  most of the noise where ``|h| >> sigma`` (bf16's step at |h| = 8 is 0.0625, sigma 0.01)
  while the backward uses the full float32 ``eps``: d loss / d sigma would be biased
  against what the forward added;
* ``dot(grad, keys) = sum(grad * eps)`` accumulated in float32 (float64 for
  float64 inputs): the backward's ``d loss / d sigma``.

``eps`` is :func:`megatron_alp.perturbation.noise.gaussian_noise` of the row keys
``keys`` ([S, B] int64) over the last dimension of ``h`` ([S, B, H]).

Implementations: ``"torch"`` (eager reference, processed in row chunks so that its
temporaries stay bounded), ``"compile"`` (the same functions under ``torch.compile``,
compiled once with dynamic shapes; inductor emits C++ on CPU and Triton on GPU), and
``"triton"`` (the hand-written kernels of :mod:`.triton_noise`, CUDA only).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch

from megatron_alp.perturbation.noise import gaussian_noise

__all__ = ["NoiseKernel", "get_kernel", "resolve_kernel_name"]

# Channel pairs per eager chunk: the eager generator's few int64/float32 temporaries of
# rows x H/2 stay ~512 KiB each whatever the activation size (hidden 512, 2-vCPU Intel
# host: 32 Ki and 64 Ki pairs per chunk timed alike, 128 Ki ~15 % slower, 16 Ki ~8 %
# slower); a chunk holds at least one row.
_EAGER_PAIRS = 65536


class NoiseKernel(NamedTuple):
    name: str
    add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    add_at: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None
    """``add`` from a ``NoiseSite`` (row keys computed inside the kernel), where available."""
    dot_at: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    """``dot`` from a ``NoiseSite``, where available."""


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _chunk_rows(hidden: int) -> int:
    return max(1, _EAGER_PAIRS // max(hidden // 2, 1))


def eager_add(h: torch.Tensor, sigma: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    hidden = h.shape[-1]
    acc = _acc_dtype(h)
    scale = sigma.to(acc)
    h2, k = _rows(h), keys.reshape(-1)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)  # contiguous, not a view
    out2 = out.view(-1, hidden)
    step = _chunk_rows(hidden)
    for i in range(0, h2.shape[0], step):
        eps = gaussian_noise(k[i : i + step], hidden)
        eps = eps.to(acc) if acc != eps.dtype else eps
        eps *= scale
        # the sum in float32 (float64), one rounding to h's dtype (see the module docstring)
        if h.dtype == acc:
            torch.add(h2[i : i + step], eps, out=out2[i : i + step])
        else:
            eps += h2[i : i + step]
            out2[i : i + step] = eps
    return out


def eager_dot(grad: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    hidden = grad.shape[-1]
    acc = _acc_dtype(grad)
    g2, k = _rows(grad), keys.reshape(-1)
    total = torch.zeros((), dtype=acc, device=grad.device)
    step = _chunk_rows(hidden)
    for i in range(0, g2.shape[0], step):
        eps = gaussian_noise(k[i : i + step], hidden).to(acc).reshape(-1)
        total += torch.dot(g2[i : i + step].reshape(-1).to(acc), eps)
    return total


def _fused_add(h, sigma, keys):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    eps = gaussian_noise(keys, h.shape[-1])
    return (h.to(acc) + sigma.to(acc) * eps.to(acc)).to(h.dtype)


def _fused_dot(grad, keys):
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    eps = gaussian_noise(keys, grad.shape[-1])
    return (grad.to(acc) * eps.to(acc)).sum()


@functools.cache
def _compiled() -> NoiseKernel:
    add = torch.compile(_fused_add, dynamic=True, fullgraph=True)
    dot = torch.compile(_fused_dot, dynamic=True, fullgraph=True)
    return NoiseKernel("compile", add, dot)


def _triton() -> NoiseKernel:
    from megatron_alp.perturbation import triton_noise

    return NoiseKernel(
        "triton", triton_noise.triton_add, triton_noise.triton_dot,
        triton_noise.triton_add_at, triton_noise.triton_dot_at,
    )


_EAGER = NoiseKernel("torch", eager_add, eager_dot)


def resolve_kernel_name(name: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when Triton imports, else ``"torch"``."""
    if name != "auto":
        return name
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def get_kernel(name: str, device: torch.device) -> NoiseKernel:
    """The implementation named ``name`` (see :data:`ALPConfig.kernel`) for ``device``."""
    name = resolve_kernel_name(name, device)
    if name == "torch":
        return _EAGER
    if name == "compile":
        return _compiled()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError(
                f"ALPConfig.kernel='triton' needs CUDA tensors, got device {device}; "
                "allowed on this device: 'torch', 'compile', 'auto'"
            )
        return _triton()
    raise ValueError(f"unknown ALP noise kernel {name!r}; allowed: auto, torch, compile, triton")
