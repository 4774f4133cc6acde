"""The paper's method names as points of the ``PolicyLossConfig`` decomposition.

Values follow the reference implementation and the paper's runs (``shared/REFERENCE.md``):
ALP and Seq-Bypass clip 0.5 / 3.0, GRPO and the TIS / MIS baselines clip 0.2 / 0.28, dual
clip c = 10 for all of them; ALP clamps log r to [-20, 20]; GSPO and the other unperturbed
sequence ratios clamp log r at 10 from above only. Everything here is a default: YAML
presets in ``configs/`` and ``policy_loss_config(name, **overrides)`` change any field (the
multi-turn runs use c = 3, the single-turn runs add ``kl_coef=0.001, kl_estimator="k3"``).
The formulas are in ``docs/objectives.md``.
"""

from __future__ import annotations

from megatron_alp.rl.losses import PolicyLossConfig, register_policy_loss

_GRPO_CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0)
_ALP_CLIP = dict(clip_low=0.5, clip_high=3.0, dual_clip_c=10.0)
# IS thresholds: verl's default upper threshold; MIS lower threshold defaults to 1 / T.
# Rejected tokens (MIS outside [lower, T], vetoed sequences) leave the loss mask and the
# token-mean count, as in the reference's single-turn code and verl's rejection sampling
# (the paper's single-turn runs); its multi-turn code kept them in the count with weight 0:
# override ``is_rejected_tokens="zero-weight"`` for that recipe.
_IS = dict(is_threshold=2.0, is_rejected_tokens="drop")


@register_policy_loss("grpo")
def grpo() -> PolicyLossConfig:
    """GRPO / PPO: token ratio against the old policy, no rollout correction."""
    return PolicyLossConfig(ratio_level="token", denominator="old", **_GRPO_CLIP)


@register_policy_loss("gspo")
def gspo() -> PolicyLossConfig:
    """GSPO: geometric-mean sequence ratio against the old policy, sequence-mean aggregation."""
    return PolicyLossConfig(
        ratio_level="geo-sequence",
        denominator="old",
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip_c=None,
        log_ratio_min=None,
        log_ratio_max=10.0,
        aggregation="seq-mean-token-mean",
    )


@register_policy_loss("seq-bypass")
def seq_bypass() -> PolicyLossConfig:
    """Seq-Bypass: sequence ratio with the rollout log-probs as denominator (no old pass)."""
    return PolicyLossConfig(
        ratio_level="sequence",
        denominator="rollout",
        log_ratio_min=None,
        log_ratio_max=10.0,
        **_ALP_CLIP,
    )


@register_policy_loss("token-tis")
def token_tis() -> PolicyLossConfig:
    """GRPO with token-level truncated IS ``min(pi_old / pi_rollout, T)``."""
    return PolicyLossConfig(is_correction="tis", is_level="token", **_IS, **_GRPO_CLIP)


@register_policy_loss("seq-tis")
def seq_tis() -> PolicyLossConfig:
    """GRPO with sequence-level truncated IS (product of token ratios, truncated at T)."""
    return PolicyLossConfig(is_correction="tis", is_level="sequence", **_IS, **_GRPO_CLIP)


@register_policy_loss("token-mis")
def token_mis() -> PolicyLossConfig:
    """GRPO with token-level masked IS: ``w`` kept inside ``[1/T, T]``, tokens outside dropped."""
    return PolicyLossConfig(is_correction="mis", is_level="token", **_IS, **_GRPO_CLIP)


@register_policy_loss("seq-mis")
def seq_mis() -> PolicyLossConfig:
    """GRPO with sequence-level masked IS (a rejected sequence leaves the loss mask)."""
    return PolicyLossConfig(is_correction="mis", is_level="sequence", **_IS, **_GRPO_CLIP)


@register_policy_loss("token-alp")
def token_alp() -> PolicyLossConfig:
    """Token-ALP: perturbed policy over rollout log-probs, per token."""
    return PolicyLossConfig(
        ratio_level="token", denominator="rollout", perturbation="alp", **_ALP_CLIP
    )


@register_policy_loss("seq-alp")
def seq_alp() -> PolicyLossConfig:
    """Seq-ALP: non-geometric sequence ratio ``sg(sum_t d_t) + lp_t - sg(lp_t)``."""
    return PolicyLossConfig(
        ratio_level="sequence", denominator="rollout", perturbation="alp", **_ALP_CLIP
    )


@register_policy_loss("cum-token-alp")
def cum_token_alp() -> PolicyLossConfig:
    """Cum-token ALP: prefix-sum ratio ``sg(sum_{s<=t} d_s) + lp_t - sg(lp_t)``."""
    return PolicyLossConfig(
        ratio_level="cum-token", denominator="rollout", perturbation="alp", **_ALP_CLIP
    )
