"""Counter-based noise: a pure function of its coordinates, normal, uncorrelated, shardable."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_alp.perturbation.function import NoiseSite, site_noise
from megatron_alp.perturbation.kernels import eager_add, eager_dot, get_kernel
from megatron_alp.perturbation.noise import (
    gaussian_noise,
    local_positions,
    mix64,
    pair_bits,
    row_keys,
    signed64,
)

REPO = Path(__file__).resolve().parents[2]
KEY = 0x0123_4567_89AB_CDEF


def noise(*, s=32, b=4, h=64, key=KEY, step=3, layer=2, offset=0, **layout) -> torch.Tensor:
    return site_noise(
        NoiseSite(key=key, step=step, layer=layer, sample_offset=offset, batch=b, s_local=s, **layout), h
    )


def test_mix64_is_bijective_on_a_range_and_matches_python_ints():
    x = torch.arange(0, 1 << 20, dtype=torch.int64) * signed64(0x9E3779B97F4A7C15)  # wraps
    y = mix64(x)
    assert y.dtype == torch.int64 and torch.unique(y).numel() == x.numel()
    assert (y < 0).float().mean().item() == pytest.approx(0.5, abs=0.005)  # the top bit is used
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x0123_4567_89AB_CDEF):
        assert mix64(v) & (2**64 - 1) == mix64(torch.tensor(signed64(v))).item() & (2**64 - 1)
    # SplitMix64's published first output for seed 0 (Vigna's splitmix64.c): mix64(GOLDEN)
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


# --- an independent re-derivation of the generator in NumPy (uint64 words) -------------
_G = np.uint64(0x9E3779B97F4A7C15)


def _np_mix64(z):
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _np_noise(key, step, layer, samples, positions, hidden):
    """Row keys, pair words and eps per noise.py's docstring, written from the spec."""
    with np.errstate(over="ignore"):
        s = np.uint64(0x6A09E667F3BCC909)
        for w in (key & 0xFFFFFFFF, key >> 32, step, layer):
            s = _np_mix64((s ^ np.uint64(w)) + _G)
        x = _np_mix64((np.asarray(samples, np.uint64) + np.uint64(1)) * _G ^ s)
        p = (np.asarray(positions, np.uint64) + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03)
        keys = _np_mix64(p[:, None] ^ x[None, :])
        j = np.arange(1, hidden // 2 + 1, dtype=np.uint64)
        z = _np_mix64(keys[..., None] ^ (j * _G))
    theta = (z.view(np.int64) >> 40).astype(np.float32) * np.float32(2 * math.pi / 2**24)
    u1 = ((z & np.uint64(0xFFFFFF)).astype(np.float32) + np.float32(1)) * np.float32(2.0**-24)
    r = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    t = theta.astype(np.float64)
    return keys, z, np.concatenate([r * np.cos(t), r * np.sin(t)], axis=-1)


@pytest.mark.parametrize("key,step,layer,offset", [(KEY, 3, 2, 0), (2**64 - 1, 2**32 - 1, 61, 10**6)])
def test_generator_matches_an_independent_numpy_derivation(key, step, layer, offset):
    """Integers bit for bit (row keys, pair words), eps to float32 rounding."""
    S, B, H = 16, 3, 70
    samples, positions = np.arange(offset, offset + B), np.arange(S) * 7 + 5
    keys_np, z_np, eps_np = _np_noise(key, step, layer, samples, positions, H)
    keys = row_keys(key, step, layer, torch.from_numpy(samples), torch.from_numpy(positions))
    assert np.array_equal(keys.numpy(), keys_np.view(np.int64))
    assert np.array_equal(pair_bits(keys, H // 2).numpy(), z_np.view(np.int64))
    eps = gaussian_noise(keys, H).double().numpy()
    np.testing.assert_allclose(eps, eps_np, rtol=0, atol=4e-6)
    assert np.abs(eps_np).max() > 1.5  # a non-trivial draw


def test_deterministic_and_every_coordinate_matters():
    base = noise()
    assert base.dtype == torch.float32 and base.shape == (32, 4, 64)
    assert torch.equal(base, noise())
    for change in (dict(key=KEY + 1), dict(key=KEY ^ (1 << 40)), dict(step=4), dict(layer=3), dict(offset=1)):
        other = noise(**change)
        assert (other - base).abs().mean() > 0.5, change


def test_micro_batch_split_gives_the_same_noise():
    whole = noise(b=4, offset=8)
    assert torch.equal(noise(b=2, offset=8), whole[:, :2])
    assert torch.equal(noise(b=2, offset=10), whole[:, 2:])
    assert torch.equal(noise(b=1, offset=11), whole[:, 3:])


@pytest.mark.parametrize(
    "tp,sp,cp",
    [(2, True, 1), (4, True, 1), (1, False, 2), (1, False, 4), (2, True, 2), (2, False, 2)],
)
def test_shards_concatenate_to_the_whole_sequence(tp, sp, cp):
    """Noise of each (TP, CP) shard = the whole sequence's noise at the shard's positions."""
    S, B, H = 64, 3, 64
    whole = noise(s=S, b=B, h=H)
    seen = torch.zeros(S, dtype=torch.int64)
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            s_local = S // cp // (tp if sp else 1)
            layout = dict(tp_rank=tp_rank, tp_size=tp, sequence_parallel=sp, cp_rank=cp_rank, cp_size=cp)
            pos = local_positions(s_local, **layout)
            shard = noise(s=s_local, b=B, h=H, **layout)
            assert torch.equal(shard, whole[pos]), (cp_rank, tp_rank)
            seen[pos] += 1
    # Every position is held by exactly (TP ranks without SP) ranks.
    assert torch.all(seen == (1 if sp else tp))


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_positions_follow_megatrons_zigzag(cp, monkeypatch):
    """local_positions agrees with megatron-core's own CP batch split (per-sequence zig-zag)."""
    from megatron.core import utils as mcore_utils

    S = 8 * cp
    for rank in range(cp):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        batch = {"position_ids": torch.arange(S).unsqueeze(0), "cu_seqlens": None}
        got = mcore_utils.get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=object())
        assert torch.equal(got["position_ids"][0], local_positions(S // cp, cp_rank=rank, cp_size=cp))


def test_statistics_over_a_million_draws():
    eps = noise(s=512, b=4, h=512).double().flatten()  # 1,048,576 draws
    n = eps.numel()
    assert n >= 1_000_000
    se_mean, se_std = 1 / math.sqrt(n), 1 / math.sqrt(2 * n)
    assert abs(eps.mean().item()) < 5 * se_mean
    assert abs(eps.std().item() - 1) < 5 * se_std
    # Shape of the distribution: tails and fourth moment of a standard normal.
    assert abs((eps.abs() < 1).double().mean().item() - 0.682689) < 5 * math.sqrt(0.2166 / n)
    assert abs((eps.abs() < 2).double().mean().item() - 0.954500) < 5 * math.sqrt(0.0434 / n)
    assert abs(eps.pow(4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    assert eps.abs().max() < 5.77  # the 24-bit u1 bounds |eps| by sqrt(48 ln 2) = 5.768


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_no_correlation_between_layers_steps_samples_positions_keys():
    base = noise(s=257, b=8, h=512, offset=0)  # ~1.05e6 draws
    pairs = {
        "layers": noise(s=257, b=8, h=512, layer=3),
        "steps": noise(s=257, b=8, h=512, step=4),
        "keys": noise(s=257, b=8, h=512, key=KEY + 1),
        "samples": noise(s=257, b=8, h=512, offset=1),  # sample i vs sample i + 1
    }
    for what, other in pairs.items():
        assert abs(_corr(base, other)) < 0.01, what
    assert abs(_corr(base[1:], base[:-1])) < 0.01, "positions p vs p + 1"
    assert abs(_corr(base[..., 1:], base[..., :-1])) < 0.01, "channels c vs c + 1"
    assert abs(_corr(base[..., :256], base[..., 256:])) < 0.01, "Box-Muller pair c vs c + h/2"


def test_eager_kernel_equals_the_reference_and_chunks_do_not_matter(monkeypatch):
    site = NoiseSite(key=KEY, step=1, layer=1, sample_offset=0, batch=3, s_local=40)
    k = site.row_keys(torch.device("cpu"))
    h = torch.randn(40, 3, 64)
    sigma = torch.tensor(0.3)
    ref = h + sigma * gaussian_noise(k, 64)
    g = torch.randn(40, 3, 64)
    ref_dot = (g.double() * gaussian_noise(k, 64).double()).sum()
    for pairs in (1, 32 * 7, 32 * 256, 65536):  # one row per chunk, 7 rows, 256, all at once
        monkeypatch.setattr("megatron_alp.perturbation.kernels._EAGER_PAIRS", pairs)
        assert torch.equal(eager_add(h, sigma, k), ref)
        torch.testing.assert_close(eager_dot(g, k).double(), ref_dot, rtol=1e-5, atol=1e-5)
        hb = h.bfloat16()  # bf16: the fp32 sum rounded once
        assert torch.equal(eager_add(hb, sigma, k), (hb.float() + sigma * gaussian_noise(k, 64)).bfloat16())
        h64 = h.double()  # fp64 activations keep fp64
        torch.testing.assert_close(eager_add(h64, sigma, k), h64 + sigma.double() * gaussian_noise(k, 64).double())
    assert get_kernel("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="kernel='triton' needs CUDA"):
        get_kernel("triton", torch.device("cpu"))


_TRITON_CHECK = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
from megatron_alp.perturbation import triton_noise
from megatron_alp.perturbation.function import NoiseSite
from megatron_alp.perturbation.kernels import eager_add, eager_dot
site = NoiseSite(key=0x0123456789ABCDEF, step=1, layer=1, sample_offset=5, batch=2, s_local=3)
k = site.row_keys(torch.device("cpu"))
for hidden in (64, 1030):  # one block of pairs, and three (the last one masked)
    h = torch.randn(3, 2, hidden)
    g = torch.randn(3, 2, hidden)
    s = torch.tensor(0.7)
    d = (triton_noise.triton_add(h, s, k) - eager_add(h, s, k)).abs().max().item()
    assert d < 1e-5, d
    t, e = triton_noise.triton_dot(g, k).item(), eager_dot(g, k).item()
    assert abs(t - e) < 1e-4 * max(1.0, abs(e)), (t, e)
# bf16: h + sigma * eps summed in fp32 and rounded once (issue 13.7); the kernel's own eps
# (its fp32 math library may differ from torch's by ulps) comes from h = 0, sigma = 1
eps = triton_noise.triton_add(torch.zeros(3, 2, 1030), torch.tensor(1.0), k)
h = (0.5 + torch.rand(3, 2, 1030) / 2).bfloat16()
s = torch.tensor(0.02)
out = triton_noise.triton_add(h, s, k)
# Triton's interpreter converts fp32 -> bf16 by truncation (the compiled kernel's fptrunc
# rounds to nearest even; tests/gpu checks that): one truncation of the fp32 sum here
rtz = ((h.float() + s * eps).view(torch.int32) & -65536).view(torch.float32).bfloat16()
assert out.dtype == torch.bfloat16 and torch.equal(out, rtz)
# row keys computed inside the kernel from the site's scalars (no host-side row_keys):
# the same noise for plain, batch 1, SP, CP and SP x CP sites
for kw in (dict(), dict(batch=1), dict(tp_rank=1, tp_size=2, sequence_parallel=True),
           dict(cp_rank=1, cp_size=2),
           dict(tp_rank=1, tp_size=2, sequence_parallel=True, cp_rank=0, cp_size=2)):
    st = NoiseSite(key=0xFEDCBA9876543210, step=3, layer=1, sample_offset=7,
                   batch=kw.pop("batch", 2), s_local=4, **kw)
    kk = st.row_keys(torch.device("cpu"))
    hh, gg = torch.randn(4, st.batch, 66), torch.randn(4, st.batch, 66)
    d = (triton_noise.triton_add_at(hh, s, st) - eager_add(hh, s, kk)).abs().max().item()
    assert d < 1e-5, (kw, d)
    t, e = triton_noise.triton_dot_at(gg, st).item(), eager_dot(gg, kk).item()
    assert abs(t - e) < 1e-4 * max(1.0, abs(e)), (kw, t, e)
empty = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=0, s_local=4)  # zero rows
assert triton_noise.triton_add_at(torch.zeros(4, 0, 66), s, empty).shape == (4, 0, 66)
assert triton_noise.triton_dot_at(torch.zeros(4, 0, 66), empty).item() == 0.0
h64 = torch.randn(3, 2, 64, dtype=torch.float64)
d = (triton_noise.triton_add(h64, s, k) - eager_add(h64, s, k)).abs().max().item()
assert d < 1e-6, d
print("ok")
"""


def test_triton_kernel_matches_reference_under_interpreter():
    """The CUDA kernels' integer pipeline, run by Triton's CPU interpreter (no GPU here)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_compiled_kernel_matches_eager():
    """torch.compile of the same functions (inductor C++ on CPU): same noise to float32 ulps."""
    site = NoiseSite(key=KEY, step=1, layer=1, sample_offset=0, batch=2, s_local=33)
    keys = site.row_keys(torch.device("cpu"))
    h, g, s = torch.randn(33, 2, 128), torch.randn(33, 2, 128), torch.tensor(0.2)
    k = get_kernel("compile", torch.device("cpu"))
    torch.testing.assert_close(k.add(h, s, keys), eager_add(h, s, keys), rtol=0, atol=1e-6)
    torch.testing.assert_close(k.dot(g, keys), eager_dot(g, keys), rtol=1e-5, atol=1e-5)
