#!/usr/bin/env python
"""HF safetensors folder -> Megatron dist checkpoint (torch_dist), streamed.

    python tools/convert/hf_to_megatron.py --hf Qwen2.5-7B --out ckpt/qwen2.5-7b [--dtype bf16]

The checkpoint loads under any TP / PP / virtual PP with
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` (or
``megatron_alp.convert.load_megatron_checkpoint``). See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model folder: config.json + *.safetensors (single or sharded with an index) + tokenizer")
    p.add_argument("--out", required=True, help="output folder of the Megatron dist checkpoint (written atomically)")
    p.add_argument("--dtype", default="auto", help="stored dtype: auto (keep each tensor's), bf16, fp16 or fp32 (default: auto)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (must match the training run; default 128)")
    p.add_argument("--threads", type=int, default=1, help="writer threads (each holds one chunk in memory; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_alp.convert import convert_hf_to_megatron

    try:
        report = convert_hf_to_megatron(
            args.hf,
            args.out,
            dtype=args.dtype,
            force=args.force,
            progress=not args.no_progress,
            thread_count=args.threads,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
    except ValueError as e:
        print(f"hf_to_megatron: error: {e}", file=sys.stderr)
        return 2
    print(
        f"hf_to_megatron: {report.model_type}, {report.tensors} tensors, "
        f"{report.bytes_written / 1e9:.3f} GB in {report.seconds:.1f} s "
        f"({report.bytes_written / 1e9 / max(report.seconds, 1e-9):.2f} GB/s) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
