"""Megatron dist checkpoint -> HF safetensors folder, streamed.

    convert_megatron_to_hf("ckpt/run1", "hf-out/", dtype="bf16", max_shard_size="5GB")

Reads a checkpoint written by :func:`convert_hf_to_megatron` or by Megatron training at
any TP / PP / virtual PP (a Megatron-LM save root resolves to its latest iteration),
tensor by tensor; writes sharded safetensors with an index, ``config.json`` (its dtype
set to the output dtype) and the tokenizer files. ALP parameters (``alp_log_sigma``) are
dropped, the vocabulary padding is removed, and optimizer state is ignored. Any other
model tensor in the checkpoint that the mapping does not know is an error, so nothing is
lost silently. The HF config comes from the checkpoint's ``hf/`` folder (or the save
root's, for a Megatron-LM ``iter_*`` folder) unless ``hf_config`` names a folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from megatron_alp.convert.dist_ckpt import DistCheckpoint, checkpoint_key, resolve_checkpoint_dir
from megatron_alp.convert.hf_to_megatron import (
    DEFAULT_BLOCK_BYTES,
    ConversionReport,
    _check_model_type,
    _progress,
)
from megatron_alp.convert.io_utils import (
    HF_ASSETS_DIR,
    atomic_output_dir,
    check_output_dir,
    copy_hf_assets,
    dtype_name,
    load_hf_config,
    parse_dtype,
    parse_size,
)
from megatron_alp.convert.mapping import ModelMapping, get_mapping, is_alp_param
from megatron_alp.convert.safetensors_io import ShardedSafetensorsWriter
from megatron_alp.models.hf import gpt_args_from_hf

__all__ = ["convert_megatron_to_hf", "find_hf_assets", "validate_dist_checkpoint"]

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def find_hf_assets(ckpt_dir: Path, hf_config: str | os.PathLike | None) -> Path:
    """The folder with config.json (+ tokenizer) for ``ckpt_dir``."""
    if hf_config is not None:
        p = Path(hf_config)
        if not (p / "config.json").exists():
            raise ValueError(f"--hf-config {p} has no config.json")
        return p
    cands = [ckpt_dir / HF_ASSETS_DIR]
    if ckpt_dir.name.startswith("iter_") or ckpt_dir.name == "release":
        cands.append(ckpt_dir.parent / HF_ASSETS_DIR)  # a Megatron-LM save root
    for cand in cands:
        if (cand / "config.json").exists():
            return cand
    raise ValueError(
        f"no HF config beside checkpoint {ckpt_dir} (looked in "
        f"{', '.join(str(c) for c in cands)}); pass --hf-config DIR with config.json and tokenizer"
    )


def validate_dist_checkpoint(mapping: ModelMapping, ckpt: DistCheckpoint) -> None:
    """Every canonical tensor has its key and global shape; no unknown model tensor."""
    L = mapping.args.num_layers
    used = set()
    for name in mapping.megatron_names():
        key, layer = checkpoint_key(name)
        want = mapping.megatron_shape(name)
        if layer is not None:
            want = (L, *want)
        if not ckpt.has(key):
            raise ValueError(
                f"dist checkpoint {ckpt.path} lacks tensor {key!r} (canonical {name}), which a "
                f"{mapping.model_type} model of this config needs"
            )
        got = ckpt.global_shape(key)
        if got != want:
            raise ValueError(
                f"shape mismatch: checkpoint tensor {key} in {ckpt.path} has global shape "
                f"{got}, the HF config implies {want}"
            )
        used.add(key)
    unknown = [
        k
        for k in ckpt.tensor_keys()
        if k.startswith(_MODEL_PREFIXES) and k not in used and not is_alp_param(k)
    ]
    if unknown:
        raise ValueError(
            f"dist checkpoint {ckpt.path} has model tensor(s) the {mapping.model_type} mapping "
            f"does not export: {unknown[:5]} (wrong HF config, e.g. tie_word_embeddings?)"
        )


def convert_megatron_to_hf(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    max_shard_size: str | int = "5GB",
    hf_config: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> ConversionReport:
    """Convert a Megatron dist checkpoint into an HF folder at ``out_dir`` (see module doc)."""
    t0 = time.perf_counter()
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        raise ValueError("--dtype must name a dtype (fp32, bf16, fp16) for HF output")
    max_bytes = parse_size(max_shard_size)
    check_output_dir(out_dir, force=force)
    ckpt_dir = resolve_checkpoint_dir(ckpt)
    assets = find_hf_assets(ckpt_dir, hf_config)
    _check_model_type(assets)
    config = load_hf_config(assets)
    args = gpt_args_from_hf(config)
    dc = DistCheckpoint(ckpt_dir)
    emb_key = "embedding.word_embeddings.weight"
    if not dc.has(emb_key):
        raise ValueError(f"dist checkpoint {ckpt_dir} lacks tensor {emb_key!r}")
    mapping = ModelMapping(
        get_mapping(args.model_type), args, padded_vocab=dc.global_shape(emb_key)[0]
    )
    validate_dist_checkpoint(mapping, dc)

    plan = [(h, mapping.hf_shape(h), out_dtype) for h in mapping.hf_names()]
    total = sum(_nbytes(s, out_dtype) for _, s, _ in plan)
    bar = _progress(total, f"megatron->hf {ckpt_dir.name}", progress)
    read_bytes = 0
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes=max_bytes)
        with writer:
            for name in mapping.megatron_names():
                key, layer = checkpoint_key(name)
                shape = mapping.megatron_shape(name)
                row_bytes = _nbytes(shape[1:], dc.dtype(key))
                if layer is None and mapping.row_aligned(name) and shape[0] * row_bytes > block_bytes:
                    (hf_name,) = mapping.hf_sources(name)
                    hf_rows = mapping.hf_shape(hf_name)[0]  # padding rows are not read
                    step = max(1, block_bytes // row_bytes)
                    for r0 in range(0, hf_rows, step):
                        t = dc.read_layer(key, None, rows=(r0, min(r0 + step, hf_rows)))
                        read_bytes += t.numel() * t.element_size()
                        writer.write(hf_name, t, row_offset=r0)
                        if bar is not None:
                            bar.update(_nbytes(t.shape, out_dtype))
                    continue
                t = dc.read_layer(key, layer)
                read_bytes += t.numel() * t.element_size()
                for hf_name, x in mapping.to_hf(name, t):
                    writer.write(hf_name, x)
                    if bar is not None:
                        bar.update(_nbytes(x.shape, out_dtype))
                del t
        if bar is not None:
            bar.close()
        copy_hf_assets(assets, tmp, skip=("config.json",))
        cfg = json.loads((assets / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["dtype"] = dtype_name(out_dtype)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(out_dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return ConversionReport(
        source=str(ckpt_dir),
        target=str(out_dir),
        model_type=args.model_type,
        tensors=len(plan),
        bytes_read=read_bytes,
        bytes_written=total,
        seconds=time.perf_counter() - t0,
    )


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n
