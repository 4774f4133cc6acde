"""Rank bodies for ``test_alp_checkpoint.py`` (module-level, so RankGroup can pickle them).

A tiny Qwen2 (4 layers) with ALP is saved by megatron-core's ``dist_checkpointing``
(torch_dist) under one layout and loaded under others; every rank reports the
TP-gathered full tensors of its stage, so the test compares the whole model, sigma
included, with the state it saved.
"""

from __future__ import annotations

import functools
import math
import queue
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_alp import parallel
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import gather_tp_full, iter_named_local_params, load_full_state
from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.perturbation import ALPConfig, is_alp_param, with_alp
from tests.layouts import LAYOUTS, canonical_state

SIGMA0 = 0.05
N_LAYERS = 4


def sigma_name(layer: int) -> str:
    return f"decoder.layers.{layer}.perturbation.alp_log_sigma"


def saved_state(cfg: ALPConfig) -> dict[str, torch.Tensor]:
    """Canonical weights plus a distinct log-sigma on every perturbed layer (sigma_l = 0.01 * (l + 2))."""
    full = canonical_state(tiny_hf_config(), seed=3)
    for layer in range(N_LAYERS):
        if cfg.perturbs_layer(layer, N_LAYERS):
            full[sigma_name(layer)] = torch.tensor(math.log(0.01 * (layer + 2)))
    return full


def sync_save(sharded_state_dict: dict, ckpt_dir: str) -> None:
    """``dist_checkpointing.save`` with a synchronous torch_dist strategy, in RankGroup's ranks.

    megatron-core's torch_dist writer (``FileSystemWriterAsync``, used for synchronous
    saves too) collects its write results through a module-level queue that it creates as
    a ``multiprocessing.Manager().Queue()`` on first use; a Manager is a child process,
    which a daemonic rank may not start. With ``thread_count=1`` the write runs in the
    calling thread, so a plain ``queue.Queue`` seeded there first does the same job.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    if dist.get_rank() == 0:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(sharded_state_dict, ckpt_dir, sharded_strategy=strategy)


def _model_sd(chunks) -> dict:
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _full_model(chunks) -> dict[str, torch.Tensor]:
    """The whole model's canonical tensors, gathered over TP and PP (identical on every rank)."""
    local = gather_tp_full(chunks)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        merged.update(p)
    return merged


def _sigma_modules(chunks):
    from megatron_alp.perturbation.layer import LayerPerturbation

    for c in chunks:
        for m in c.modules():
            if isinstance(m, LayerPerturbation) and m.log_sigma is not None:
                yield sigma_name(m.layer_number - 1), m.log_sigma


def _all_sigmas(chunks) -> dict[str, float]:
    """log-sigma of every layer that owns one (parameter or buffer), gathered over all ranks."""
    local = {n: float(t) for n, t in _sigma_modules(chunks)}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for p in parts for k, v in p.items()}


def _build(args, layout, cfg: ALPConfig):
    tc = transformer_config(args, LAYOUTS[layout])
    return build_model(args, tc, layer_spec_transform=functools.partial(with_alp, cfg=cfg))


def save_and_load(ckpt_dir: str, save_layout: str, load_layouts: list[str], cfg: ALPConfig) -> dict:
    """Save ``saved_state(cfg)`` at ``save_layout``, load it at each of ``load_layouts``.

    Returns, per load layout, the whole loaded model (canonical full tensors) and whether
    sigma is a trainable parameter exactly on the perturbed layers.
    """
    args = gpt_args_from_hf(tiny_hf_config())
    full = saved_state(cfg)
    with parallel.model_parallel(LAYOUTS[save_layout]):
        chunks = _build(args, save_layout, cfg)
        load_full_state(chunks, full)
        with torch.no_grad():
            for name, t in _sigma_modules(chunks):  # buffers too (a fixed sigma)
                t.copy_(full[name])
        sync_save(_model_sd(chunks), ckpt_dir)
    out = {}
    for layout in load_layouts:
        with parallel.model_parallel(LAYOUTS[layout]):
            chunks = _build(args, layout, cfg)  # sigma at its init, weights random
            from megatron.core import dist_checkpointing

            loaded = dist_checkpointing.load(_model_sd(chunks), ckpt_dir)
            for i, c in enumerate(chunks):
                c.load_state_dict(loaded[f"model{i}"], strict=True)
            sigma_params = sorted(n for n, _ in iter_named_local_params(chunks) if is_alp_param(n))
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, sigma_params)
            out[layout] = {
                "model": _full_model(chunks),
                "sigma_params": sorted({n for p in parts for n in p}),
                "sigmas": _all_sigmas(chunks),
            }
    return out


def _train_setup(args, layout: str, cfg: ALPConfig, full: dict):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_alp.perturbation import alp_config_overrides
    from megatron_alp.schedule import wrap_ddp

    tc = transformer_config(args, LAYOUTS[layout])
    chunks = build_model(args, tc, layer_spec_transform=functools.partial(with_alp, cfg=cfg))
    load_full_state(chunks, full)
    model = wrap_ddp(chunks, tc)
    ocfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0)
    opt = get_megatron_optimizer(
        ocfg, model, config_overrides=alp_config_overrides(cfg, ocfg),
        use_gloo_process_groups=parallel.has_gloo_groups(),
    )
    return chunks, model, opt


def _train_step(model, opt, ctx, step: int) -> None:
    from megatron_alp.schedule import forward_backward
    from tests.layouts import cross_entropy_loss
    from tests.distributed.alp_bodies import SEQ, make_batches

    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(model, make_batches(2), cross_entropy_loss([]), seq_length=SEQ,
                     forward_context=functools.partial(ctx, step))
    opt.step()


def optimizer_resume(ckpt_dir: str, save_layout: str, load_layout: str, cfg: ALPConfig) -> dict:
    """Resume through a dist checkpoint of model + optimizer (Adam) with a partial ALP range.

    ``continued``: step 0, save, step 1 at ``save_layout``. ``resumed``: load model and
    optimizer at ``load_layout``, step 1. ``fresh_optimizer``: load the model only, step 1
    (the control: Adam's moments matter). Returns each run's sigma values after step 1.

    Megatron's (non-distributed) optimizer only: on this CPU backend (torch Adam, no Apex /
    TE) loading a DistributedOptimizer checkpoint fails in megatron-core with or without
    ALP (dp_reshardable: in-place copy into a leaf view; fully_reshardable: KeyError 'step').
    """
    from megatron.core import dist_checkpointing

    from tests.distributed.alp_bodies import NoiseContext

    args = gpt_args_from_hf(tiny_hf_config())
    full = saved_state(cfg)
    ctx = NoiseContext()  # caches each step's key: the same noise in all three runs
    out = {}
    with parallel.model_parallel(LAYOUTS[save_layout]):
        chunks, model, opt = _train_setup(args, save_layout, cfg, full)
        _train_step(model, opt, ctx, 0)
        sd = _model_sd(chunks)
        sd["optimizer"] = opt.sharded_state_dict(sd)
        sync_save(sd, ckpt_dir)
        _train_step(model, opt, ctx, 1)
        out["continued"] = _all_sigmas(chunks)
    for run, with_opt in (("resumed", True), ("fresh_optimizer", False)):
        with parallel.model_parallel(LAYOUTS[load_layout]):
            chunks, model, opt = _train_setup(args, load_layout, cfg, full)
            sd = _model_sd(chunks)
            if with_opt:
                sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=True)
            loaded = dist_checkpointing.load(sd, ckpt_dir)
            for i, c in enumerate(chunks):
                c.load_state_dict(loaded[f"model{i}"], strict=True)
            if with_opt:
                opt.load_state_dict(loaded["optimizer"])
            else:
                opt.reload_model_params()  # the fp32 copy of the params, if any
            _train_step(model, opt, ctx, 1)
            out[run] = _all_sigmas(chunks)
    return out
