"""Megatron dist checkpoint -> HF safetensors folder, streamed.

    convert_megatron_to_hf("ckpt/run1", "hf-out/", dtype="bf16", max_shard_size="5GB")

Reads a checkpoint written by :func:`convert_hf_to_megatron` or by Megatron training at
any TP / PP / virtual PP (a Megatron-LM save root resolves to its latest iteration),
tensor by tensor; writes sharded safetensors with an index, ``config.json`` (its dtype
set to the output dtype) and the tokenizer files. ALP parameters (``alp_log_sigma``) are
dropped, the vocabulary padding is removed, and optimizer state is ignored. Any other
model tensor in the checkpoint that the mapping does not know is an error, so nothing is
lost silently. The HF config comes from the checkpoint's ``hf/`` folder (or the save
root's, for a Megatron-LM ``iter_*`` folder) unless ``hf_config`` names a folder; the
checkpoint's own record (its provenance file, its own ``hf/config.json``) wins over a
``hf_config`` that disagrees on architecture, layer count or vocabulary size (error), and
the output dtype is the checkpoint's (``dtype="auto"``) unless asked otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_alp.convert.checks import (
    PROVENANCE_FILE,
    find_hf_assets,
    own_hf_assets_candidates,
    read_json,
    read_provenance,
    resolve_checkpoint_dir,
)
from megatron_alp.convert.dist_ckpt import DistCheckpoint, checkpoint_key
from megatron_alp.convert.hf_to_megatron import (
    DEFAULT_BLOCK_BYTES,
    ConversionReport,
    _check_model_type,
    _progress,
    check_weights,
)
from megatron_alp.convert.io_utils import (
    copy_hf_assets,
    dtype_name,
    load_hf_config,
    parse_dtype,
    parse_size,
)
from megatron_alp.convert.mapping import ModelMapping, get_mapping, is_alp_param
from megatron_alp.convert.safetensors_io import ShardedSafetensorsWriter
from megatron_alp.io_safety import atomic_output_dir, check_output
from megatron_alp.models.hf import gpt_args_from_hf

__all__ = [
    "check_against_record",
    "convert_megatron_to_hf",
    "find_hf_assets",
    "stored_dtype",
    "validate_dist_checkpoint",
]

TOOL = "megatron_to_hf"
"""Name in the output marker: ``--force`` replaces only a folder this tool wrote."""

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def check_against_record(ckpt_dir: Path, assets: Path, args) -> None:
    """The checkpoint's own record wins: its provenance file and its own ``hf/config.json``
    must agree with the config used for export (``--hf-config``) on the architecture, the
    layer count and the vocabulary size. A disagreement is an error naming both values
    (a smaller vocabulary would silently drop trained embedding rows)."""
    used = assets / "config.json"
    records: list[tuple[str, dict]] = []
    prov = read_provenance(ckpt_dir)
    if prov:
        records.append((str(ckpt_dir / PROVENANCE_FILE), {
            "model_type": prov.get("model_type"),
            "num_hidden_layers": prov.get("num_layers"),
            "vocab_size": prov.get("vocab_size"),
        }))
    for own in own_hf_assets_candidates(ckpt_dir):
        cfg = own / "config.json"
        if cfg.is_file() and cfg.resolve() != used.resolve():
            own_cfg = read_json(cfg, what="config")
            if isinstance(own_cfg, dict):
                records.append((str(cfg), {k: own_cfg.get(k) for k in
                                           ("model_type", "num_hidden_layers", "vocab_size")}))
            break
    given = {
        "model_type": args.model_type,
        "num_hidden_layers": args.num_layers,
        "vocab_size": args.vocab_size,
    }
    for where, rec in records:
        for field, value in given.items():
            want = rec.get(field)
            if want is not None and want != value:
                raise ValueError(
                    f"{field} = {value!r} in {used} disagrees with the checkpoint's own record "
                    f"{where}: {field} = {want!r}; the checkpoint's record wins (drop "
                    "--hf-config, or give the config it was trained with)"
                )


def stored_dtype(dc: DistCheckpoint, keys: list[str]) -> torch.dtype:
    """The dtype holding most of the model's bytes in the checkpoint (``--dtype auto``)."""
    count: dict[torch.dtype, int] = {}
    for k in keys:
        n = 1
        for s in dc.global_shape(k):
            n *= s
        count[dc.dtype(k)] = count.get(dc.dtype(k), 0) + n
    return max(count, key=count.get)


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
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: str | int = "5GB",
    hf_config: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    allow_non_float: bool = False,
    allow_non_finite: bool = False,
    say: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert a Megatron dist checkpoint into an HF folder at ``out_dir`` (see module doc).

    ``dtype`` "auto" (or None) keeps the checkpoint's stored dtype; ``"bf16"`` / ``"fp16"``
    / ``"fp32"`` cast. ``force`` replaces an earlier output of this converter, never
    anything else. Integer / NaN / inf weights are refused unless allowed.
    """
    t0 = time.perf_counter()
    want_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    ckpt_dir = resolve_checkpoint_dir(ckpt)
    assets = find_hf_assets(ckpt_dir, hf_config)
    target = check_output(out_dir, tool=TOOL, inputs=[ckpt, ckpt_dir, assets], force=force)
    _check_model_type(assets, flag="--hf-config" if hf_config is not None else "config")
    config = load_hf_config(assets)
    args = gpt_args_from_hf(config)
    check_against_record(ckpt_dir, assets, args)
    dc = DistCheckpoint(ckpt_dir)
    emb_key = "embedding.word_embeddings.weight"
    if not dc.has(emb_key):
        raise ValueError(f"dist checkpoint {ckpt_dir} lacks tensor {emb_key!r}")
    mapping = ModelMapping(
        get_mapping(args.model_type), args, padded_vocab=dc.global_shape(emb_key)[0]
    )
    validate_dist_checkpoint(mapping, dc)
    keys = [checkpoint_key(n)[0] for n in mapping.megatron_names()]
    if not allow_non_float:
        for k in dict.fromkeys(keys):
            check_weights(torch.empty(0, dtype=dc.dtype(k)), k, str(ckpt_dir),
                          allow_non_float=False, allow_non_finite=True)
    out_dtype = want_dtype or stored_dtype(dc, list(dict.fromkeys(keys)))

    def checked(t: torch.Tensor, key: str, layer: int | None) -> torch.Tensor:
        name = key if layer is None else f"{key} (layer {layer})"
        check_weights(t, name, str(ckpt_dir), allow_non_float=allow_non_float,
                      allow_non_finite=allow_non_finite)
        return t

    plan = [(h, mapping.hf_shape(h), out_dtype) for h in mapping.hf_names()]
    total = sum(_nbytes(s, out_dtype) for _, s, _ in plan)
    read_bytes = 0
    with atomic_output_dir(target, expected_bytes=total, say=say) as tmp:
        bar = _progress(total, f"megatron->hf {ckpt_dir.name}", progress)
        try:
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
                            t = checked(dc.read_layer(key, None, rows=(r0, min(r0 + step, hf_rows))), key, None)
                            read_bytes += t.numel() * t.element_size()
                            writer.write(hf_name, t, row_offset=r0)
                            if bar is not None:
                                bar.update(_nbytes(t.shape, out_dtype))
                        continue
                    t = checked(dc.read_layer(key, layer), key, layer)
                    read_bytes += t.numel() * t.element_size()
                    for hf_name, x in mapping.to_hf(name, t):
                        writer.write(hf_name, x)
                        if bar is not None:
                            bar.update(_nbytes(x.shape, out_dtype))
                    del t
        finally:
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
        target=str(target.path),
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
