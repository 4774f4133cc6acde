"""LocalEngine: processed log-probs against an independent recomputation; weight updates."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_alp.rollout import LocalEngine, SamplingParams, create_engine, available_engines
from megatron_alp.models.tiny import tiny_hf_config

PROMPTS = [[5, 17, 99, 3], [42], [7, 8, 9, 10, 11, 12, 13]]


def _ref_processed_logp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent NumPy version of vLLM's processing: temperature, top-k, top-p."""
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        keep_sorted = (np.cumsum(p) - p) < top_p
        keep = np.zeros_like(keep_sorted)
        keep[order] = keep_sorted
        x = np.where(keep, x, -np.inf)
    m = x[np.isfinite(x)].max()
    return x - (m + math.log(np.exp(x[np.isfinite(x)] - m).sum()))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return LocalEngine(tiny_hf_config("qwen2"), dtype="float32", max_batch_size=4)


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=1),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=6, n=2, seed=2),
        SamplingParams(temperature=1.3, top_p=0.5, max_new_tokens=5, seed=3),
    ],
)
def test_logprobs_equal_processed_logsoftmax(engine, sp):
    comps = engine.generate(PROMPTS, sp)
    assert [(c.prompt_index, c.sample_index) for c in comps] == [
        (i, j) for i in range(len(PROMPTS)) for j in range(sp.n)
    ]
    model = engine.model
    for c in comps:
        assert len(c.token_ids) == len(c.logprobs) == sp.max_new_tokens
        full = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0].numpy()  # no cache, no padding
        start = len(PROMPTS[c.prompt_index]) - 1
        for t, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            ref = _ref_processed_logp(logits[start + t], sp.temperature, sp.top_k, sp.top_p)
            assert np.isfinite(ref[tok]), "sampled a token outside top-k/top-p"
            assert abs(ref[tok] - lp) < 1e-5, (c.prompt_index, t, ref[tok], lp)


def test_seeded_sampling_does_not_depend_on_batching(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=5, n=3, seed=11)
    a = engine.generate(PROMPTS, sp)
    engine.max_batch_size = 1
    try:
        b = engine.generate(PROMPTS, sp)
    finally:
        engine.max_batch_size = 4
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    np.testing.assert_allclose([c.logprobs for c in a], [c.logprobs for c in b], atol=1e-5)
    # different samples of one prompt differ
    assert a[0].token_ids != a[1].token_ids


def test_stop_tokens_and_greedy(engine):
    greedy = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=6))[0]
    stop_at = greedy.token_ids[2]
    first = greedy.token_ids.index(stop_at)
    c = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(stop_at,))
    )[0]
    assert c.token_ids == greedy.token_ids[: first + 1] and c.finish_reason == "stop"
    assert greedy.finish_reason == "length"


def test_update_weights_follows_new_weights(engine):
    torch.manual_seed(123)
    other = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2")).float().eval()
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    fresh = LocalEngine(tiny_hf_config("qwen2"), dtype="float32")
    before = fresh.generate(PROMPTS, sp)
    target = LocalEngine(other, dtype="float32").generate(PROMPTS, sp)
    state = list(other.state_dict().items())
    buckets = [state[i : i + 5] for i in range(0, len(state), 5)]
    info = fresh.update_weights(iter(buckets))
    assert info["tensors"] == len(state)
    after = fresh.generate(PROMPTS, sp)
    assert [c.token_ids for c in after] == [c.token_ids for c in target]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    np.testing.assert_allclose([c.logprobs for c in after], [c.logprobs for c in target], atol=1e-6)


def test_update_weights_errors(engine):
    name, p = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError, match="'nope.weight' is not a parameter"):
        engine.update_weights([[("nope.weight", torch.zeros(1))]])
    with pytest.raises(ValueError, match=rf"{name}' has shape \(1,\)"):
        engine.update_weights([[(name, torch.zeros(1))]])
    with pytest.raises(ValueError, match="did not send"):
        engine.update_weights([[(name, p.detach().clone())]])


def test_registry_and_bad_params():
    assert {"local", "vllm"} <= set(available_engines())
    # other tests may register test-only engines in this process: the listed names are
    # exactly the registry's, whatever it holds
    with pytest.raises(ValueError, match=f"unknown rollout engine 'sglang'; available: {', '.join(available_engines())}$"):
        create_engine("sglang")
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        LocalEngine(tiny_hf_config("qwen2"), dtype="int8")
