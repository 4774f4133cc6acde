"""RL objectives on 2 gloo ranks: TP=2 log-probs, DP=2 x micro-batch gradients, CP=2 sequence ratios.

One group of 2 ranks serves the whole module; each body sets up its own Megatron layout.
Every oracle is computed on the same rank from the full, unsplit data (TP=1 / DP=1 /
CP=1), plus megatron-core's own ``vocab_parallel_cross_entropy`` for the log-probs.
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.launch import RankGroup


@pytest.fixture(scope="module")
def group():
    with RankGroup(2, timeout_s=300) as g:
        yield g


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------- TP = 2
def body_tp2_logprobs() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_alp import parallel
    from megatron_alp.rl.logprobs import vocab_parallel_logprobs

    errs = {}
    with parallel.model_parallel(parallel.ParallelConfig(tensor_model_parallel_size=2)):
        tp = ps.get_tensor_model_parallel_group()
        r = ps.get_tensor_model_parallel_rank()
        g = torch.Generator().manual_seed(7)
        S, B, V = 5, 3, 32  # Megatron layout [s, b, v]
        full = 2 * torch.randn(S, B, V, generator=g)
        w1, w2 = torch.randn(S, B, generator=g), torch.randn(S, B, generator=g)
        lo, hi = r * V // 2, (r + 1) * V // 2

        # (1) against megatron-core's vocab_parallel_cross_entropy, no padding, T = 1
        target = torch.randint(0, V, (S, B), generator=g)
        shard = full[..., lo:hi].clone().requires_grad_()
        logp = vocab_parallel_logprobs(shard, target, tp_group=tp)
        (logp * w1).sum().backward()
        mshard = full[..., lo:hi].clone().requires_grad_()
        ce = vocab_parallel_cross_entropy(mshard.clone(), target, tp_group=tp)
        (-ce * w1).sum().backward()
        errs["vs_megatron_ce"] = _max_err(logp, -ce)
        errs["vs_megatron_ce_grad"] = _max_err(shard.grad, mshard.grad)

        # (2) against full-softmax autograd at TP=1: temperature, padded vocab, entropy
        vocab = 27  # ids 27..31 are padding rows (all on rank 1)
        target = torch.randint(0, vocab, (S, B), generator=g)
        shard = full[..., lo:hi].clone().requires_grad_()
        logp, ent = vocab_parallel_logprobs(
            shard, target, tp_group=tp, temperature=0.7, vocab_size=vocab, with_entropy=True
        )
        (logp * w1 + ent * w2).sum().backward()
        ref_in = full.double().requires_grad_()
        lsm = torch.log_softmax(ref_in[..., :vocab] / 0.7, dim=-1)
        ref_logp = lsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        ref_ent = -(lsm.exp() * lsm).sum(-1)
        (ref_logp * w1 + ref_ent * w2).sum().backward()
        # fp32 full softmax (what TP=1 computes), then fp64 relative to |logp| (fp32 rounding)
        lsm32 = torch.log_softmax(full[..., :vocab] / 0.7, dim=-1)
        errs["vs_tp1_logp"] = _max_err(logp, lsm32.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        errs["vs_tp1_entropy"] = _max_err(ent, -(lsm32.exp() * lsm32).sum(-1))
        errs["vs_fp64_logp_rel"] = float(((logp - ref_logp).abs() / ref_logp.abs().clamp(min=1)).max())
        errs["vs_fp64_entropy_rel"] = float(((ent - ref_ent).abs() / ref_ent.abs().clamp(min=1)).max())
        errs["vs_fp64_grad"] = _max_err(shard.grad, ref_in.grad[..., lo:hi])
        # the same function without a group on the full vocabulary (TP=1 path)
        one = vocab_parallel_logprobs(full, target, temperature=0.7, vocab_size=vocab)
        errs["vs_own_tp1"] = _max_err(logp, one)
    return errs


def test_tp2_logprobs_match_tp1_and_megatron(group):
    for rank, errs in enumerate(group.run(body_tp2_logprobs)):
        for name, err in errs.items():
            assert err <= 1e-6, f"rank {rank}: {name} max error {err:.3g}"


# ----------------------------------------------------------------------------- DP = 2
def _dp_problem():
    """A tiny 'model' (one weight matrix) so the check is on parameter gradients."""
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 8, 6, 5, 9
    x = torch.randn(B, T, H, generator=g)
    W = torch.randn(H, V, generator=g) * 0.5
    target = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp0 = torch.log_softmax(x @ W, -1).gather(-1, target[..., None])[..., 0]
    old = lp0 + 0.3 * torch.randn(B, T, generator=g)
    roll = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # a fully masked sequence
    roll[6, 1] = float("nan")  # a broken rollout log-prob on the second rank's half
    mask[6, 1] = True
    return x, W, target, old, roll, adv, mask


def _grad_of(cfg, rows_per_mb, dp_group, x, W0, target, old, roll, adv, mask):
    from megatron_alp.rl.logprobs import vocab_parallel_logprobs
    from megatron_alp.rl.losses import compute_policy_loss, effective_loss_mask, global_loss_counts

    W = W0.clone().requires_grad_()
    eff = [
        effective_loss_mask(cfg, mask[c], rollout_logp=roll[c], old_logp=old[c], advantages=adv[c])
        for c in rows_per_mb
    ]
    n_tok, n_seq = global_loss_counts(eff, dp_group=dp_group)
    total = 0.0
    for c in rows_per_mb:
        logp = vocab_parallel_logprobs(x[c] @ W, target[c])
        loss, _ = compute_policy_loss(
            cfg, logp, old[c], roll[c], adv[c], mask[c],
            global_token_count=n_tok, global_seq_count=n_seq,
        )
        loss.backward()  # gradient accumulation over micro-batches
        total += loss.item()
    return W.grad, total


def body_dp2_gradients(cases: list[tuple[str, str]]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_alp import parallel
    from megatron_alp.rl.losses import policy_loss_config
    from megatron_alp.rl.metrics import mismatch_metrics

    errs = {}
    with parallel.model_parallel(parallel.ParallelConfig()):
        dp = ps.get_data_parallel_group()
        assert dist.get_world_size(dp) == 2
        r = ps.get_data_parallel_rank()
        x, W, target, old, roll, adv, mask = _dp_problem()
        mine = torch.arange(4 * r, 4 * r + 4)
        for name, agg in cases:
            cfg = policy_loss_config(name, aggregation=agg)
            ref_grad, ref_loss = _grad_of(cfg, [torch.arange(8)], None, x, W, target, old, roll, adv, mask)
            for n_micro in (1, 2, 4):
                mbs = list(torch.tensor_split(mine, n_micro))
                grad, loss = _grad_of(cfg, mbs, dp, x, W, target, old, roll, adv, mask)
                dist.all_reduce(grad, group=dp)  # the DP gradient reduction is a sum
                t = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(t, group=dp)
                errs[f"{name}/{agg}/mb{n_micro}/grad"] = _max_err(grad, ref_grad)
                errs[f"{name}/{agg}/mb{n_micro}/loss"] = abs(float(t) - ref_loss)
            assert ref_grad.abs().max() > 1e-3  # the gradient is not trivially zero

        # metrics over DP=2 equal the single-process metrics of the whole batch
        cfg = policy_loss_config("token-tis")
        with torch.no_grad():
            lp = torch.log_softmax(x @ W, -1).gather(-1, target[..., None])[..., 0]
        kw = dict(cfg=cfg)
        whole = mismatch_metrics(logp=lp, rollout_logp=roll, mask=mask, old_logp=old, advantages=adv, **kw)
        part = mismatch_metrics(logp=lp[mine], rollout_logp=roll[mine], mask=mask[mine],
                                old_logp=old[mine], advantages=adv[mine], dp_group=dp, **kw)
        errs["metrics/keys"] = 0.0 if whole.keys() == part.keys() else 1.0
        for k in whole:
            errs[f"metrics/{k}"] = abs(whole[k] - part[k]) / max(1.0, abs(whole[k]))
        errs["metrics/nonfinite_seen"] = abs(part["rollout_corr/n_nonfinite_tokens"] - 1)
    return errs


DP_CASES = [
    ("grpo", "token-mean"), ("token-alp", "token-mean"), ("seq-alp", "token-mean"),
    ("seq-mis", "token-mean"), ("gspo", "seq-mean-token-mean"), ("grpo", "seq-mean-token-sum"),
    ("cum-token-alp", "seq-mean-token-mean"),
]


def test_dp2_and_microbatches_give_the_whole_batch_gradient(group):
    for rank, errs in enumerate(group.run(body_dp2_gradients, DP_CASES)):
        for name, err in errs.items():
            assert err <= 1e-6, f"rank {rank}: {name} error {err:.3g}"


# ----------------------------------------------------------------------------- CP = 2
def _cp_split(T: int, cp_rank: int, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return torch.arange(cp_rank * T // 2, (cp_rank + 1) * T // 2)
    c = T // 4  # Megatron: 2*cp chunks; rank r holds chunks r and 2*cp-1-r
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c),
                      torch.arange((3 - cp_rank) * c, (4 - cp_rank) * c)])


def body_cp2_sequence_ratios(cases: list[tuple[str, dict]]) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_alp import parallel
    from megatron_alp.rl.losses import _terms, compute_policy_loss, global_loss_counts, policy_loss_config
    from megatron_alp.rl.metrics import mismatch_metrics

    errs = {}
    with parallel.model_parallel(parallel.ParallelConfig(context_parallel_size=2)):
        cp = ps.get_context_parallel_group()
        r = ps.get_context_parallel_rank()
        g = torch.Generator().manual_seed(5)
        B, T = 4, 12
        lp = -torch.rand(B, T, generator=g) * 2
        old = lp + 0.1 * torch.randn(B, T, generator=g)
        roll = old + 0.1 * torch.randn(B, T, generator=g)
        roll[1, 9] -= 1.5  # a token that the veto catches (on one CP rank only)
        roll[3, 2] = float("nan")  # drops sequence 3 for sequence-coupled objectives
        adv = torch.randn(B, generator=g)
        mask = torch.rand(B, T, generator=g) > 0.2
        mask[0, T // 2:] = False  # under the contiguous layout, sequence 0 is empty on rank 1
        mask[3, 2] = True
        for layout in ("load-balanced", "contiguous"):
            idx = _cp_split(T, r, layout)
            for name, over in cases:
                cfg = policy_loss_config(name, **over)
                tag = f"{layout}/{name}{over or ''}"
                full_lp = lp.clone().requires_grad_()
                ref_loss, _ = compute_policy_loss(cfg, full_lp, old, roll, adv, mask)
                ref_loss.backward()
                ref_ratio = _terms(cfg, lp, old, roll, adv, mask, None, None, None, layout).log_ratio_BT
                loc_lp = lp[:, idx].clone().requires_grad_()
                loss, _ = compute_policy_loss(cfg, loc_lp, old[:, idx], roll[:, idx], adv,
                                              mask[:, idx], cp_group=cp, cp_layout=layout)
                loss.backward()
                ratio = _terms(cfg, lp[:, idx], old[:, idx], roll[:, idx], adv, mask[:, idx],
                               None, None, cp, layout).log_ratio_BT
                total = loss.detach().clone()
                torch.distributed.all_reduce(total, group=cp)
                errs[f"{tag}/ratio"] = _max_err(ratio, ref_ratio[:, idx])
                errs[f"{tag}/loss"] = abs(float(total) - float(ref_loss))
                errs[f"{tag}/grad"] = _max_err(loc_lp.grad, full_lp.grad[:, idx])
            n_ref = global_loss_counts(mask)
            n_cp = global_loss_counts(mask[:, idx], cp_group=cp)
            errs[f"{layout}/counts"] = float(n_ref != n_cp)
            cfg = policy_loss_config("seq-mis", is_veto_threshold=0.3)
            whole = mismatch_metrics(logp=lp, rollout_logp=roll, mask=mask, cfg=cfg, old_logp=old,
                                     advantages=adv)
            part = mismatch_metrics(logp=lp[:, idx], rollout_logp=roll[:, idx], mask=mask[:, idx],
                                    cfg=cfg, old_logp=old[:, idx], advantages=adv, cp_group=cp,
                                    cp_layout=layout)
            for k in whole:
                errs[f"{layout}/metrics/{k}"] = abs(whole[k] - part[k]) / max(1.0, abs(whole[k]))
    return errs


CP_CASES = [
    ("seq-alp", {}), ("seq-alp", {"aggregation": "seq-mean-token-mean"}),
    ("gspo", {"clip_low": 0.5, "clip_high": 0.5}), ("cum-token-alp", {}),
    ("cum-token-alp", {"log_ratio_max": 0.05}), ("seq-bypass", {}), ("token-alp", {}),
    ("seq-mis", {"is_veto_threshold": 0.3}), ("seq-tis", {"is_threshold": 1.05}),
]


def test_cp2_sequence_ratios_equal_the_unsplit_computation(group):
    for rank, errs in enumerate(group.run(body_cp2_sequence_ratios, CP_CASES)):
        for name, err in errs.items():
            assert err <= 1e-6, f"rank {rank}: {name} error {err:.3g}"
