"""Fusions on with CUDA, and a broken Transformer Engine not selected (issue 13, defect 6).

The CUDA host is simulated (``torch.cuda.is_available`` / ``device_count`` answer as on a
GPU machine); the configs are built by megatron-core for real.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_alp import platform
from megatron_alp.models import builder, gpt_args_from_hf
from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.parallel import ParallelConfig

FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
           "masked_softmax_fusion", "gradient_accumulation_fusion", "persist_layer_norm")


@pytest.fixture
def cuda_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv(platform.FORCE_CPU_ENV, raising=False)
    clear = getattr(getattr(builder, "_te_works", None), "cache_clear", lambda: None)
    clear()
    yield
    clear()


@pytest.fixture
def broken_te(monkeypatch):
    """``import transformer_engine`` works, its PyTorch extension does not (a broken wheel)."""
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import raises


def test_a_broken_transformer_engine_is_not_selected(cuda_host, broken_te):
    with pytest.warns(UserWarning, match="Transformer Engine is installed but does not work"):
        assert builder.te_available() is False
    args = gpt_args_from_hf(tiny_hf_config())
    spec = builder.layer_spec(args)  # the local spec, not TE's
    assert "transformer_engine" not in repr(spec)


def test_fusions_default_on_with_cuda_and_each_can_be_switched_off(cuda_host, monkeypatch):
    monkeypatch.setattr(builder, "te_available", lambda: False)  # no TE, no apex here
    args = gpt_args_from_hf(tiny_hf_config())
    tc = builder.transformer_config(args, ParallelConfig())
    assert tc.bias_activation_fusion and tc.bias_dropout_fusion
    # their kernels are absent on this machine: off rather than a crash at build time
    assert not (tc.apply_rope_fusion or tc.gradient_accumulation_fusion or tc.masked_softmax_fusion)
    off = builder.transformer_config(args, ParallelConfig(), fusions=False)
    assert not any(getattr(off, f) for f in FUSIONS)
    one = builder.transformer_config(args, ParallelConfig(), bias_activation_fusion=False)
    assert not one.bias_activation_fusion and one.bias_dropout_fusion


def test_no_fusions_without_cuda():
    if platform.cuda_available():
        pytest.skip("CUDA present")
    assert not any(builder.default_fusions().values())


def test_start_up_names_the_layer_spec_and_why(cuda_host, broken_te):
    """A broken TE (an extension built for another torch: an ABI mismatch) must not fall
    back silently: the start-up line names the local spec, the reason and the install
    command (issue 18, item 10). The trainer prints it on rank 0 (stderr, WARNING)."""
    with pytest.warns(UserWarning):
        line, loud = builder.layer_spec_report()
    assert loud
    assert "LOCAL spec although CUDA is present" in line
    assert "Transformer Engine is installed but does not work" in line
    assert "--no-build-isolation" in line


def test_layer_spec_report_without_cuda_or_without_te(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line, loud = builder.layer_spec_report()
    assert not loud and "megatron-core local (no CUDA" in line


def test_missing_te_on_a_gpu_is_said_loudly_too(cuda_host, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not installed
    line, loud = builder.layer_spec_report()
    assert loud and "Transformer Engine is not installed" in line
