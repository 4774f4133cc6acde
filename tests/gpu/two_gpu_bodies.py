"""Rank bodies of ``test_two_gpus.py`` (module-level, so RankGroup can pickle them)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_alp import parallel
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import iter_named_local_params, load_full_state
from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.perturbation import alp_config_overrides, is_alp_param, step_key, with_alp
from megatron_alp.schedule import forward_backward, sync_params, wrap_ddp
from tests.layouts import LAYOUTS, cross_entropy_loss
from tests.distributed.alp_bodies import ALP, SEQ, NoiseContext, full_state, make_batches, sweep

__all__ = ["device_info", "dist_optimizer", "layouts", "metrics_nccl", "step_keys"]


def device_info() -> dict:
    from megatron_alp import platform

    return {"backend": dist.get_backend(), "device": str(platform.current_device()),
            "current": torch.cuda.current_device()}


def layouts() -> dict:
    """TP=1 (DP=2), TP=2 + SP and PP=2 of the same ALP step (fp32, the machine's layer spec)."""
    return sweep({
        "tp1": ("tp1", 2, None, True),
        "tp2_sp": ("tp2_sp", 2, None, True),
        "pp2": ("pp2", 2, None, True),
        "tp2_sp_full": ("tp2_sp", 2, "full", True),
    })


def dist_optimizer() -> dict:
    """One bf16 step with DP=2: log-sigma after Megatron's plain vs distributed optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    layout = LAYOUTS["tp1"]
    out = {}
    for dist_opt in (False, True):
        with parallel.model_parallel(layout):
            tc = transformer_config(args, layout, params_dtype=torch.bfloat16)
            chunks = build_model(args, tc, layer_spec_transform=functools.partial(with_alp, cfg=ALP))
            load_full_state(chunks, full)
            model = wrap_ddp(chunks, tc, use_distributed_optimizer=dist_opt)
            ocfg = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                                   bf16=True, use_distributed_optimizer=dist_opt)
            opt = get_megatron_optimizer(ocfg, model, config_overrides=alp_config_overrides(ALP, ocfg),
                                         use_gloo_process_groups=parallel.has_gloo_groups())
            for m in model:
                m.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(model, make_batches(2), cross_entropy_loss([]), seq_length=SEQ,
                             forward_context=functools.partial(NoiseContext(), 0))
            before = {n: float(p) for n, p in iter_named_local_params(model) if is_alp_param(n)}
            opt.step()
            sync_params(model)  # overlap_param_gather (on with CUDA): finish the all-gather
            after = {n: (float(p), p.dtype) for n, p in iter_named_local_params(model) if is_alp_param(n)}
            out[dist_opt] = {"before": before, "after": after}
    return out


def step_keys() -> dict:
    """step_key on every rank of TP=2, with Megatron's and with TE's RNG tracker."""
    from megatron.core import tensor_parallel

    from megatron_alp.models import te_available

    out = {}
    with parallel.model_parallel(LAYOUTS["tp2"]):
        for te in (False, True):
            if te and not te_available():
                continue
            tensor_parallel.model_parallel_cuda_manual_seed(123, te_rng_tracker=te, force_reset_rng=True)
            keys = [step_key(7), step_key(7)]
            gathered = [None, None]
            dist.all_gather_object(gathered, keys)
            out[f"te={te}"] = {"keys": keys, "all": gathered,
                               "tracker": type(tensor_parallel.get_cuda_rng_tracker()).__name__}
    return out


def metrics_nccl() -> dict:
    """MismatchMetrics over a DP=2 NCCL group, GPU inputs and host inputs alike."""
    from megatron.core import parallel_state as ps

    from megatron_alp.rl.metrics import MismatchMetrics

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 8, generator=g)
    roll = lp + 0.1 * torch.randn(4, 8, generator=g)
    mask = torch.rand(4, 8, generator=g) > 0.2
    rank = dist.get_rank()
    rows = slice(2 * rank, 2 * rank + 2)
    out = {}
    with parallel.model_parallel(LAYOUTS["tp1"]):
        group = ps.get_data_parallel_group()
        for where in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            acc = MismatchMetrics()
            acc.update(logp=lp[rows].to(where), rollout_logp=roll[rows].to(where), mask=mask[rows].to(where))
            out[where] = acc.compute(dp_group=group)
    whole = MismatchMetrics()
    whole.update(logp=lp, rollout_logp=roll, mask=mask)
    out["single_process"] = whole.compute()
    return out
