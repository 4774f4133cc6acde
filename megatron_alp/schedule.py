"""Megatron DDP wrapping and one forward/backward pass through megatron-core's schedules.

The same code path for every layout: ``get_forward_backward_func()`` picks no-pipelining,
1F1B or interleaved 1F1B; Megatron's DDP holds the grad buffers; ``finalize_model_grads``
reduces grads over DP, all-reduces tied-embedding grads between the first and last
stage, and the grads of sequence-parallel / q-k-norm weights over TP.

A micro-batch is a dict of tensors, at least ``tokens`` [b, s] (and ``position_ids``);
the caller's ``loss_fn(logits_BSV, batch) -> (loss, stats)`` turns this rank's
vocab-parallel logits into a scalar loss. The logits come in the model's precision
(bf16 under ``Float16Module``: no fp32 copy of ``[b, s, V / TP]``).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, ContextManager, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_alp import platform

__all__ = ["LossFn", "batch_to_device", "forward_backward", "sync_params", "wrap_ddp"]

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, Any]]]
ForwardContext = Callable[[Batch], ContextManager[Any]]


def wrap_ddp(
    chunks: Sequence[torch.nn.Module],
    config: TransformerConfig,
    *,
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
    overlap_grad_reduce: bool | None = None,
    align_grad_reduce: bool = True,
    overlap_param_gather: bool | None = None,
) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP and hook the schedules' grad finalisation.

    ``overlap_grad_reduce`` (Megatron's ``--overlap-grad-reduce``): None (default) turns it
    on with CUDA/NCCL — each grad bucket is all-reduced (reduce-scattered under the
    distributed optimizer) while the backward still runs — and off on the CPU/gloo backend.
    The reduced values are the same either way. With it on, every parameter must receive a
    gradient in every step (Megatron asserts that each bucket's reduction was issued): a
    learnable ALP sigma trained outside ``perturbed(...)`` gets none, so pass False there.
    ``align_grad_reduce`` (with overlap and pipelining) launches the reductions of all
    pipeline stages from the schedule, like megatron.training does by default.

    ``overlap_param_gather`` (Megatron's ``--overlap-param-gather``, distributed optimizer
    only): None (default) turns it on with the distributed optimizer on CUDA. The
    optimizer step then leaves each rank with only its own shard of the new weights; the
    all-gather of each bucket runs from the next forward's pre-hooks (megatron-core
    0.19.2 ``distributed_data_parallel.py`` ``_make_forward_pre_hook``,
    ``distrib_optimizer.py`` ``step_with_ready_grads``), overlapping the next
    mini-batch's forward. Anything that reads the weights outside a forward (the weight
    export, a checkpoint, ALP's sigma metrics) must call :func:`sync_params` first.
    """
    if overlap_grad_reduce is None:
        overlap_grad_reduce = platform.cuda_available()
    if overlap_param_gather is None:
        overlap_param_gather = use_distributed_optimizer and platform.cuda_available()
    if overlap_param_gather and not use_distributed_optimizer:
        raise ValueError("overlap_param_gather=True needs use_distributed_optimizer=True "
                         "(only the distributed optimizer shards the weights it gathers)")
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_cfg,
            module=chunk,
            # One bucket per chunk beyond the first, like megatron.training does.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if overlap_grad_reduce and align_grad_reduce:
        syncs = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = syncs if len(syncs) > 1 else syncs[0]
    return wrapped


def sync_params(model: Sequence[torch.nn.Module]) -> None:
    """Finish every weight all-gather left for the next forward (``overlap_param_gather``);
    a no-op otherwise. Collective over the data-parallel group."""
    for m in model:
        if isinstance(m, DistributedDataParallel) and m.ddp_config.overlap_param_gather:
            with torch.no_grad():
                m.start_param_sync(force_sync=True)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return platform.current_device()


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """The micro-batch with every tensor of rank >= 1 on ``device`` (asynchronous copies).

    0-dim tensors (``sample_offset`` and similar per-batch scalars) stay where they are:
    they are read on the host (``.item()``), and a round trip through the GPU would cost
    a synchronisation per micro-batch. Non-tensor values pass through.
    """
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def _output_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Logits in the model's precision: Float16Module would upcast the whole
    ``[b, s, V / TP]`` to fp32 (``fp32_output=True``, megatron-core 0.19.2
    ``transformer/module.py``); the log-probs upcast row chunk by row chunk instead
    (``rl/logprobs.py``), to the same numbers."""
    from megatron.core.transformer.module import Float16Module

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {"fp32_output": False} if isinstance(inner, Float16Module) else {}


def _forward_step(
    loss_fn: LossFn,
    forward_context: ForwardContext | None,
    data_iterator: Any,
    model: torch.nn.Module,
):
    # The one place batches reach the device: micro-batches are built on the host; the
    # model (embedding lookup, loss) needs them where its weights live.
    batch = batch_to_device(next(data_iterator), _model_device(model))
    ctx = forward_context(batch) if forward_context is not None else contextlib.nullcontext()
    with ctx:
        logits = model(
            batch["tokens"],
            batch["position_ids"],
            attention_mask=batch.get("attention_mask"),
            **_output_kwargs(model),
        )

    def loss_func(output: torch.Tensor):
        loss, stats = loss_fn(output, batch)
        return loss, stats

    return logits, loss_func


def forward_backward(
    model: Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    seq_length: int,
    forward_only: bool = False,
    forward_context: ForwardContext | None = None,
) -> list[dict[str, Any]]:
    """Run all micro-batches through the schedule; return ``stats`` of each (last stage).

    Every rank passes the same ``micro_batches`` (a rank that needs no data ignores
    them), built anywhere (usually on the host): each is moved to the model's device
    (:func:`batch_to_device`) before the model and ``loss_fn`` see it. Grads accumulate in the DDP buffers (``zero_grad_buffer()`` first); on the
    last pipeline stage the list holds one ``stats`` dict per micro-batch, elsewhere it
    is empty. The loss of each micro-batch is divided by the number of micro-batches.
    ``forward_context(batch)``, when given, is a context manager entered around the model
    call of each micro-batch (e.g. ALP's ``perturbed(...)`` with the batch's sample offset).
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    b, s = micro_batches[0]["tokens"].shape
    vpp = len(model)
    iters: Any = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=partial(_forward_step, loss_fn, forward_context),
        data_iterator=iters,
        model=list(model) if vpp > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=s if seq_length is None else seq_length,
        micro_batch_size=b,
        forward_only=forward_only,
    )


def is_last_stage() -> bool:
    """True on the ranks of the last pipeline stage (they hold logits and losses)."""
    return ps.is_pipeline_last_stage()
