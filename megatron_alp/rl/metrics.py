"""Per-step mismatch metrics between the trainer's and the rollout engine's log-probs.

Call :meth:`MismatchMetrics.update` once per micro-batch (detached inputs, cheap) and
:meth:`MismatchMetrics.compute` once per step. Quantiles are exact over the *global* token
set: ``compute`` all-gathers the masked per-token values over the CP group and then the DP
group, so every rank holds O(global tokens) floats (5 per token; e.g. 512 x 8 responses x
2k tokens = 8.4M tokens -> ~170 MB in fp32 per rank, once per step) and sorts them. Pass a
smaller ``max_tokens`` budget upstream if that is too much; no sketch is used. ``update``
never waits for the device (it runs inside the loss, once per micro-batch): the per-token
values of every position (5 floats, masked ones included) go to pinned host memory by
asynchronous copies, the per-sequence sums stay on the device, and the valid tokens and
sequences are selected in ``compute``, which gathers them on the groups' communication
device and copies the result to the host once.

Names follow verl's ``rollout_corr/*`` and ``is_ratio/*`` where they exist. With ``delta =
logp_train - logp_rollout`` per token and ``rho = exp(delta)``:

- ``rollout_corr/kl`` = mean(-delta) (k1 of KL(rollout || train)); ``rollout_corr/k3_kl`` =
  mean(rho - 1 - delta); ``rollout_corr/chi2_token`` = mean(rho^2) - 1;
  ``rollout_corr/chi2_seq`` = mean over sequences of exp(2 sum_t delta) - 1;
  ``rollout_corr/ess_token`` / ``ess_seq`` = mean(rho)^2 / mean(rho^2) in (0, 1];
- ``rollout_corr/{training,rollout}_log_ppl`` = mean over sequences of -mean_t logp,
  ``rollout_corr/log_ppl_diff`` (training - rollout) and ``log_ppl_abs_diff``;
  ``rollout_corr/{training,rollout}_ppl`` = mean over sequences of exp(-mean_t logp);
- ``rollout_corr/abs_logp_diff_{mean,max}`` (slime's train_rollout_logprob_abs_diff),
  ``rollout_corr/token_mult_prob_error`` = mean exp(|delta|) (NeMo-RL; alarm above 1.05);
- with a ``PolicyLossConfig``: ``is_ratio/{q01,q05,q25,q50,q75,q95,q99,q999,min,max,mean}``
  of the policy ratio exactly as the loss sees it (level, denominator, clamp), clip
  fractions ``policy/clip_frac{,_lower,_upper,_dual}``, and for TIS / MIS
  ``rollout_corr/is_weight_{mean,std,min,max}``, ``is_truncated_fraction`` (raw w > T),
  ``is_masked_fraction`` (tokens whose weight is 0), ``is_seq_masked_fraction``,
  ``is_veto_fraction``;
- counts: ``rollout_corr/n_tokens``, ``n_seqs``, ``n_nonfinite_tokens`` (tokens under the
  mask with a non-finite log-prob or advantage), ``n_nonfinite_seqs`` (sequences holding
  such a token: they are left out of every metric).

Exponentials of summed log-ratios are clamped to [-20, 20] in log space.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_alp.rl.collectives import CPLayout, all_reduce_sum, gather_cat
from megatron_alp.rl.losses import PolicyLossConfig, _check_shapes, _terms

__all__ = ["MismatchMetrics", "QUANTILES", "mismatch_metrics"]

QUANTILES: tuple[tuple[str, float], ...] = (
    ("q01", 0.01), ("q05", 0.05), ("q25", 0.25), ("q50", 0.50),
    ("q75", 0.75), ("q95", 0.95), ("q99", 0.99), ("q999", 0.999),
)
_LOG_BOUND = 20.0


def _quantiles(x: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (torch.quantile's default) without its size limit."""
    s = torch.sort(x.double()).values
    n = s.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


def _offload(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host: an asynchronous copy into pinned memory from a GPU (no sync; the
    copies are waited for in ``compute``), ``t`` itself on the CPU."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class MismatchMetrics:
    """Accumulates one step's micro-batches, then reduces them globally (see module docstring)."""

    def __init__(self, cfg: PolicyLossConfig | None = None) -> None:
        self.cfg = cfg
        self._tok: list[torch.Tensor] = []  # [b * t, 5]: delta, log_ratio, adv, w, is_log_raw
        self._tok_valid: list[torch.Tensor] = []  # [b * t]: the token counts (selected in compute)
        self._seq: list[torch.Tensor] = []  # [b, 4]: sum delta, n, sum lp, sum rollout
        self._seq_flags: list[torch.Tensor] = []  # [b, 3]: weight-0 tokens>0, vetoed, counted
        self._counts: torch.Tensor | None = None  # [2]: nonfinite tokens, nonfinite seqs
        self._device: torch.device | None = None  # where update() accumulates

    @torch.no_grad()
    def update(
        self,
        *,
        logp: torch.Tensor,
        rollout_logp: torch.Tensor,
        mask: torch.Tensor,
        old_logp: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        cp_group: dist.ProcessGroup | None = None,
        cp_layout: CPLayout = "load-balanced",
    ) -> None:
        """Add one micro-batch: ``[B, T]`` trainer and rollout log-probs over ``mask``.

        ``logp`` is the log-prob the loss uses (under ALP the perturbed one). With a config,
        ``old_logp`` / ``advantages`` are needed as for the loss. Under context parallelism
        pass ``cp_group`` (sequence sums are reduced over it; one or two all-reduces).
        """
        _check_shapes("logp", logp, rollout_logp=rollout_logp, mask=mask, old_logp=old_logp,
                      advantages=advantages)
        m = mask.bool() if mask.dtype == torch.bool else mask > 0
        logp = logp.detach()
        bad = m & ~(torch.isfinite(logp) & torch.isfinite(rollout_logp))
        if advantages is not None:
            a_bad = ~torch.isfinite(advantages)
            bad |= m & (a_bad if a_bad.dim() == 2 else a_bad.unsqueeze(-1))
        cfg = self.cfg
        if cfg is not None:
            if advantages is None:
                raise ValueError("advantages are required when MismatchMetrics has a config")
            if cfg.needs_old_logp:
                if old_logp is None:
                    raise ValueError("old_logp is required by this config but was None")
                bad |= m & ~torch.isfinite(old_logp)
        seq_bad = all_reduce_sum(bad.sum(-1).double(), cp_group) > 0
        valid = m & ~seq_bad.unsqueeze(-1)
        counts = torch.stack([bad.sum().double(), seq_bad.sum().double()])
        # accumulate where the inputs live: a .cpu() here would sync every micro-batch
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)
        self._device = self._device or logp.device

        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        lp = torch.where(valid, logp.float(), zero)
        roll = torch.where(valid, rollout_logp.float(), zero)
        delta = lp - roll
        cols = [delta, torch.zeros_like(delta), torch.zeros_like(delta),
                torch.ones_like(delta), torch.zeros_like(delta)]
        flags = torch.zeros((m.shape[0], 3), dtype=torch.float64, device=m.device)
        if cfg is not None:
            # Metrics describe every valid token, whatever the loss does with rejected ones
            # (is_rejected_tokens="drop" takes them out of the loss mask, not out of view).
            seen = dataclasses.replace(cfg, is_rejected_tokens="zero-weight")
            t = _terms(seen, logp, old_logp, rollout_logp, advantages, valid, None, None,
                       cp_group, cp_layout)
            cols[1], cols[2] = t.log_ratio_BT, t.adv_BT
            if t.is_weight_BT is not None:
                cols[3], cols[4] = t.is_weight_BT, t.is_log_raw_BT
                zero_w = ((t.is_weight_BT == 0) & valid).sum(-1).double()
                flags[:, 0] = all_reduce_sum(zero_w, cp_group)
                if t.veto_B is not None:
                    flags[:, 1] = t.veto_B.double()
        # Every token and sequence is kept with its flag and selected in compute(): a
        # boolean selection here would read its size on the host (a sync per micro-batch).
        self._tok.append(_offload(torch.stack([c.float() for c in cols], dim=-1).reshape(-1, 5)))
        self._tok_valid.append(_offload(valid.reshape(-1)))
        seq = torch.stack([delta.sum(-1), valid.sum(-1), lp.sum(-1), roll.sum(-1)], -1).double()
        seq = all_reduce_sum(seq, cp_group)
        flags[:, 2] = 1.0
        self._seq.append(seq)  # [b, 4]: small, stays where it is
        self._seq_flags.append(flags)

    @torch.no_grad()
    def compute(
        self,
        *,
        dp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, float]:
        """The step's metrics over all micro-batches and all DP x CP ranks (same on every rank).

        Collective over ``cp_group`` and ``dp_group``: every rank must call it. ``device``
        (default: where ``update`` accumulated, else the CPU) holds the values while they
        are gathered; each collective moves them to its group's communication device if
        they are elsewhere (the GPU under NCCL: :func:`~megatron_alp.rl.collectives.comm_device`).
        """
        dev = torch.device(device) if device is not None else (self._device or torch.device("cpu"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies made by _offload are complete
        tok = torch.cat([t[v] for t, v in zip(self._tok, self._tok_valid)]) if self._tok else torch.zeros((0, 5))
        seq = torch.cat(self._seq) if self._seq else torch.zeros((0, 4), dtype=torch.float64)
        flags = torch.cat(self._seq_flags) if self._seq_flags else torch.zeros((0, 3), dtype=torch.float64)
        keep = seq[:, 1] > 0  # sequences with at least one valid token
        seq, flags = seq[keep], flags[keep]
        counts = self._counts if self._counts is not None else torch.zeros(2, dtype=torch.float64)
        # tokens are distinct across CP and DP ranks; sequences (already CP-reduced) across DP only
        tok = gather_cat(gather_cat(tok.to(dev), cp_group), dp_group).cpu()
        seqf = gather_cat(torch.cat([seq.to(dev), flags.to(dev)], -1), dp_group).cpu()
        counts = all_reduce_sum(all_reduce_sum(counts.to(dev), cp_group), dp_group).cpu()
        seq, flags = seqf[:, :4], seqf[:, 4:]
        # n_nonfinite_seqs was counted on every CP rank of the sequence
        n_cp = dist.get_world_size(cp_group) if cp_group is not None else 1
        out: dict[str, float] = {
            "rollout_corr/n_tokens": float(tok.shape[0]),
            "rollout_corr/n_seqs": float(seq.shape[0]),
            "rollout_corr/n_nonfinite_tokens": float(counts[0]),
            "rollout_corr/n_nonfinite_seqs": float(counts[1]) / n_cp,
        }
        if tok.shape[0] == 0:
            return out
        delta = tok[:, 0].double()
        rho = torch.exp(delta.clamp(-_LOG_BOUND, _LOG_BOUND))
        out["rollout_corr/kl"] = float((-delta).mean())
        out["rollout_corr/k3_kl"] = float((rho - 1 - delta.clamp(-_LOG_BOUND, _LOG_BOUND)).mean())
        out["rollout_corr/chi2_token"] = float((rho * rho).mean() - 1)
        out["rollout_corr/ess_token"] = float(rho.mean() ** 2 / (rho * rho).mean())
        out["rollout_corr/abs_logp_diff_mean"] = float(delta.abs().mean())
        out["rollout_corr/abs_logp_diff_max"] = float(delta.abs().max())
        out["rollout_corr/token_mult_prob_error"] = float(torch.exp(delta.abs().clamp(max=_LOG_BOUND)).mean())
        if seq.shape[0]:
            rho_s = torch.exp(seq[:, 0].clamp(-_LOG_BOUND, _LOG_BOUND))
            out["rollout_corr/chi2_seq"] = float((rho_s * rho_s).mean() - 1)
            out["rollout_corr/ess_seq"] = float(rho_s.mean() ** 2 / (rho_s * rho_s).mean())
            train_lppl = -seq[:, 2] / seq[:, 1]
            roll_lppl = -seq[:, 3] / seq[:, 1]
            out["rollout_corr/training_log_ppl"] = float(train_lppl.mean())
            out["rollout_corr/rollout_log_ppl"] = float(roll_lppl.mean())
            out["rollout_corr/log_ppl_diff"] = float((train_lppl - roll_lppl).mean())
            out["rollout_corr/log_ppl_abs_diff"] = float((train_lppl - roll_lppl).abs().mean())
            out["rollout_corr/training_ppl"] = float(torch.exp(train_lppl.clamp(max=_LOG_BOUND)).mean())
            out["rollout_corr/rollout_ppl"] = float(torch.exp(roll_lppl.clamp(max=_LOG_BOUND)).mean())
        cfg = self.cfg
        if cfg is None:
            return out
        ratio = torch.exp(tok[:, 1].double())
        adv = tok[:, 2].double()
        for (name, _), v in zip(QUANTILES, _quantiles(ratio, [q for _, q in QUANTILES])):
            out[f"is_ratio/{name}"] = v
        out["is_ratio/min"] = float(ratio.min())
        out["is_ratio/max"] = float(ratio.max())
        out["is_ratio/mean"] = float(ratio.mean())
        lower = (adv < 0) & (ratio < 1 - cfg.clip_low)
        upper = (adv > 0) & (ratio > 1 + cfg.clip_high)
        out["policy/clip_frac_lower"] = float(lower.double().mean())
        out["policy/clip_frac_upper"] = float(upper.double().mean())
        out["policy/clip_frac"] = float((lower | upper).double().mean())
        if cfg.dual_clip_c is not None:
            out["policy/clip_frac_dual"] = float(((adv < 0) & (ratio > cfg.dual_clip_c)).double().mean())
        if cfg.is_correction != "none":
            w = tok[:, 3].double()
            raw = torch.exp(tok[:, 4].double().clamp(-_LOG_BOUND, _LOG_BOUND))
            out["rollout_corr/is_weight_mean"] = float(w.mean())
            out["rollout_corr/is_weight_std"] = float(w.std(unbiased=False))
            out["rollout_corr/is_weight_min"] = float(w.min())
            out["rollout_corr/is_weight_max"] = float(w.max())
            out["rollout_corr/is_truncated_fraction"] = float((raw > cfg.is_threshold).double().mean())
            out["rollout_corr/is_masked_fraction"] = float((w == 0).double().mean())
            if seq.shape[0]:
                out["rollout_corr/is_seq_masked_fraction"] = float((flags[:, 0] > 0).double().mean())
                out["rollout_corr/is_veto_fraction"] = float((flags[:, 1] > 0).double().mean())
        return out


def mismatch_metrics(
    *,
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig | None = None,
    old_logp: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    dp_group: dist.ProcessGroup | None = None,
    cp_group: dist.ProcessGroup | None = None,
    cp_layout: CPLayout = "load-balanced",
) -> dict[str, float]:
    """One-call form of :class:`MismatchMetrics` for a single batch (see the module docstring)."""
    acc = MismatchMetrics(cfg)
    acc.update(logp=logp, rollout_logp=rollout_logp, mask=mask, old_logp=old_logp,
               advantages=advantages, cp_group=cp_group, cp_layout=cp_layout)
    return acc.compute(dp_group=dp_group, cp_group=cp_group, device=logp.device)
