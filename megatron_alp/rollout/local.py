"""``LocalEngine``: the embedded rollout engine, Hugging Face transformers in-process.

The default on CPU and in tests, and handy for debugging on one GPU. It samples with
vLLM's semantics (``sampling.py``) and reports processed log-probs, in BF16 by default
like a vLLM fleet (fp32 allowed; ``fp8`` is BF16 with every decoder linear layer run
through the W8A8 FP8 emulation of ``fp8.py``). Weight updates load the same HF-named stream that the
vLLM engine receives.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch

from megatron_alp.rollout.base import (
    Completion,
    SamplingParams,
    WeightBucket,
    register_engine,
)
from megatron_alp.rollout.fp8 import drop_fp8_cache, quantize_linears
from megatron_alp.rollout.sampling import completion_seed, process_logits, sample

__all__ = ["LocalEngine"]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
           "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_FP8 = ("fp8",)


_row_seed = completion_seed  # the per-completion seed, shared with every engine


@register_engine("local")
class LocalEngine:
    """In-process HF transformers engine (see the module docstring).

    ``model`` is a path to an HF folder, a ``PretrainedConfig`` (random weights, for
    tests), or a ready ``PreTrainedModel``. ``max_batch_size`` bounds the rows decoded
    together.
    """

    def __init__(
        self,
        model: Any,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

        fp8 = dtype in _FP8
        if fp8:
            dtype = torch.bfloat16  # the compute dtype around the emulated FP8 linears
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(
                    f"LocalEngine dtype {dtype!r} is not one of {sorted(_DTYPES) + sorted(_FP8)}")
            dtype = _DTYPES[dtype]
        if isinstance(model, PreTrainedModel):
            hf = model
        elif isinstance(model, PretrainedConfig):
            hf = AutoModelForCausalLM.from_config(model)
        elif isinstance(model, str):
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        else:
            raise ValueError(
                f"LocalEngine model must be an HF folder path, PretrainedConfig or "
                f"PreTrainedModel, got {type(model).__name__}"
            )
        self.model = hf.to(device=device, dtype=dtype).eval()
        self.fp8_linears = quantize_linears(self.model) if fp8 else []
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        cfg = self.model.config
        eos = eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None)
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.weight_version = 0

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """n completions per prompt, ordered by (prompt_index, sample_index)."""
        rows = []
        for i, prompt in enumerate(prompt_token_ids):
            for j in range(sampling.n):
                rows.append((i, j, prompt))
        return self.generate_rows(rows, sampling)

    @torch.no_grad()
    def generate_rows(
        self, rows: Sequence[tuple[int, int, Sequence[int]]], sampling: SamplingParams
    ) -> list[Completion]:
        """One completion per row ``(prompt_index, sample_index, prompt_token_ids)``, in row
        order; ``sampling.n`` is ignored. The indices pick the completion's seed, so a row
        draws the same tokens whatever else is batched with it (the fleet's engines serve
        arbitrary subsets of a generation this way)."""
        rows = [(int(i), int(j), list(p)) for i, j, p in rows]
        for i, j, prompt in rows:
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        out: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            out.extend(self._generate_rows(rows[start : start + self.max_batch_size], sampling))
        return out

    def _generate_rows(self, rows: list[tuple[int, int, list[int]]], sp: SamplingParams) -> list[Completion]:
        b = len(rows)
        width = max(len(r[2]) for r in rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for k, (_, _, prompt) in enumerate(rows):  # left padding
            ids[k, width - len(prompt):] = torch.tensor(prompt)
            mask[k, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens: list[torch.Generator | None] = []
        for i, j, _ in rows:
            if sp.seed is None:
                gens.append(None)
            else:
                gens.append(torch.Generator(device=self.device).manual_seed(_row_seed(sp.seed, i, j)))
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_ids))
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        reason = ["length"] * b
        done = torch.zeros(b, dtype=torch.bool)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        step_ids = ids
        step_pos = pos
        for _ in range(sp.max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            processed = process_logits(
                out.logits[:, -1, :], temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p
            )
            nxt, lp = sample(processed, gens, greedy=sp.temperature == 0)
            for k in range(b):
                if done[k]:
                    continue
                t = int(nxt[k])
                tokens[k].append(t)
                logps[k].append(float(lp[k]))
                if t in stops:
                    done[k] = True
                    reason[k] = "stop"
            if bool(done.all()):
                break
            nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, self.pad_id), nxt)
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        return [
            Completion(i, j, tokens[k], logps[k], reason[k]) for k, (i, j, _) in enumerate(rows)
        ]

    # -- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, stream: Iterable[WeightBucket], *, strict: bool = True) -> dict[str, Any]:
        """Copy HF-named full tensors into the model, bucket by bucket.

        Unknown names and shape mismatches raise ``ValueError`` naming the tensor; with
        ``strict`` every parameter (a tied ``lm_head`` counts as the embedding) must be
        updated exactly once. Returns counts and the load time.
        """
        t0 = time.perf_counter()
        params = dict(self.model.named_parameters())
        seen: set[str] = set()
        n_bytes = 0
        for bucket in stream:
            for name, tensor in bucket:
                p = params.get(name)
                if p is None:
                    raise ValueError(
                        f"weight stream tensor {name!r} is not a parameter of the local "
                        f"{self.model.config.model_type} model"
                    )
                if tuple(tensor.shape) != tuple(p.shape):
                    raise ValueError(
                        f"weight stream tensor {name!r} has shape {tuple(tensor.shape)}, the "
                        f"model expects {tuple(p.shape)}"
                    )
                if name in seen:
                    raise ValueError(f"weight stream sent {name!r} twice")
                p.copy_(tensor.to(device=p.device, dtype=p.dtype))
                seen.add(name)
                n_bytes += tensor.numel() * tensor.element_size()
        missing = sorted(set(params) - seen)
        if strict and missing:
            raise ValueError(f"weight stream did not send {len(missing)} parameter(s): {missing[:8]}")
        self.weights_loaded()
        self.weight_version += 1
        return dict(tensors=len(seen), bytes=n_bytes, seconds=time.perf_counter() - t0)

    def weights_loaded(self) -> None:
        """The parameters changed (however they were written): rebuild derived state (the
        FP8 emulation's quantised weights)."""
        if self.fp8_linears:
            drop_fp8_cache(self.model)

    def close(self) -> None:
        """Drop the model."""
        self.model = None  # type: ignore[assignment]
