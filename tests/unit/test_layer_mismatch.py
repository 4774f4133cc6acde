"""Per-layer mismatch attribution (``--rl-mismatch-by-layer-interval``) against HF's own
``output_hidden_states`` and NumPy norms."""

import copy

import numpy as np
import pytest
import torch

from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.train.layer_mismatch import LayerMismatchProbe, layer_divergence


def _np_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    return float(np.sqrt(((a - b) ** 2).sum()) / np.sqrt((b**2).sum()))


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_hf_config("qwen2", num_hidden_layers=5)).float().eval()


def _batch():
    ids = torch.tensor([[5, 17, 99, 3, 8, 9, 2], [42, 7, 1, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
    return ids, mask


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_an_engine_copy_differing_in_one_layer_diverges_from_that_layer_on(ref, layer):
    eng = copy.deepcopy(ref)
    with torch.no_grad():
        eng.model.layers[layer].mlp.down_proj.weight.mul_(1.05)
    ids, mask = _batch()
    got = layer_divergence(eng, ref, ids, mask)
    n = len(ref.model.layers)
    assert sorted(k for k in got if k.startswith("mismatch/layer_")) == [f"mismatch/layer_{k:02d}" for k in range(n)]
    # independent: HF's hidden_states (entry k + 1 is layer k's output, but the last entry
    # has the final norm applied, so layers 0..n-2 are compared there) and NumPy norms
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        he = eng(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        hr = ref(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    m = mask.bool()
    for k in range(n):
        v = got[f"mismatch/layer_{k:02d}"]
        if k < layer:
            assert v == 0.0, (k, v)
        else:
            assert v > 1e-4, (k, v)
        if k < n - 1:
            want = _np_rel(he.hidden_states[k + 1][m], hr.hidden_states[k + 1][m])
            assert v == pytest.approx(want, rel=1e-5, abs=1e-9), (k, v, want)
    assert got["mismatch/logits"] == pytest.approx(_np_rel(he.logits[m], hr.logits[m]), rel=1e-5)


def test_probe_fp32_is_exact_and_fp8_diverges_more_than_bf16(ref):
    buckets = [[(n, p.detach().clone()) for n, p in ref.named_parameters()]]
    rows = [[5, 17, 99, 3, 8, 9, 2], [42, 7, 1]]
    cfg = ref.config
    res = {}
    for dt in ("fp32", "bf16", "fp8"):
        probe = LayerMismatchProbe(cfg, dt)
        probe.load(buckets)
        res[dt] = probe.measure(rows)
    layers = [k for k in res["fp32"] if k.startswith("mismatch/layer_")]
    assert all(res["fp32"][k] == 0.0 for k in layers)
    assert all(res["bf16"][k] > 0 for k in layers)
    assert all(res["fp8"][k] > 2 * res["bf16"][k] for k in layers)  # e4m3 keeps 3 mantissa bits, bf16 7
