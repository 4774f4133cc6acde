"""Counter-based Gaussian noise: ``eps`` as a pure function of its coordinates.

``eps[s, b, c]`` of one perturbed layer is a function of
``(key, step, layer, sample = sample_offset + b, position = pos[s], channel = c)`` and of
nothing else: no generator state, no shape, no rank. Any parallel layout (TP, SP, CP, PP,
DP), any micro-batch size and any recomputation therefore sees the same numbers for the
same token, and the backward pass regenerates ``eps`` instead of storing it.

The generator (this file is the reference; ``triton_noise.py`` computes the same
integers, ``tests/unit/test_alp_noise.py`` re-derives them in NumPy):

* ``mix64`` is SplitMix64's output function (S. Vigna's ``splitmix64``, Stafford's
  "Mix13" constants): ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
  z *= 0x94D049BB133111EB; z ^= z >> 31`` on 64-bit words, modulo 2**64, logical shifts.
  A bijection of 64-bit words with good avalanche (SplitMix64 is this function of a Weyl
  sequence ``seed + i * 0x9E3779B97F4A7C15``; it passes BigCrush). Counters enter by XOR
  with a Weyl value ``(i + 1) * GOLDEN`` (measured: an int64 XOR costs a third of an
  int64 add in torch on CPU).
* Scalar seed: ``s = mix64((s ^ w) + GOLDEN)`` (mod 2**64) over the words ``(key mod 2**32,
  key >> 32, step, layer)`` from ``s = 0x6A09E667F3BCC909`` (python ints, no tensors).
* Row key of a token: ``K = mix64(mix64(s ^ (sample + 1) * GOLDEN) ^ ((position + 1) *
  POS_MUL))``, 64 bits: two tokens share a key with probability ~2**-64.
* Channel pair ``j < H/2``: ``z = mix64(K ^ (j + 1) * GOLDEN)`` (the inputs of one row
  are distinct, ``GOLDEN`` being odd, and ``mix64`` is a bijection: distinct words).
  Box-Muller on two 24-bit fields: ``u1 = ((z & 0xFFFFFF) + 1) / 2**24`` in (0, 1] and
  ``theta = 2 pi t / 2**24`` with ``t`` the top 24 bits read as a signed number
  (``int64(z) >> 40``, arithmetic, in [-2**23, 2**23): theta in [-pi, pi)); both
  integers are exact in float32. ``r = sqrt(-2 log u1)``; ``r cos(theta)`` is channel
  ``j``, ``r sin(theta)`` channel ``j + H/2``. |eps| is bounded by 5.77 (the 24-bit
  ``u1``), a tail of probability 8e-9.

One 64-bit hash (two multiplies) per pair of channels; the torch reference runs it on
int64 tensors holding the words' bit patterns (two's complement: multiplication and
addition wrap modulo 2**64 in torch's CPU and CUDA kernels and in inductor's code, the
logical shift is an arithmetic shift and a mask) in 14 int64 passes, the Triton kernel on uint64.

Positions of the local sequence shard (sequence parallelism over TP, zig-zag context
parallelism) come from :func:`local_positions`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "GOLDEN",
    "MASK64",
    "POS_MUL",
    "gaussian_noise",
    "local_positions",
    "mix64",
    "pair_bits",
    "row_keys",
    "seed64",
    "signed64",
]

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (odd: i -> i * GOLDEN is a bijection)
POS_MUL = 0xD1B54A32D192ED03  # odd: position -> (position + 1) * POS_MUL is a bijection
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SEED0 = 0x6A09E667F3BCC909  # frac(sqrt 2), SHA-512's first IV word
_INV_2_24 = 1.0 / 16777216.0
_TWO_PI = 2.0 * math.pi


def signed64(x: int) -> int:
    """The int64 (two's complement) value with the bit pattern of the 64-bit word ``x``."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN_S, _POS_MUL_S = signed64(GOLDEN), signed64(POS_MUL)
_MIX1_S, _MIX2_S = signed64(_MIX1), signed64(_MIX2)


def _xorshift_(z: torch.Tensor, s: int) -> None:
    """``z ^= z >> s`` with a logical shift, in place (int64 has only the arithmetic one)."""
    t = z >> s
    t &= (1 << (64 - s)) - 1
    z ^= t


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns, in place (products wrap mod 2**64)."""
    _xorshift_(z, 30)
    z *= _MIX1_S
    _xorshift_(z, 27)
    z *= _MIX2_S
    _xorshift_(z, 31)
    return z


def mix64(x):
    """SplitMix64's output function: a python int word (unsigned result) or an int64 tensor
    of bit patterns (a new tensor, bit patterns as int64)."""
    if isinstance(x, torch.Tensor):
        return _mix64_(x.to(torch.int64, copy=True))
    x &= MASK64
    x ^= x >> 30
    x = x * _MIX1 & MASK64
    x ^= x >> 27
    x = x * _MIX2 & MASK64
    return x ^ (x >> 31)


def seed64(key: int, step: int, layer: int) -> int:
    """The 64-bit seed of one (key, step, layer) (python ints, no tensors)."""
    if not 0 <= key < 2**64:
        raise ValueError(f"noise key={key} is outside [0, 2**64)")
    if not 0 <= step < 2**32:
        raise ValueError(f"noise step={step} is outside [0, 2**32)")
    if not 0 <= layer < 2**32:
        raise ValueError(f"noise layer={layer} is outside [0, 2**32)")
    s = _SEED0
    for w in (key & MASK32, key >> 32, step, layer):
        s = mix64((s ^ w) + GOLDEN)
    return s


def row_keys(key: int, step: int, layer: int, samples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The 64-bit key of every token: int64 bit patterns ``[S, B]``.

    ``samples`` [B] are global sample indices, ``positions`` [S] global token positions
    (integers in [0, 2**32)).
    """
    seed = signed64(seed64(key, step, layer))
    x = samples.to(torch.int64) + 1
    x *= _GOLDEN_S
    x ^= seed
    _mix64_(x)
    p = positions.to(torch.int64) + 1
    p *= _POS_MUL_S
    return _mix64_(p[:, None] ^ x[None, :])


def pair_bits(keys: torch.Tensor, half: int) -> torch.Tensor:
    """The 64-bit word of every channel pair: int64 ``[*keys.shape, half]``."""
    j = torch.arange(1, half + 1, dtype=torch.int64, device=keys.device)
    j *= _GOLDEN_S
    return _mix64_(keys.unsqueeze(-1) ^ j)


def gaussian_noise(keys: torch.Tensor, hidden: int) -> torch.Tensor:
    """Standard normal float32 noise ``[*keys.shape, hidden]`` from the row keys.

    ``hidden`` must be even (channel ``j`` and ``j + hidden/2`` share one Box-Muller pair).
    """
    if hidden % 2:
        raise ValueError(f"ALP noise needs an even hidden size, got {hidden}")
    half = hidden // 2
    z = pair_bits(keys, half)
    theta = (z >> 40).to(torch.float32)  # the top 24 bits, signed: [-2**23, 2**23), exact
    theta *= _INV_2_24 * _TWO_PI
    z &= 0xFFFFFF
    r = z.to(torch.float32)
    r += 1.0
    r *= _INV_2_24  # u1 in (0, 1], exact
    r.log_().mul_(-2.0).sqrt_()
    if torch.compiler.is_compiling():  # dynamo refuses out= views; inductor fuses the cat
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)
    out = torch.empty(*keys.shape, hidden, dtype=torch.float32, device=keys.device)
    torch.mul(r, torch.cos(theta), out=out[..., :half])  # eager: no cat pass
    torch.mul(r, theta.sin_(), out=out[..., half:])
    return out


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
