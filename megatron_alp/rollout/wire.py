"""The fleet's wire format: plain JSON for requests, completions and bucket metadata.

Two engine kinds speak it through the fleet client (``fleet.py``):

* the CPU twin (``engine_server.py``): ``POST /generate`` with rows
  ``[prompt_index, sample_index, prompt_token_ids]`` and a sampling dict; the answer
  carries, per row, the generated token ids, their processed log-probs, the finish reason
  and the engine's weight version;
* ``vllm serve`` (OpenAI ``POST /v1/completions``): one request per prompt group with
  ``prompt`` = token ids, ``n`` = the group's samples, a seed from which vLLM seeds
  sample k with ``seed + k`` (:func:`openai_seed`), ``logprobs=0`` and
  ``return_token_ids=true`` (vllm >= 0.10.2 ``entrypoints/openai/protocol.py``
  ``CompletionRequest``); the answer's ``choices[k].token_ids`` and
  ``choices[k].logprobs.token_logprobs`` are sample k's tokens and their log-probs.

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
    "completions_from_openai",
    "openai_completion_request",
    "openai_seed",
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


_OPENAI_SEED_RANGE = 2**62
"""Group seeds lie below this, so ``seed + k`` stays a valid int64 (vLLM's request
``seed`` field: ``le=`` int64 max, vllm 0.10.2 ``entrypoints/openai/protocol.py`` /
0.33 ``entrypoints/openai/completion/protocol.py``)."""


def openai_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The vLLM seed of completion ``sample_index`` of prompt ``prompt_index``.

    A ``/v1/completions`` request with ``n`` samples and seed ``s`` seeds sample k with
    ``s + k`` (vllm 0.10.2 and 0.33 ``v1/engine/parallel_sampling.py``
    ``ParentRequest._get_child_sampling_params``; the answers come back in k order, its
    ``output_aggregator``). So completion (i, j) has seed ``base(i) + j`` with ``base`` a
    mix of (seed, i) in [0, 2**62): the same whether the group is sent as one request
    or (a retry, a smaller request) in pieces. Two completions share a seed only if two
    prompts' bases lie within ``n`` of each other (probability ~ n / 2**62 a pair)."""
    return completion_seed(seed, prompt_index, 0) % _OPENAI_SEED_RANGE + sample_index


def openai_completion_request(
    model: str | None, prompt: Sequence[int], sp: SamplingParams, prompt_index: int,
    sample_index: int, n: int = 1,
) -> dict[str, Any]:
    """The ``/v1/completions`` body of completions ``sample_index .. sample_index + n - 1``
    of one prompt for ``vllm serve``.

    One request per prompt group: vLLM fans it out into ``n`` child requests on the same
    engine that share the prompt's cached prefix, seeded as :func:`openai_seed` says;
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
        prompt=list(prompt), n=int(n), temperature=sp.temperature, top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, max_tokens=sp.max_new_tokens, logprobs=0,
        ignore_eos=sp.ignore_eos, return_token_ids=True, skip_special_tokens=False,
    )
    if model is not None:  # None: the server's own model (vLLM accepts a missing name)
        body["model"] = model
    if sp.stop_token_ids:
        body["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        body["seed"] = openai_seed(sp.seed, prompt_index, sample_index)
    return body


def completion_from_openai(response: dict[str, Any], prompt_index: int, sample_index: int) -> Completion:
    """A :class:`Completion` from a ``/v1/completions`` answer to
    :func:`openai_completion_request` with ``n=1``; ``abort`` (and 0.33's ``error``) stay
    as they are."""
    return completions_from_openai(response, prompt_index, sample_index, 1)[0]


def completions_from_openai(response: dict[str, Any], prompt_index: int, sample_index: int,
                            n: int) -> list[Completion]:
    """The ``n`` completions (samples ``sample_index ..``, in order) of an answer to
    :func:`openai_completion_request`; choice ``index`` k is sample ``sample_index + k``
    (vLLM numbers the choices of a one-prompt request by sample)."""
    choices = response.get("choices") or []
    if len(choices) != n:
        raise ValueError(f"vLLM answer for prompt {prompt_index} samples {sample_index}.."
                         f"{sample_index + n - 1} has {len(choices)} choices, expected {n}")
    by_index = sorted(choices, key=lambda ch: int(ch.get("index", 0)))
    if [int(ch.get("index", 0)) for ch in by_index] != list(range(n)):
        raise ValueError(f"vLLM answer for prompt {prompt_index}: choice indices "
                         f"{[ch.get('index') for ch in choices]}, expected 0..{n - 1}")
    return [_completion_from_choice(ch, prompt_index, sample_index + k) for k, ch in enumerate(by_index)]


def _completion_from_choice(ch: dict[str, Any], prompt_index: int, sample_index: int) -> Completion:
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
