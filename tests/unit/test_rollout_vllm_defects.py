"""Fixes of the vLLM path that can be checked without a GPU (issue 10, defects 1-7).

vLLM itself is CUDA-only; where a vLLM object is needed, a small recording stand-in
plays it (the real engine is exercised by tests/e2e/test_vllm_gpu.py on a GPU machine).
"""

from types import SimpleNamespace

import msgspec
import pytest
import torch

from megatron_alp.rollout import create_engine
from megatron_alp.rollout.vllm_engine import VLLMEngine
from megatron_alp.rollout.vllm_support import (
    engine_kwargs,
    ipc_payload,
    local_device_of_uuid,
    rebuild_ipc_args,
    require_pynccl,
    require_reset,
    workers_per_engine,
)
from megatron_alp.rollout.vllm_worker import WeightSyncExtension


def _reduced_like_torch():
    """The shape of ``reduce_tensor(cuda_tensor)``'s answer (torch 2.x
    ``multiprocessing/reductions.py``): a function plus classes, a dtype and handles."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = (torch.Tensor, torch.Size([4, 3]), (3, 1), 0, torch.storage.TypedStorage, torch.bfloat16,
            2, b"\x01handle", 24, 0, False, b"\x02ref", 8, b"\x03event", True)
    return rebuild_cuda_tensor, args


def test_ipc_arguments_survive_msgpack():
    """vLLM's msgpack encoder refuses functions, classes and dtypes (defect 2)."""
    reduced = _reduced_like_torch()
    enc = msgspec.msgpack.Encoder()  # no enc_hook: exactly what vLLM accepts without pickle
    with pytest.raises(TypeError):
        enc.encode([["w", reduced]])  # the old argument form
    items = [["model.embed_tokens.weight", ipc_payload(reduced, "GPU-1234")]]
    back = msgspec.msgpack.decode(enc.encode(items))
    assert back == items
    args = rebuild_ipc_args(back[0][1], device_index=0)
    want = list(reduced[1])
    want[6] = 0  # opened on the receiver's index of the sender's GPU
    assert list(args) == want


def test_ipc_device_by_uuid_not_index():
    """Indices differ between processes (CUDA_VISIBLE_DEVICES); the UUID is what names the
    GPU. Any receiving worker (TP > 1, several engines) finds the sender's GPU."""
    assert local_device_of_uuid("GPU-b", ["GPU-a", "GPU-b", "GPU-c"]) == 1
    with pytest.raises(ValueError, match="GPU-z is not visible to this vLLM worker"):
        local_device_of_uuid("GPU-z", ["GPU-a"])


def test_disabled_pynccl_is_an_error():
    with pytest.raises(RuntimeError, match="VLLM_DISABLE_PYNCCL=1.*silent no-ops"):
        require_pynccl(SimpleNamespace(disabled=True), "worker 1")
    require_pynccl(SimpleNamespace(disabled=False), "worker 1")
    with pytest.raises(RuntimeError, match="disabled"):
        require_pynccl(object(), "worker 1")  # no attribute: not a live communicator


def test_reset_prefix_cache_false_is_an_error():
    with pytest.raises(RuntimeError, match="engine 3: reset_prefix_cache\\(\\) returned False"):
        require_reset(False, "engine 3")
    assert require_reset(True, "e") is True
    assert require_reset(None, "e") is False  # vllm 0.10.2 answers None


def test_workers_per_engine_counts_pp():
    assert workers_per_engine(2, 2) == 4
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1, got 0"):
        workers_per_engine(1, 0)
    with pytest.raises(ValueError, match="data_parallel_size=2"):
        engine_kwargs("/m", extra={"data_parallel_size": 2})
    assert engine_kwargs("/m", pipeline_parallel_size=2)["pipeline_parallel_size"] == 2


def test_in_process_engine_refuses_a_fleet():
    """Several in-process engines would all bind cuda:0.. of the trainer (defect 1)."""
    with pytest.raises(ValueError, match="num_engines=2.*create_engine\\('fleet'"):
        create_engine("vllm", model="/m", num_engines=2)
    with pytest.raises(ValueError, match="colocate=False"):
        create_engine("vllm", model="/m", colocate=False)


class _FakeLLM:
    """Records the calls VLLMEngine makes on ``vllm.LLM``."""

    def __init__(self, reset=True):
        self.calls = []
        self.reset = reset
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(
            shutdown=lambda: self.calls.append("shutdown")))

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return self.reset


def _engine(llm):
    eng = VLLMEngine.__new__(VLLMEngine)
    eng._attach(llm)
    eng._load_bucket = lambda bucket: llm.calls.append(f"load({len(bucket)})")
    return eng


@pytest.mark.parametrize("level", [1, 2])
def test_update_after_sleep_wakes_weights_first(level):
    """Loading into unmapped memory is an illegal access and a plain wake_up restores the
    old weights (defect 3): weights wake, load, then the KV cache wakes."""
    llm = _FakeLLM()
    eng = _engine(llm)
    eng.sleep(level)
    eng.update_weights([[("a", torch.zeros(1))], [("b", torch.zeros(1)), ("c", torch.zeros(1))]])
    assert llm.calls == [f"sleep({level})", "wake_up(['weights'])", "load(1)", "load(2)",
                         "wake_up(['kv_cache'])", "reset_prefix_cache"]
    assert eng.sleep_level == 0


@pytest.mark.parametrize("level", [1, 2])
def test_trainer_cache_is_freed_before_each_wake(level):
    """Issue 17, defect 13: the engine woke (weights, then KV cache) while the trainer's
    caching allocator still held its reserve (empty_cache ran only in close())."""
    llm = _FakeLLM()
    eng = _engine(llm)
    eng._free_trainer_cache = lambda: llm.calls.append("free")  # the real one: next test
    eng.sleep(level)
    eng.update_weights([[("a", torch.zeros(1))], [("b", torch.zeros(1))]])
    assert llm.calls == [f"sleep({level})", "free", "wake_up(['weights'])", "load(1)", "load(1)",
                         "free", "wake_up(['kv_cache'])", "reset_prefix_cache"]
    llm.calls.clear()
    eng.sleep(level)
    eng.wake_up()
    assert llm.calls == [f"sleep({level})", "free", "wake_up(None)"]
    llm.calls.clear()
    eng.update_weights([[("a", torch.zeros(1))]])  # awake: nothing to wake, nothing freed
    assert llm.calls == ["load(1)", "reset_prefix_cache"]


def test_freeing_the_trainer_cache_collects_cycles():
    """Tensors held only by reference cycles (autograd graphs, closures) are not freed by
    empty_cache alone; the free collects them first (on the GPU: then empties the cache,
    tests/gpu/test_vllm_worker.py)."""
    import gc
    import weakref

    eng = _engine(_FakeLLM())
    gc.disable()  # no automatic collection may free the cycle behind the test's back
    try:
        a, b = [torch.ones(1024)], []
        a.append(b)
        b.append(a)
        ref = weakref.ref(a[0])
        del a, b
        assert ref() is not None
        eng._free_trainer_cache()
        assert ref() is None
    finally:
        gc.enable()


def test_update_awake_and_reset_false():
    llm = _FakeLLM(reset=False)
    eng = _engine(llm)
    with pytest.raises(RuntimeError, match="returned False"):
        eng.update_weights([[("a", torch.zeros(1))]])
    assert llm.calls == ["load(1)", "reset_prefix_cache"]


def test_close_shuts_the_engine_down():
    llm = _FakeLLM()
    eng = _engine(llm)
    eng.close()
    eng.close()  # idempotent
    assert llm.calls == ["shutdown"]
    assert eng.llm is None


def test_worker_rpc_arguments_are_plain():
    """Every worker method takes plain values: the NCCL bucket metadata survives msgpack."""
    from megatron_alp.rollout.vllm_support import bucket_meta

    meta = bucket_meta([("a", torch.zeros(2, 3, dtype=torch.bfloat16))])
    args = (list(meta.names), list(meta.dtypes), [list(s) for s in meta.shapes])
    assert tuple(msgspec.msgpack.decode(msgspec.msgpack.encode(args))) == args
    assert hasattr(WeightSyncExtension, "receive_bucket")
