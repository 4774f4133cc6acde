"""FP8 rollout emulation (``--rl-rollout-dtype fp8``) against an independent NumPy e4m3."""

import numpy as np
import torch
from torch import nn

from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.rollout import LocalEngine
from megatron_alp.rollout.fp8 import FP8EmulatedLinear, fp8_quantize, quantize_linears
from megatron_alp.rollout.vllm_support import engine_kwargs
from megatron_alp.rollout.fleet_launch import engine_command


def _np_e4m3(v: np.ndarray) -> np.ndarray:
    """Round to the nearest e4m3 value (ties to even), by hand: 3 mantissa bits, exponent
    bias 7 (normal exponents -6..8, subnormal step 2**-9), largest finite 448."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, -6.0)  # below 2**-6: the subnormal spacing 2**-9
    step = 2.0 ** (e - 3)
    r = np.round(a / step) * step  # np.round: half to even
    return np.sign(v) * np.minimum(r, 448.0)


def test_known_values_round_like_e4m3_by_hand():
    # hand-checked: 0.3 -> 0.3125 (step 1/32), 1.1 -> 1.125, 17 -> 16 (tie 17 between 16 and 18 -> even
    # mantissa 16), 300 -> 288, 0.001 -> 2**-9 (subnormal), 449 -> 448 (clamped before the cast)
    x = torch.tensor([[0.3, 1.1, 17.0, 300.0, 0.001, -5.5, 448.0]])
    q = (x.clamp(-448, 448)).to(torch.float8_e4m3fn).float()
    want = [0.3125, 1.125, 16.0, 288.0, 2.0 ** -9, -5.5, 448.0]
    assert q.tolist()[0] == want
    assert _np_e4m3(x.numpy()).tolist()[0] == want


def test_per_channel_quantisation_matches_numpy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different size
    q, scale = fp8_quantize(w, dim=1)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    wn = w.double().numpy()
    s = np.abs(wn).max(axis=1, keepdims=True) / 448.0
    np.testing.assert_allclose(scale.double().numpy(), s, rtol=1e-6)
    ref = _np_e4m3(w.numpy() / scale.numpy())  # the same fp32 division the code does
    np.testing.assert_array_equal(q.float().numpy(), ref.astype(np.float32))
    # every row's largest magnitude maps onto 448 exactly
    assert np.all(np.abs(q.float().numpy()).max(axis=1) == 448.0)


def test_emulated_linear_equals_dequantised_numpy_matmul():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(24, generator=g) * 0.1)
    x = (torch.randn(3, 5, 64, generator=g) * torch.linspace(0.1, 4, 5)[None, :, None]).to(torch.bfloat16)
    with torch.no_grad():
        plain = lin(x).double().numpy()
    quantize_linears(nn.Sequential(lin))
    assert isinstance(lin, FP8EmulatedLinear)
    with torch.no_grad():
        got = lin(x).double().numpy()
    # independent: per-token / per-channel scales and e4m3 rounding in float64 NumPy
    wn, xn = lin.weight.detach().double().numpy(), x.double().numpy()
    ws = np.abs(wn).max(axis=1, keepdims=True) / 448.0
    xs = np.abs(xn).max(axis=-1, keepdims=True) / 448.0
    ref = (_np_e4m3(xn / xs) * xs) @ (_np_e4m3(wn / ws) * ws).T + lin.bias.detach().double().numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    fp8_effect = np.abs(plain - ref).max() / np.abs(ref).max()
    assert err < 8e-3, err  # BF16 rounding of the operands and output only
    assert fp8_effect > 2 * err, (fp8_effect, err)  # the quantisation is visible beyond that


def test_local_engine_fp8_quantises_decoder_linears_and_follows_weight_updates():
    torch.manual_seed(0)
    cfg = tiny_hf_config("qwen2")
    bf = LocalEngine(cfg, dtype="bfloat16")
    f8 = LocalEngine(cfg, dtype="fp8")
    assert f8.dtype == torch.bfloat16 and f8.fp8_linears
    assert all(".layers." in n for n in f8.fp8_linears)  # not the LM head
    assert type(f8.model.lm_head) is nn.Linear
    names = {n for n, m in f8.model.named_modules() if type(m) is nn.Linear or isinstance(m, FP8EmulatedLinear)}
    assert set(f8.fp8_linears) == names - {"lm_head"}
    # same weights, different numerics
    f8.update_weights([[(n, p.detach().clone()) for n, p in bf.model.named_parameters()]])
    ids = torch.tensor([[5, 17, 99, 3, 8, 9]])
    lb = bf.model(input_ids=ids).logits.float()
    l8 = f8.model(input_ids=ids).logits.float()
    assert not torch.equal(lb, l8)
    # new weights reach the quantised copies (the cache is rebuilt after an update)
    g = torch.Generator().manual_seed(3)
    new = [(n, (p.detach().float() + 0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
           for n, p in bf.model.named_parameters()]
    f8.update_weights([new])
    fresh = LocalEngine(cfg, dtype="fp8")
    fresh.update_weights([new])
    assert torch.equal(f8.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_vllm_engines_are_told_fp8():
    kw = engine_kwargs("/m", dtype="fp8")
    assert kw["quantization"] == "fp8" and kw["dtype"] == "bfloat16"
    assert "quantization" not in engine_kwargs("/m", dtype="bf16")
    cmd = engine_command("vllm", "/m", 8000, dtype="fp8")
    assert cmd[cmd.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in engine_command("vllm", "/m", 8000, dtype="bfloat16")
