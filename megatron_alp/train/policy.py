"""The policy: build -> load -> (bf16) -> Megatron DDP -> Megatron optimizer -> passes.

One object per run and rank holding this rank's model chunks (ALP layers when the
objective perturbs), the optional frozen reference chunks (KL penalty), Megatron's
``DistributedDataParallel``, optimizer (``DistributedOptimizer`` with
``--use-distributed-optimizer``; sigma in its own parameter group) and
``OptimizerParamScheduler``. Every pass goes through megatron-core's
``get_forward_backward_func`` (no pipelining, 1F1B or interleaved 1F1B):

* :meth:`Policy.logprob_pass` — forward only, never perturbed: the log-probs (and
  entropy) of the labels of each micro-batch, on the last pipeline stage;
* :meth:`Policy.update` — one optimizer step over a mini-batch of micro-batches with the
  caller's loss, ALP active in the update forward through ``forward_context``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from megatron_alp import parallel
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import iter_named_local_params, shard_full_tensor
from megatron_alp.perturbation import alp_config_overrides, with_alp
from megatron_alp.rl.logprobs import check_token_ids, vocab_parallel_logprobs
from megatron_alp.schedule import Batch, forward_backward, sync_params, wrap_ddp

__all__ = ["Policy", "load_hf_weights", "make_optimizer", "optimizer_step"]


def make_optimizer(model: Sequence[torch.nn.Module], opt_config: Any, alp_cfg: Any = None) -> Any:
    """Megatron's optimizer for DDP-wrapped ``model``; ALP's sigma in its own group."""
    from megatron.core.optimizer import get_megatron_optimizer

    overrides = alp_config_overrides(alp_cfg, opt_config) if alp_cfg is not None and alp_cfg.enabled else None
    return get_megatron_optimizer(
        opt_config, list(model), config_overrides=overrides,
        use_gloo_process_groups=parallel.has_gloo_groups(),
    )


def optimizer_step(
    model: Sequence[torch.nn.Module],
    optimizer: Any,
    micro_batches: Sequence[Batch],
    loss_fn: Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict]],
    *,
    forward_context: Callable[[Batch], Any] | None = None,
    before_step: Callable[[], None] | None = None,
) -> tuple[list[dict], bool, float | None]:
    """Zero grads, forward/backward every micro-batch through Megatron's schedule, step.

    ``loss_fn(logits, batch)`` as in :func:`megatron_alp.schedule.forward_backward`;
    ``before_step`` runs after the backward (grads reduced) and before the update.
    Returns the per-micro-batch stats (last stage), whether the update was applied, and
    the grad norm.
    """
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    stats = forward_backward(
        model, micro_batches, loss_fn, seq_length=micro_batches[0]["tokens"].shape[1],
        forward_context=forward_context,
    )
    if before_step is not None:
        before_step()
    ok, grad_norm, _ = optimizer.step()
    return stats, bool(ok), grad_norm


@torch.no_grad()
def load_hf_weights(chunks: Sequence[torch.nn.Module], hf_dir: Path, hf_config: Any) -> int:
    """Copy an HF safetensors checkpoint into this rank's shards; return tensors loaded.

    Reads only the tensors this rank's chunks hold (its pipeline stage), one at a time,
    through the same declarative mapping as the converters. ALP parameters keep their
    initial value.
    """
    from megatron_alp.convert.mapping import is_alp_param, model_mapping
    from megatron_alp.convert.safetensors_io import HFSafetensors

    mapping = model_mapping(hf_config)
    files = HFSafetensors(hf_dir)
    n = 0
    for name, param in iter_named_local_params(chunks):
        if is_alp_param(name):
            continue
        sources = mapping.hf_sources(name)
        missing = [s for s in sources if s not in files]
        if missing:
            raise ValueError(f"--hf-model {hf_dir}: weights lack {missing[0]!r} (needed for {name})")
        full = mapping.to_megatron(name, [files.read(s) for s in sources])
        param.copy_(shard_full_tensor(name, full.to(param.dtype), param))
        n += 1
    return n


class Policy:
    """See the module docstring. Build after ``parallel.initialize``."""

    def __init__(self, cfg: Any, hf_config: Any, *, with_reference: bool) -> None:
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        self.hf_config = hf_config
        self.gpt_args = gpt_args_from_hf(hf_config)
        self.vocab_size = self.gpt_args.vocab_size
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self.config = transformer_config(
            self.gpt_args, cfg.parallel, params_dtype=dtype,
            recompute_granularity=cfg.recompute_granularity,
        )
        transform = functools.partial(with_alp, cfg=cfg.alp) if cfg.alp.enabled else None
        # Weights are loaded into fp32 chunks, then cast (Float16Module) for bf16 runs.
        fp32_config = transformer_config(
            self.gpt_args, cfg.parallel, recompute_granularity=cfg.recompute_granularity
        )
        self.chunks = build_model(self.gpt_args, fp32_config, layer_spec_transform=transform)
        self.loaded_tensors = load_hf_weights(self.chunks, cfg.run.hf_model, hf_config)
        self.reference: list[torch.nn.Module] | None = None
        if with_reference:
            ref = build_model(self.gpt_args, fp32_config)
            load_hf_weights(ref, cfg.run.hf_model, hf_config)
            for p in (p for c in ref for p in c.parameters()):
                p.requires_grad_(False)
            self.reference = [self._maybe_fp16(c).eval() for c in ref]
        modules = [self._maybe_fp16(c) for c in self.chunks]
        self.model = wrap_ddp(modules, self.config, use_distributed_optimizer=cfg.use_distributed_optimizer)
        opt = cfg.optimizer
        self.opt_config = OptimizerConfig(
            optimizer="adam",
            lr=opt["lr"],
            min_lr=opt["min_lr"],
            weight_decay=opt["weight_decay"],
            adam_beta1=opt["adam_beta1"],
            adam_beta2=opt["adam_beta2"],
            adam_eps=opt["adam_eps"],
            clip_grad=opt["clip_grad"],
            bf16=cfg.bf16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            overlap_param_gather=self.model[0].ddp_config.overlap_param_gather,
        )
        self.optimizer = make_optimizer(self.model, self.opt_config, cfg.alp)
        sch = cfg.scheduler
        steps = self.optimizer_steps_per_rl_step
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if sch["lr_warmup_iters"] else opt["lr"],
            max_lr=opt["lr"],
            min_lr=opt["min_lr"],
            lr_warmup_steps=sch["lr_warmup_iters"] * steps,
            lr_decay_steps=max(sch["lr_decay_iters"] * steps, sch["lr_warmup_iters"] * steps + 1),
            lr_decay_style=sch["lr_decay_style"],
            start_wd=sch["start_weight_decay"],
            end_wd=sch["end_weight_decay"],
            wd_incr_steps=max(cfg.train_iters * steps, 1),
            wd_incr_style=sch["weight_decay_incr_style"],
        )

    def sync_params(self) -> None:
        """Every rank's weights complete after the last optimizer step (collective): with
        ``overlap_param_gather`` (on with the distributed optimizer on CUDA) the step's
        all-gather is otherwise left to the next forward. Call before reading weights
        outside a forward: the weight export, a checkpoint, ALP's sigma metrics."""
        sync_params(self.model)

    def _maybe_fp16(self, chunk: torch.nn.Module) -> torch.nn.Module:
        if not self.cfg.bf16:
            return chunk
        from megatron.core.transformer.module import Float16Module

        return Float16Module(self.config, chunk)

    @property
    def optimizer_steps_per_rl_step(self) -> int:
        run = self.cfg.run
        return run.iterations * (run.prompts_per_step * run.group_size) // self.cfg.global_batch_size

    # ------------------------------------------------------------------------- passes
    def _logprobs(self, logits: torch.Tensor, batch: Batch, *, with_entropy: bool):
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        # The labels were checked before the schedule (_check_labels): a check here would
        # be a host sync per micro-batch.
        return vocab_parallel_logprobs(
            logits, batch["labels"], tp_group=tp, temperature=self.cfg.run.temperature,
            vocab_size=self.vocab_size, with_entropy=with_entropy, check_target=False,
        )

    def _check_labels(self, micro_batches: Sequence[Batch]) -> None:
        """Labels within the vocabulary, all micro-batches at once, before the schedule
        (free for the trainer's micro-batches, which are built on the host)."""
        check_token_ids([b["labels"] for b in micro_batches], self.vocab_size)

    @torch.no_grad()
    def logprob_pass(
        self, micro_batches: Sequence[Batch], *, reference: bool = False, with_entropy: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Unperturbed forward-only log-probs ``[b, s]`` (+ entropy) per micro-batch (last stage)."""
        chunks = self.reference if reference else self.model
        assert chunks is not None, "no reference model was built"
        self._check_labels(micro_batches)

        def loss_fn(logits: torch.Tensor, batch: Batch):
            out = self._logprobs(logits, batch, with_entropy=with_entropy)
            lp, ent = out if with_entropy else (out, None)
            stats = {"logp": lp.detach()}
            if ent is not None:
                stats["entropy"] = ent.detach()
            return logits.new_zeros(()), stats

        for c in chunks:
            c.eval()
        try:
            return forward_backward(
                chunks, micro_batches, loss_fn, seq_length=micro_batches[0]["tokens"].shape[1],
                forward_only=True,
            )
        finally:
            for c in chunks:
                c.train()

    def update(
        self,
        micro_batches: Sequence[Batch],
        loss_fn: Callable[[torch.Tensor, torch.Tensor, Batch], tuple[torch.Tensor, dict]],
        *,
        forward_context: Callable[[Batch], Any] | None = None,
    ) -> tuple[list[dict], dict[str, float]]:
        """One optimizer step over ``micro_batches``; ``loss_fn(logp, entropy, batch)``.

        ``loss_fn`` returns this micro-batch's share of the *globally normalised* loss (the
        sum of the shares over micro-batches and DP ranks is the mini-batch loss). Megatron's
        schedule divides each micro-batch loss by the number of micro-batches and DDP
        averages grads over DP; both are undone here so the reduction is the exact sum.
        """
        from megatron.core import parallel_state as ps

        self._check_labels(micro_batches)
        n_micro = len(micro_batches)
        scale = float(n_micro * ps.get_data_parallel_world_size())
        need_entropy = self.cfg.loss.needs_entropy

        def schedule_loss(logits: torch.Tensor, batch: Batch):
            out = self._logprobs(logits, batch, with_entropy=need_entropy)
            lp, ent = out if need_entropy else (out, None)
            loss, stats = loss_fn(lp, ent, batch)
            return loss * scale, stats

        stats, ok, grad_norm = optimizer_step(
            self.model, self.optimizer, micro_batches, schedule_loss, forward_context=forward_context
        )
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"] if hasattr(self.optimizer, "param_groups") else float("nan")
        return stats, {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_skipped": float(not ok),
            "lr": float(lr),
        }
