"""Bad input is refused with a ValueError that names the value, before any process group."""

import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_alp import parallel
from megatron_alp.models import gpt_args_from_hf, padded_vocab_size, validate_layout
from megatron_alp.parallel import ParallelConfig
from megatron_alp.models.tiny import tiny_hf_config

REPO = Path(__file__).resolve().parents[2]


def test_world_size_not_divisible():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .* = 4"):
        cfg.data_parallel_size(6)
    # initialize() checks before creating any process group.
    with pytest.raises(ValueError, match="world size 6"):
        parallel.initialize(cfg, rank=0, world_size=6, master_port=1)
    assert not dist.is_initialized()
    assert cfg.data_parallel_size(8) == 2


def test_parallel_config_fields():
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be an integer >= 1, got 0"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size=2 needs"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)


def test_heads_and_groups_not_divisible_by_tp():
    # SmolLM2-135M's attention: 9 heads, 3 KV heads.
    smol = gpt_args_from_hf(
        tiny_hf_config("llama", tie=True, hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536)
    )
    with pytest.raises(ValueError, match=r"num_attention_heads=9 is not divisible by tensor_model_parallel_size=2"):
        validate_layout(smol, ParallelConfig(tensor_model_parallel_size=2))
    validate_layout(smol, ParallelConfig(tensor_model_parallel_size=3))
    args = gpt_args_from_hf(tiny_hf_config("qwen2", num_attention_heads=4, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"num_key_value_heads \(query groups\)=1 is not divisible"):
        validate_layout(args, ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible by pipeline"):
        validate_layout(args, ParallelConfig(pipeline_model_parallel_size=3))
    with pytest.raises(ValueError, match="world size 3"):
        validate_layout(args, ParallelConfig(tensor_model_parallel_size=2), world_size=3)
    with pytest.raises(ValueError, match="context_parallel_size=2 needs Transformer Engine"):
        validate_layout(args, ParallelConfig(context_parallel_size=2))


def test_unknown_model_type_lists_supported():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        gpt_args_from_hf(Cfg())


def test_unsupported_architecture_details():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        gpt_args_from_hf(tiny_hf_config("qwen2", hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias=True"):
        gpt_args_from_hf(tiny_hf_config("llama", attention_bias=True))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        gpt_args_from_hf(tiny_hf_config("qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))


def test_hf_config_mapping():
    q2 = gpt_args_from_hf(tiny_hf_config("qwen2"))
    assert (q2.add_qkv_bias, q2.qk_layernorm, q2.kv_channels, q2.num_query_groups) == (True, False, 16, 2)
    q3 = gpt_args_from_hf(tiny_hf_config("qwen3", head_dim=32))
    assert (q3.add_qkv_bias, q3.qk_layernorm, q3.kv_channels) == (False, True, 32)
    ll = gpt_args_from_hf(tiny_hf_config("llama", tie=True))
    assert ll.tie_word_embeddings and ll.rotary_base == 500000.0
    assert ll.rope_scaling is not None and ll.rope_scaling.original_max_position_embeddings == 64
    assert padded_vocab_size(250, 128, 2) == 256
    assert padded_vocab_size(49152, 128, 8) == 49152
    assert padded_vocab_size(151936, 128, 3) == 152064  # lcm(128, 3) = 384


def test_bootstrap_refuses_without_python312(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYENV_ROOT": str(tmp_path / "nopyenv"),
        "MEGATRON_ALP_VENV": str(tmp_path / "venv"),
    }
    probe = subprocess.run(
        ["bash", "-c", "for p in /usr/bin/python3.12 /usr/local/bin/python3.12 /opt/homebrew/bin/python3.12; do [ -x $p ] && echo $p; done; python3 -c 'import sys;print(sys.version_info[:2]==(3,12))' 2>/dev/null"],
        env=env, capture_output=True, text=True,
    )
    if "/python3.12" in probe.stdout or "True" in probe.stdout:
        pytest.skip("this machine has a system-wide Python 3.12; cannot hide it")
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "Python 3.12 not found" in out.stderr
    assert "MEGATRON_ALP_PYTHON" in out.stderr
    assert not (tmp_path / "venv").exists()
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap.sh")],
        env={**env, "MEGATRON_ALP_PYTHON": "/bin/true"}, capture_output=True, text=True,
    )
    assert out.returncode != 0 and "MEGATRON_ALP_PYTHON=/bin/true is not a working Python 3.12" in out.stderr
