"""One policy-loss decomposition that covers ALP and every baseline of the paper.

``PolicyLossConfig`` picks, independently: the ratio level (token | sequence |
geo-sequence | cum-token), its denominator (old | rollout log-probs), a rollout
importance-sampling correction (none | tis | mis, token or sequence level, optional veto),
PPO clipping (asymmetric bounds, dual clip for A < 0), a log-ratio clamp, the aggregation,
and optional KL-to-reference and entropy terms. Named presets (``presets.py``) map the
paper's method names onto it; ``docs/objectives.md`` gives every formula.

Normalisation is global: ``compute_policy_loss`` divides by ``global_token_count`` (or
``global_seq_count``), computed once per step by :func:`global_loss_counts`, so that the sum
of the returned losses over micro-batches and DP x CP ranks *is* the loss of the whole batch
and its gradient is exact (the gradient reduction across DP x CP must then be a sum).

Inputs are ``[B, T]`` (``T`` the local sequence chunk under context parallelism). Non-finite
rollout / old / reference log-probs or advantages are detected, their tokens (or whole
sequences, where a sequence-level quantity depends on them) are masked, counted, and
replaced by zeros *before* any differentiable op, so no NaN reaches a gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, NamedTuple, Sequence

import torch
import torch.distributed as dist

from megatron_alp.rl.collectives import CPLayout, all_reduce_sum, group_rank, sequence_cumsum

__all__ = [
    "PolicyLossConfig",
    "available_policy_losses",
    "compute_policy_loss",
    "effective_loss_mask",
    "global_loss_counts",
    "policy_loss_config",
    "register_policy_loss",
]

RATIO_LEVELS = ("token", "sequence", "geo-sequence", "cum-token")
DENOMINATORS = ("old", "rollout")
PERTURBATIONS = ("off", "alp")
IS_CORRECTIONS = ("none", "tis", "mis")
IS_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k3")
REJECTED_TOKENS = ("zero-weight", "drop")

# exp() of fp32 overflows above ~88.7; keep every exponentiated log-ratio well inside.
_MAX_LOG_RATIO = 80.0
# Safety clamp on the IS log-weight before exp (same bound as the reference implementation).
_IS_LOG_BOUND = 20.0
# k3 estimator: clamp its log-ratio and the value itself (verl's low_var_kl does the same).
_K3_LOG_BOUND = 20.0
_K3_MAX = 10.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PolicyLossConfig:
    """The policy objective, one point in the decomposition (see ``docs/objectives.md``)."""

    ratio_level: Literal["token", "sequence", "geo-sequence", "cum-token"] = "token"
    """token: ``log r_t = d_t``; sequence: ``sg(sum_s d_s) + lp_t - sg(lp_t)``; geo-sequence:
    the same with the sum divided by the sequence length (GSPO); cum-token: the prefix sum
    ``sg(sum_{s<=t} d_s) + lp_t - sg(lp_t)``. ``d_t = lp_t - denominator_t``."""
    denominator: Literal["old", "rollout"] = "old"
    """Log-probs in the ratio's denominator: the trainer's old-policy pass, or the rollout
    engine's (ALP, Seq-Bypass: no old-log-prob pass needed)."""
    perturbation: Literal["off", "alp"] = "off"
    """Whether the update forward runs with ALP noise; read by the trainer, the loss itself
    does not depend on it."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Rollout correction ``w = pi_old / pi_rollout`` multiplying the clipped loss: tis
    truncates ``min(w, T)``; mis zeroes ``w`` outside ``[lower, T]``. Needs denominator old."""
    is_level: Literal["token", "sequence"] = "token"
    """token: per-token ``w_t``; sequence: the product over the sequence, on every token."""
    is_threshold: float = 2.0
    """Upper IS threshold T (> 0)."""
    is_lower_threshold: float | None = None
    """MIS lower threshold (>= 0, < T); None means 1 / T."""
    is_veto_threshold: float | None = None
    """If set, a sequence with any token ratio ``pi_old / pi_rollout`` below it gets weight 0."""
    is_rejected_tokens: Literal["zero-weight", "drop"] = "zero-weight"
    """What happens to a token whose IS weight is 0 (rejected by MIS, or in a vetoed
    sequence). ``"zero-weight"``: it stays in the loss mask, contributes 0 to the policy
    term and still counts in the token-mean / sequence denominators (and keeps its KL and
    entropy terms): the reference's multi-turn code. ``"drop"``: it leaves the loss mask
    as if its mask were 0: out of every term, of the ratio's sequence sums and of the global
    counts (token-mean divides by the kept tokens): the reference's single-turn code and
    verl's rejection sampling. No effect without an IS correction."""
    clip_low: float = 0.2
    """PPO lower clip: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``; in [0, 1)."""
    clip_high: float = 0.28
    """PPO upper clip (> 0)."""
    dual_clip_c: float | None = 10.0
    """Dual clip: for A < 0 the per-token loss is capped at ``-A * c`` (c > 1); None disables."""
    log_ratio_min: float | None = -20.0
    """Lower clamp of ``log r`` before ``exp``; None for no lower clamp."""
    log_ratio_max: float = 20.0
    """Upper clamp of ``log r`` before ``exp`` (<= 80 so that ``exp`` stays finite in fp32)."""
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """token-mean: sum over tokens / global token count; seq-mean-token-sum: per-sequence sums
    / global sequence count; seq-mean-token-mean: per-sequence means / global sequence count."""
    kl_coef: float = 0.0
    """Weight of the per-token KL-to-reference penalty (needs ``ref_logp``); 0 disables."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """k1: ``lp - ref``; k3 (low-variance): ``exp(ref - lp) - (ref - lp) - 1``, clamped to 10."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (``- coef * H_t``, needs ``entropy``); 0 disables."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("ratio_level", RATIO_LEVELS),
            ("denominator", DENOMINATORS),
            ("perturbation", PERTURBATIONS),
            ("is_correction", IS_CORRECTIONS),
            ("is_level", IS_LEVELS),
            ("aggregation", AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
            ("is_rejected_tokens", REJECTED_TOKENS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"PolicyLossConfig.{name}={value!r} is not one of {allowed}")

        def number(name: str, ok: Callable[[float], bool], expected: str, optional: bool = False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise ValueError(f"PolicyLossConfig.{name}={value!r}; expected {expected}")

        number("is_threshold", lambda v: v > 0, "a finite number > 0")
        number(
            "is_lower_threshold",
            lambda v: 0 <= v < self.is_threshold,
            f"None or a number in [0, is_threshold={self.is_threshold})",
            optional=True,
        )
        number("is_veto_threshold", lambda v: v > 0, "None or a number > 0", optional=True)
        number("clip_low", lambda v: 0 <= v < 1, "a number in [0, 1)")
        number("clip_high", lambda v: v >= 0, "a number >= 0")
        number("dual_clip_c", lambda v: v > 1, "None or a number > 1", optional=True)
        number(
            "log_ratio_max",
            lambda v: -_MAX_LOG_RATIO <= v <= _MAX_LOG_RATIO,
            f"a number in [-{_MAX_LOG_RATIO}, {_MAX_LOG_RATIO}] (exp must stay finite in fp32)",
        )
        number(
            "log_ratio_min",
            lambda v: v < self.log_ratio_max,
            f"None or a number < log_ratio_max={self.log_ratio_max}",
            optional=True,
        )
        number("kl_coef", lambda v: v >= 0, "a number >= 0")
        number("entropy_coef", lambda v: v >= 0, "a number >= 0")
        if self.is_correction != "none" and self.denominator != "old":
            raise ValueError(
                f"PolicyLossConfig.is_correction={self.is_correction!r} needs denominator='old' "
                f"(w = pi_old / pi_rollout corrects an old-policy ratio), got "
                f"denominator={self.denominator!r}"
            )

    @property
    def needs_old_logp(self) -> bool:
        """Whether the trainer must run the (unperturbed) old-log-prob pass."""
        return self.denominator == "old" or self.is_correction != "none"

    @property
    def needs_ref_logp(self) -> bool:
        """Whether a reference-model log-prob pass is needed (KL penalty)."""
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        """Whether the update forward must also return the token entropy."""
        return self.entropy_coef > 0

    @property
    def sequence_coupled(self) -> bool:
        """True when a token's loss depends on other tokens of its sequence (ratio or IS)."""
        if self.ratio_level != "token":
            return True
        if self.is_correction == "none":
            return False
        return self.is_level == "sequence" or self.is_veto_threshold is not None

    @property
    def is_lower(self) -> float:
        """The effective MIS lower threshold."""
        return 1.0 / self.is_threshold if self.is_lower_threshold is None else self.is_lower_threshold


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[[], PolicyLossConfig]] = {}


def register_policy_loss(
    name: str,
) -> Callable[[Callable[[], PolicyLossConfig]], Callable[[], PolicyLossConfig]]:
    """Decorator registering a named preset: a zero-argument function returning a config.

    Names are exact; registering a name twice raises ``ValueError`` (a registry that
    silently overwrites hides which objective a run used).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy loss name must be a non-empty string, got {name!r}")

    def deco(fn: Callable[[], PolicyLossConfig]) -> Callable[[], PolicyLossConfig]:
        if name in _REGISTRY:
            raise ValueError(
                f"policy loss {name!r} is already registered (by {_REGISTRY[name].__qualname__})"
            )
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_presets() -> None:
    from megatron_alp.rl import presets  # noqa: F401  (registers the built-in presets)


def available_policy_losses() -> list[str]:
    """Sorted names of all registered presets."""
    _load_presets()
    return sorted(_REGISTRY)


def policy_loss_config(name: str, **overrides) -> PolicyLossConfig:
    """The preset ``name`` with ``overrides`` applied (validated like any config).

    Unknown names raise ``ValueError`` listing the valid ones; unknown override fields
    raise ``ValueError`` listing the config's fields.
    """
    _load_presets()
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {sorted(_REGISTRY)}")
    cfg = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(PolicyLossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown PolicyLossConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------- input checks
def _check_shapes(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if ref.dim() != 2:
        raise ValueError(f"{ref_name} must be [batch, seq], got shape {tuple(ref.shape)}")
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "advantages" and t.dim() == 1 and t.shape[0] == ref.shape[0]:
            continue
        if tuple(t.shape) != tuple(ref.shape):
            allowed = " or [batch]" if name == "advantages" else ""
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; "
                f"expected {tuple(ref.shape)}{allowed}"
            )


def _bad(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else ~torch.isfinite(x)


def _inputs_for(cfg: PolicyLossConfig, old_logp, rollout_logp, ref_logp):
    if cfg.needs_old_logp and old_logp is None:
        raise ValueError(
            f"old_logp is required by this objective (denominator={cfg.denominator!r}, "
            f"is_correction={cfg.is_correction!r}) but was None"
        )
    if rollout_logp is None and (cfg.denominator == "rollout" or cfg.is_correction != "none"):
        raise ValueError("rollout_logp is required by this objective but was None")
    if cfg.needs_ref_logp and ref_logp is None:
        raise ValueError(f"ref_logp is required when kl_coef={cfg.kl_coef} > 0 but was None")


class _IS(NamedTuple):
    """The rollout IS correction of one micro-batch (detached)."""

    weight_BT: torch.Tensor  # final weight (truncated / masked / vetoed), 0 off the mask
    log_raw_BT: torch.Tensor  # unclamped log of pi_old / pi_rollout at the IS level
    veto_B: torch.Tensor | None  # sequences vetoed


class _MaskInfo(NamedTuple):
    valid_BT: torch.Tensor  # bool: tokens that enter the loss
    seq_len_B: torch.Tensor  # valid tokens per sequence, summed over CP
    n_nonfinite_tokens: torch.Tensor  # tokens under the input mask with a non-finite input
    n_dropped_seqs: torch.Tensor  # sequences dropped whole because of such a token
    n_rejected_tokens: torch.Tensor  # tokens dropped by is_rejected_tokens="drop"
    is_: _IS | None  # the IS correction, when computed here (is_rejected_tokens="drop")


def _is_correction(
    cfg: PolicyLossConfig,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    valid: torch.Tensor,
    cp_group: dist.ProcessGroup | None,
) -> _IS:
    """IS weights ``w`` of the tokens under ``valid`` (docs/objectives.md); 0 elsewhere.

    ``w > 0`` exactly where a token is kept: ``exp`` of a log-weight clamped to +-20 is
    positive in fp32, truncation keeps it positive, and only MIS and the veto write 0.
    """
    old = _zero_where_invalid(old_logp.detach(), valid)
    roll = _zero_where_invalid(rollout_logp.detach(), valid)
    x = old - roll
    if cfg.is_level == "sequence":
        log_raw = all_reduce_sum(x.sum(-1), cp_group).unsqueeze(-1).expand_as(x)
    else:
        log_raw = x
    w = torch.exp(log_raw.clamp(-_IS_LOG_BOUND, _IS_LOG_BOUND))
    if cfg.is_correction == "tis":
        w = w.clamp(max=cfg.is_threshold)
    else:
        w = w * ((w >= cfg.is_lower) & (w <= cfg.is_threshold)).to(w.dtype)
    veto = None
    if cfg.is_veto_threshold is not None:
        low = (x < math.log(cfg.is_veto_threshold)) & valid
        veto = all_reduce_sum(low.sum(-1).to(torch.float64), cp_group) > 0
        w = torch.where(veto.unsqueeze(-1), torch.zeros_like(w), w)
    return _IS(torch.where(valid, w, torch.zeros_like(w)), log_raw, veto)


def _mask_info(
    cfg: PolicyLossConfig,
    mask: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    cp_group: dist.ProcessGroup | None,
) -> _MaskInfo:
    m = mask.bool() if mask.dtype == torch.bool else mask > 0
    bad = torch.zeros_like(m)
    used = [rollout_logp if (cfg.denominator == "rollout" or cfg.is_correction != "none") else None]
    used += [old_logp if cfg.needs_old_logp else None, ref_logp if cfg.needs_ref_logp else None]
    for t in used:
        if t is not None:
            bad |= _bad(t)
    if advantages is not None:
        adv_bad = _bad(advantages)
        bad |= adv_bad if adv_bad.dim() == 2 else adv_bad.unsqueeze(-1)
    bad &= m
    # per-sequence [tokens kept, bad tokens], summed over CP ranks in one all-reduce
    counts = torch.stack([(m & ~bad).sum(-1), bad.sum(-1)], dim=-1).to(torch.float64)
    counts = all_reduce_sum(counts, cp_group)
    seq_len, seq_bad = counts[:, 0], counts[:, 1]
    valid = m & ~bad
    n_dropped = torch.zeros((), dtype=torch.float64, device=m.device)
    if cfg.sequence_coupled:
        drop = seq_bad > 0
        valid &= ~drop.unsqueeze(-1)
        seq_len = torch.where(drop, torch.zeros_like(seq_len), seq_len)
        # replicated on every CP rank: count it on CP rank 0 only, so sums over ranks are right
        if group_rank(cp_group) == 0:
            n_dropped = drop.sum().to(torch.float64)
    n_rejected = torch.zeros((), dtype=torch.float64, device=m.device)
    is_ = None
    if cfg.is_correction != "none" and cfg.is_rejected_tokens == "drop":
        # The weights are computed on the tokens before rejection (as the reference does);
        # the rejected ones then leave the mask, so every count below agrees with the loss.
        is_ = _is_correction(cfg, old_logp, rollout_logp, valid, cp_group)
        rejected = valid & (is_.weight_BT == 0)
        valid = valid & ~rejected
        n_rejected = rejected.sum().to(torch.float64)
        seq_len = all_reduce_sum(valid.sum(-1).to(torch.float64), cp_group)
    return _MaskInfo(valid, seq_len, bad.sum().to(torch.float64), n_dropped, n_rejected, is_)


def effective_loss_mask(
    cfg: PolicyLossConfig,
    mask: torch.Tensor,
    *,
    rollout_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The boolean ``[B, T]`` mask of tokens that actually enter the loss.

    ``mask`` minus tokens whose rollout / old / reference log-prob or advantage is not
    finite, minus whole sequences holding such a token when the objective couples the
    tokens of a sequence (sequence / cum-token ratios, sequence-level IS or veto), and, with
    ``is_rejected_tokens="drop"``, minus the tokens the IS correction rejects (MIS outside
    ``[lower, T]``, vetoed sequences). Feed it to :func:`global_loss_counts`;
    :func:`compute_policy_loss` derives the same mask itself.
    """
    _check_shapes(
        "mask", mask, rollout_logp=rollout_logp, old_logp=old_logp, advantages=advantages,
        ref_logp=ref_logp,
    )
    return _mask_info(cfg, mask, rollout_logp, old_logp, advantages, ref_logp, cp_group).valid_BT


def global_loss_counts(
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    dp_group: dist.ProcessGroup | None = None,
    cp_group: dist.ProcessGroup | None = None,
) -> tuple[int, int]:
    """``(tokens, sequences)`` with a non-zero mask over all micro-batches and DP x CP ranks.

    ``masks`` are this rank's effective loss masks (one ``[B, T]`` per micro-batch, see
    :func:`effective_loss_mask`). Tokens are summed over CP and DP; a sequence split over
    CP ranks is counted once (its per-rank counts are summed over CP first), and sequences
    are summed over DP only. Two all-reduces; call once per step and pass the results as
    ``global_token_count`` / ``global_seq_count`` to every :func:`compute_policy_loss`.
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if not masks:
        raise ValueError("global_loss_counts needs at least one mask")
    for i, m in enumerate(masks):
        if m.dim() != 2:
            raise ValueError(f"masks[{i}] must be [batch, seq], got shape {tuple(m.shape)}")
    per_seq = torch.cat([(m.bool() if m.dtype == torch.bool else m > 0).sum(-1) for m in masks])
    per_seq = all_reduce_sum(per_seq.to(torch.float64), cp_group)
    totals = torch.stack([per_seq.sum(), (per_seq > 0).sum().to(torch.float64)])
    totals = all_reduce_sum(totals, dp_group)
    return int(totals[0].item()), int(totals[1].item())


# --------------------------------------------------------------------------- the objective
class _Terms(NamedTuple):
    """Everything the loss and the metrics derive from one micro-batch (detached but ``lp``)."""

    info: _MaskInfo
    lp_BT: torch.Tensor  # trainer log-probs, fp32, 0 where not valid (differentiable)
    log_ratio_BT: torch.Tensor  # clamped policy log-ratio, value as in the loss (differentiable)
    adv_BT: torch.Tensor  # advantages, fp32, 0 where not valid
    is_weight_BT: torch.Tensor | None  # final IS weight (truncated / masked / vetoed), detached
    is_log_raw_BT: torch.Tensor | None  # unclamped log of pi_old / pi_rollout at the IS level
    veto_B: torch.Tensor | None  # sequences vetoed


def _zero_where_invalid(x: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    # sanitise before any differentiable op: where() with a NaN operand would leak NaN into
    # the backward of that operand, so non-finite values are replaced, not multiplied by 0
    if x is None:
        return None
    return torch.where(valid, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def _terms(
    cfg: PolicyLossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    cp_group: dist.ProcessGroup | None,
    cp_layout: CPLayout,
) -> _Terms:
    _inputs_for(cfg, old_logp, rollout_logp, ref_logp)
    if cfg.needs_entropy and entropy is None:
        raise ValueError(f"entropy is required when entropy_coef={cfg.entropy_coef} > 0 but was None")
    _check_shapes(
        "logp", logp, old_logp=old_logp, rollout_logp=rollout_logp, advantages=advantages,
        mask=mask, ref_logp=ref_logp, entropy=entropy,
    )
    info = _mask_info(cfg, mask, rollout_logp, old_logp, advantages, ref_logp, cp_group)
    valid = info.valid_BT
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    lp = _zero_where_invalid(logp, valid)
    adv = _zero_where_invalid(advantages.detach(), valid)
    denom_src = rollout_logp if cfg.denominator == "rollout" else old_logp
    denom = _zero_where_invalid(denom_src.detach(), valid)
    d = lp - denom  # 0 where invalid

    if cfg.ratio_level == "token":
        log_ratio = d
    else:
        lp_sg = lp.detach()
        if cfg.ratio_level == "cum-token":
            const = sequence_cumsum(d.detach(), cp_group, cp_layout=cp_layout)
        else:
            const = all_reduce_sum(d.detach().sum(-1), cp_group)
            if cfg.ratio_level == "geo-sequence":
                const = const / info.seq_len_B.clamp(min=1).to(const.dtype)
            const = const.unsqueeze(-1)
        # value = the sequence (prefix) log-ratio; gradient = that of lp_t alone
        log_ratio = torch.where(valid, const + lp - lp_sg, torch.zeros_like(lp))
    log_ratio = torch.clamp(log_ratio, min=cfg.log_ratio_min, max=cfg.log_ratio_max)

    is_weight = is_log_raw = veto = None
    if cfg.is_correction != "none":
        is_ = info.is_ if info.is_ is not None else _is_correction(
            cfg, old_logp, rollout_logp, valid, cp_group
        )
        is_weight, is_log_raw, veto = is_
    return _Terms(info, lp, log_ratio, adv, is_weight, is_log_raw, veto)


def compute_policy_loss(
    cfg: PolicyLossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    global_token_count: float | int | torch.Tensor | None = None,
    global_seq_count: float | int | torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
    cp_layout: CPLayout = "load-balanced",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's (and this rank's) share of the policy loss, and detached metrics.

    ``logp`` ``[B, T]`` is the trainer's (differentiable; under ALP: perturbed) log-prob of
    each response token; ``old_logp`` / ``rollout_logp`` / ``ref_logp`` the detached
    old-policy, rollout-engine and reference log-probs (None where the objective does not
    use them); ``advantages`` ``[B, T]`` or ``[B]``; ``mask`` selects the response tokens;
    ``entropy`` ``[B, T]`` is needed when ``entropy_coef > 0``. The loss is
    ``sum_t weight_t * l_t`` over this shard's valid tokens, normalised by
    ``global_token_count`` (token-mean) or ``global_seq_count`` (seq-mean-*), which default
    to this micro-batch's own counts (summed over ``cp_group``): then, with one micro-batch
    and no DP, it is the masked mean. Under context parallelism pass ``cp_group``:
    sequence sums and prefix sums are reduced over it (``cp_layout`` names the chunk
    layout) and the loss is this rank's partial sum. Metrics are sums over this shard
    (``policy/*``), already divided by the same global count where they are means.
    """
    t = _terms(
        cfg, logp, old_logp, rollout_logp, advantages, mask, ref_logp, entropy, cp_group, cp_layout
    )
    valid, adv = t.info.valid_BT, t.adv_BT
    ratio = torch.exp(t.log_ratio_BT)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    if cfg.dual_clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip_c), pg)
    if t.is_weight_BT is not None:
        pg = pg * t.is_weight_BT

    per_token = pg
    kl = ent = None
    if cfg.kl_coef > 0:
        ref = _zero_where_invalid(ref_logp.detach(), valid)
        if cfg.kl_estimator == "k1":
            kl = t.lp_BT - ref
        else:
            x = torch.clamp(ref - t.lp_BT, -_K3_LOG_BOUND, _K3_LOG_BOUND)
            kl = torch.clamp(torch.exp(x) - x - 1.0, max=_K3_MAX)
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef > 0:
        ent = _zero_where_invalid(entropy, valid)
        per_token = per_token - cfg.entropy_coef * ent

    # weights that turn sums into the global mean; 0 on invalid tokens
    if cfg.aggregation == "token-mean":
        denom = global_token_count if global_token_count is not None else t.info.seq_len_B.sum()
        scale_BT = valid.float()
    else:
        if global_seq_count is not None:
            denom = global_seq_count
        else:
            denom = (t.info.seq_len_B > 0).sum()
        if cfg.aggregation == "seq-mean-token-sum":
            scale_BT = valid.float()
        else:
            inv_len = 1.0 / t.info.seq_len_B.clamp(min=1).float()
            scale_BT = valid.float() * inv_len.unsqueeze(-1)
    denom_f = torch.as_tensor(denom, dtype=torch.float32, device=logp.device).clamp(min=1.0)
    scale_BT = scale_BT / denom_f

    def agg(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x * scale_BT, torch.zeros_like(x)).sum()

    loss = agg(per_token)
    metrics: dict[str, torch.Tensor] = {
        "policy/pg_loss": agg(pg).detach(),
        "policy/n_tokens": valid.sum().to(torch.float64),
        "policy/n_nonfinite_tokens": t.info.n_nonfinite_tokens,
        "policy/n_dropped_seqs": t.info.n_dropped_seqs,
        "policy/n_rejected_tokens": t.info.n_rejected_tokens,
    }
    if kl is not None:
        metrics["policy/kl_ref"] = agg(kl).detach()
    if ent is not None:
        metrics["policy/entropy"] = agg(ent).detach()
    return loss, metrics
