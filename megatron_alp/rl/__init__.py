"""RL objectives: vocab-parallel log-probs, policy losses, advantages, mismatch metrics."""

from megatron_alp.rl.advantages import (
    AdvantageOutput,
    available_advantage_estimators,
    compute_advantages,
    register_advantage_estimator,
)
from megatron_alp.rl.logprobs import vocab_parallel_logprobs
from megatron_alp.rl.losses import (
    PolicyLossConfig,
    available_policy_losses,
    compute_policy_loss,
    effective_loss_mask,
    global_loss_counts,
    policy_loss_config,
    register_policy_loss,
)
from megatron_alp.rl.metrics import MismatchMetrics, mismatch_metrics

__all__ = [
    "AdvantageOutput",
    "MismatchMetrics",
    "PolicyLossConfig",
    "available_advantage_estimators",
    "available_policy_losses",
    "compute_advantages",
    "compute_policy_loss",
    "effective_loss_mask",
    "global_loss_counts",
    "mismatch_metrics",
    "policy_loss_config",
    "register_advantage_estimator",
    "register_policy_loss",
    "vocab_parallel_logprobs",
]
