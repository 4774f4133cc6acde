"""What the vLLM engine needs that runs without a GPU (and is tested on the CPU).

Version checks, the supported range, request building, output conversion, fleet
assignment and bucket metadata. ``vllm_engine.py`` holds the part that needs vLLM and CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Sequence

import torch

from megatron_alp.rollout.base import Completion, SamplingParams, WeightBucket

__all__ = [
    "SUPPORTED_VLLM",
    "BucketMeta",
    "assign_prompts",
    "bucket_meta",
    "check_vllm_version",
    "completions_from_outputs",
    "engine_kwargs",
    "sampling_kwargs",
]

SUPPORTED_VLLM = ("0.10.2", "0.34")
"""[min, max) vLLM versions: ``processed_logprobs`` is correct from 0.10.2, and the worker
extension API (``worker_extension_cls`` + ``collective_rpc``) is stable across the range."""


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not p.isdigit():  # 0.11.0rc1 -> (0, 11, 0)
            break
    return tuple(parts)


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or ``ImportError`` / ``ValueError`` saying what to do."""
    if version is None:
        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                "the vllm rollout engine needs vLLM (CUDA only): pip install "
                f"'megatron-alp[vllm]' (vllm>={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}); on a "
                "machine without a GPU use the 'local' engine"
            ) from None
    lo, hi = SUPPORTED_VLLM
    if not _parse(lo) <= _parse(version) < _parse(hi):
        raise ValueError(
            f"vllm {version} is outside the supported range >={lo},<{hi}; install a "
            "supported version (see docs/rollout.md)"
        )
    return version


def sampling_kwargs(sp: SamplingParams, *, prompt_index: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` equivalent to ``sp`` (one request).

    ``logprobs=0`` returns the sampled token's log-prob only; the engine-wide
    ``logprobs_mode="processed_logprobs"`` makes it the processed distribution's. Seeds
    are per prompt (vLLM draws the n samples of a request from one seeded generator).
    """
    kw: dict[str, Any] = dict(
        n=sp.n,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1,
        max_tokens=sp.max_new_tokens,
        logprobs=0,
        ignore_eos=sp.ignore_eos,
        detokenize=False,
    )
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        kw["seed"] = (sp.seed * 1_000_003 + prompt_index) % (2**31 - 1)
    return kw


def engine_kwargs(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    colocate: bool = False,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: BF16, processed log-probs, our worker extension.

    ``colocate`` turns on sleep mode (the engine frees its weights and KV cache while
    the trainer runs on the same GPUs).
    """
    kw: dict[str, Any] = dict(
        model=model,
        dtype="bfloat16",
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="megatron_alp.rollout.vllm_worker.WeightSyncExtension",
        enable_prefix_caching=True,
        enable_sleep_mode=colocate,
        seed=seed,
    )
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    kw.update(extra or {})
    return kw


def completions_from_outputs(outputs: Sequence[Any], prompt_indices: Sequence[int]) -> list[Completion]:
    """Convert vLLM ``RequestOutput``s into :class:`Completion`s.

    Each output's ``outputs[j].logprobs`` is a list (one per token) of dicts
    ``{token_id: Logprob}``; the sampled token's entry is the one used.
    """
    result = []
    for out, i in zip(outputs, prompt_indices, strict=True):
        for j, comp in enumerate(out.outputs):
            ids = list(comp.token_ids)
            if comp.logprobs is None or len(comp.logprobs) != len(ids):
                raise ValueError(
                    f"vLLM output for prompt {i} has no per-token logprobs; the request must "
                    "set logprobs=0"
                )
            lps = []
            for t, entry in zip(ids, comp.logprobs):
                lp = entry[t]
                lps.append(float(getattr(lp, "logprob", lp)))
            reason = "length" if comp.finish_reason == "length" else "stop"
            result.append(Completion(i, j, ids, lps, reason))
    return result


def assign_prompts(n_prompts: int, n_engines: int) -> list[list[int]]:
    """Split prompt indices over engines in contiguous, balanced chunks (sizes differ <= 1).

    A prompt's n samples stay on one engine, so its prefix is cached once.
    """
    if n_engines < 1:
        raise ValueError(f"need at least one vLLM engine, got {n_engines}")
    base, extra = divmod(n_prompts, n_engines)
    out, start = [], 0
    for e in range(n_engines):
        size = base + (1 if e < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class BucketMeta:
    """What a worker needs to receive one bucket: names, dtypes and shapes, in order."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        total = 0
        for dt, shape in zip(self.dtypes, self.shapes):
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=getattr(torch, dt)).element_size()
        return total


def bucket_meta(bucket: WeightBucket) -> BucketMeta:
    """Metadata of a bucket (sent ahead of the tensors themselves)."""
    names, dtypes, shapes = [], [], []
    for name, t in bucket:
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(tuple(t.shape))
    return BucketMeta(tuple(names), tuple(dtypes), tuple(shapes))
