"""The fleet's wire format: plain JSON for requests, completions and bucket metadata.

Two engine kinds speak it through the fleet client (``fleet.py``):

* the CPU twin (``engine_server.py``): ``POST /generate`` with rows
  ``[prompt_index, sample_index, prompt_token_ids]`` and a sampling dict; the answer
  carries, per row, the generated token ids, their processed log-probs, the finish reason
  and the engine's weight version;
* ``vllm serve`` (OpenAI ``POST /v1/completions``): one request per completion with
  ``prompt`` = token ids, ``n=1``, its own seed, ``logprobs=0`` and
  ``return_token_ids=true`` (vllm >= 0.10.2 ``entrypoints/openai/protocol.py``
  ``CompletionRequest``); the answer's ``choices[0].token_ids`` and
  ``choices[0].logprobs.token_logprobs`` are the tokens and their log-probs.

Everything here is pure data conversion, tested on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from megatron_alp.rollout.base import Completion, SamplingParams
from megatron_alp.rollout.sampling import completion_seed

__all__ = [
    "completion_from_dict",
    "completion_from_openai",
    "completion_to_dict",
    "openai_completion_request",
    "sampling_from_dict",
    "sampling_to_dict",
]


def sampling_to_dict(sp: SamplingParams) -> dict[str, Any]:
    """JSON form of :class:`SamplingParams` (tuples become lists)."""
    d = dataclasses.asdict(sp)
    d["stop_token_ids"] = list(sp.stop_token_ids)
    return d


def sampling_from_dict(d: dict[str, Any]) -> SamplingParams:
    """Inverse of :func:`sampling_to_dict`; unknown fields raise ``ValueError``."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"sampling fields {unknown} are not SamplingParams fields {sorted(known)}")
    d = dict(d)
    if "stop_token_ids" in d:
        d["stop_token_ids"] = tuple(int(t) for t in d["stop_token_ids"])
    return SamplingParams(**d)


def completion_to_dict(c: Completion) -> list[Any]:
    """Compact JSON form of a completion: [i, j, token_ids, logprobs, finish_reason].

    Log-probs are Python floats (JSON keeps every bit of a float64 through repr)."""
    return [c.prompt_index, c.sample_index, list(c.token_ids), [float(x) for x in c.logprobs],
            c.finish_reason]


def completion_from_dict(row: Sequence[Any]) -> Completion:
    """Inverse of :func:`completion_to_dict`."""
    i, j, tokens, logprobs, reason = row
    if len(tokens) != len(logprobs):
        raise ValueError(
            f"completion ({i}, {j}) has {len(tokens)} tokens but {len(logprobs)} log-probs"
        )
    return Completion(int(i), int(j), [int(t) for t in tokens], [float(x) for x in logprobs],
                      str(reason))


def openai_completion_request(
    model: str | None, prompt: Sequence[int], sp: SamplingParams, prompt_index: int,
    sample_index: int,
) -> dict[str, Any]:
    """The ``/v1/completions`` body of one completion for ``vllm serve``.

    ``n=1`` with a per-completion seed (vLLM's n > 1 seeds sample j with ``seed + j``);
    ``logprobs=0`` returns the sampled token's log-prob; ``return_token_ids`` returns ids
    (no detokenisation round trip); ``skip_special_tokens=False`` keeps the text harmless.

    The penalties and ``min_p`` are sent at their neutral values: a field left out takes
    the *server's* default, which ``vllm serve`` reads from the model's
    ``generation_config.json`` (vllm 0.10.2 ``protocol.py`` / 0.33
    ``openai/completion/protocol.py`` ``to_sampling_params``; e.g. Qwen2.5-Instruct's
    ``repetition_penalty`` 1.05): the processed log-probs would then include a penalty the
    trainer's log-probs do not, biasing every importance ratio.
    """
    body: dict[str, Any] = dict(
        prompt=list(prompt), n=1, temperature=sp.temperature, top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, max_tokens=sp.max_new_tokens, logprobs=0,
        ignore_eos=sp.ignore_eos, return_token_ids=True, skip_special_tokens=False,
    )
    if model is not None:  # None: the server's own model (vLLM accepts a missing name)
        body["model"] = model
    if sp.stop_token_ids:
        body["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        body["seed"] = completion_seed(sp.seed, prompt_index, sample_index)
    return body


def completion_from_openai(response: dict[str, Any], prompt_index: int, sample_index: int) -> Completion:
    """A :class:`Completion` from a ``/v1/completions`` answer to
    :func:`openai_completion_request`; ``abort`` (and 0.33's ``error``) stay as they are."""
    choices = response.get("choices") or []
    if len(choices) != 1:
        raise ValueError(f"vLLM answer for prompt {prompt_index} sample {sample_index} has "
                         f"{len(choices)} choices, expected 1")
    ch = choices[0]
    ids = ch.get("token_ids")
    lp = (ch.get("logprobs") or {}).get("token_logprobs")
    if ids is None or lp is None or len(ids) != len(lp) or any(x is None for x in lp):
        raise ValueError(
            f"vLLM answer for prompt {prompt_index} sample {sample_index} lacks token ids or "
            "per-token log-probs; the server must be vllm >= 0.10.2 (return_token_ids) and "
            "the request must set logprobs=0"
        )
    reason = ch.get("finish_reason") or "abort"
    return Completion(prompt_index, sample_index, [int(t) for t in ids], [float(x) for x in lp],
                      str(reason))
