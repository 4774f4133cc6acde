"""GGUF file -> HF safetensors folder, through transformers' own GGUF loader.

    report = convert_gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf/")

transformers reads the GGUF metadata into a config, dequantises every tensor (Q4 / Q8 /
F16 ... -> ``dtype``, fp32 by default), undoes llama.cpp's Q / K row permutation, and
rebuilds the tokenizer from the GGUF vocabulary; the result is saved with
``save_pretrained`` (safetensors) into a temporary folder published atomically (see
:mod:`megatron_alp.io_safety`). The quantisation config is dropped: the folder is a plain
checkpoint that :func:`~megatron_alp.convert.convert_hf_to_megatron` accepts.

Unlike the other converters this holds the whole model in memory (transformers' loader
works that way): fine for the small GGUF models it is meant for.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Callable

import torch

from megatron_alp.convert.checks import check_gguf_file
from megatron_alp.convert.hf_to_megatron import PROGRESS_MIN_BYTES, ConversionReport, check_weights
from megatron_alp.convert.io_utils import parse_dtype, parse_size
from megatron_alp.io_safety import atomic_output_dir, check_output

__all__ = ["convert_gguf_to_hf"]

TOOL = "gguf_to_hf"
"""Name in the output marker: ``--force`` replaces only a folder this tool wrote."""


def convert_gguf_to_hf(
    gguf_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "fp32",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    tokenizer: bool = True,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Dequantise ``gguf_file`` into an HF folder at ``out_dir`` (see module doc).

    ``dtype``: the dtype of the saved weights (fp32 default; "auto" means fp32 too, since
    a quantised tensor has no float dtype of its own). ``tokenizer``: also convert the
    GGUF vocabulary (a failure there is an error; pass False to skip it). ``progress``:
    transformers' progress bars, for files of at least 256 MiB.
    """
    t0 = time.perf_counter()
    path = check_gguf_file(gguf_file)
    out_dtype = parse_dtype(dtype) or torch.float32
    shard_bytes = parse_size(max_shard_size)
    target = check_output(out_dir, tool=TOOL, inputs=[path], force=force)
    for mod, pkg in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ValueError(f"reading {path} needs the {mod!r} package: pip install '{pkg}'")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress or path.stat().st_size < PROGRESS_MIN_BYTES:
        hf_logging.disable_progress_bar()  # transformers' own bars (dequantising, loading)

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=out_dtype, local_files_only=True
        )
        tok = (
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            if tokenizer else None
        )
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # transformers' message says what it could not map
        text = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"transformers cannot load {path} ({type(e).__name__}: {text[:300]}); "
            "pass --no-tokenizer if only the tokenizer is the problem"
        ) from None
    if hasattr(model.config, "quantization_config"):  # dequantised: a plain checkpoint now
        del model.config.quantization_config
    model.hf_quantizer = None
    nbytes, seen = 0, set()
    for name, p in model.state_dict().items():
        if p.data_ptr() in seen:  # tied: saved once
            continue
        seen.add(p.data_ptr())
        check_weights(p, name, str(path), allow_non_float=False, allow_non_finite=False)
        nbytes += p.numel() * p.element_size()
    with atomic_output_dir(target, expected_bytes=nbytes, say=say) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        if tok is not None:
            tok.save_pretrained(tmp)
    return ConversionReport(
        source=str(path),
        target=str(target.path),
        model_type=str(model.config.model_type),
        tensors=len(seen),
        bytes_read=path.stat().st_size,
        bytes_written=nbytes,
        seconds=time.perf_counter() - t0,
    )
