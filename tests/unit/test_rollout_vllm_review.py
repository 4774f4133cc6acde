"""Defects found by reading the vLLM path against the vllm 0.10.2 and 0.33.0 wheels
(docs/rollout.md "Verified against"). vLLM is CUDA-only and not installed here: where
a vLLM object is needed, a small recording stand-in plays it."""

from types import SimpleNamespace

import pytest

import megatron_alp.rollout.vllm_engine as vllm_engine
from megatron_alp.rollout import create_engine
from megatron_alp.rollout.vllm_support import engine_kwargs


class _Reached(Exception):
    pass


def test_trainer_can_create_the_colocated_engine(monkeypatch):
    """The trainer calls create_engine(name, model=..., dtype=...) for every engine
    (train/loop.py start_engine); VLLMEngine had no dtype and raised TypeError."""
    def stop(*a, **k):
        raise _Reached

    monkeypatch.setattr(vllm_engine, "check_vllm_version", stop)
    with pytest.raises(_Reached):
        create_engine("vllm", model="/m", dtype="bfloat16")
    assert engine_kwargs("/m", dtype="bf16")["dtype"] == "bfloat16"
    assert engine_kwargs("/m", dtype="float32")["dtype"] == "float32"
    assert engine_kwargs("/m")["dtype"] == "bfloat16"


def test_vllm_commit_retries_a_busy_reset_then_reports_the_engine_down(monkeypatch):
    """vllm 0.33 /reset_prefix_cache answers {"success": false} while blocks are held and
    says callers may retry; a RuntimeError used to escape the fleet's collective (which
    only handles EngineDown / EngineError) and fail the whole update."""
    import megatron_alp.rollout.fleet_backends as fb

    answers = iter([{"success": False}, {"success": False}, {"success": True}])
    calls = []

    def fake_http(url, body=None, *, timeout):
        calls.append(url)
        return next(answers)

    monkeypatch.setattr(fb, "http_json", fake_http)
    monkeypatch.setattr(fb.time, "sleep", lambda s: None)
    ep = fb.VLLMEndpoint("http://e:1")
    ep.commit(1, epoch=0, timeout=5)
    assert calls == ["http://e:1/reset_prefix_cache"] * 3
    monkeypatch.setattr(fb, "http_json", lambda url, body=None, *, timeout: {"success": False})
    with pytest.raises(fb.EngineDown, match="returned False"):
        ep.commit(1, epoch=0, timeout=5, retry_s=0)
    monkeypatch.setattr(fb, "http_json", lambda url, body=None, *, timeout: None)  # 0.10.2
    ep.commit(1, epoch=0, timeout=5)
