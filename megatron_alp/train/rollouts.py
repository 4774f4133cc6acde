"""Rollouts of one RL step: prompts -> engine -> rewards -> advantages -> samples.

Runs on the rank that holds the engine (global rank 0); the trainer broadcasts the
resulting :class:`Sample` list to every rank. Prompts are tokenized once with the
tokenizer's own chat template (the same code path as any HF model).

With ``--rl-max-turns > 1`` :func:`generate_multiturn` replaces :func:`generate`: each
sample is a whole tool-integrated trajectory (model turns and sandbox observations
interleaved in ``response_ids``) whose ``loss_mask`` is 1 on model tokens only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from megatron_alp.rl.advantages import compute_advantages
from megatron_alp.rollout import SamplingParams

__all__ = ["Sample", "encode_prompts", "generate", "generate_multiturn", "pass_at_k"]


@dataclasses.dataclass(slots=True)
class Sample:
    """One completion of one prompt, with everything the update needs."""

    prompt_index: int
    """Row of the dataset."""
    group: int
    """Prompt slot within the step (GRPO group id)."""
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]
    """Engine's processed log-prob of each response token."""
    finish_reason: str
    reward: float
    advantage: float = 0.0
    loss_mask: list[int] | None = None
    """Per response token: 1 = model token (trained on), 0 = observation token; None =
    every response token (single-turn). ``rollout_logp`` is 0.0 where it is 0."""
    versions: list[int] | None = None
    """Per response token: the policy version (completed RL steps) whose weights produced
    it (asynchronous rollouts, ``train/async_rollouts.py``); None = the current policy."""


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, max_length: int, source: str) -> list[list[int]]:
    """Chat-template token ids of each user prompt; ValueError naming a row that is too long."""
    out = []
    for i, p in enumerate(prompts):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        ids = [int(t) for t in ids]
        if len(ids) > max_length:
            raise ValueError(
                f"{source} row {i}: the prompt has {len(ids)} tokens after the chat template, more "
                f"than --rl-max-prompt-length={max_length}"
            )
        out.append(ids)
    return out


def generate(
    engine: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    prompt_rows: Sequence[int],
    answers: Sequence[str],
    sampling: SamplingParams,
    reward_fn: Callable[[str, str], float],
) -> list[Sample]:
    """``sampling.n`` completions per prompt, scored (no advantages yet)."""
    completions = engine.generate([prompt_ids[r] for r in prompt_rows], sampling)
    out = []
    for c in completions:
        row = prompt_rows[c.prompt_index]
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        out.append(Sample(
            prompt_index=row, group=c.prompt_index, prompt_ids=list(prompt_ids[row]),
            response_ids=list(c.token_ids), rollout_logp=list(c.logprobs),
            finish_reason=c.finish_reason, reward=float(reward_fn(text, answers[row])),
        ))
    return out


def generate_multiturn(
    engine: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    prompt_rows: Sequence[int],
    answers: Sequence[str],
    sampling: SamplingParams,
    reward_fn: Callable[[str, str], float],
    sandbox: Any,
    cfg: Any,
) -> tuple[list[Sample], dict[str, float]]:
    """``sampling.n`` multi-turn trajectories per prompt, scored, and their ``multiturn/*``
    metrics. ``cfg`` is a :class:`~megatron_alp.rollout.MultiTurnConfig`; the reward reads
    the whole response text (observations included, as the reference does)."""
    from megatron_alp.rollout import multiturn_metrics, run_multiturn

    trajs = run_multiturn(engine, [prompt_ids[r] for r in prompt_rows], sampling, tokenizer, sandbox, cfg)
    out = []
    for t in trajs:
        row = prompt_rows[t.prompt_index]
        out.append(Sample(
            prompt_index=row, group=t.prompt_index, prompt_ids=list(t.prompt_ids),
            response_ids=list(t.response_ids), rollout_logp=list(t.rollout_logprobs),
            finish_reason=t.finish_reason, reward=float(reward_fn(t.response_text, answers[row])),
            loss_mask=list(t.loss_mask),
        ))
    metrics = multiturn_metrics(trajs)
    calls = sum(t.tool_calls for t in trajs)
    metrics["multiturn/tool_calls"] = float(calls)
    metrics["multiturn/tool_errors"] = float(sum(t.tool_errors for t in trajs))
    metrics["multiturn/tool_timeouts"] = float(sum(t.tool_timeouts for t in trajs))
    return out, metrics


def add_advantages(samples: list[Sample], estimator: str) -> None:
    """Group-relative advantages in place (groups = prompt slots of the step)."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples])
    adv = compute_advantages(estimator, rewards, group_ids=groups).advantages
    for s, a in zip(samples, adv.tolist()):
        s.advantage = float(a)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
