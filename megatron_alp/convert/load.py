"""Load a dist checkpoint into this rank's GPTModel chunks (any TP / PP / virtual PP).

``dist_checkpointing.load(model.sharded_state_dict(), dir)`` works on a converted
checkpoint as is. :func:`load_megatron_checkpoint` wraps it for the cases a plain call
gets wrong or explains badly:

* a model with ALP (``alp_log_sigma``) loading a checkpoint converted from HF, which has
  no sigma: those parameters keep their initial value and are reported;
* a Transformer Engine model whose layers have ``_extra_state`` objects the local-spec
  checkpoint lacks (FP8 metadata, None when not in FP8): they are skipped;
* a global-shape mismatch (most often the padded vocabulary: a TP that does not divide
  ``make_vocab_size_divisible_by``): a ValueError naming the key and both shapes, checked
  before anything is read.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from megatron_alp.convert.dist_ckpt import DistCheckpoint, resolve_checkpoint_dir
from megatron_alp.convert.mapping import is_alp_param

__all__ = ["load_megatron_checkpoint", "sharded_state_dict_of"]


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def sharded_state_dict_of(chunks: Sequence[torch.nn.Module]) -> dict:
    """``{"model0": ..., "model1": ...}``: the chunks' sharded state dicts, Megatron-LM style."""
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def load_megatron_checkpoint(
    chunks: Sequence[torch.nn.Module], ckpt_dir: str | os.PathLike
) -> list[str]:
    """Load ``ckpt_dir`` into ``chunks`` (collective over all ranks); see the module doc.

    Returns the state-dict names that the checkpoint did not provide and were skipped
    by rule (ALP parameters, ``_extra_state``); any other gap is an error.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    path = resolve_checkpoint_dir(ckpt_dir)
    dc = DistCheckpoint(path)
    objects = set(dc.object_keys())
    sd = sharded_state_dict_of(chunks)

    def absent(x) -> bool:
        if isinstance(x, ShardedTensor):
            if not dc.has(x.key):
                if is_alp_param(x.key):
                    return True
                raise ValueError(f"dist checkpoint {path} lacks tensor {x.key!r}")
            if tuple(x.global_shape) != dc.global_shape(x.key):
                hint = (
                    " (the padded vocabulary differs: the model pads to a multiple of "
                    "lcm(make_vocab_size_divisible_by, TP); convert with a matching "
                    "--make-vocab-size-divisible-by)"
                    if "word_embeddings" in x.key or "output_layer" in x.key
                    else ""
                )
                raise ValueError(
                    f"shape mismatch: model expects {x.key} with global shape "
                    f"{tuple(x.global_shape)}, checkpoint {path} has "
                    f"{dc.global_shape(x.key)}{hint}"
                )
            return False
        if isinstance(x, ShardedTensorFactory):
            if not dc.has(x.key):
                raise ValueError(f"dist checkpoint {path} lacks tensor {x.key!r}")
            return False
        if isinstance(x, ShardedObject):
            if x.unique_key in objects:
                return False
            if x.key.endswith("_extra_state"):
                return True
            raise ValueError(f"dist checkpoint {path} lacks object {x.unique_key!r}")
        return False

    skipped_sd, sd = extract_matching_values(sd, absent)
    skipped = _names(skipped_sd)
    loaded = dist_checkpointing.load(sd, str(path))
    for i, c in enumerate(chunks):
        state = loaded.get(f"model{i}", {})
        missing, unexpected = _unwrap(c).load_state_dict(state, strict=False)
        bad = [m for m in missing if not (is_alp_param(m) or m.endswith("_extra_state"))]
        if bad or unexpected:
            raise ValueError(
                f"loading {path}: parameters not provided {bad[:5]}, unexpected {list(unexpected)[:5]}"
            )
    return skipped


def _names(tree) -> list[str]:
    """Leaf keys of a nested (sharded) state dict."""
    if not isinstance(tree, dict):
        return []
    out: list[str] = []
    for k, v in tree.items():
        out += _names(v) if isinstance(v, dict) else [str(k)]
    return out
