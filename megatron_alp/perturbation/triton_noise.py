"""Fused Triton kernels for ALP on CUDA: the same counters as the torch reference.

``triton_add`` reads ``h`` once and writes ``h + sigma * eps`` once (summed in float32,
rounded once to ``h``'s dtype); ``triton_dot``
reads ``grad`` once and returns ``sum(grad * eps)`` (float32) through per-program
partial sums (no atomics, so the result is deterministic). The integer pipeline is the
one of :mod:`megatron_alp.perturbation.noise` step for step, on ``tl.uint64``: products
wrap modulo 2**64 (LLVM ``mul i64``), ``>>`` is a logical shift for unsigned and an
arithmetic one for signed types (triton 3.8 ``language/core.py``, ``tensor.__rshift__``),
literals in [2**63, 2**64) are uint64 and smaller ones promote to uint64 against a uint64
tensor (``language/semantic.py``, ``to_tensor_type`` / ``integer_promote_impl``); so the
integers are the reference's bits and
``eps`` matches it up to the float32 ``log``/``sqrt``/``cos``/``sin`` of the device math
library. ``triton_add_at`` / ``triton_dot_at`` take the noise site instead of row-key
tensors and compute each row's key in the kernel from a few scalars (the host-side
``row_keys`` costs ~30 tiny int64 kernel launches per call, three calls per layer and
step with recompute).

Import-guarded: importing this module needs ``triton``; :func:`kernels.get_kernel`
only imports it for CUDA tensors. Without a GPU the kernels can still be checked
against the reference under Triton's interpreter (``TRITON_INTERPRET=1`` before
import), which ``tests/unit/test_alp_noise.py`` does in a subprocess.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from megatron_alp.perturbation.noise import seed64, signed64

__all__ = ["triton_add", "triton_add_at", "triton_dot", "triton_dot_at"]

_BLOCK_J = 256


@triton.jit
def _mix64(z):
    """SplitMix64's output function on uint64 (``noise.mix64``): wraps mod 2**64, logical shifts."""
    z ^= z >> 30
    z *= 0xBF58476D1CE4E5B9
    z ^= z >> 27
    z *= 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _u64(x):
    """An int64 (or narrower signed) value -> uint64 with the same two's-complement bits."""
    return x.to(tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _site_key(row, batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk):
    """Row key of row ``row`` of a contiguous [S, B, H] tensor, from the site's scalars.

    The same bits as ``noise.row_keys(key, step, layer, samples, local_positions(...))``
    (``seed`` is ``signed64(noise.seed64(...))``), computed per program instead of by
    ~25 tiny int64 kernels on the host side.
    """
    s = row // batch
    sample = (sample_offset + row % batch).to(tl.int64)
    i = (s + sp_offset).to(tl.int64)  # index into the CP-local sequence
    chunk64 = chunk.to(tl.int64)
    # Megatron's zig-zag under CP: this rank holds chunks cp_rank and 2*cp_size-1-cp_rank
    zig = tl.where(
        i < chunk64,
        cp_rank.to(tl.int64) * chunk64 + i,
        (2 * cp_size.to(tl.int64) - 1 - cp_rank) * chunk64 + (i - chunk64),
    )
    pos = tl.where(cp_size > 1, zig, i).to(tl.int64)
    x = _mix64(_u64(sample + 1) * 0x9E3779B97F4A7C15 ^ _u64(seed))
    return _mix64(_u64(pos + 1) * 0xD1B54A32D192ED03 ^ x)


@triton.jit
def _row_key(keys_ptr, row, batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk,
             FROM_SITE: tl.constexpr):
    if FROM_SITE:
        k = _site_key(row, batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk)
    else:
        k = _u64(tl.load(keys_ptr + row))
    return k


@triton.jit
def _normal_pair(k, j):
    z = _mix64(k ^ (_u64(j + 1) * 0x9E3779B97F4A7C15))
    # noise.gaussian_noise: theta from the top 24 bits read as signed, u1 from the low 24
    t = z.to(tl.int64, bitcast=True) >> 40  # arithmetic shift on int64
    theta = t.to(tl.float32) * (6.283185307179586 / 16777216.0)
    u1 = ((z & 0xFFFFFF).to(tl.float32) + 1.0) * (1.0 / 16777216.0)
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(theta), r * tl.sin(theta)


_SITE_ARGS = ["batch", "seed", "sample_offset", "sp_offset", "cp_size", "cp_rank", "chunk"]


@triton.jit(do_not_specialize=_SITE_ARGS)
def _add_kernel(
    h_ptr, out_ptr, sigma_ptr, keys_ptr, half,
    batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk,
    BLOCK_J: tl.constexpr, F64: tl.constexpr, FROM_SITE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = j < half
    k = _row_key(keys_ptr, row, batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk,
                 FROM_SITE)
    z0, z1 = _normal_pair(k, j)
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


@triton.jit(do_not_specialize=_SITE_ARGS)
def _dot_kernel(
    g_ptr, part_ptr, keys_ptr, half, n_blocks,
    batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk,
    BLOCK_J: tl.constexpr, FROM_SITE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    j = blk * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = j < half
    k = _row_key(keys_ptr, row, batch, seed, sample_offset, sp_offset, cp_size, cp_rank, chunk,
                 FROM_SITE)
    z0, z1 = _normal_pair(k, j)
    base = row * (2 * half)
    g0 = tl.load(g_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(g_ptr + base + half + j, mask=mask, other=0.0).to(tl.float32)
    part = tl.sum(tl.where(mask, g0 * z0 + g1 * z1, 0.0), axis=0)
    tl.store(part_ptr + row * n_blocks + blk, part)


def _check(t: torch.Tensor, keys: torch.Tensor) -> tuple[int, int]:
    hidden = t.shape[-1]
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    rows = t.numel() // hidden
    if keys.numel() != rows:
        raise ValueError(f"row keys hold {keys.numel()} rows, the tensor {rows}")
    return rows, hidden // 2


_NO_SITE = (1, 0, 0, 0, 1, 0, 0)  # batch, seed, offset, sp_offset, cp, cp_rank, chunk


def _site_args(site: Any, rows: int) -> tuple[int, ...]:
    """The kernels' scalar arguments for ``site`` (a ``function.NoiseSite``)."""
    seed = signed64(seed64(site.key, site.step, site.layer))
    if rows != site.s_local * site.batch:
        raise ValueError(
            f"ALP noise site has s={site.s_local} x b={site.batch} rows, the tensor {rows}"
        )
    sp = site.sequence_parallel and site.tp_size > 1
    s_cp = site.s_local * (site.tp_size if site.sequence_parallel else 1)
    if site.cp_size > 1 and s_cp % 2:
        raise ValueError(
            f"context parallel local sequence length {s_cp} is odd; Megatron's zig-zag split "
            "needs 2 * context_parallel_size to divide the sequence length"
        )
    return (site.batch, seed, site.sample_offset, site.tp_rank * site.s_local if sp else 0,
            site.cp_size, site.cp_rank, s_cp // 2)


def _sigma_arg(sigma: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return sigma.reshape(1).to(acc).contiguous()


def triton_add(h: torch.Tensor, sigma: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``h + sigma * eps`` in one pass, row keys given as tensors (see the module docstring)."""
    h = h.contiguous()
    rows, half = _check(h, keys)
    out = torch.empty_like(h)
    if rows == 0:
        return out
    grid = (rows, triton.cdiv(half, _BLOCK_J))
    _add_kernel[grid](
        h, out, _sigma_arg(sigma, h), keys.reshape(-1).contiguous(), half, *_NO_SITE, BLOCK_J=_BLOCK_J, F64=h.dtype == torch.float64, FROM_SITE=False,
    )
    return out


def triton_add_at(h: torch.Tensor, sigma: torch.Tensor, site: Any) -> torch.Tensor:
    """``h + sigma * eps(site)`` in one pass, the row keys computed inside the kernel."""
    h = h.contiguous()
    hidden = h.shape[-1]
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    rows, half = h.numel() // max(hidden, 1), hidden // 2
    out = torch.empty_like(h)
    if rows == 0:
        return out
    args = _site_args(site, rows)
    _add_kernel[(rows, triton.cdiv(half, _BLOCK_J))](
        h, out, _sigma_arg(sigma, h), out, half, *args,
        BLOCK_J=_BLOCK_J, F64=h.dtype == torch.float64, FROM_SITE=True,
    )
    return out


def triton_dot(grad: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``sum(grad * eps)`` in float32, deterministic (per-program partials, then a sum)."""
    grad = grad.contiguous()
    rows, half = _check(grad, keys)
    n_blocks = triton.cdiv(half, _BLOCK_J)
    parts = torch.empty(rows, n_blocks, dtype=torch.float32, device=grad.device)
    if rows == 0:
        return parts.sum()
    _dot_kernel[(rows, n_blocks)](
        grad, parts, keys.reshape(-1).contiguous(), half, n_blocks, *_NO_SITE, BLOCK_J=_BLOCK_J, FROM_SITE=False,
    )
    return parts.sum()


def triton_dot_at(grad: torch.Tensor, site: Any) -> torch.Tensor:
    """``sum(grad * eps(site))`` in float32, deterministic, row keys computed in the kernel."""
    grad = grad.contiguous()
    hidden = grad.shape[-1]
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    rows, half = grad.numel() // max(hidden, 1), hidden // 2
    n_blocks = triton.cdiv(half, _BLOCK_J)
    parts = torch.empty(rows, n_blocks, dtype=torch.float32, device=grad.device)
    if rows == 0:
        return parts.sum()
    args = _site_args(site, rows)
    _dot_kernel[(rows, n_blocks)](
        grad, parts, parts, half, n_blocks, *args, BLOCK_J=_BLOCK_J, FROM_SITE=True,
    )
    return parts.sum()
