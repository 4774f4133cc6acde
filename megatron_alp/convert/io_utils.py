"""Shared plumbing of the converters: HF side files, HF configs, dtypes, sizes.

Output folders (atomic publish, ``--force`` rules, clean-up) are
:mod:`megatron_alp.io_safety`'s; cheap input checks are :mod:`megatron_alp.convert.checks`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_alp.convert.checks import HF_ASSETS_DIR, PROVENANCE_FILE, check_hf_folder, read_provenance

__all__ = [
    "HF_ASSETS_DIR",
    "PROVENANCE_FILE",
    "copy_hf_assets",
    "load_hf_config",
    "parse_dtype",
    "parse_size",
    "read_provenance",
]


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def parse_dtype(value: str | torch.dtype | None, *, flag: str = "--dtype") -> torch.dtype | None:
    """``"bf16"`` / ``"fp32"`` / ``"fp16"`` (or a torch dtype) -> torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key in ("auto", "source", "keep"):
        return None
    if key not in _DTYPES:
        raise ValueError(f"{flag}={value!r} is not one of fp32, bf16, fp16 (or auto)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(value: str | int, *, flag: str = "--max-shard-size") -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / bytes -> bytes (HF's convention: GB = 1e9)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"{flag}={value!r} is not a size such as 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), m.group(2).upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    size = int(number * base ** powers[unit.rstrip("IB")])
    if size <= 0:
        raise ValueError(f"{flag}={value!r} must be positive")
    return size


def copy_hf_assets(src: str | os.PathLike, dst: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy an HF folder's config, tokenizer and other side files (no weights) to ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in skip or p.name.startswith("."):
            continue  # hidden files: e.g. another tool's output marker
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def load_hf_config(folder: str | os.PathLike, *, flag: str = "config", plain: bool = False) -> Any:
    """``transformers.AutoConfig`` of a local folder (never downloads); ValueError naming
    the file when transformers rejects it.

    ``plain``: if ``config.json`` states every field the converters read
    (:func:`~megatron_alp.models.hf.explicit_hf_config`), return it as a plain attribute
    object without importing transformers (~1 s); otherwise fall back to AutoConfig. Only
    for callers that need the architecture, not a ``PretrainedConfig``.
    """
    folder = Path(folder)
    cfg = check_hf_folder(folder, flag=flag)
    if plain:
        from megatron_alp.models.hf import explicit_hf_config

        explicit = explicit_hf_config(cfg)
        if explicit is not None:
            return explicit
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers / huggingface_hub raise many kinds
        text = " ".join(str(e).split()) or type(e).__name__
        text = text if len(text) <= 300 else text[:297] + "..."
        raise ValueError(f"transformers rejects {folder / 'config.json'}: {text}") from None
