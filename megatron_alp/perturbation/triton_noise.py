"""Fused Triton kernels for ALP on CUDA: the same counters as the torch reference.

``triton_add`` reads ``h`` once and writes ``h + sigma * eps`` once (summed in float32,
rounded once to ``h``'s dtype); ``triton_dot``
reads ``grad`` once and returns ``sum(grad * eps)`` (float32) through per-program
partial sums (no atomics, so the result is deterministic). The integer pipeline is the
one of :mod:`megatron_alp.perturbation.noise` step for step (int64 holding 32-bit
values, multipliers below 2**27), so ``eps`` matches the reference up to the float32
``log``/``sqrt``/``cos``/``sin`` of the device math library.

Import-guarded: importing this module needs ``triton``; :func:`kernels.get_kernel`
only imports it for CUDA tensors. Without a GPU the kernels can still be checked
against the reference under Triton's interpreter (``TRITON_INTERPRET=1`` before
import), which ``tests/unit/test_alp_noise.py`` does in a subprocess.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_add", "triton_dot"]

_BLOCK_J = 256


@triton.jit
def _mix32(x):
    x = ((x >> 16) ^ x) * 0x045D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x045D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _normal_pair(lane_a_ptr, lane_b_ptr, row, j, mask):
    a = tl.load(lane_a_ptr + row).to(tl.int64)
    b = tl.load(lane_b_ptr + row).to(tl.int64)
    jc = j.to(tl.int64) * 0x9E3779B1 & 0xFFFFFFFF
    x = _mix32(_mix32(a ^ jc) ^ b)
    y = _mix32(x ^ 0x1F83D9AB)
    u1 = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    theta = (y >> 8).to(tl.float32) * (6.283185307179586 / 16777216.0)
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _add_kernel(
    h_ptr, out_ptr, sigma_ptr, lane_a_ptr, lane_b_ptr, half, BLOCK_J: tl.constexpr, F64: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = j < half
    z0, z1 = _normal_pair(lane_a_ptr, lane_b_ptr, row, j, mask)
    base = row * (2 * half)
    h0 = tl.load(h_ptr + base + j, mask=mask)
    h1 = tl.load(h_ptr + base + half + j, mask=mask)
    # h + sigma * eps in float32, rounded once to h's dtype by the store (kernels.py doc)
    if F64:  # float64 activations keep float64 (like the torch reference)
        scale = tl.load(sigma_ptr).to(tl.float64)
        out0 = h0.to(tl.float64) + scale * z0.to(tl.float64)
        out1 = h1.to(tl.float64) + scale * z1.to(tl.float64)
    else:
        scale = tl.load(sigma_ptr).to(tl.float32)
        out0 = h0.to(tl.float32) + scale * z0
        out1 = h1.to(tl.float32) + scale * z1
    tl.store(out_ptr + base + j, out0.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + half + j, out1.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_kernel(g_ptr, part_ptr, lane_a_ptr, lane_b_ptr, half, n_blocks, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    j = blk * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = j < half
    z0, z1 = _normal_pair(lane_a_ptr, lane_b_ptr, row, j, mask)
    base = row * (2 * half)
    g0 = tl.load(g_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(g_ptr + base + half + j, mask=mask, other=0.0).to(tl.float32)
    part = tl.sum(tl.where(mask, g0 * z0 + g1 * z1, 0.0), axis=0)
    tl.store(part_ptr + row * n_blocks + blk, part)


def _check(t: torch.Tensor, lane_a: torch.Tensor) -> tuple[int, int]:
    hidden = t.shape[-1]
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    rows = t.numel() // hidden
    if lane_a.numel() != rows:
        raise ValueError(f"row keys hold {lane_a.numel()} rows, the tensor {rows}")
    return rows, hidden // 2


def triton_add(h: torch.Tensor, sigma: torch.Tensor, lane_a: torch.Tensor, lane_b: torch.Tensor) -> torch.Tensor:
    """``h + sigma * eps`` in one pass (see the module docstring)."""
    h = h.contiguous()
    rows, half = _check(h, lane_a)
    out = torch.empty_like(h)
    if rows == 0:
        return out
    grid = (rows, triton.cdiv(half, _BLOCK_J))
    _add_kernel[grid](
        h, out, sigma.reshape(1).to(torch.float64 if h.dtype == torch.float64 else torch.float32).contiguous(), lane_a.reshape(-1).contiguous(),
        lane_b.reshape(-1).contiguous(), half, BLOCK_J=_BLOCK_J, F64=h.dtype == torch.float64,
    )
    return out


def triton_dot(grad: torch.Tensor, lane_a: torch.Tensor, lane_b: torch.Tensor) -> torch.Tensor:
    """``sum(grad * eps)`` in float32, deterministic (per-program partials, then a sum)."""
    grad = grad.contiguous()
    rows, half = _check(grad, lane_a)
    n_blocks = triton.cdiv(half, _BLOCK_J)
    parts = torch.empty(rows, n_blocks, dtype=torch.float32, device=grad.device)
    if rows == 0:
        return parts.sum()
    _dot_kernel[(rows, n_blocks)](
        grad, parts, lane_a.reshape(-1).contiguous(), lane_b.reshape(-1).contiguous(),
        half, n_blocks, BLOCK_J=_BLOCK_J,
    )
    return parts.sum()
