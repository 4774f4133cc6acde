"""The vLLM engine's CPU-testable parts: versions, requests, outputs, fleet, metadata."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from megatron_alp.rollout import SamplingParams
from megatron_alp.rollout.base import check_ratio_sampling
from megatron_alp.rollout.sampling import completion_seed
from megatron_alp.rollout.vllm_support import (
    assign_prompts,
    bucket_meta,
    check_vllm_version,
    completions_from_outputs,
    engine_kwargs,
    sampling_kwargs,
)


def test_version_range():
    assert check_vllm_version("0.10.2") == "0.10.2"
    assert check_vllm_version("0.33.0+cu130") == "0.33.0+cu130"
    assert check_vllm_version("0.11.0rc1") == "0.11.0rc1"
    with pytest.raises(ValueError, match=r"vllm 0.10.1 is outside the supported range >=0.10.2,<0.34"):
        check_vllm_version("0.10.1")
    with pytest.raises(ValueError, match="vllm 0.34.0 is outside"):
        check_vllm_version("0.34.0")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_missing_vllm_is_explained():
    from megatron_alp.rollout import create_engine

    with pytest.raises(ImportError, match=r"needs vLLM in this environment.*bootstrap_vllm\.sh"):
        check_vllm_version()
    with pytest.raises(ImportError, match="needs vLLM"):
        create_engine("vllm", model="/nonexistent")


def test_sampling_kwargs():
    sp = SamplingParams(temperature=0.6, max_new_tokens=128, n=8, stop_token_ids=(2, 7), seed=5)
    kw = sampling_kwargs(sp, prompt_index=3, sample_index=4)
    assert kw == dict(n=1, temperature=0.6, top_p=1.0, top_k=-1, max_tokens=128, logprobs=0,
                      ignore_eos=False, detokenize=False, stop_token_ids=[2, 7],
                      seed=completion_seed(5, 3, 4))
    assert "seed" not in sampling_kwargs(SamplingParams())
    assert sampling_kwargs(SamplingParams(top_k=40))["top_k"] == 40


def test_seeds_distinct_across_prompts_and_samples():
    """vLLM seeds sample j of an n>1 request with seed + j: with per-prompt seeds
    s + i, (i, j + 1) and (i + 1, j) collide. Every completion has its own seed."""
    n, prompts = 16, 64
    for base in (0, 1, 12345):
        seeds = [sampling_kwargs(SamplingParams(n=n, seed=base), prompt_index=i, sample_index=j)["seed"]
                 for i in range(prompts) for j in range(n)]
        assert len(set(seeds)) == n * prompts
        assert all(0 <= s < 2**63 - 1 for s in seeds)  # int64 (vLLM's OpenAI field bound)
    # and across steps (bases): step t's seeds do not repeat step t+1's
    a = {completion_seed(7, i, j) for i in range(32) for j in range(8)}
    b = {completion_seed(8, i, j) for i in range(32) for j in range(8)}
    assert not a & b


def test_truncated_sampling_refused():
    with pytest.raises(ValueError, match=r"top_p=0.9.*biasing every importance ratio"):
        check_ratio_sampling(SamplingParams(top_p=0.9))
    with pytest.raises(ValueError, match=r"top_k=20"):
        check_ratio_sampling(SamplingParams(top_k=20))
    check_ratio_sampling(SamplingParams(top_k=20, top_p=0.9), allow_truncation=True)
    check_ratio_sampling(SamplingParams(top_k=-1, top_p=1.0))
    check_ratio_sampling(SamplingParams(top_k=0))


def test_temperature_range():
    with pytest.raises(ValueError, match=r"temperature=0.005 is below 0.01: vLLM clamps"):
        check_ratio_sampling(SamplingParams(temperature=0.005))
    check_ratio_sampling(SamplingParams(temperature=0))
    check_ratio_sampling(SamplingParams(temperature=0.01))
    with pytest.raises(ValueError, match="finite and >= 0, got inf"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(ValueError, match="finite and >= 0, got nan"):
        SamplingParams(temperature=float("nan"))


def test_engine_kwargs():
    kw = engine_kwargs("/m", tensor_parallel_size=2, colocate=True, extra={"enforce_eager": True})
    assert kw["dtype"] == "bfloat16"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"] == "megatron_alp.rollout.vllm_worker.WeightSyncExtension"
    assert kw["enable_sleep_mode"] is True and kw["enforce_eager"] is True
    assert kw["tensor_parallel_size"] == 2
    # The extension class is importable by that name without vllm.
    from megatron_alp.rollout.vllm_worker import WeightSyncExtension  # noqa: F401


def test_assign_prompts_balanced_contiguous():
    parts = assign_prompts(10, 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert assign_prompts(2, 4) == [[0], [1], [], []]
    assert sum(map(len, assign_prompts(513, 8))) == 513
    sizes = [len(p) for p in assign_prompts(513, 8)]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one vLLM engine"):
        assign_prompts(3, 0)


def _lp(x):
    return SimpleNamespace(logprob=x, rank=1, decoded_token=None)


def test_completions_from_outputs_picks_sampled_token():
    outs = [
        SimpleNamespace(outputs=[
            SimpleNamespace(token_ids=[4, 9], logprobs=[{4: _lp(-0.5), 1: _lp(-2.0)}, {9: _lp(-1.25)}],
                            finish_reason="stop")]),
        SimpleNamespace(outputs=[
            SimpleNamespace(token_ids=[3], logprobs=[{3: _lp(-0.1)}], finish_reason="length")]),
        SimpleNamespace(outputs=[
            SimpleNamespace(token_ids=[], logprobs=[], finish_reason="abort")]),
    ]
    comps = completions_from_outputs(outs, [(7, 0), (7, 1), (8, 0)])
    assert [(c.prompt_index, c.sample_index, c.token_ids, c.logprobs, c.finish_reason) for c in comps] == [
        (7, 0, [4, 9], [-0.5, -1.25], "stop"), (7, 1, [3], [-0.1], "length"), (8, 0, [], [], "abort")]
    bad = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1], logprobs=None, finish_reason="stop")])]
    with pytest.raises(ValueError, match="must set logprobs=0"):
        completions_from_outputs(bad, [(0, 0)])


def test_bucket_meta():
    bucket = [("a.weight", torch.zeros(3, 4, dtype=torch.bfloat16)), ("b.bias", torch.zeros(5))]
    meta = bucket_meta(bucket)
    assert meta.names == ("a.weight", "b.bias")
    assert meta.dtypes == ("bfloat16", "float32")
    assert meta.shapes == ((3, 4), (5,))
    assert meta.nbytes == 3 * 4 * 2 + 5 * 4
