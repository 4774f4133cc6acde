"""Outcome-reward advantage estimators, in a registry by exact name.

A group is the ``n`` responses sampled for one prompt. Every estimator maps one scalar
reward per response to one advantage per response (broadcast over its tokens by the
loss). Non-finite rewards (a verifier that crashed, a NaN from a reward model) are
detected: those responses are excluded from their group's statistics, get advantage 0
and ``valid=False``; AND ``valid`` into the loss mask (``compute_policy_loss`` also masks
any non-finite advantage it is given, as a second line of defence).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch

__all__ = [
    "AdvantageOutput",
    "available_advantage_estimators",
    "compute_advantages",
    "group_ids_from_size",
    "register_advantage_estimator",
]


class AdvantageOutput(NamedTuple):
    """Result of :func:`compute_advantages`."""

    advantages: torch.Tensor
    """``[N]`` fp32, finite; 0 for invalid responses and for groups without a baseline."""
    valid: torch.Tensor
    """``[N]`` bool: False where the reward was not finite."""
    n_nonfinite_rewards: int
    """How many rewards were NaN or inf."""


class AdvantageEstimator(Protocol):
    def __call__(
        self, *, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor, eps: float
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator registering a keyword-only estimator ``(rewards, group_ids, valid, eps) -> [N]``.

    Registering a name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an advantage estimator name must be a non-empty string, got {name!r}")

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _REGISTRY:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_advantage_estimators() -> list[str]:
    """Sorted names of the registered estimators."""
    return sorted(_REGISTRY)


def group_ids_from_size(n_responses: int, group_size: int, device=None) -> torch.Tensor:
    """Group ids ``[N]`` for responses laid out prompt-major: ``n`` consecutive per prompt."""
    if group_size < 1 or n_responses % group_size:
        raise ValueError(
            f"{n_responses} responses cannot be split into groups of group_size={group_size}"
        )
    return torch.arange(n_responses, device=device) // group_size


def _group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response (count, sum, sum of squares) of the valid rewards of its group, in fp64."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    r = torch.where(valid, rewards.double(), torch.zeros((), dtype=torch.float64, device=rewards.device))
    v = valid.double()
    cnt = torch.zeros(n_groups, dtype=torch.float64, device=rewards.device).index_add_(0, inv, v)
    s1 = torch.zeros_like(cnt).index_add_(0, inv, r)
    s2 = torch.zeros_like(cnt).index_add_(0, inv, r * r)
    return cnt[inv], s1[inv], s2[inv]


def _grpo(*, rewards, group_ids, valid, eps, scale_by_std: bool) -> torch.Tensor:
    cnt, s1, s2 = _group_stats(rewards, group_ids, valid)
    r = torch.where(valid, rewards.double(), torch.zeros_like(s1))
    mean = s1 / cnt.clamp(min=1)
    adv = r - mean
    if scale_by_std:
        # unbiased std of the group (torch.std's default, as in verl's GRPO)
        var = (s2 - cnt * mean * mean).clamp(min=0) / (cnt - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    # a group with fewer than two valid responses has no baseline: no learning signal
    return torch.where(valid & (cnt >= 2), adv, torch.zeros_like(adv))


@register_advantage_estimator("grpo")
def grpo_advantage(*, rewards, group_ids, valid, eps) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)`` (unbiased std)."""
    return _grpo(rewards=rewards, group_ids=group_ids, valid=valid, eps=eps, scale_by_std=True)


@register_advantage_estimator("grpo-no-std")
def grpo_no_std_advantage(*, rewards, group_ids, valid, eps) -> torch.Tensor:
    """GRPO without the std division (Dr. GRPO): ``r - mean_group``."""
    return _grpo(rewards=rewards, group_ids=group_ids, valid=valid, eps=eps, scale_by_std=False)


@register_advantage_estimator("rloo")
def rloo_advantage(*, rewards, group_ids, valid, eps) -> torch.Tensor:
    """Leave-one-out: ``r_i - mean_{j != i} r_j`` over the valid responses of the group."""
    cnt, s1, _ = _group_stats(rewards, group_ids, valid)
    r = torch.where(valid, rewards.double(), torch.zeros_like(s1))
    adv = r - (s1 - r) / (cnt - 1).clamp(min=1)
    return torch.where(valid & (cnt >= 2), adv, torch.zeros_like(adv))


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Advantages ``[N]`` for scalar rewards ``[N]`` with the estimator ``name``.

    Groups come from ``group_ids`` ``[N]`` (any integer labels, e.g. the prompt index) or
    from ``group_size`` (``n`` consecutive responses per prompt); give exactly one.
    Unknown names raise ``ValueError`` listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid names: {available_advantage_estimators()}"
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N] (one scalar per response), got shape {tuple(rewards.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size or group_ids")
    if group_ids is None:
        group_ids = group_ids_from_size(rewards.shape[0], group_size, device=rewards.device)
    elif tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}"
        )
    valid = torch.isfinite(rewards)
    adv = _REGISTRY[name](rewards=rewards, group_ids=group_ids, valid=valid, eps=eps)
    return AdvantageOutput(adv.float(), valid, int((~valid).sum().item()))
