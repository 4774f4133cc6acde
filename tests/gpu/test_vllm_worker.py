"""The vLLM worker extension's device-side ordering on one GPU (no vLLM needed).

``WeightSyncExtension`` is vLLM's worker mixed in; here it runs on a plain object with
the two attributes vLLM gives it (``device``, ``model_runner``), a communicator that
"broadcasts" by filling the receive buffer on the stream it is handed, and a model whose
``load_weights`` is slow on the device (``torch.cuda._sleep`` before the copy). What is
checked is what vLLM's forward would see: a read on *another* stream issued the moment
the RPC returns (vllm 0.33 runs the forward on its own per-thread stream and, with async
scheduling, queues it right after the commit).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_alp.rollout.vllm_worker import WeightSyncExtension
from tests.gpu.gpu_env import needs_cuda

pytestmark = needs_cuda

SLOW_CYCLES = 2_000_000_000  # ~1 s of GPU clock: the load is still queued when the RPC returns


class _FillComm:
    """Stands in for PyNcclCommunicator: the broadcast writes ``value`` on ``stream``."""

    disabled = False

    def __init__(self, value: float) -> None:
        self.value = value

    def broadcast(self, t: torch.Tensor, src: int, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            t.fill_(self.value)


class _SlowLoadModel(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, device="cuda"), requires_grad=False)

    def load_weights(self, weights):
        for _, t in weights:
            torch.cuda._sleep(SLOW_CYCLES)  # queued on this thread's current stream
            self.w.data.copy_(t)


def test_receive_bucket_returns_after_the_load_ran_on_the_device():
    """Issue 17, defect 11: receive_bucket returned with load_weights' copies still
    queued (receive_ipc synchronised, receive_bucket did not); a forward on another
    stream then read the old weights. Fails without the torch.cuda.synchronize."""
    n = 1 << 20
    model = _SlowLoadModel(n)
    worker = WeightSyncExtension()
    worker.device = torch.device("cuda", torch.cuda.current_device())
    worker.model_runner = SimpleNamespace(get_model=lambda: model)
    worker._weight_comm = _FillComm(3.0)
    torch.cuda.synchronize()

    assert worker.receive_bucket(["w"], ["float32"], [[n]], 60.0) == 4 * n

    side = torch.cuda.Stream()  # what vLLM's forward stream would read right now
    with torch.cuda.stream(side):
        seen = model.w.detach().clone()
    side.synchronize()
    assert torch.equal(seen, torch.full((n,), 3.0, device="cuda")), (
        f"read {seen[:4].tolist()} on another stream right after receive_bucket returned")


class _RecordingLLM:
    """Stands in for ``vllm.LLM``: records the trainer's reserved GPU memory at each wake
    and takes the IPC buckets as the engine would (the handles are opened, not loaded)."""

    def __init__(self) -> None:
        self.reserved_at_wake: list[tuple[list[str] | None, int]] = []

    def sleep(self, level: int) -> None:
        pass

    def wake_up(self, tags=None) -> None:
        self.reserved_at_wake.append((tags, torch.cuda.memory_reserved()))

    def collective_rpc(self, method: str, args=()):
        assert method == "receive_ipc"
        return [len(args[0])]

    def reset_prefix_cache(self) -> bool:
        return True


def test_colocated_engine_wakes_after_the_trainer_cache_is_freed():
    """Issue 17, defect 13: with 1 GiB freed by the "training step" but still reserved by
    the trainer's caching allocator, the engine woke into a GPU short of that memory.
    At each wake the trainer now reserves less than the freed block."""
    from megatron_alp.rollout.vllm_engine import VLLMEngine

    llm = _RecordingLLM()
    eng = VLLMEngine.__new__(VLLMEngine)
    eng._attach(llm)
    eng.sleep(2)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()  # what earlier tests of this process still hold
    block = 1 << 30
    scratch = torch.empty(block, dtype=torch.uint8, device="cuda")  # the step's activations
    del scratch
    assert torch.cuda.memory_reserved() >= base + block  # freed, still held by the allocator
    eng.update_weights([[("w", torch.ones(256, 256))]])
    assert [t for t, _ in llm.reserved_at_wake] == [["weights"], ["kv_cache"]]
    assert all(r < base + block // 2 for _, r in llm.reserved_at_wake), (base, llm.reserved_at_wake)
