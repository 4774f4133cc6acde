"""Run the same tiny training steps under any parallel layout and report comparable numbers.

``run_layout`` builds the model for a layout, loads the same canonical weights, runs
``steps`` optimizer steps of next-token cross-entropy through megatron-core's schedules,
and returns (on the ranks that have them) the full-vocabulary logits of the first
micro-batch, every micro-batch loss, and the TP-gathered gradients of the first step —
all in canonical names, so a TP=1 run is the oracle for every other layout.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from megatron.core import tensor_parallel

from megatron_alp import parallel
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import gather_tp_full, gather_vocab, load_full_state
from megatron_alp.schedule import wrap_ddp
from megatron_alp.models.tiny import random_full_state

__all__ = [
    "LAYOUTS",
    "canonical_state",
    "cross_entropy_loss",
    "gather_vocab",
    "merge_ranks",
    "run_layout",
]

LAYOUTS: dict[str, parallel.ParallelConfig] = {
    "tp1": parallel.ParallelConfig(),
    "tp2": parallel.ParallelConfig(tensor_model_parallel_size=2),
    "tp2_sp": parallel.ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": parallel.ParallelConfig(pipeline_model_parallel_size=2),
    "tp2_pp2": parallel.ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "pp2_vpp2": parallel.ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2
    ),
}
"""The layouts every equivalence test sweeps on 4 ranks (TP=1 runs with DP=4)."""


def merge_ranks(per_rank: list[dict[str, Any]], run: str) -> dict[str, Any]:
    """Merge ``run_layout`` results of all ranks: grads of every stage, logits, losses."""
    grads: dict[str, torch.Tensor] = {}
    logits, losses = None, None
    for r in per_rank:
        res = r[run]
        if res["grads"] is not None:
            grads.update(res["grads"])
        if res["logits"] is not None:
            logits = res["logits"]
        if res["losses"] is not None:
            losses = res["losses"]
    return dict(grads=grads, logits=logits, losses=losses)


def cross_entropy_loss(record: list) -> Callable:
    """A schedule loss_fn: masked mean token CE via megatron's vocab-parallel CE."""

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        if not record:
            # Before the loss: megatron's vocab_parallel_cross_entropy shifts its input by
            # the row max in place.
            record.append(gather_vocab(logits))
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        mask = batch["loss_mask"]
        loss = (per_token * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach().clone()}

    return loss_fn


def canonical_state(hf_config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded canonical weights for ``hf_config`` (builds a TP=1, PP=1 model once)."""
    args = gpt_args_from_hf(hf_config)
    cfg = parallel.ParallelConfig()
    with parallel.model_parallel(cfg):
        chunks = build_model(args, transformer_config(args, cfg))
        return random_full_state(chunks, seed)


def run_layout(
    hf_config: Any,
    layout: parallel.ParallelConfig,
    full_state: dict[str, torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    steps: int = 1,
    lr: float = 1e-2,
    recompute_granularity: str | None = None,
    layer_spec_transform: Callable | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
    forward_context: Callable[[int, dict[str, torch.Tensor]], Any] | None = None,
    overlap_grad_reduce: bool | None = None,
) -> dict[str, Any]:
    """See the module docstring. Collective over all ranks of the group.

    ``forward_context(step, batch)``, when given, returns a context manager entered around
    the model call of each micro-batch (ALP's ``perturbed``).
    """
    from megatron.core.optimizer import OptimizerConfig

    from megatron_alp.train.policy import make_optimizer, optimizer_step

    args = gpt_args_from_hf(hf_config)
    with parallel.model_parallel(layout) as info:
        tc = transformer_config(args, layout, recompute_granularity=recompute_granularity)
        chunks = build_model(args, tc, layer_spec_transform=layer_spec_transform)
        load_full_state(chunks, full_state)
        model = wrap_ddp(chunks, tc, overlap_grad_reduce=overlap_grad_reduce)
        # The trainer's own optimizer construction and step (megatron_alp.train.policy).
        opt = make_optimizer(model, OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=0.0))
        losses, logits, grads = [], None, None
        for step in range(steps):
            record: list = []
            first: dict[str, Any] = {}
            ctx = None if forward_context is None else partial(forward_context, step)

            def before_step(_first=first, _step=step) -> None:
                if _step == 0:
                    _first["grads"] = gather_tp_full(model, grads=True)

            stats, _, _ = optimizer_step(
                model, opt, batches, cross_entropy_loss(record), forward_context=ctx,
                before_step=before_step,
            )
            losses.append([float(s["loss"]) for s in stats])
            if on_step is not None:
                on_step(step, losses[-1])
            if step == 0:
                logits = record[0] if record else None
                grads = first["grads"]
        keep = info.tp_rank == 0 and info.dp_rank == 0
        return dict(
            pp_rank=info.pp_rank,
            losses=losses if (keep and info.is_last_stage) else None,
            logits=logits if keep else None,
            grads=grads if keep else None,
        )
