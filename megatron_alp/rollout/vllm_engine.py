"""``VLLMEngine``: a fleet of vLLM engines in BF16, weights pushed after every step.

One or more ``vllm.LLM`` instances (each with its own tensor parallelism, on GPUs the
trainer does not use, or colocated on the trainer's GPUs with sleep mode). Prompts are
split over the engines in balanced contiguous chunks; log-probs come back in
``processed_logprobs`` mode; after every weight update the prefix cache is reset (vLLM
does not do it itself), so no stale KV is reused.

Weight transport (see ``vllm_worker.py``): NCCL broadcast from the trainer's sending rank
over a stateless process group that spans it and every worker of every engine; or, when
colocated, CUDA IPC handles. The trainer passes HF-named, full tensors in buckets
(``megatron_alp.convert`` live export); vLLM's ``load_weights`` fuses and reshards.

Supported vLLM versions: ``SUPPORTED_VLLM`` in ``vllm_support.py`` (docs/rollout.md).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence

import torch

from megatron_alp.rollout.base import Completion, SamplingParams, WeightBucket, register_engine
from megatron_alp.rollout.vllm_support import (
    assign_prompts,
    bucket_meta,
    check_vllm_version,
    completions_from_outputs,
    engine_kwargs,
    sampling_kwargs,
)

__all__ = ["VLLMEngine"]


def _run_parallel(calls: Sequence[tuple[Any, tuple, dict]], *, alongside: Any = None) -> list[Any]:
    """Run ``fn(*args, **kw)`` for each call in its own thread (and ``alongside()`` in this
    one); return the results in order and re-raise the first exception of any thread.

    ``collective_rpc`` blocks until the workers return, and a worker that receives by
    broadcast returns only after this process has sent: the sender must run beside it.
    """
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def target(i: int, fn: Any, args: tuple, kw: dict) -> None:
        try:
            results[i] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i, *c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    try:
        if alongside is not None:
            alongside()
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


@register_engine("vllm")
class VLLMEngine:
    """A fleet of ``num_engines`` vLLM engines serving ``model`` (an HF folder).

    ``colocate=True`` shares the trainer's GPUs: sleep mode frees vLLM's memory between
    generations and weights travel by CUDA IPC. Otherwise weights travel by NCCL from
    the trainer process that calls :meth:`update_weights` (the export stream's sending
    rank) to all workers; ``sync_address``/``sync_port`` is that rendezvous.
    """

    def __init__(
        self,
        model: str,
        *,
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        colocate: bool = False,
        sync_address: str = "127.0.0.1",
        sync_port: int = 29600,
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_vllm_version()
        if not torch.cuda.is_available():
            raise RuntimeError("the vllm rollout engine needs CUDA; use the 'local' engine on CPU")
        import vllm

        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.colocate = colocate
        self.tp = tensor_parallel_size
        self.engines = [
            vllm.LLM(
                **engine_kwargs(
                    model,
                    tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization,
                    max_model_len=max_model_len,
                    colocate=colocate,
                    seed=seed + e,
                    extra=llm_kwargs,
                )
            )
            for e in range(num_engines)
        ]
        self._comm = None
        if not colocate:
            self._init_nccl(sync_address, sync_port)

    # -- weight sync ---------------------------------------------------------------------
    def _init_nccl(self, address: str, port: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        world = 1 + len(self.engines) * self.tp

        def join() -> None:
            pg = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world)
            self._comm = PyNcclCommunicator(pg, device=torch.cuda.current_device())

        _run_parallel(
            [
                (llm.collective_rpc, ("init_weight_sync",), dict(args=(address, port, 1 + e * self.tp, world)))
                for e, llm in enumerate(self.engines)
            ],
            alongside=join,
        )

    def update_weights(self, stream: Iterable[WeightBucket]) -> None:
        """Push every bucket to every worker, then reset the engines' prefix caches."""
        for bucket in stream:
            if self.colocate:
                self._send_ipc(bucket)
            else:
                self._send_nccl(bucket)
        for llm in self.engines:
            llm.reset_prefix_cache()

    def _send_nccl(self, bucket: WeightBucket) -> None:
        meta = bucket_meta(bucket)
        args = (list(meta.names), list(meta.dtypes), [list(s) for s in meta.shapes])

        def send() -> None:
            stream = torch.cuda.current_stream()
            for _, tensor in bucket:
                self._comm.broadcast(tensor.cuda().contiguous(), src=0, stream=stream)
            stream.synchronize()

        _run_parallel(
            [(llm.collective_rpc, ("receive_bucket",), dict(args=args)) for llm in self.engines],
            alongside=send,
        )

    def _send_ipc(self, bucket: WeightBucket) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        keep = [(name, t.cuda().contiguous()) for name, t in bucket]
        handles = {uuid: [(name, reduce_tensor(t)) for name, t in keep]}
        for llm in self.engines:
            llm.collective_rpc("receive_ipc", args=(handles,))
        torch.cuda.synchronize()

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory (colocated mode): level 1 offloads weights, 2 drops them."""
        for llm in self.engines:
            llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate memory after :meth:`sleep` (``tags`` e.g. ["weights"], ["kv_cache"])."""
        for llm in self.engines:
            llm.wake_up(tags=list(tags) if tags is not None else None)

    # -- generation ----------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """Balanced over the engines (in threads); results ordered by prompt."""
        import vllm

        parts = assign_prompts(len(prompt_token_ids), len(self.engines))

        def run(e: int) -> list[Completion]:
            idx = parts[e]
            if not idx:
                return []
            prompts = [{"prompt_token_ids": list(prompt_token_ids[i])} for i in idx]
            params = [vllm.SamplingParams(**sampling_kwargs(sampling, prompt_index=i)) for i in idx]
            outs = self.engines[e].generate(prompts, params, use_tqdm=False)
            return completions_from_outputs(outs, idx)

        results = _run_parallel([(run, (e,), {}) for e in range(len(self.engines))])
        return [c for part in results for c in part]

    def close(self) -> None:
        """Shut the engines down."""
        self.engines = []
        self._comm = None
