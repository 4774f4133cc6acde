"""sigma's own parameter group inside Megatron's optimizer.

Megatron groups parameters by ``config_overrides`` (``ParamKey`` -> ``ParamGroupOverride``)
in ``get_megatron_optimizer``; the group's learning rate and weight decay are then set
each step by ``OptimizerParamScheduler`` from the group's ``max_lr``/``min_lr`` and
``start_wd``/``end_wd``. :func:`alp_config_overrides` adds one entry matching
:func:`is_alp_param` to Megatron's standard overrides, so sigma gets ``ALPConfig.lr`` and
an explicit ``ALPConfig.weight_decay`` (default 0; the reference silently inherited
0.01) under the same scheduler shape (warmup, then constant unless ``ALPConfig.min_lr``),
in the same optimizer (plain or ``DistributedOptimizer``), so it is part of the global
grad norm and of grad clipping like every other parameter::

    opt = get_megatron_optimizer(
        opt_cfg, model,
        config_overrides=alp_config_overrides(alp_cfg, opt_cfg),
        use_gloo_process_groups=parallel.has_gloo_groups(),
    )
    sched = OptimizerParamScheduler(opt, ...)   # applies the per-group lr / wd
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.perturbation.layer import is_alp_param

__all__ = ["ALP_PARAM_KEY", "alp_config_overrides"]

ALP_PARAM_KEY = ParamKey(
    with_name_predicate=ParamWithNamePredicate(
        name="alp_log_sigma", fn=lambda param, name: is_alp_param(name)
    )
)


def alp_config_overrides(
    alp_cfg: ALPConfig,
    optimizer_cfg: OptimizerConfig,
    base: dict[ParamKey, ParamGroupOverride] | None = None,
) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron ``config_overrides`` with sigma in its own group (lr, weight decay).

    ``base`` defaults to ``get_standard_config_overrides(optimizer_cfg)`` (no weight
    decay on biases and 1-D params), i.e. what ``get_megatron_optimizer`` would use
    without overrides. sigma is a 0-dim tensor, so no standard rule matches it.
    """
    overrides = dict(get_standard_config_overrides(optimizer_cfg) if base is None else base)
    min_lr = alp_cfg.lr if alp_cfg.min_lr is None else alp_cfg.min_lr
    overrides[ALP_PARAM_KEY] = ParamGroupOverride(
        max_lr=float(alp_cfg.lr),
        min_lr=float(min_lr),
        start_wd=float(alp_cfg.weight_decay),
        end_wd=float(alp_cfg.weight_decay),
        wd_mult=1.0,
    )
    return overrides

