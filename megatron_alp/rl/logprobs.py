"""Token log-probs and entropy from vocab-parallel (TP-sharded) logits, without gathering the vocabulary.

Megatron's output layer leaves logits sharded over the tensor-parallel group along the
vocabulary: rank ``r`` of ``TP`` holds vocab ids ``[r * Vp, (r + 1) * Vp)`` where ``Vp`` is
the local size. Like megatron-core's ``vocab_parallel_cross_entropy``, the log-softmax is
assembled from three all-reduces of ``[...]``-shaped tensors (max, sum of exp, target
logit), never of ``[..., V]``; the entropy costs one more all-reduce.

Numerics follow the rollout engine so the importance ratio compares like with like: logits
are upcast to fp32 and divided by the sampling temperature before the log-softmax (vLLM's
sampler does ``logits.float().div_(temperature)``, and its ``processed_logprobs`` are taken
after that), and the rows Megatron adds to pad the vocabulary to a multiple of
``128 * TP`` are excluded from the softmax (they hold real but meaningless weights).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_alp.rl.collectives import group_rank, group_size

__all__ = ["vocab_parallel_logprobs"]


def _shifted_scaled_logits(
    logits: torch.Tensor,
    temperature: float,
    vocab_start: int,
    vocab_size: int | None,
    tp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``logits / T - max`` (global max over the TP group), padded entries at -inf."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    else:
        z = z.clone()  # the shift below is in place; never touch the caller's tensor
    pad = None
    Vp = z.shape[-1]
    if vocab_size is not None and vocab_start + Vp > vocab_size:
        ids = torch.arange(vocab_start, vocab_start + Vp, device=z.device)
        pad = ids >= vocab_size
        z.masked_fill_(pad, float("-inf"))
    z_max = z.max(dim=-1).values
    if group_size(tp_group) > 1:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
    z.sub_(z_max.unsqueeze(-1))
    return z, pad


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(target) and entropy from a vocab shard; backward needs no communication.

    Both outputs are replicated over the TP group, so every rank receives the same output
    gradients and can form the gradient of its own shard locally:
    ``d logp / d z_j = 1[j = target] - p_j`` and ``d H / d z_j = -p_j (log p_j + H)``, both
    times ``1 / temperature`` for the original logits.
    """

    @staticmethod
    def forward(ctx, logits, target, temperature, vocab_size, tp_group, with_entropy):
        Vp = logits.shape[-1]
        rank = group_rank(tp_group)
        vocab_start = rank * Vp
        z, pad = _shifted_scaled_logits(logits, temperature, vocab_start, vocab_size, tp_group)

        in_shard = (target >= vocab_start) & (target < vocab_start + Vp)
        local_idx = torch.where(in_shard, target - vocab_start, torch.zeros_like(target))
        target_z = torch.gather(z, -1, local_idx.unsqueeze(-1)).squeeze(-1)
        target_z = torch.where(in_shard, target_z, torch.zeros_like(target_z))

        exp_z = torch.exp(z)  # 0 at padded entries
        sum_exp = exp_z.sum(dim=-1)
        if with_entropy:
            # sum_j e^{z_j} z_j; padded entries are 0 * -inf, so zero them explicitly
            z_fin = z if pad is None else z.masked_fill(pad, 0.0)
            sum_exp_z = (exp_z * z_fin).sum(dim=-1)
            stacked = torch.stack([target_z, sum_exp, sum_exp_z])
        else:
            stacked = torch.stack([target_z, sum_exp])
        if group_size(tp_group) > 1:
            # one all-reduce for all [...]-shaped partial sums
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
        target_z, sum_exp = stacked[0], stacked[1]
        log_z = torch.log(sum_exp)
        logp = target_z - log_z

        probs = exp_z.div_(sum_exp.unsqueeze(-1))  # reuse the buffer: memory is [..., Vp] fp32
        if with_entropy:
            entropy = log_z - stacked[2] / sum_exp
        else:
            entropy = torch.zeros_like(logp)
        ctx.save_for_backward(probs, local_idx, in_shard, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.in_dtype = logits.dtype
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        probs, local_idx, in_shard, entropy = ctx.saved_tensors
        grad = torch.zeros_like(probs) if grad_logp is None else -probs * grad_logp.unsqueeze(-1)
        if grad_logp is not None:
            onehot_val = torch.where(in_shard, grad_logp, torch.zeros_like(grad_logp))
            grad.scatter_add_(-1, local_idx.unsqueeze(-1), onehot_val.unsqueeze(-1))
        if ctx.with_entropy and grad_entropy is not None:
            # -p (log p + H); p == 0 (padding or underflow) contributes nothing, and log(0)
            # must not turn that 0 into NaN
            safe = probs > 0
            log_p = torch.log(torch.where(safe, probs, torch.ones_like(probs)))
            term = torch.where(safe, probs * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(probs))
            grad.sub_(term * grad_entropy.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (fp32, shape of ``target``) of ``target`` under ``softmax(logits / temperature)``.

    ``logits`` is this rank's vocab shard ``[..., V / TP]`` (Megatron's vocab-parallel layout;
    with ``tp_group=None`` it is the whole vocabulary and nothing is communicated; pass
    ``parallel_state.get_tensor_model_parallel_group()`` under TP). ``vocab_size`` is the
    true vocabulary size: ids at or above it (Megatron's padding rows) get probability 0,
    and targets must lie in ``[0, vocab_size)`` (``ValueError`` otherwise; this costs one
    host sync). With ``with_entropy`` it also returns the entropy of the same tempered
    distribution. Differentiable in ``logits`` on every TP rank (custom backward, exact
    under TP, no communication); the gradient has the dtype of ``logits``.
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
    limit = vocab_size if vocab_size is not None else padded_total
    out_of_range = (target < 0) | (target >= limit)
    if bool(out_of_range.any()):
        bad = target[out_of_range]
        raise ValueError(
            f"target holds token ids outside [0, {limit}): e.g. {bad[:5].tolist()} "
            "(mask padding positions with a valid id such as 0 and exclude them via the loss mask)"
        )
    logp, entropy = _VocabParallelLogProbs.apply(
        logits, target.long(), float(temperature), vocab_size, tp_group, with_entropy
    )
    return (logp, entropy) if with_entropy else logp
