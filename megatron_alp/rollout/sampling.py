"""Logit processing and sampling with vLLM's semantics, in plain torch.

Order (as vLLM's sampler): divide by temperature, mask everything outside top-k, then
outside top-p, then sample from the softmax of what is left. The log-prob reported for
a sampled token is the log-softmax of these *processed* logits, i.e. vLLM's
``logprobs_mode="processed_logprobs"``: the distribution the token was actually drawn
from, which is the right denominator for an importance ratio.
"""

from __future__ import annotations

import torch

__all__ = ["completion_seed", "process_logits", "sample"]

_SEED_MOD = 2**63 - 1


def completion_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of completion ``sample_index`` of prompt ``prompt_index`` (in [0, 2**63 - 1)).

    A fixed mix of the three numbers, so a completion's randomness depends neither on how
    prompts are batched nor on which engine serves it (a retry on another engine draws
    the same tokens). Every engine seeds each completion with it on its own: vLLM's
    ``n > 1`` derives sample j's seed as ``seed + j`` (vllm 0.10.2
    ``v1/engine/parallel_sampling.py``), which would make (prompt i, sample j + 1) and
    (prompt i + 1, sample j) draw the same noise whenever prompt seeds are consecutive.
    """
    x = seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB
    # One round of splitmix64-style mixing so nearby inputs give unrelated seeds.
    x &= 2**64 - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x % _SEED_MOD


def process_logits(
    logits_BV: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """fp32 processed logits: temperature, then top-k, then top-p (masked to -inf).

    ``temperature == 0`` (greedy) leaves the logits unscaled.
    """
    x = logits_BV.float()
    if temperature > 0:
        x = x / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token; a token is kept while that is below top_p,
        # so the most likely token always stays.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(
    processed_BV: torch.Tensor,
    generators: list[torch.Generator | None],
    *,
    greedy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens [B], their processed log-probs [B]).

    Each row draws with its own generator (exponential race: argmax p / E, E ~ Exp(1)),
    so a row's draw does not depend on the other rows of the batch.
    """
    logp = torch.log_softmax(processed_BV, dim=-1)
    if greedy:
        tokens = processed_BV.argmax(dim=-1)
    else:
        probs = logp.exp()
        race = torch.empty_like(probs)
        for i, g in enumerate(generators):
            race[i].exponential_(generator=g)
        tokens = (probs / race).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
