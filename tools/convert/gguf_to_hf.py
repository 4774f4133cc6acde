#!/usr/bin/env python
"""GGUF file -> HF safetensors folder (dequantised), via transformers' GGUF loader.

    python tools/convert/gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-hf
    python tools/convert/hf_to_megatron.py --hf smollm2-hf --out ckpt/smollm2

Needs the gguf and accelerate packages. The output holds config.json, safetensors weights
(fp32 unless --dtype) and the tokenizer rebuilt from the GGUF vocabulary. --out is written
atomically; --force replaces only an earlier output of this tool. Exit codes: 0 done, 2 bad
input, 130 / 143 interrupted. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_alp.convert import checks  # noqa: E402  (standard library only)
from megatron_alp.convert.cli import dtype_choice, finish_line, quiet_third_party, run_cli  # noqa: E402
from megatron_alp.io_safety import check_output  # noqa: E402

PROG = "gguf_to_hf"
PROGRESS_MIN_BYTES = 256 * 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gguf_to_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="output HF folder (written atomically)")
    p.add_argument("--dtype", type=dtype_choice, default="fp32", help="dtype of the saved weights: fp32 (default), bf16, fp16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not convert the GGUF vocabulary into a tokenizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (shown for files of 256 MiB or more)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier output of this tool (never anything else)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    gguf = checks.check_gguf_file(args.gguf)
    check_output(args.out, tool=PROG, inputs=[gguf], force=args.force)
    quiet_third_party(args.verbose)
    if args.no_progress or gguf.stat().st_size < PROGRESS_MIN_BYTES:
        # transformers' GGUF loader draws its own tqdm bars; tqdm reads this on import.
        os.environ["TQDM_DISABLE"] = "1"
    from megatron_alp.convert.gguf_to_hf import convert_gguf_to_hf

    report = convert_gguf_to_hf(gguf, args.out, dtype=args.dtype, force=args.force,
                                max_shard_size=args.max_shard_size, tokenizer=not args.no_tokenizer,
                                progress=not args.no_progress)
    print(finish_line(PROG, f"{report.model_type}, {report.tensors} tensors", report.bytes_written,
                      report.seconds, report.target), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
