"""A rollout engine whose first turn is scripted: the CPU multi-turn example's policy.

A model small enough to train on a laptop CPU does not write Python by itself, so the
first turn of every trajectory is *forced*: for a prompt that asks ``a+b=?`` and has no
code fence yet (turn 0) the engine emits a fenced python block holding ``print(a+b)``. Everything
else is the real model: the forced tokens get the model's own processed log-probs
(teacher-forced, the same ``process_logits`` as ``LocalEngine``), so the trainer's
importance ratios and mismatch metrics are as real as for sampled tokens; later turns
(after the sandbox's observation) are sampled by :class:`~megatron_alp.rollout.LocalEngine`.

Registered as ``scripted-first-turn`` when imported (once per process). The trainer finds
it because the example's entry point (``train.py``) and the tests import this module
before parsing the arguments.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from megatron_alp.rollout import Completion, LocalEngine, SamplingParams, available_engines, register_engine
from megatron_alp.rollout.sampling import process_logits

__all__ = ["ENGINE_NAME", "ScriptedFirstTurnEngine"]

ENGINE_NAME = "scripted-first-turn"
_SUM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*\?")


class ScriptedFirstTurnEngine:
    """``LocalEngine`` plus a scripted code turn for prompts without a code block yet."""

    def __init__(self, model: str, *, dtype: str = "bfloat16", device: str | None = None, **kw: Any) -> None:
        from transformers import AutoTokenizer

        from megatron_alp import platform

        # the trainer passes a device to the `local` engine only: default to the rank's
        self.inner = LocalEngine(model, dtype=dtype, device=device or str(platform.device()), **kw)
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    @property
    def model(self) -> Any:
        """The HF model (the trainer's --rl-verify-model-weights-swap reads it)."""
        return self.inner.model

    def script(self, prompt_ids: Sequence[int]) -> list[int] | None:
        """Token ids of the forced turn for this prompt, or None to let the model generate."""
        text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
        found = _SUM.findall(text)
        if "```" in text or not found:
            return None
        a, b = found[-1]
        return self.tokenizer.encode(f"```python\nprint({a}+{b})\n```", add_special_tokens=False)

    @torch.no_grad()
    def _forced_logprobs(self, prompt: list[int], forced: list[int], sp: SamplingParams) -> list[float]:
        ids = torch.tensor([prompt + forced], device=self.inner.device)
        logits = self.inner.model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(forced) - 1]
        proc = process_logits(logits, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p)
        lp = torch.log_softmax(proc, -1).gather(-1, torch.tensor(forced, device=proc.device)[:, None])
        return [float(x) for x in lp.squeeze(-1)]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt: forced for first turns, sampled otherwise."""
        forced = {i: self.script(p) for i, p in enumerate(prompt_token_ids)}
        free = [i for i, f in forced.items() if f is None]
        out: dict[tuple[int, int], Completion] = {}
        if free:
            for c in self.inner.generate([prompt_token_ids[i] for i in free], sampling):
                i = free[c.prompt_index]
                out[(i, c.sample_index)] = Completion(i, c.sample_index, c.token_ids, c.logprobs, c.finish_reason)
        for i, ids in forced.items():
            if ids is None:
                continue
            ids = ids[: sampling.max_new_tokens]
            lp = self._forced_logprobs(list(prompt_token_ids[i]), ids, sampling)
            for j in range(sampling.n):
                out[(i, j)] = Completion(i, j, list(ids), list(lp), "stop")
        return [out[k] for k in sorted(out)]

    def update_weights(self, stream: Iterable[Any], **kw: Any) -> Any:
        """Same weight stream as ``LocalEngine``."""
        return self.inner.update_weights(stream, **kw)

    def close(self) -> None:
        """Drop the model."""
        self.inner.close()


if ENGINE_NAME not in available_engines():
    register_engine(ENGINE_NAME)(ScriptedFirstTurnEngine)
