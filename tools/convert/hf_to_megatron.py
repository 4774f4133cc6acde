#!/usr/bin/env python
"""HF safetensors folder -> Megatron dist checkpoint (torch_dist), streamed.

    python tools/convert/hf_to_megatron.py --hf Qwen2.5-7B --out ckpt/qwen2.5-7b [--dtype bf16]

The checkpoint loads under any TP / PP / virtual PP with
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` (or
``megatron_alp.convert.load_megatron_checkpoint``). --out is written atomically and never
inside --hf; --force replaces only an earlier output of this tool. Exit codes: 0 done,
2 bad input (one line naming the file / tensor / flag), 130 / 143 interrupted (Ctrl-C /
SIGTERM; nothing is left behind). See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_alp.convert import checks  # noqa: E402  (standard library only)
from megatron_alp.convert.cli import (  # noqa: E402
    dtype_choice,
    finish_line,
    positive_int,
    quiet_third_party,
    run_cli,
)
from megatron_alp.io_safety import check_output  # noqa: E402

PROG = "hf_to_megatron"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf_to_megatron.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model folder: config.json + *.safetensors (single or sharded with an index) + tokenizer")
    p.add_argument("--out", required=True, help="output folder of the Megatron dist checkpoint (written atomically)")
    p.add_argument("--dtype", type=dtype_choice, default="auto", help="stored dtype: auto (keep each tensor's), bf16, fp16 or fp32 (default: auto)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier output of this tool (never anything else)")
    p.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128,
                   help="pad the vocabulary to a multiple of this (must match the training run; default 128)")
    p.add_argument("--threads", type=positive_int, default=1, help="threads that read and assemble chunks while the main thread writes (threads + 1 chunk buffers in memory; default 1)")
    p.add_argument("--direct-io", choices=("auto", "on", "off"), default="auto",
                   help="write the checkpoint with O_DIRECT (skipping the page cache): auto where the "
                        "file system accepts it, on (required), off (always buffered; use it if a "
                        "network file system misbehaves with O_DIRECT); default auto")
    p.add_argument("--allow-non-finite", action="store_true", help="convert NaN / inf weights instead of refusing them")
    p.add_argument("--allow-non-float", action="store_true", help="convert integer (quantised) weights instead of refusing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on conversions of 256 MiB or more)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    # Cheap checks first: a bad path is reported before torch is imported.
    checks.check_hf_folder(args.hf, flag="--hf")
    check_output(args.out, tool=PROG, inputs=[args.hf], force=args.force)
    quiet_third_party(args.verbose)
    from megatron_alp.convert.hf_to_megatron import convert_hf_to_megatron

    report = convert_hf_to_megatron(
        args.hf,
        args.out,
        dtype=args.dtype,
        force=args.force,
        progress=not args.no_progress,
        thread_count=args.threads,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        allow_non_finite=args.allow_non_finite,
        allow_non_float=args.allow_non_float,
        direct_io=args.direct_io,
    )
    print(finish_line(PROG, f"{report.model_type}, {report.tensors} tensors", report.bytes_written,
                      report.seconds, report.target), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
