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
