"""Shared plumbing of the converters: atomic output folders, HF side files, dtypes, sizes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "HF_ASSETS_DIR",
    "PROVENANCE_FILE",
    "atomic_output_dir",
    "check_output_dir",
    "copy_hf_assets",
    "load_hf_config",
    "parse_dtype",
    "parse_size",
    "read_provenance",
]

HF_ASSETS_DIR = "hf"
"""Sub-folder of a converted Megatron checkpoint with the HF config and tokenizer."""
PROVENANCE_FILE = "megatron_alp_convert.json"
"""Provenance of a converted checkpoint (source, dtype, vocabulary padding, versions)."""

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


def check_output_dir(target: str | os.PathLike, *, force: bool) -> Path:
    """``target`` as an absolute path; ValueError if it is a file, or a non-empty folder
    without ``force``. Converters call it first, before reading any weights."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {target} exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not force:
        raise ValueError(
            f"output folder {target} is not empty; pass --force (force=True) to replace it"
        )
    return target


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; rename it to ``target`` on success.

    A non-empty ``target`` is refused unless ``force`` (then replaced, after the new
    content is complete). On any error the temporary folder is removed; a killed process
    leaves only a hidden ``.<name>.tmp-*`` folder, never something that looks complete.
    """
    target = check_output_dir(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{tag}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def copy_hf_assets(src: str | os.PathLike, dst: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy an HF folder's config, tokenizer and other side files (no weights) to ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in skip:
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def load_hf_config(folder: str | os.PathLike) -> Any:
    """``transformers.AutoConfig`` of a local folder (never downloads)."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} has no config.json (expected an HF model folder)")
    return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)


def read_provenance(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of a converted checkpoint ({} if it has none)."""
    p = Path(ckpt_dir) / PROVENANCE_FILE
    return json.loads(p.read_text()) if p.exists() else {}
