"""The fleet's wire format and launcher plans (pure functions)."""

import json

import pytest

from megatron_alp.rollout import Completion, SamplingParams
from megatron_alp.rollout.fleet_launch import assign_devices, engine_command, main
from megatron_alp.rollout.sampling import completion_seed
from megatron_alp.rollout.wire import (
    completion_from_dict,
    completion_from_openai,
    completion_to_dict,
    completions_from_openai,
    openai_completion_request,
    openai_seed,
    sampling_from_dict,
    sampling_to_dict,
)


def test_sampling_and_completion_round_trip_through_json():
    sp = SamplingParams(temperature=0.7, max_new_tokens=9, stop_token_ids=(3, 4), n=5, seed=11)
    assert sampling_from_dict(json.loads(json.dumps(sampling_to_dict(sp)))) == sp
    with pytest.raises(ValueError, match=r"sampling fields \['beam'\]"):
        sampling_from_dict(dict(beam=2))
    c = Completion(3, 1, [5, 6], [-0.1234567890123456789, -2.5e-9], "length")
    assert completion_from_dict(json.loads(json.dumps(completion_to_dict(c)))) == c  # bit-exact
    with pytest.raises(ValueError, match=r"\(3, 1\) has 2 tokens but 1 log-probs"):
        completion_from_dict([3, 1, [5, 6], [-0.1], "stop"])


def test_openai_request_one_completion_per_seed():
    sp = SamplingParams(temperature=1.0, max_new_tokens=7, n=8, seed=2, stop_token_ids=(9,))
    body = openai_completion_request("m", [1, 2, 3], sp, prompt_index=4, sample_index=5)
    assert body == dict(model="m", prompt=[1, 2, 3], n=1, temperature=1.0, top_p=1.0, top_k=-1,
                        min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, max_tokens=7, logprobs=0, ignore_eos=False, return_token_ids=True,
                        skip_special_tokens=False, stop_token_ids=[9], seed=openai_seed(2, 4, 5))
    assert openai_seed(2, 4, 5) == completion_seed(2, 4, 0) % 2**62 + 5


def test_openai_answer_keeps_abort():
    ans = {"choices": [{"index": 0, "text": "", "token_ids": [5, 7],
                        "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.5, -1.5]},
                        "finish_reason": "length"}]}
    assert completion_from_openai(ans, 2, 3) == Completion(2, 3, [5, 7], [-0.5, -1.5], "length")
    ans["choices"][0]["finish_reason"] = "abort"
    assert completion_from_openai(ans, 2, 3).finish_reason == "abort"
    ans["choices"][0]["token_ids"] = None
    with pytest.raises(ValueError, match="return_token_ids"):
        completion_from_openai(ans, 2, 3)


def test_assign_devices_disjoint_and_never_the_trainers():
    assert assign_devices(3, 2, range(8), reserved=[0, 1]) == [[2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match=r"4 engines x 2 GPUs need 8 GPUs; available \[2, 3, 4, 5, 6, 7\]"):
        assign_devices(4, 2, list(range(8)), reserved=[0, 1])
    with pytest.raises(ValueError, match="lists a GPU twice"):
        assign_devices(1, 1, [0, 0])


def test_engine_commands():
    cmd = engine_command("vllm", "/m", 8101, gpus_per_engine=2, seed=3)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/m"]  # `vllm serve`
    for flag, value in [("--logprobs-mode", "processed_logprobs"), ("--dtype", "bfloat16"),
                        ("--worker-extension-cls", "megatron_alp.rollout.vllm_worker.WeightSyncExtension"),
                        ("--tensor-parallel-size", "2"), ("--port", "8101"), ("--seed", "3")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prefix-caching" in cmd
    twin = engine_command("twin", "/m", 8100, dtype="float32")
    assert twin[1:3] == ["-m", "megatron_alp.rollout.engine_server"] and "float32" in twin
    assert "--exit-with-parent" in twin  # a trainer killed by SIGKILL leaves no engine behind


def test_launcher_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--backend", "vllm", "--gpus", "0,x"])
    assert e.value.code == 2 and "--gpus '0,x'" in capsys.readouterr().err


def test_engine_server_usage_error_exits_2(tmp_path, capsys):
    from megatron_alp.rollout.engine_server import main as server_main

    with pytest.raises(SystemExit) as e:
        server_main(["--model", str(tmp_path / "nope"), "--port", "1"])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err


# ---- independent review of the vLLM path against the vllm 0.10.2 / 0.33.0 wheels ----

# The fields whose value, when the request leaves them out, comes from the server's
# defaults, i.e. the model's generation_config.json: vllm 0.33.0
# entrypoints/openai/completion/protocol.py CompletionRequest._DEFAULT_SAMPLING_PARAMS
# (0.10.2 protocol.py: the same minus the two penalties added later).
_SERVER_DEFAULTED = ("repetition_penalty", "presence_penalty", "frequency_penalty",
                     "temperature", "top_p", "top_k", "min_p")


def test_openai_request_never_takes_the_servers_sampling_defaults():
    """A Qwen2.5-Instruct generation_config (repetition_penalty 1.05) would otherwise
    penalise vLLM's processed log-probs and not the trainer's."""
    body = openai_completion_request(None, [1, 2], SamplingParams(seed=1), 0, 0)
    for name in _SERVER_DEFAULTED:
        assert body.get(name) is not None, name
    assert (body["repetition_penalty"], body["presence_penalty"], body["frequency_penalty"],
            body["min_p"]) == (1.0, 0.0, 0.0, 0.0)
    assert "model" not in body  # None: the server's own model (see the next test)
    cmd = engine_command("vllm", "/m", 8101)
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"


def test_fleet_vllm_needs_no_served_model_name():
    """The trainer creates the fleet client with endpoints and model=--hf-model only; the
    client used to refuse that (and a path spelt differently from `vllm serve`'s argument
    would be a 404): vLLM accepts a request without a model name."""
    from megatron_alp.rollout import create_engine
    from megatron_alp.rollout.fleet_backends import VLLMEndpoint

    engine = create_engine("fleet", endpoints=["http://127.0.0.1:9"], backend="vllm",
                           model="/ckpt/hf", dtype="bfloat16", sync_host="127.0.0.1",
                           sync_port=None, health_timeout_s=0.5, startup_wait_s=0)
    try:
        ep = engine.engines[0].endpoint
        assert isinstance(ep, VLLMEndpoint) and ep.model is None
        assert not engine.engines[0].up  # nothing listens there: down, not an exception
    finally:
        engine.close()


def test_visible_devices_map_through_the_parents_cuda_visible_devices():
    from megatron_alp.rollout.fleet_launch import visible_devices

    assert visible_devices([0, 1], None) == "0,1"
    assert visible_devices([0, 2], "4,5,6,7") == "4,6"  # was "0,2": another job's GPUs
    assert visible_devices([1], "GPU-aa, GPU-bb") == "GPU-bb"
    with pytest.raises(ValueError, match=r"GPU indices \[4\] are not visible.*indices 0\.\.3"):
        visible_devices([4], "4,5,6,7")


def test_local_vllm_fleet_reserves_the_trainers_gpus(monkeypatch):
    """`--rl-rollout-engine fleet --rl-fleet-backend vllm` without endpoints: rank 0
    starts the engines; they used to be spread over every GPU, the trainer's included."""
    import megatron_alp.rollout.fleet_launch as fl
    from megatron_alp.rollout import create_engine
    from megatron_alp.rollout.fleet import trainer_gpus

    seen = {}

    class Stop(Exception):
        pass

    def fake_local_fleet(num_engines, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(fl, "LocalFleet", fake_local_fleet)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(Stop):
        create_engine("fleet", backend="vllm", model="/ckpt/hf", num_engines=4)
    assert set(seen["reserve_gpus"]) >= {0, 1, 2, 3}
    with pytest.raises(Stop):  # an explicit reservation wins
        create_engine("fleet", backend="vllm", model="/ckpt/hf", launch_kwargs=dict(reserve_gpus=[7]))
    assert seen["reserve_gpus"] == [7]

    assert trainer_gpus({"LOCAL_WORLD_SIZE": "4"}, current=0) == [0, 1, 2, 3]
    assert trainer_gpus({}, current=2) == [0, 2]
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='x'"):
        trainer_gpus({"LOCAL_WORLD_SIZE": "x"}, current=0)


def test_a_prompt_group_is_one_vllm_request_with_the_same_seeds():
    """Issue 17, defect 14: a vLLM fleet sent one request per completion (and spread a
    group over engines). Now one request carries a prompt's group (n samples); vLLM
    seeds sample k with seed + k (v1/engine/parallel_sampling.py, 0.10.2 and 0.33), so
    each completion keeps the seed a one-sample request for it would carry."""
    import megatron_alp.rollout.fleet_backends as fb

    sp = SamplingParams(max_new_tokens=2, n=3, seed=7)
    sent = []

    def fake_http(url, body=None, *, timeout):
        sent.append(body)
        # answered as vLLM does: choice k is child k (seed + k); listed out of order
        choices = [dict(index=k, token_ids=[body["seed"] + k], finish_reason="length",
                        logprobs=dict(token_logprobs=[-float(k)])) for k in range(body["n"])]
        return dict(choices=choices[::-1])

    saved, fb.http_json = fb.http_json, fake_http
    try:
        rows = [(4, 0, [1, 2]), (4, 1, [1, 2]), (4, 2, [1, 2]), (5, 0, [3]), (5, 1, [3]), (5, 2, [3])]
        comps, version = fb.VLLMEndpoint("http://e:1").generate(rows, sp, timeout=5)
    finally:
        fb.http_json = saved
    assert version is None
    assert [(b["prompt"], b["n"]) for b in sent] == [([1, 2], 3), ([3], 3)]
    assert [(c.prompt_index, c.sample_index) for c in comps] == [(i, j) for i, j, _ in rows]
    for c in comps:
        one = openai_completion_request(None, [0], sp, c.prompt_index, c.sample_index)
        assert c.token_ids == [one["seed"]] and one["n"] == 1  # the seed vLLM gave it
    # a retry of part of a group (samples 1..2) draws with the same seeds
    part = openai_completion_request(None, [1, 2], sp, 4, 1, n=2)
    assert part["seed"] == openai_seed(7, 4, 1) and part["n"] == 2
    assert all(openai_seed(7, i, 2) < 2**63 - 1 for i in range(100))
    with pytest.raises(ValueError, match=r"samples 0..2 has 2 choices, expected 3"):
        completions_from_openai(dict(choices=[{}, {}]), 4, 0, 3)


@pytest.mark.slow  # two interpreters importing torch
def test_an_engine_started_with_exit_with_parent_goes_when_its_starter_is_killed():
    """A local fleet starts its engines in their own sessions (no signal reaches them): an
    engine whose starter died of SIGKILL used to run on forever. ``--exit-with-parent``'s
    watcher ends it within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = ("import sys, time\n"
             "from megatron_alp.rollout.engine_server import _watch_parent\n"
             "_watch_parent(int(sys.argv[1]))\n"
             "time.sleep(120)\n")
    parent = ("import os, subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], start_new_session=True)\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(120)\n")
    starter = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(starter.stdout.readline())
    time.sleep(1)  # killed early or late, the child goes: it was told its starter's pid
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init; a zombie still answers kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the engine outlived its starter")
