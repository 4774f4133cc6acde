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
    openai_completion_request,
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
                        max_tokens=7, logprobs=0, ignore_eos=False, return_token_ids=True,
                        skip_special_tokens=False, stop_token_ids=[9], seed=completion_seed(2, 4, 5))


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
    assert cmd[:3] == ["vllm", "serve", "/m"]
    for flag, value in [("--logprobs-mode", "processed_logprobs"), ("--dtype", "bfloat16"),
                        ("--worker-extension-cls", "megatron_alp.rollout.vllm_worker.WeightSyncExtension"),
                        ("--tensor-parallel-size", "2"), ("--port", "8101"), ("--seed", "3")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prefix-caching" in cmd
    twin = engine_command("twin", "/m", 8100, dtype="float32")
    assert twin[1:3] == ["-m", "megatron_alp.rollout.engine_server"] and "float32" in twin


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
