"""Policy losses against an independent NumPy reference (loss value and d loss / d logp).

The reference below is written from the formulas in docs/objectives.md with plain loops in
float64 and hand-derived gradients; it imports nothing from megatron_alp. The preset table
is hand-written from shared/REFERENCE.md, so a preset that drifts fails here too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_alp.rl import losses as L
from megatron_alp.rl.losses import (
    PolicyLossConfig,
    available_policy_losses,
    compute_policy_loss,
    effective_loss_mask,
    global_loss_counts,
    policy_loss_config,
    register_policy_loss,
)

# ----------------------------------------------------------------------------- presets table
_G = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, log_ratio_min=-20.0, log_ratio_max=20.0)
_A = dict(clip_low=0.5, clip_high=3.0, dual_clip_c=10.0, log_ratio_min=-20.0, log_ratio_max=20.0)
_BASE = dict(is_correction="none", is_level="token", is_threshold=2.0, is_lower_threshold=None,
             is_veto_threshold=None, aggregation="token-mean", kl_coef=0.0, kl_estimator="k3",
             entropy_coef=0.0, perturbation="off", is_rejected_tokens="zero-weight")
EXPECTED = {
    "grpo": {**_BASE, **_G, "ratio_level": "token", "denominator": "old"},
    "gspo": {**_BASE, "ratio_level": "geo-sequence", "denominator": "old", "clip_low": 3e-4,
             "clip_high": 4e-4, "dual_clip_c": None, "log_ratio_min": None, "log_ratio_max": 10.0,
             "aggregation": "seq-mean-token-mean"},
    "seq-bypass": {**_BASE, **_A, "ratio_level": "sequence", "denominator": "rollout",
                   "log_ratio_min": None, "log_ratio_max": 10.0},
    # The IS baselines follow the reference's single-turn code: rejected tokens leave the mask.
    "token-tis": {**_BASE, **_G, "ratio_level": "token", "denominator": "old", "is_correction": "tis",
                  "is_rejected_tokens": "drop"},
    "seq-tis": {**_BASE, **_G, "ratio_level": "token", "denominator": "old", "is_correction": "tis",
                "is_level": "sequence", "is_rejected_tokens": "drop"},
    "token-mis": {**_BASE, **_G, "ratio_level": "token", "denominator": "old", "is_correction": "mis",
                  "is_rejected_tokens": "drop"},
    "seq-mis": {**_BASE, **_G, "ratio_level": "token", "denominator": "old", "is_correction": "mis",
                "is_level": "sequence", "is_rejected_tokens": "drop"},
    "token-alp": {**_BASE, **_A, "ratio_level": "token", "denominator": "rollout", "perturbation": "alp"},
    "seq-alp": {**_BASE, **_A, "ratio_level": "sequence", "denominator": "rollout", "perturbation": "alp"},
    "cum-token-alp": {**_BASE, **_A, "ratio_level": "cum-token", "denominator": "rollout",
                      "perturbation": "alp"},
}


def test_presets_match_reference_table():
    assert set(available_policy_losses()) >= set(EXPECTED)
    for name, want in EXPECTED.items():
        got = dataclasses.asdict(policy_loss_config(name))
        assert got == want, name
    assert not policy_loss_config("token-alp").needs_old_logp
    assert not policy_loss_config("seq-bypass").needs_old_logp
    assert policy_loss_config("seq-mis").needs_old_logp


# ----------------------------------------------------------------------------- reference
def ref_loss(p, lp, old, roll, adv, mask, ref=None, ent=None, n_tok=None, n_seq=None):
    """Float64 loss and d loss / d lp for one batch [B, T]; p is a plain dict of settings."""
    B, T = lp.shape
    uses_roll = p["denominator"] == "rollout" or p["is_correction"] != "none"
    uses_old = p["denominator"] == "old" or p["is_correction"] != "none"
    coupled = p["ratio_level"] != "token" or (
        p["is_correction"] != "none" and (p["is_level"] == "sequence" or p["is_veto_threshold"])
    )
    valid = np.zeros((B, T), bool)
    for b in range(B):
        bad_seq = False
        for t in range(T):
            if not mask[b, t]:
                continue
            ok = math.isfinite(adv[b])
            ok &= (not uses_roll) or math.isfinite(roll[b, t])
            ok &= (not uses_old) or math.isfinite(old[b, t])
            ok &= p["kl_coef"] == 0 or math.isfinite(ref[b, t])
            valid[b, t] = ok
            bad_seq |= not ok
        if bad_seq and coupled:
            valid[b, :] = False
    # IS weights on the tokens valid so far; "drop" then removes the rejected (w = 0) ones
    # from everything: lengths, counts, the ratio's sequence sums, KL and entropy terms.
    W = np.ones((B, T))
    if p["is_correction"] != "none":
        for b in range(B):
            ts = [t for t in range(T) if valid[b, t]]
            x = {t: old[b, t] - roll[b, t] for t in ts}
            seq_x = sum(x.values())
            for t in ts:
                lw = seq_x if p["is_level"] == "sequence" else x[t]
                wt = math.exp(min(max(lw, -20.0), 20.0))
                if p["is_correction"] == "tis":
                    wt = min(wt, p["is_threshold"])
                else:
                    lo = p["is_lower_threshold"]
                    lo = 1.0 / p["is_threshold"] if lo is None else lo
                    wt = wt if lo <= wt <= p["is_threshold"] else 0.0
                W[b, t] = wt
            if p["is_veto_threshold"] and any(x[t] < math.log(p["is_veto_threshold"]) for t in ts):
                W[b, :] = 0.0
        if p["is_rejected_tokens"] == "drop":
            valid &= W != 0.0
    lengths = valid.sum(1)
    N_tok = n_tok if n_tok is not None else lengths.sum()
    N_seq = n_seq if n_seq is not None else (lengths > 0).sum()
    loss, grad = 0.0, np.zeros((B, T))
    for b in range(B):
        ts = [t for t in range(T) if valid[b, t]]
        if not ts:
            continue
        den = roll if p["denominator"] == "rollout" else old
        d = {t: lp[b, t] - den[b, t] for t in ts}
        w = {t: W[b, t] for t in ts}
        A = adv[b]
        running = 0.0
        for t in ts:
            running += d[t]
            lr = {"token": d[t], "sequence": sum(d.values()),
                  "geo-sequence": sum(d.values()) / len(ts), "cum-token": running}[p["ratio_level"]]
            lo_c = -math.inf if p["log_ratio_min"] is None else p["log_ratio_min"]
            clamped = lr < lo_c or lr > p["log_ratio_max"]
            r = math.exp(min(max(lr, lo_c), p["log_ratio_max"]))
            lo_r, hi_r = 1 - p["clip_low"], 1 + p["clip_high"]
            u1, u2 = -A * r, -A * min(max(r, lo_r), hi_r)
            pg = max(u1, u2)
            g = -A if (u1 > u2 or lo_r <= r <= hi_r) else 0.0
            if p["dual_clip_c"] is not None and A < 0 and pg > -A * p["dual_clip_c"]:
                pg, g = -A * p["dual_clip_c"], 0.0
            pg, g = pg * w[t], g * w[t]
            dl = g * r * (0.0 if clamped else 1.0)
            lt = pg
            if p["kl_coef"] > 0:
                if p["kl_estimator"] == "k1":
                    kl, dkl = lp[b, t] - ref[b, t], 1.0
                else:
                    xr = ref[b, t] - lp[b, t]
                    xc = min(max(xr, -20.0), 20.0)
                    kl = math.exp(xc) - xc - 1
                    dkl = -(math.exp(xc) - 1) * (0.0 if xc != xr else 1.0)
                    if kl > 10.0:
                        kl, dkl = 10.0, 0.0
                lt += p["kl_coef"] * kl
                dl += p["kl_coef"] * dkl
            if p["entropy_coef"] > 0:
                lt -= p["entropy_coef"] * ent[b, t]
            if p["aggregation"] == "token-mean":
                s = 1.0 / max(N_tok, 1)
            elif p["aggregation"] == "seq-mean-token-sum":
                s = 1.0 / max(N_seq, 1)
            else:
                s = 1.0 / (len(ts) * max(N_seq, 1))
            loss += lt * s
            grad[b, t] = dl * s
    return loss, grad


# ----------------------------------------------------------------------------- batch
def make_batch(seed=0, B=6, T=5):
    """Rows: 0 normal A>0; 1 A<0 with big ratio (dual clip); 2 A=0; 3 fully masked;
    4 extreme log-ratios (clamp); 5 partially masked, A<0, veto-able token."""
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1.0, 0.5, (B, T)))
    d = g.normal(0, 0.1, (B, T))
    d[1] = 3.0  # token ratio e^3 = 20 > c
    d[4] = -30.0  # beyond the clamp
    d[4, 0] = 30.0
    old = lp - d
    x = g.normal(0, 0.2, (B, T))  # log pi_old - log pi_rollout
    x[0] = 0.9  # token w = 2.46 > T: truncated / masked
    x[5, 2] = -1.0  # below log(0.5): vetoes row 5 when veto=0.5
    roll = old - x
    adv = np.array([1.0, -1.5, 0.0, 0.7, 2.0, -0.5])
    mask = np.ones((B, T), bool)
    mask[3] = False
    mask[5, 1] = False
    ref = lp + g.normal(0, 0.3, (B, T))
    ref[0, 0] = lp[0, 0] + 4.0  # k3 above its cap of 10
    ent = np.abs(g.normal(1, 0.5, (B, T)))
    return lp, old, roll, adv, mask, ref, ent


def run_impl(cfg, lp, old, roll, adv, mask, ref=None, ent=None, **kw):
    lp_t = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    f = lambda a: None if a is None else torch.tensor(a, dtype=torch.float32)
    loss, metrics = compute_policy_loss(
        cfg, lp_t, f(old), f(roll), f(adv), torch.tensor(mask), ref_logp=f(ref), entropy=f(ent), **kw
    )
    loss.backward()
    return loss.item(), lp_t.grad.double().numpy(), metrics


VARIANTS = [(name, {}) for name in EXPECTED] + [
    ("grpo", {"kl_coef": 0.1, "kl_estimator": "k1"}),
    ("grpo", {"kl_coef": 0.1, "kl_estimator": "k3", "entropy_coef": 0.01}),
    ("grpo", {"aggregation": "seq-mean-token-sum"}),
    ("seq-alp", {"aggregation": "seq-mean-token-mean"}),
    ("token-alp", {"dual_clip_c": None, "log_ratio_min": None, "log_ratio_max": 5.0}),
    ("token-mis", {"is_lower_threshold": 0.0, "is_veto_threshold": 0.5}),
    ("token-mis", {"is_veto_threshold": 0.5, "is_rejected_tokens": "zero-weight"}),
    ("token-mis", {"kl_coef": 0.1, "entropy_coef": 0.01}),
    ("token-mis", {"ratio_level": "sequence"}),  # drop: rejected tokens leave the sequence sum
    ("token-mis", {"aggregation": "seq-mean-token-mean"}),
    ("seq-mis", {"is_rejected_tokens": "zero-weight"}),
    ("seq-mis", {"is_veto_threshold": 0.5, "aggregation": "seq-mean-token-sum"}),
    ("seq-tis", {"is_veto_threshold": 0.5, "is_threshold": 5.0}),
    ("seq-tis", {"is_veto_threshold": 0.5, "is_rejected_tokens": "zero-weight"}),
    ("gspo", {"denominator": "rollout", "aggregation": "token-mean"}),
    ("gspo", {"clip_low": 0.5, "clip_high": 3.0}),  # unclipped: the 1/L of row 5 matters
    ("cum-token-alp", {"denominator": "old", "log_ratio_max": 2.0}),
]


@pytest.mark.parametrize("name,over", VARIANTS, ids=[f"{n}{'+' if o else ''}{i}" for i, (n, o) in enumerate(VARIANTS)])
def test_against_numpy_reference(name, over):
    lp, old, roll, adv, mask, ref, ent = make_batch()
    p = {**EXPECTED[name], **over}
    cfg = policy_loss_config(name, **over)
    want_loss, want_grad = ref_loss(p, lp, old, roll, adv, mask, ref, ent)
    loss, grad, _ = run_impl(cfg, lp, old, roll, adv, mask, ref, ent)
    assert math.isfinite(loss)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6)
    assert np.all(grad[3] == 0) and np.all(grad[~mask] == 0)


def test_edge_cases_are_exercised():
    """The batch really hits the dual clip, the clamp, and A = 0 (else the test is weak)."""
    lp, old, roll, adv, mask, ref, ent = make_batch()
    _, grad_alp = ref_loss(EXPECTED["token-alp"], lp, old, roll, adv, mask)
    _, grad_grpo = ref_loss(EXPECTED["grpo"], lp, old, roll, adv, mask)
    assert np.all(grad_grpo[1] == 0)  # dual clip: A<0 and r = e^3 > c... capped, no gradient
    assert np.all(grad_grpo[2] == 0)  # A = 0
    assert np.all(grad_grpo[4] == 0)  # clamped log-ratios
    _, _, m = run_impl(policy_loss_config("grpo"), lp, old, roll, adv, mask)
    assert m["policy/n_tokens"].item() == mask.sum()


def test_token_mean_single_microbatch_is_masked_mean():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(4, 7, generator=g)
    adv = torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.3
    # ratio 1 everywhere: the per-token loss is -A
    loss, _ = compute_policy_loss(policy_loss_config("grpo"), lp, lp.clone(), None, adv, mask)
    torch.testing.assert_close(loss, (-adv)[mask].mean())


def test_entropy_bonus_gradient_flows_into_the_entropy():
    lp = torch.zeros(2, 3)
    ent = torch.rand(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    cfg = policy_loss_config("grpo", entropy_coef=0.5)
    loss, m = compute_policy_loss(cfg, lp, lp, None, torch.zeros(2), mask, entropy=ent)
    loss.backward()
    torch.testing.assert_close(ent.grad, -0.5 * mask.float() / 3)
    torch.testing.assert_close(m["policy/entropy"], ent.detach()[mask].mean())


@pytest.mark.parametrize("name", ["grpo", "seq-alp", "gspo", "seq-mis", "token-mis", "cum-token-alp"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_microbatches_give_the_whole_batch_gradient(name, agg):
    lp, old, roll, adv, mask, _, _ = make_batch(seed=3, B=8, T=6)
    adv = np.resize(adv, 8)
    cfg = policy_loss_config(name, aggregation=agg)
    whole_loss, whole_grad, _ = run_impl(cfg, lp, old, roll, adv, mask)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    for k in (1, 2, 4):
        chunks = np.array_split(np.arange(8), k)
        # The documented recipe: counts from the effective masks (for the MIS presets these
        # lack the rejected tokens, so the raw masks would give the wrong denominators).
        n_tok, n_seq = global_loss_counts([
            effective_loss_mask(cfg, torch.tensor(mask[c]), rollout_logp=f(roll[c]),
                                old_logp=f(old[c]), advantages=f(adv[c]))
            for c in chunks
        ])
        total, grad = 0.0, np.zeros_like(whole_grad)
        for c in chunks:
            l, g, _ = run_impl(cfg, lp[c], old[c], roll[c], adv[c], mask[c],
                               global_token_count=n_tok, global_seq_count=n_seq)
            total += l
            grad[c] = g
        np.testing.assert_allclose(total, whole_loss, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad, whole_grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("name", ["token-alp", "seq-alp", "token-tis", "seq-mis", "grpo"])
def test_nonfinite_inputs_are_masked_counted_and_never_reach_the_gradient(name):
    lp, old, roll, adv, mask, _, _ = make_batch(seed=5)
    cfg = policy_loss_config(name)
    roll_bad, old_bad, adv_bad, lp_bad = roll.copy(), old.copy(), adv.copy(), lp.copy()
    roll_bad[0, 1] = np.nan
    roll_bad[4, 2] = -np.inf
    old_bad[5, 3] = np.inf
    roll_bad[3, 0] = np.nan  # under a zero mask: ignored, not counted
    adv_bad[2] = np.nan
    lp_bad[3, :] = np.nan  # trainer garbage on padding must not leak either
    loss, grad, m = run_impl(cfg, lp_bad, old_bad, roll_bad, adv_bad, mask)
    assert math.isfinite(loss) and np.all(np.isfinite(grad))
    # the same numbers as the NumPy reference, whose validity rules are written independently
    p = EXPECTED[name]
    want_loss, want_grad = ref_loss(p, lp, old_bad, roll_bad, adv_bad, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.nan_to_num(grad), want_grad, rtol=2e-5, atol=1e-6)
    uses_roll = p["denominator"] == "rollout" or p["is_correction"] != "none"
    uses_old = p["denominator"] == "old" or p["is_correction"] != "none"
    expected_bad = 5 + (2 if uses_roll else 0) + (1 if uses_old else 0)  # row 2 (A=nan) has 5
    assert m["policy/n_nonfinite_tokens"].item() == expected_bad
    bad_rows = 1 + 2 * uses_roll + uses_old  # row 2 (A), rows 0 and 4 (rollout), row 5 (old)
    assert m["policy/n_dropped_seqs"].item() == (bad_rows if cfg.sequence_coupled else 0)
    eff = effective_loss_mask(cfg, torch.tensor(mask), rollout_logp=torch.tensor(roll_bad),
                              old_logp=torch.tensor(old_bad), advantages=torch.tensor(adv_bad))
    assert int(eff.sum()) == int(m["policy/n_tokens"].item())


def test_dropped_sequences_counted():
    lp, old, roll, adv, mask, _, _ = make_batch(seed=5)
    roll[0, 1] = np.nan
    roll[4, 2] = np.nan
    _, _, m = run_impl(policy_loss_config("seq-alp"), lp, old, roll, adv, mask)
    assert m["policy/n_dropped_seqs"].item() == 2
    assert m["policy/n_tokens"].item() == mask.sum() - 10


# ----------------------------------------------------------------------------- rejected tokens
@pytest.mark.parametrize("name,over", [("token-mis", {}), ("seq-mis", {}),
                                       ("token-tis", {"is_veto_threshold": 0.5})])
def test_drop_rescales_the_gradient_by_n_over_n_kept(name, over):
    """token-mean: "drop" divides by the kept tokens, "zero-weight" by all valid ones, and
    nothing else differs (no KL / entropy term): grad_drop = grad_zero * N / N_kept."""
    lp, old, roll, adv, mask, _, _ = make_batch(seed=11, B=8, T=6)
    adv = np.resize(adv, 8)
    old = old.copy()
    old[6, :] = roll[6, :] + 1.5  # a sequence far outside [1/2, 2]: rejected by both MIS levels
    old[2, 3] = roll[2, 3] - 1.0  # one token below 1/2 (token MIS) and below the 0.5 veto
    drop = policy_loss_config(name, **over)
    zero = dataclasses.replace(drop, is_rejected_tokens="zero-weight")
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    eff = effective_loss_mask(drop, torch.tensor(mask), rollout_logp=f(roll), old_logp=f(old),
                              advantages=f(adv))
    n, n_kept = int(mask.sum()), int(eff.sum())
    assert 0 < n_kept < n - 5  # the batch really rejects tokens
    assert eff.sum() == (eff & torch.tensor(mask)).sum()
    assert not eff[2 if drop.is_veto_threshold else 6].any()  # vetoed / MIS-rejected sequence
    assert global_loss_counts(eff) == (n_kept, int((eff.sum(-1) > 0).sum()))
    loss_d, grad_d, m_d = run_impl(drop, lp, old, roll, adv, mask)
    loss_z, grad_z, m_z = run_impl(zero, lp, old, roll, adv, mask)
    assert m_d["policy/n_tokens"].item() == n_kept and m_z["policy/n_tokens"].item() == n
    assert m_d["policy/n_rejected_tokens"].item() == n - n_kept
    assert m_z["policy/n_rejected_tokens"].item() == 0
    assert np.abs(grad_z).max() > 1e-3
    np.testing.assert_allclose(grad_d, grad_z * n / n_kept, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loss_d, loss_z * n / n_kept, rtol=1e-5, atol=1e-8)
    # Both against the float64 NumPy oracle.
    for cfg, loss, grad in ((drop, loss_d, grad_d), (zero, loss_z, grad_z)):
        want_loss, want_grad = ref_loss(dataclasses.asdict(cfg), lp, old, roll, adv, mask)
        np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7)


def test_rejected_tokens_field_is_validated():
    with pytest.raises(ValueError, match=r"is_rejected_tokens='mask' is not one of \('zero-weight', 'drop'\)"):
        PolicyLossConfig(is_rejected_tokens="mask")


# ----------------------------------------------------------------------------- user errors
def test_shape_mismatch_names_the_tensors():
    cfg = policy_loss_config("grpo")
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 4\).*logp has \(2, 3\)"):
        compute_policy_loss(cfg, lp, torch.zeros(2, 4), None, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        compute_policy_loss(cfg, lp, lp, None, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        compute_policy_loss(cfg, lp, lp, None, torch.zeros(2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"logp must be \[batch, seq\]"):
        compute_policy_loss(cfg, torch.zeros(6), torch.zeros(6), None, torch.zeros(6), torch.ones(6))


def test_missing_inputs():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logp is required"):
        compute_policy_loss(policy_loss_config("grpo"), lp, None, lp, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="rollout_logp is required"):
        compute_policy_loss(policy_loss_config("seq-alp"), lp, None, None, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="ref_logp is required"):
        compute_policy_loss(policy_loss_config("grpo", kl_coef=0.1), lp, lp, None, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="entropy is required"):
        compute_policy_loss(policy_loss_config("grpo", entropy_coef=0.1), lp, lp, None, torch.zeros(2), torch.ones(2, 3))


def test_registry_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'.*'grpo'.*'seq-alp'"):
        policy_loss_config("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("grpo")(lambda: PolicyLossConfig())
    with pytest.raises(ValueError, match=r"unknown PolicyLossConfig field\(s\) \['clip'\]"):
        policy_loss_config("grpo", clip=0.1)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ratio_level": "seq"}, r"ratio_level='seq' is not one of \('token'"),
        ({"aggregation": "mean"}, "aggregation='mean'"),
        ({"clip_low": 1.0}, r"clip_low=1.0; expected a number in \[0, 1\)"),
        ({"dual_clip_c": 1.0}, "dual_clip_c=1.0"),
        ({"log_ratio_max": 100.0}, "log_ratio_max=100.0"),
        ({"log_ratio_min": 30.0}, "log_ratio_min=30.0"),
        ({"is_threshold": float("nan")}, "is_threshold=nan"),
        ({"is_lower_threshold": 3.0}, "is_lower_threshold=3.0"),
        ({"kl_coef": -1.0}, "kl_coef=-1.0"),
        ({"is_correction": "tis", "denominator": "rollout"}, "needs denominator='old'"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_config_is_frozen_and_keyword_only():
    cfg = PolicyLossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_low = 0.1
    with pytest.raises(TypeError):
        PolicyLossConfig("token")  # noqa


def test_module_has_no_leftover_names():
    assert set(L.__all__) <= set(dir(L))
