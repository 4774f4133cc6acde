#!/usr/bin/env python
"""Megatron dist checkpoint (any TP / PP, ALP or not) -> HF safetensors folder, streamed.

    python tools/convert/megatron_to_hf.py --megatron ckpt/run1 --out hf-out [--dtype bf16]

ALP parameters (alp_log_sigma) and optimizer state are dropped, the vocabulary padding
removed; the output loads with AutoModelForCausalLM.from_pretrained. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True,
                   help="dist checkpoint folder (with metadata.json), or a Megatron-LM save root (latest iteration is used)")
    p.add_argument("--out", required=True, help="output HF folder (written atomically)")
    p.add_argument("--dtype", default="bf16", help="output dtype: bf16 (default), fp16 or fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--hf-config", default=None,
                   help="folder with config.json + tokenizer (default: the checkpoint's hf/ folder, or its parent's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_alp.convert import convert_megatron_to_hf

    try:
        report = convert_megatron_to_hf(
            args.megatron,
            args.out,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            hf_config=args.hf_config,
            force=args.force,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"megatron_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(
        f"megatron_to_hf: {report.model_type}, {report.tensors} tensors, "
        f"{report.bytes_written / 1e9:.3f} GB in {report.seconds:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
