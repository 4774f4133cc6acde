"""Token log-probs and entropy from vocab-parallel (TP-sharded) logits, without gathering the vocabulary.

Megatron's output layer leaves logits sharded over the tensor-parallel group along the
vocabulary: rank ``r`` of ``TP`` holds vocab ids ``[r * Vp, (r + 1) * Vp)`` where ``Vp`` is
the local size. Like megatron-core's ``vocab_parallel_cross_entropy``, the log-softmax is
assembled from three all-reduces of ``[...]``-shaped tensors (max, sum of exp, target
logit), never of ``[..., V]``; the entropy costs one more all-reduce.

Numerics follow the rollout engine so the importance ratio compares like with like: logits
are upcast to fp32 (row chunk by row chunk: never a whole fp32 copy of ``[b, s, V / TP]``)
and divided by the sampling temperature before the log-softmax (vLLM's
sampler does ``logits.float().div_(temperature)``, and its ``processed_logprobs`` are taken
after that), and the rows Megatron adds to pad the vocabulary to a multiple of
``128 * TP`` are excluded from the softmax (they hold real but meaningless weights).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_alp.rl.collectives import group_rank, group_size

__all__ = ["CHUNK_BYTES", "check_token_ids", "vocab_parallel_logprobs"]


CHUNK_BYTES = 128 << 20
"""fp32 working set per row chunk: the log-softmax never holds more than a few chunks of
fp32 ``[rows, V / TP]`` (instead of several fp32 copies of the whole ``[b, s, V / TP]``)."""


def _chunk_rows(vocab_shard: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab_shard))


def _valid_columns(vocab_start: int, vocab_shard: int, vocab_size: int | None) -> int:
    """Columns of this shard below the true vocabulary size (the padding rows come last)."""
    if vocab_size is None:
        return vocab_shard
    return min(max(vocab_size - vocab_start, 0), vocab_shard)


def _scaled_chunk(x: torch.Tensor, temperature: float, n_valid: int, z_max: torch.Tensor) -> torch.Tensor:
    """fp32 ``x / T - max`` of a row chunk (a fresh tensor), padded columns at -inf."""
    z = x.to(torch.float32, copy=True)  # never touch the caller's tensor
    if temperature != 1.0:
        z.div_(temperature)
    if n_valid < z.shape[-1]:
        z[:, n_valid:] = float("-inf")
    return z.sub_(z_max.unsqueeze(-1))


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(target) and entropy from a vocab shard; backward needs no communication.

    Both outputs are replicated over the TP group, so every rank receives the same output
    gradients and can form the gradient of its own shard locally:
    ``d logp / d z_j = 1[j = target] - p_j`` and ``d H / d z_j = -p_j (log p_j + H)``, both
    times ``1 / temperature`` for the original logits.

    Memory: the logits stay in their own dtype (bf16 from the model); both passes walk
    over row chunks of ``CHUNK_BYTES`` in fp32, and the backward recomputes the
    probabilities from the saved logits instead of keeping an fp32 copy. Per element the
    arithmetic is the one of an fp32 pass over the whole tensor (upcast, divide by T,
    subtract the max, exp, sums over the vocabulary), so the results do not depend on the
    chunking. Peak extra memory: the gradient (the logits' dtype) plus a few fp32 chunks.
    """

    @staticmethod
    def forward(ctx, logits, target, temperature, vocab_size, tp_group, with_entropy, chunk_bytes):
        Vp = logits.shape[-1]
        vocab_start = group_rank(tp_group) * Vp
        n_valid = _valid_columns(vocab_start, Vp, vocab_size)
        x = logits.reshape(-1, Vp)
        tgt = target.reshape(-1)
        N = x.shape[0]
        # The max of fl(x / T) is fl(max(x) / T) (the upcast is exact, rounding is
        # monotonic): taken on the logits as they are, padding columns left out.
        if n_valid > 0:
            z_max = x[:, :n_valid].amax(dim=-1).float()
            if temperature != 1.0:
                z_max = z_max / temperature
        else:
            z_max = torch.full((N,), float("-inf"), dtype=torch.float32, device=x.device)
        if group_size(tp_group) > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)

        in_shard = (tgt >= vocab_start) & (tgt < vocab_start + Vp)
        local_idx = torch.where(in_shard, tgt - vocab_start, torch.zeros_like(tgt))
        stacked = torch.zeros((3 if with_entropy else 2, N), dtype=torch.float32, device=x.device)
        rows = _chunk_rows(Vp, chunk_bytes)
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            z = _scaled_chunk(x[r0:r1], temperature, n_valid, z_max[r0:r1])
            target_z = torch.gather(z, -1, local_idx[r0:r1].unsqueeze(-1)).squeeze(-1)
            stacked[0, r0:r1] = torch.where(in_shard[r0:r1], target_z, torch.zeros_like(target_z))
            exp_z = torch.exp(z)  # 0 at padded entries
            stacked[1, r0:r1] = exp_z.sum(dim=-1)
            if with_entropy:
                # sum_j e^{z_j} z_j; padded entries are 0 * -inf, so zero them explicitly
                if n_valid < Vp:
                    z[:, n_valid:] = 0.0
                stacked[2, r0:r1] = z.mul_(exp_z).sum(dim=-1)
            del z, exp_z
        if group_size(tp_group) > 1:
            # one all-reduce for all [...]-shaped partial sums
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp = stacked[1]
        log_z = torch.log(sum_exp)
        logp = stacked[0] - log_z
        if with_entropy:
            entropy = log_z - stacked[2] / sum_exp
        else:
            entropy = torch.zeros_like(logp)
        ctx.save_for_backward(logits, z_max, sum_exp, local_idx, in_shard, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.n_valid = n_valid
        ctx.rows = rows
        shape = target.shape
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, z_max, sum_exp, local_idx, in_shard, entropy = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(x)  # the logits' dtype: no fp32 [b, s, V / TP] tensor
        g_lp = None if grad_logp is None else grad_logp.reshape(-1)
        g_h = grad_entropy.reshape(-1) if ctx.with_entropy and grad_entropy is not None else None
        for r0 in range(0, x.shape[0], ctx.rows):
            r1 = min(r0 + ctx.rows, x.shape[0])
            z = _scaled_chunk(x[r0:r1], ctx.temperature, ctx.n_valid, z_max[r0:r1])
            probs = torch.exp(z).div_(sum_exp[r0:r1].unsqueeze(-1))
            del z
            if g_lp is None:
                g = torch.zeros_like(probs)
            else:
                g = -probs * g_lp[r0:r1].unsqueeze(-1)
                onehot_val = torch.where(in_shard[r0:r1], g_lp[r0:r1], torch.zeros_like(g_lp[r0:r1]))
                g.scatter_add_(-1, local_idx[r0:r1].unsqueeze(-1), onehot_val.unsqueeze(-1))
            if g_h is not None:
                # -p (log p + H); p == 0 (padding or underflow) contributes nothing, and log(0)
                # must not turn that 0 into NaN
                safe = probs > 0
                log_p = torch.log(torch.where(safe, probs, torch.ones_like(probs)))
                term = torch.where(safe, probs * (log_p + entropy[r0:r1].unsqueeze(-1)),
                                   torch.zeros_like(probs))
                del log_p
                g.sub_(term * g_h[r0:r1].unsqueeze(-1))
                del term, safe
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[r0:r1] = g
            del g, probs
        return grad.view(logits.shape), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    check_target: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (fp32, shape of ``target``) of ``target`` under ``softmax(logits / temperature)``.

    ``logits`` is this rank's vocab shard ``[..., V / TP]`` (Megatron's vocab-parallel layout;
    with ``tp_group=None`` it is the whole vocabulary and nothing is communicated; pass
    ``parallel_state.get_tensor_model_parallel_group()`` under TP). ``vocab_size`` is the
    true vocabulary size: ids at or above it (Megatron's padding rows) get probability 0,
    and targets must lie in ``[0, vocab_size)`` (``ValueError`` otherwise; the check costs
    one host sync on an accelerator: ``check_target=False`` skips it where the caller has
    checked the ids, e.g. on the host before the micro-batch loop, see
    :func:`check_token_ids`). With ``with_entropy`` it also returns the entropy of the same
    tempered distribution. Differentiable in ``logits`` on every TP rank (custom backward,
    exact under TP, no communication); the gradient has the dtype of ``logits``.

    ``logits`` may be bf16 (the model's output without Float16Module's fp32 upcast): the
    arithmetic is fp32 per row chunk of ``chunk_bytes`` (see ``_VocabParallelLogProbs``),
    the same numbers as upcasting the whole tensor first, without the fp32 copies.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"logits must be a tensor [..., vocab_shard], got {type(logits).__name__}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits shape without the vocab "
            f"dim {tuple(logits.shape[:-1])} (logits: {tuple(logits.shape)})"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} (vLLM treats "
            "temperature 0 as greedy sampling; its log-probs are then those at temperature 1)"
        )
    padded_total = logits.shape[-1] * group_size(tp_group)
    if vocab_size is not None and not (0 < vocab_size <= padded_total):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {padded_total}] (shard {logits.shape[-1]} "
            f"x TP {group_size(tp_group)})"
        )
    if check_target:
        check_token_ids([target], vocab_size if vocab_size is not None else padded_total)
    if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
        raise ValueError(f"chunk_bytes must be an integer > 0, got {chunk_bytes!r}")
    logp, entropy = _VocabParallelLogProbs.apply(
        logits, target.long(), float(temperature), vocab_size, tp_group, with_entropy, chunk_bytes
    )
    return (logp, entropy) if with_entropy else logp


def check_token_ids(targets: Sequence[torch.Tensor], limit: int) -> None:
    """ValueError if any tensor of ``targets`` holds an id outside ``[0, limit)``.

    One host read for all of them: free for host tensors, one sync on an accelerator.
    """
    flags = [((t < 0) | (t >= limit)).any() for t in targets]
    if not flags or not bool(torch.stack([f.cpu() for f in flags]).any()):
        return
    for t in targets:
        bad = t[(t < 0) | (t >= limit)]
        if bad.numel():
            raise ValueError(
                f"target holds token ids outside [0, {limit}): e.g. {bad[:5].tolist()} "
                "(mask padding positions with a valid id such as 0 and exclude them via the loss mask)"
            )
