"""Cheap input checks of the converters (standard library only: no torch, no transformers).

The command-line tools run these before importing anything heavy, so a wrong path or a
broken ``config.json`` is reported in a fraction of a second; the library functions run
them too. Every error is a ``ValueError`` naming the file (or flag) and what was expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "HF_ASSETS_DIR",
    "MEGATRON_METADATA",
    "PROVENANCE_FILE",
    "check_dist_checkpoint_files",
    "check_gguf_file",
    "check_hf_folder",
    "check_same_model",
    "find_hf_assets",
    "read_json",
    "read_provenance",
    "resolve_checkpoint_dir",
]

HF_ASSETS_DIR = "hf"
"""Sub-folder of a converted Megatron checkpoint with the HF config and tokenizer."""
PROVENANCE_FILE = "megatron_alp_convert.json"
"""Provenance of a converted checkpoint (source, dtype, vocabulary padding, versions)."""
MEGATRON_METADATA = "metadata.json"
"""Megatron's marker file: ``{"sharded_backend": "torch_dist", ...}``."""
DCP_METADATA = ".metadata"
"""torch.distributed.checkpoint's index of a dist checkpoint."""


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """``json.loads`` of a file; ValueError naming the file for a missing / unreadable /
    invalid one."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"{what} {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {p} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def check_hf_folder(folder: str | os.PathLike, *, flag: str = "--hf") -> dict[str, Any]:
    """An HF model folder: it exists and holds a ``config.json`` that is a JSON object
    with a ``model_type``. Returns the parsed config."""
    p = Path(folder)
    if not p.is_dir():
        raise ValueError(f"{flag} {p} does not exist or is not a folder (expected an HF model folder)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{flag} {p} has no config.json (expected an HF model folder)")
    cfg = read_json(cfg_path, what="config")
    if not isinstance(cfg, dict):
        raise ValueError(f"config {cfg_path} is a JSON {type(cfg).__name__}, expected an object")
    if not isinstance(cfg.get("model_type"), str):
        raise ValueError(f"config {cfg_path} has no \"model_type\" (expected e.g. \"qwen2\", \"llama\")")
    return cfg


def resolve_checkpoint_dir(path: str | os.PathLike, *, flag: str = "--megatron") -> Path:
    """The folder holding a dist checkpoint: ``path`` itself, or for a Megatron-LM save
    root (``latest_checkpointed_iteration.txt``), its latest ``iter_*`` folder."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{flag} {p}: Megatron checkpoint does not exist or is not a folder")
    if (p / MEGATRON_METADATA).exists():
        return p
    tracker = p / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        it = tracker.read_text().strip()
        if it != "release" and not it.isdigit():
            raise ValueError(f"{tracker} holds {it!r}, expected an iteration number or 'release'")
        sub = p / ("release" if it == "release" else f"iter_{int(it):07d}")
        if (sub / MEGATRON_METADATA).exists():
            return sub
        raise ValueError(f"{tracker} names iteration {it!r}, but {sub} is not a dist checkpoint")
    raise ValueError(
        f"{flag} {p} is not a Megatron dist checkpoint (no {MEGATRON_METADATA}, no "
        "latest_checkpointed_iteration.txt)"
    )


def check_dist_checkpoint_files(ckpt_dir: Path) -> None:
    """Megatron's ``metadata.json`` names the torch_dist backend and DCP's ``.metadata``
    exists and is not empty (the data files are checked against it when it is read)."""
    cfg = read_json(ckpt_dir / MEGATRON_METADATA, what="Megatron checkpoint metadata")
    backend = cfg.get("sharded_backend") if isinstance(cfg, dict) else None
    if backend != "torch_dist":
        raise ValueError(
            f"{ckpt_dir / MEGATRON_METADATA}: sharded_backend {backend!r} is not supported "
            "(expected 'torch_dist')"
        )
    md = ckpt_dir / DCP_METADATA
    if not md.is_file() or md.stat().st_size == 0:
        state = "is empty" if md.is_file() else "is missing"
        raise ValueError(
            f"dist checkpoint {ckpt_dir}: {md.name} {state} (torch.distributed.checkpoint's "
            "index; the checkpoint is incomplete or was not fully copied)"
        )


def find_hf_assets(ckpt_dir: Path, hf_config: str | os.PathLike | None) -> Path:
    """The folder with config.json (+ tokenizer) for ``ckpt_dir``: ``hf_config`` if given,
    else the checkpoint's ``hf/`` folder (or its save root's)."""
    if hf_config is not None:
        p = Path(hf_config)
        if not (p / "config.json").is_file():
            raise ValueError(f"--hf-config {p} has no config.json")
        return p
    for cand in own_hf_assets_candidates(ckpt_dir):
        if (cand / "config.json").is_file():
            return cand
    raise ValueError(
        f"no HF config beside checkpoint {ckpt_dir} (looked in "
        f"{', '.join(str(c) for c in own_hf_assets_candidates(ckpt_dir))}); pass --hf-config "
        "DIR with config.json and tokenizer"
    )


def own_hf_assets_candidates(ckpt_dir: Path) -> list[Path]:
    """Where a checkpoint keeps its own HF config: ``hf/``, or the save root's ``hf/``."""
    cands = [ckpt_dir / HF_ASSETS_DIR]
    if ckpt_dir.name.startswith("iter_") or ckpt_dir.name == "release":
        cands.append(ckpt_dir.parent / HF_ASSETS_DIR)  # a Megatron-LM save root
    return cands


def read_provenance(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of a converted checkpoint ({} if it has none)."""
    p = Path(ckpt_dir) / PROVENANCE_FILE
    if not p.exists():
        return {}
    rec = read_json(p, what="provenance")
    if not isinstance(rec, dict):
        raise ValueError(f"provenance {p} is a JSON {type(rec).__name__}, expected an object")
    return rec


MODEL_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)
"""config.json fields that two folders describing the same weights must agree on."""


def check_same_model(a: Path, b: Path, *, a_flag: str, b_what: str) -> None:
    """ValueError naming the first field in which ``a/config.json`` and ``b/config.json``
    describe different architectures (absent fields are not compared)."""
    ca, cb = check_hf_folder(a, flag=a_flag), read_json(b / "config.json", what="config")
    for field in MODEL_FIELDS:
        va, vb = ca.get(field), cb.get(field) if isinstance(cb, dict) else None
        if va is not None and vb is not None and va != vb:
            raise ValueError(
                f"{field} = {va!r} in {a_flag} {a / 'config.json'}, but {vb!r} in {b_what} "
                f"{b / 'config.json'}: they describe different models"
            )


def check_gguf_file(path: str | os.PathLike, *, flag: str = "--gguf") -> Path:
    """A GGUF file: exists, is a file, starts with the ``GGUF`` magic."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {p} does not exist or is not a file (expected a .gguf file)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{flag} {p} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return p
