"""Counter-based Gaussian noise: ``eps`` as a pure function of its coordinates.

``eps[s, b, c]`` of one perturbed layer is a function of
``(key, step, layer, sample = sample_offset + b, position = pos[s], channel = c)`` and of
nothing else: no generator state, no shape, no rank. Any parallel layout (TP, SP, CP, PP,
DP), any micro-batch size and any recomputation therefore sees the same numbers for the
same token, and the backward pass regenerates ``eps`` instead of storing it.

The hash (this file is the reference; ``triton_noise.py`` computes the same integers):

* ``mix32`` is a bijective 32-bit integer finaliser (shift-xor-multiply, two rounds, the
  multiplier ``0x045d9f3b`` of T. Mueller's hash). All arithmetic is on non-negative
  int64 holding 32-bit values, and the multiplier is below 2**27, so no product overflows
  int64: the result is the same on every backend (eager torch, inductor C++/Triton, Triton
  uint32) without relying on wrap-around.
* Per row (token) two independent 32-bit lanes A and B are chained from different
  constants over the scalar coordinates (key words, step, layer), then over the sample
  index and the position (in opposite orders in the two lanes). The row key is 64 bits,
  so two tokens collide with probability ~2**-64, not ~2**-32.
* Per channel pair ``j < H/2``: ``x = mix(mix(A ^ j*phi) ^ B)`` and ``y = mix(x ^ C)``;
  Box-Muller on the top 24 bits of each (``u1 = (x>>8 + 0.5) / 2**24`` in (0, 1),
  ``u2 = (y>>8) / 2**24``; both exact in float32) gives ``r cos(2 pi u2)`` for channel
  ``j`` and ``r sin(2 pi u2)`` for channel ``j + H/2``. |eps| is bounded by 5.9 (the
  24-bit ``u1``), a tail of probability 4e-9.

Positions of the local sequence shard (sequence parallelism over TP, zig-zag context
parallelism) come from :func:`local_positions`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MASK32",
    "gaussian_noise",
    "local_positions",
    "mix32",
    "row_keys",
    "scalar_lane_seeds",
]

MASK32 = 0xFFFFFFFF
_MUL = 0x045D9F3B  # < 2**27: x * _MUL < 2**59, never overflows int64
_PHI = 0x9E3779B1  # odd: j -> j * _PHI mod 2**32 is a bijection
_LANE_A = 0x3C6EF372
_LANE_B = 0xA54FF53A
_POS_SALT = 0x510E527F
_SAMPLE_SALT = 0x9B05688C
_Y_SALT = 0x1F83D9AB
_INV_2_24 = 1.0 / 16777216.0
_TWO_PI = 2.0 * math.pi


def mix32(x):
    """Bijective 32-bit finaliser on non-negative int64 tensors or python ints (same result)."""
    x = ((x >> 16) ^ x) * _MUL & MASK32
    x = ((x >> 16) ^ x) * _MUL & MASK32
    return (x >> 16) ^ x


def scalar_lane_seeds(key: int, step: int, layer: int) -> tuple[int, int]:
    """Lane-A and lane-B seeds from the scalar coordinates (python ints, no tensors)."""
    if not 0 <= key < 2**64:
        raise ValueError(f"noise key={key} is outside [0, 2**64)")
    if not 0 <= step < 2**32:
        raise ValueError(f"noise step={step} is outside [0, 2**32)")
    if not 0 <= layer < 2**32:
        raise ValueError(f"noise layer={layer} is outside [0, 2**32)")
    words = (key & MASK32, key >> 32, step, layer)
    a, b = _LANE_A, _LANE_B
    for w in words:
        a = mix32(a ^ w)
        b = mix32(b ^ mix32(w ^ _LANE_B))
    return a, b


def row_keys(
    key: int, step: int, layer: int, samples: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit lanes of every token: int64 ``[S, B]`` each.

    ``samples`` [B] are global sample indices, ``positions`` [S] global token positions
    (both int64, values in [0, 2**32)).
    """
    a0, b0 = scalar_lane_seeds(key, step, layer)
    s = samples.to(torch.int64)
    p = positions.to(torch.int64)
    lane_a = mix32(mix32(a0 ^ s)[None, :] ^ mix32(p ^ _POS_SALT)[:, None])
    lane_b = mix32(mix32(b0 ^ p)[:, None] ^ mix32(s ^ _SAMPLE_SALT)[None, :])
    return lane_a, lane_b


def _pair_bits(lane_a: torch.Tensor, lane_b: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    j = torch.arange(half, dtype=torch.int64, device=lane_a.device) * _PHI & MASK32
    x = mix32(mix32(lane_a.unsqueeze(-1) ^ j) ^ lane_b.unsqueeze(-1))
    y = mix32(x ^ _Y_SALT)
    return x, y


def gaussian_noise(lane_a: torch.Tensor, lane_b: torch.Tensor, hidden: int) -> torch.Tensor:
    """Standard normal float32 noise ``[*lane_a.shape, hidden]`` from the row keys.

    ``hidden`` must be even (channel ``j`` and ``j + hidden/2`` share one Box-Muller pair).
    """
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    x, y = _pair_bits(lane_a, lane_b, hidden // 2)
    u1 = ((x >> 8).to(torch.float32) + 0.5) * _INV_2_24
    theta = (y >> 8).to(torch.float32) * (_INV_2_24 * _TWO_PI)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)


def local_positions(
    s_local: int,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    cp_rank: int = 0,
    cp_size: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global token positions [s_local] of this rank's slice of the sequence dimension.

    Under context parallelism Megatron splits the sequence into ``2 * cp`` chunks and CP
    rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` (load balancing for causal
    attention); under sequence parallelism TP rank ``t`` then holds the ``t``-th
    contiguous slice of that CP-local sequence. Without either, positions are 0..s-1.
    """
    s_cp = s_local * (tp_size if sequence_parallel else 1)
    if cp_size > 1:
        if s_cp % 2:
            raise ValueError(
                f"context parallel local sequence length {s_cp} is odd; Megatron's zig-zag "
                "split needs 2 * context_parallel_size to divide the sequence length"
            )
        chunk = s_cp // 2
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, dtype=torch.int64, device=device)
        last = 2 * cp_size - 1 - cp_rank
        second = torch.arange(last * chunk, (last + 1) * chunk, dtype=torch.int64, device=device)
        cp_positions = torch.cat([first, second])
    else:
        cp_positions = torch.arange(s_cp, dtype=torch.int64, device=device)
    if sequence_parallel and tp_size > 1:
        cp_positions = cp_positions[tp_rank * s_local : (tp_rank + 1) * s_local]
    return cp_positions
