"""Prompt datasets (local JSONL / Parquet) and a resumable, seeded sampler."""

from megatron_alp.data.prompts import PromptDataset, PromptSampler

__all__ = ["PromptDataset", "PromptSampler"]
