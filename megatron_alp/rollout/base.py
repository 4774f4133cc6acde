"""The rollout-engine protocol, its data types, and the engine registry.

An engine turns prompts (token ids) into completions with the per-token log-probs of the
sampled tokens *under the processed sampling distribution* (temperature, top-k, top-p
applied), which is what the importance ratio's denominator needs, and accepts weight
updates as a stream of HF-named tensor buckets (see ``megatron_alp.convert``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "Completion",
    "RolloutEngine",
    "SamplingParams",
    "WeightBucket",
    "available_engines",
    "check_ratio_sampling",
    "create_engine",
    "register_engine",
]

WeightBucket = Sequence[tuple[str, torch.Tensor]]
"""One bucket of the weight stream: (HF parameter name, full tensor) pairs."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How to sample; the same meaning as vLLM's ``SamplingParams`` of the same names."""

    temperature: float = 1.0
    """Logits are divided by it before softmax; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens per completion (finish reason ``length``)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a completion (kept in the output, finish reason ``stop``); the
    model's EOS token is added by the engine unless ``ignore_eos``."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS token."""
    n: int = 1
    """Completions per prompt (the GRPO group size)."""
    seed: int | None = None
    """Base seed; completion j of prompt i uses a generator seeded from (seed, i, j), so
    results do not depend on how prompts are batched. None draws from torch's RNG."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")


MIN_TEMPERATURE = 0.01
"""vLLM raises any temperature in (0, 0.01) to 0.01 with only a warning (vllm 0.10.2 and
0.33.0 ``sampling_params.py``, ``_MAX_TEMP = 1e-2``): its log-probs would then be those of
T = 0.01 while the trainer divides by the requested T."""

MAX_TEMPERATURE = 2.0
"""vLLM 0.33 rejects a request with temperature > 2 (``sampling_params.py``); the trainer
refuses such a ``--rl-default-temperature`` before any rollout."""


def check_ratio_sampling(sp: SamplingParams, *, allow_truncation: bool = False) -> None:
    """Refuse sampling settings whose rollout log-probs the trainer cannot reproduce.

    The trainer's log-probs apply the temperature only
    (``megatron_alp.rl.logprobs.vocab_parallel_logprobs(..., temperature=...)``), while
    processed rollout log-probs are renormalised over the top-k / top-p set: with
    ``top_p < 1`` or ``top_k > 0`` every importance ratio would be biased. Pass
    ``allow_truncation=True`` only when the trainer computes the same truncated
    distribution. Temperatures in (0, 0.01) are refused because vLLM silently clamps them.
    """
    if not allow_truncation and (sp.top_p < 1.0 or sp.top_k > 0):
        raise ValueError(
            f"SamplingParams top_p={sp.top_p}, top_k={sp.top_k}: rollout log-probs would be "
            "renormalised over the truncated vocabulary while the trainer's log-probs apply "
            "the temperature only, biasing every importance ratio; use top_p=1.0 and "
            "top_k=-1 (or allow_truncation=True if the trainer truncates the same way)"
        )
    if 0 < sp.temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"SamplingParams.temperature={sp.temperature} is below {MIN_TEMPERATURE}: vLLM "
            f"clamps it to {MIN_TEMPERATURE}, so its log-probs would not match the trainer's; "
            f"use 0 (greedy) or >= {MIN_TEMPERATURE}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    sample_index: int
    """0..n-1 within the prompt's group."""
    token_ids: list[int]
    """Generated tokens (stop token included when it ended the completion)."""
    logprobs: list[float]
    """log pi(token) under the processed sampling distribution, one per token."""
    finish_reason: str
    """``stop`` (a stop/EOS token) or ``length`` (max_new_tokens reached); an engine
    never turns vLLM's ``abort`` into either (the fleet client retries aborted requests,
    the in-process vLLM engine raises)."""
    version: int | None = None
    """The policy version whose weights produced it, where the caller labels it
    (asynchronous rollouts, ``train/async_rollouts.py``); None otherwise."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an inference engine."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """n completions per prompt, ordered by (prompt_index, sample_index)."""
        ...

    def update_weights(self, stream: Iterable[WeightBucket]) -> None:
        """Load HF-named full tensors, bucket by bucket; later generations use them.

        Done with each bucket (copied, sent and acknowledged) before asking the stream
        for the next one: the live export may reuse one buffer for every bucket.
        """
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """Register an engine factory under an exact name; duplicates are an error."""

    def deco(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        if name in _ENGINES:
            raise ValueError(f"rollout engine {name!r} is already registered")
        _ENGINES[name] = factory
        return factory

    return deco


def available_engines() -> list[str]:
    """Names accepted by :func:`create_engine`."""
    return sorted(_ENGINES)


def engine_can_sleep(name: str) -> bool:
    """True if the engine registered as ``name`` frees its GPU memory on request
    (``sleep(level)``; the next ``update_weights`` wakes it): colocated engines do, where
    their platform can (an engine class's optional ``can_sleep_here()`` says; vLLM's CPU
    backend cannot)."""
    cls = _ENGINES.get(name)
    if not callable(getattr(cls, "sleep", None)):
        return False
    here = getattr(cls, "can_sleep_here", None)
    return bool(here()) if callable(here) else True


def create_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Build the engine registered as ``name``; unknown names list the valid ones."""
    if name not in _ENGINES:
        raise ValueError(
            f"unknown rollout engine {name!r}; available: {', '.join(available_engines())}"
        )
    return _ENGINES[name](**kwargs)
