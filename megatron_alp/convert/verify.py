"""Check a Megatron checkpoint against HF transformers on fixed prompts.

The oracle is HF's own model on the HF weights; the candidate is megatron-core's
GPTModel built for a layout (TP / PP / virtual PP), loaded from the dist checkpoint and
run through megatron-core's schedule. Both run in fp32 by default. The report gives the
largest absolute logit difference over the real vocabulary and the fraction of positions
whose arg-max token agrees.

:func:`megatron_logits` is collective (every rank of the group calls it, e.g. through
``RankGroup.run`` or under torchrun); the rest runs in one process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "DEFAULT_PROMPTS",
    "VerifyReport",
    "compare_logits",
    "forward_logits",
    "hf_reference_logits",
    "megatron_logits",
    "prompt_batch",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

DEFAULT_PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin, and the capital of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "Question: what is 12 times 7? Answer: let us think step by step. 12 times 7 is",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon. The astronauts",
)


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    """HF vs Megatron logits on the same tokens."""

    max_abs_diff: float
    top1_agreement: float
    positions: int

    def ok(self, atol: float, min_top1: float) -> bool:
        return self.max_abs_diff <= atol and self.top1_agreement >= min_top1

    def __str__(self) -> str:
        return (
            f"max |delta logits| = {self.max_abs_diff:.3e}, top-1 agreement = "
            f"{self.top1_agreement:.4f} over {self.positions} positions"
        )


def prompt_batch(
    hf_dir: str | os.PathLike,
    *,
    seq_len: int = 24,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Token ids [len(prompts), seq_len] from the folder's tokenizer (right-filled by
    repeating the prompt); seeded random ids if the folder has no tokenizer files."""
    if vocab_size is None:
        from megatron_alp.convert.io_utils import load_hf_config

        vocab_size = int(load_hf_config(hf_dir).vocab_size)
    rows = []
    if any((Path(hf_dir) / f).exists() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        for p in prompts:
            ids = list(tok(p)["input_ids"])
            if not ids or max(ids) >= vocab_size:
                rows = []  # not this model's tokenizer: fall back to fixed ids
                break
            while len(ids) < seq_len:
                ids += ids
            rows.append(ids[:seq_len])
    if not rows:
        g = torch.Generator().manual_seed(1234)
        return torch.randint(0, vocab_size, (len(prompts), seq_len), generator=g)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def hf_reference_logits(
    hf_dir: str | os.PathLike, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """HF transformers' logits [b, s, V] for ``tokens`` (the oracle)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True)
    model.eval()
    out = model(input_ids=tokens).logits.float()
    del model
    return out


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> VerifyReport:
    """Max |ref - got| and arg-max agreement over the first ``ref.shape[-1]`` columns."""
    got = got[..., : ref.shape[-1]].float()
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: HF {tuple(ref.shape)} vs Megatron {tuple(got.shape)}")
    diff = (ref.float() - got).abs().max().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return VerifyReport(max_abs_diff=diff, top1_agreement=agree, positions=ref.shape[0] * ref.shape[1])


def megatron_logits(
    ckpt_dir: str | os.PathLike,
    layout: Any,
    tokens: torch.Tensor,
    *,
    hf_config: str | os.PathLike | None = None,
    params_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, Vp] of the checkpoint under ``layout`` (a
    :class:`~megatron_alp.parallel.ParallelConfig`); collective over the group.

    Returns the logits on the rank with TP rank 0, DP rank 0 of the last pipeline
    stage, None on the others. Errors for a layout the model cannot be split into are
    raised before any model is built.
    """
    import torch.distributed as dist

    from megatron_alp import parallel
    from megatron_alp.convert.dist_ckpt import resolve_checkpoint_dir
    from megatron_alp.convert.io_utils import load_hf_config
    from megatron_alp.convert.load import load_megatron_checkpoint
    from megatron_alp.convert.megatron_to_hf import find_hf_assets
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.builder import validate_layout

    path = resolve_checkpoint_dir(ckpt_dir)
    args = gpt_args_from_hf(load_hf_config(find_hf_assets(Path(path), hf_config)))
    validate_layout(args, layout, world_size=dist.get_world_size())
    with parallel.model_parallel(layout):
        tc = transformer_config(args, layout, params_dtype=params_dtype)
        chunks = build_model(args, tc)
        load_megatron_checkpoint(chunks, path)
        return forward_logits(chunks, tokens)


@torch.no_grad()
def forward_logits(chunks: Sequence[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, Vp] of this rank's model chunks through
    megatron-core's schedule (forward only, one micro-batch); collective.

    The rank with TP rank 0 and DP rank 0 of the last pipeline stage gets the logits,
    the others None.
    """
    from megatron.core import parallel_state as ps

    from megatron_alp.schedule import forward_backward
    from megatron_alp.models.sharding import gather_vocab

    for c in chunks:
        c.eval()
    record: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        record.append(gather_vocab(logits.float()))
        return logits.float().sum() * 0.0, {}

    # One row per micro-batch; interleaved 1F1B needs at least PP micro-batches.
    b, s = tokens.shape
    pp = ps.get_pipeline_model_parallel_world_size()
    rows = list(range(b)) + [0] * (max(0, pp - b) if len(chunks) > 1 else 0)
    position_ids = torch.arange(s).unsqueeze(0)
    batches = [dict(tokens=tokens[r : r + 1], position_ids=position_ids) for r in rows]
    forward_backward(list(chunks), batches, loss_fn, seq_length=s, forward_only=True)
    record = record[:b]
    holder = (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
    return torch.cat(record, dim=0) if holder and record else None
