"""Per-layer sigma and d loss / d log_sigma, gathered over pipeline stages for logging.

Call :func:`alp_metrics` after the step's forward/backward (grads finalised); before
``optimizer.step()`` it reports the sigma the step used, after it the updated sigma (the
grads stay in Megatron's grad buffers until the next ``zero_grad_buffer()``). It is
collective over the pipeline group (every rank must call it; all get the same dict) and,
under the distributed optimizer, over the data-parallel group.

Keys (global 0-based layer ``l``, zero-padded to two digits): ``alp/sigma/layer_{l}``,
``alp/log_sigma_grad/layer_{l}`` (learnable sigma only), and ``alp/sigma_mean``,
``alp/sigma_min``, ``alp/sigma_max`` over the perturbed layers.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from megatron_alp.perturbation.layer import LayerPerturbation

__all__ = ["alp_metrics", "local_alp_layers"]


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    inner = chunk
    while hasattr(inner, "module") and not hasattr(inner, "decoder"):
        inner = inner.module
    return inner


def local_alp_layers(chunks: Iterable[torch.nn.Module]) -> list[tuple[int, LayerPerturbation, Any]]:
    """(global 0-based layer, perturbation module, its DDP wrapper or None) on this rank."""
    out = []
    for chunk in chunks:
        ddp = chunk if hasattr(chunk, "ddp_config") else None
        for module in _unwrap(chunk).modules():
            if isinstance(module, LayerPerturbation) and module.active:
                out.append((module.layer_number - 1, module, ddp))
    return sorted(out, key=lambda t: t[0])


def _owned_by_distributed_optimizer(ddp: Any, param: torch.nn.Parameter) -> tuple[bool, Any] | None:
    """Under the distributed optimizer: (does this DP rank own param's reduced grad, group)."""
    if ddp is None or not getattr(ddp.ddp_config, "use_distributed_optimizer", False):
        return None
    bucket_group = ddp.param_to_bucket_group[param]
    for bucket in bucket_group.buckets:
        if param in bucket.params:
            size = bucket_group.intra_distributed_optimizer_instance_size
            group = bucket_group.intra_distributed_optimizer_instance_group
            shard = bucket.grad_data.numel() // size
            start, _ = bucket.param_to_index[param]
            return start // shard == dist.get_rank(group), group
    raise AssertionError("parameter not found in its bucket group")


def _grad_value(ddp: Any, param: torch.nn.Parameter) -> float | None:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    owner = _owned_by_distributed_optimizer(ddp, param)
    if owner is not None:
        # After the reduce-scatter only the owning DP rank's shard holds the reduced grad.
        is_owner, group = owner
        value = grad.detach().float().reshape(()).clone() if (is_owner and grad is not None) else None
        value = value if value is not None else torch.zeros((), device=param.device)
        dist.all_reduce(value, group=group)
        return float(value)
    return None if grad is None else float(grad.detach().float().reshape(()))


def alp_metrics(chunks: Iterable[torch.nn.Module], *, prefix: str = "alp") -> dict[str, float]:
    """Per-layer sigma and log-sigma grads of the whole model (see the module docstring)."""
    local: dict[str, float] = {}
    for layer, module, ddp in local_alp_layers(list(chunks)):
        log_sigma = module.log_sigma
        local[f"{prefix}/sigma/layer_{layer:02d}"] = float(log_sigma.detach().float().exp())
        if isinstance(log_sigma, torch.nn.Parameter):
            g = _grad_value(ddp, log_sigma)
            if g is not None:
                local[f"{prefix}/log_sigma_grad/layer_{layer:02d}"] = g
    merged = dict(local)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            parts: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, local, group=group)
            merged = {}
            for part in parts:
                merged.update(part)
    sigmas = [v for k, v in merged.items() if k.startswith(f"{prefix}/sigma/layer_")]
    if sigmas:
        merged[f"{prefix}/sigma_mean"] = sum(sigmas) / len(sigmas)
        merged[f"{prefix}/sigma_min"] = min(sigmas)
        merged[f"{prefix}/sigma_max"] = max(sigmas)
    return dict(sorted(merged.items()))
