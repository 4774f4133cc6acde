"""Counter-based noise: a pure function of its coordinates, normal, uncorrelated, shardable."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_alp.perturbation.function import NoiseSite, site_noise
from megatron_alp.perturbation.kernels import eager_add, eager_dot, get_kernel
from megatron_alp.perturbation.noise import gaussian_noise, local_positions, mix32

REPO = Path(__file__).resolve().parents[2]
KEY = 0x0123_4567_89AB_CDEF


def noise(*, s=32, b=4, h=64, key=KEY, step=3, layer=2, offset=0, **layout) -> torch.Tensor:
    return site_noise(
        NoiseSite(key=key, step=step, layer=layer, sample_offset=offset, batch=b, s_local=s, **layout), h
    )


def test_mix32_is_bijective_on_a_range_and_matches_python_ints():
    x = torch.arange(0, 1 << 20, dtype=torch.int64) * 4093 & 0xFFFFFFFF
    y = mix32(x)
    assert y.min() >= 0 and y.max() < 2**32
    assert torch.unique(y).numel() == x.numel()
    for v in (0, 1, 0xFFFFFFFF, 0x8000_0000, 123456789):
        assert mix32(v) == int(mix32(torch.tensor(v)))


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
    assert eps.abs().max() < 6.0  # the 24-bit u1 bounds |eps| by 5.9


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
    a, b = site.lanes(torch.device("cpu"))
    h = torch.randn(40, 3, 64)
    sigma = torch.tensor(0.3)
    ref = h + sigma * gaussian_noise(a, b, 64)
    g = torch.randn(40, 3, 64)
    ref_dot = (g.double() * gaussian_noise(a, b, 64).double()).sum()
    for rows in (1, 7, 256):
        monkeypatch.setattr("megatron_alp.perturbation.kernels._EAGER_ROWS", rows)
        assert torch.equal(eager_add(h, sigma, a, b), ref)
        torch.testing.assert_close(eager_dot(g, a, b).double(), ref_dot, rtol=1e-5, atol=1e-5)
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
a, b = site.lanes(torch.device("cpu"))
for hidden in (64, 1030):  # one block of pairs, and three (the last one masked)
    h = torch.randn(3, 2, hidden)
    g = torch.randn(3, 2, hidden)
    s = torch.tensor(0.7)
    d = (triton_noise.triton_add(h, s, a, b) - eager_add(h, s, a, b)).abs().max().item()
    assert d < 1e-5, d
    t, e = triton_noise.triton_dot(g, a, b).item(), eager_dot(g, a, b).item()
    assert abs(t - e) < 1e-4 * max(1.0, abs(e)), (t, e)
# bf16: h + sigma * eps summed in fp32 and rounded once (issue 13.7); the kernel's own eps
# (its fp32 math library may differ from torch's by ulps) comes from h = 0, sigma = 1
eps = triton_noise.triton_add(torch.zeros(3, 2, 1030), torch.tensor(1.0), a, b)
h = (0.5 + torch.rand(3, 2, 1030) / 2).bfloat16()
s = torch.tensor(0.02)
out = triton_noise.triton_add(h, s, a, b)
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
    la, lb = st.lanes(torch.device("cpu"))
    hh, gg = torch.randn(4, st.batch, 66), torch.randn(4, st.batch, 66)
    d = (triton_noise.triton_add_at(hh, s, st) - eager_add(hh, s, la, lb)).abs().max().item()
    assert d < 1e-5, (kw, d)
    t, e = triton_noise.triton_dot_at(gg, st).item(), eager_dot(gg, la, lb).item()
    assert abs(t - e) < 1e-4 * max(1.0, abs(e)), (kw, t, e)
empty = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=0, s_local=4)  # zero rows
assert triton_noise.triton_add_at(torch.zeros(4, 0, 66), s, empty).shape == (4, 0, 66)
assert triton_noise.triton_dot_at(torch.zeros(4, 0, 66), empty).item() == 0.0
h64 = torch.randn(3, 2, 64, dtype=torch.float64)
d = (triton_noise.triton_add(h64, s, a, b) - eager_add(h64, s, a, b)).abs().max().item()
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
    a, b = site.lanes(torch.device("cpu"))
    h, g, s = torch.randn(33, 2, 128), torch.randn(33, 2, 128), torch.tensor(0.2)
    k = get_kernel("compile", torch.device("cpu"))
    torch.testing.assert_close(k.add(h, s, a, b), eager_add(h, s, a, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(k.dot(g, a, b), eager_dot(g, a, b), rtol=1e-5, atol=1e-5)
