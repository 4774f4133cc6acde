"""Mismatch metrics against NumPy on small batches (global reduction is in tests/distributed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_alp.rl.losses import policy_loss_config
from megatron_alp.rl.metrics import MismatchMetrics, _quantiles, mismatch_metrics


def make(seed=0, B=6, T=8):
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1, 0.5, (B, T)))
    roll = lp + g.normal(0, 0.3, (B, T))
    old = lp + g.normal(0, 0.2, (B, T))
    adv = g.normal(size=B)
    mask = g.random((B, T)) > 0.2
    mask[2] = False
    return lp, roll, old, adv, mask


def np_metrics(lp, roll, old, adv, mask, cfg=None):
    d = (lp - roll)[mask]
    rho = np.exp(d)
    rows = [b for b in range(lp.shape[0]) if mask[b].any()]
    sd = np.array([(lp - roll)[b][mask[b]].sum() for b in rows])
    tr = np.array([-lp[b][mask[b]].mean() for b in rows])
    ro = np.array([-roll[b][mask[b]].mean() for b in rows])
    out = {
        "rollout_corr/kl": np.mean(-d),
        "rollout_corr/k3_kl": np.mean(rho - 1 - d),
        "rollout_corr/chi2_token": np.mean(rho**2) - 1,
        "rollout_corr/chi2_seq": np.mean(np.exp(2 * sd)) - 1,
        "rollout_corr/ess_token": np.mean(rho) ** 2 / np.mean(rho**2),
        "rollout_corr/ess_seq": np.mean(np.exp(sd)) ** 2 / np.mean(np.exp(2 * sd)),
        "rollout_corr/abs_logp_diff_mean": np.abs(d).mean(),
        "rollout_corr/abs_logp_diff_max": np.abs(d).max(),
        "rollout_corr/token_mult_prob_error": np.exp(np.abs(d)).mean(),
        "rollout_corr/training_log_ppl": tr.mean(),
        "rollout_corr/rollout_log_ppl": ro.mean(),
        "rollout_corr/log_ppl_diff": (tr - ro).mean(),
        "rollout_corr/training_ppl": np.exp(tr).mean(),
        "rollout_corr/n_tokens": mask.sum(),
        "rollout_corr/n_seqs": len(rows),
    }
    if cfg == "seq-mis":  # token ratio vs old; sequence-level w = prod old/roll masked to [1/2, 2]
        A = np.broadcast_to(adv[:, None], lp.shape)[mask]
        r = np.exp((lp - old)[mask])
        for name, q in (("q01", .01), ("q25", .25), ("q50", .5), ("q99", .99), ("q999", .999)):
            out[f"is_ratio/{name}"] = np.quantile(r, q)
        out["is_ratio/max"] = r.max()
        out["policy/clip_frac_lower"] = np.mean((A < 0) & (r < 0.8))
        out["policy/clip_frac_upper"] = np.mean((A > 0) & (r > 1.28))
        out["policy/clip_frac_dual"] = np.mean((A < 0) & (r > 10))
        ws = {b: np.exp((old - roll)[b][mask[b]].sum()) for b in rows}
        w_tok = np.concatenate([np.full(mask[b].sum(), ws[b] if 0.5 <= ws[b] <= 2 else 0.0) for b in rows])
        out["rollout_corr/is_weight_mean"] = w_tok.mean()
        out["rollout_corr/is_weight_max"] = w_tok.max()
        out["rollout_corr/is_masked_fraction"] = np.mean(w_tok == 0)
        out["rollout_corr/is_truncated_fraction"] = np.mean(
            np.concatenate([np.full(mask[b].sum(), ws[b] > 2) for b in rows]))
        out["rollout_corr/is_seq_masked_fraction"] = np.mean([not (0.5 <= ws[b] <= 2) for b in rows])
    return out


def test_quantiles_match_numpy():
    x = torch.randn(1001, dtype=torch.float64).exp()
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999]
    np.testing.assert_allclose(_quantiles(x, qs), np.quantile(x.numpy(), qs), rtol=1e-12)
    assert _quantiles(torch.tensor([3.0]), [0.01, 0.999]) == [3.0, 3.0]


@pytest.mark.parametrize("cfg_name", [None, "seq-mis"])
def test_metrics_match_numpy(cfg_name):
    lp, roll, old, adv, mask = make()
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    cfg = policy_loss_config(cfg_name) if cfg_name else None
    got = mismatch_metrics(logp=f(lp), rollout_logp=f(roll), mask=torch.tensor(mask), cfg=cfg,
                           old_logp=f(old), advantages=f(adv))
    want = np_metrics(lp, roll, old, adv, mask, cfg_name)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    if cfg_name:
        assert 0 < got["rollout_corr/is_masked_fraction"] < 1  # the batch exercises MIS


def test_microbatch_accumulation_equals_one_call():
    lp, roll, old, adv, mask = make(seed=2, B=8)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    cfg = policy_loss_config("token-tis")
    whole = mismatch_metrics(logp=f(lp), rollout_logp=f(roll), mask=torch.tensor(mask), cfg=cfg,
                             old_logp=f(old), advantages=f(adv))
    acc = MismatchMetrics(cfg)
    for c in np.array_split(np.arange(8), 3):
        acc.update(logp=f(lp[c]), rollout_logp=f(roll[c]), mask=torch.tensor(mask[c]),
                   old_logp=f(old[c]), advantages=f(adv[c]))
    parts = acc.compute()
    assert whole.keys() == parts.keys()
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_nonfinite_values_are_counted_and_excluded():
    lp, roll, old, adv, mask = make(seed=4)
    mask[0, :] = True
    mask[1, :] = True
    roll_bad = roll.copy()
    roll_bad[0, 3] = np.nan
    roll_bad[1, 0] = -np.inf
    roll_bad[2, 0] = np.nan  # fully masked row: not counted
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    got = mismatch_metrics(logp=f(lp), rollout_logp=f(roll_bad), mask=torch.tensor(mask))
    assert got["rollout_corr/n_nonfinite_tokens"] == 2
    assert got["rollout_corr/n_nonfinite_seqs"] == 2
    keep = mask.copy()
    keep[[0, 1]] = False
    want = np_metrics(lp, roll, old, adv, keep)
    assert all(np.isfinite(v) for v in got.values())
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rollout_logp has shape \(2, 4\)"):
        mismatch_metrics(logp=z, rollout_logp=torch.zeros(2, 4), mask=z)
    with pytest.raises(ValueError, match="old_logp is required"):
        mismatch_metrics(logp=z, rollout_logp=z, mask=z, cfg=policy_loss_config("grpo"),
                         advantages=torch.zeros(2))


class _HostCopies(torch.overrides.TorchFunctionMode):
    """Records the calls that copy a tensor to the host (a GPU synchronisation each)."""

    NAMES = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg_name", [None, "seq-mis"])
def test_update_makes_no_host_copies(cfg_name):
    """Issue 13.5: update() did four .cpu() per micro-batch (a GPU sync each); values now
    stay on their device until compute() and the numbers are unchanged."""
    lp, roll, old, adv, mask = make(seed=4, B=6)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    cfg = policy_loss_config(cfg_name) if cfg_name else None
    acc = MismatchMetrics(cfg)
    spy = _HostCopies()
    with spy:
        for c in np.array_split(np.arange(6), 2):
            acc.update(logp=f(lp[c]), rollout_logp=f(roll[c]), mask=torch.tensor(mask[c]),
                       old_logp=f(old[c]), advantages=f(adv[c]))
    assert spy.calls == []
    got = acc.compute()
    want = np_metrics(lp, roll, old, adv, mask, cfg_name)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
