#!/usr/bin/env python
"""Megatron dist checkpoint (any TP / PP, ALP or not) -> HF safetensors folder, streamed.

    python tools/convert/megatron_to_hf.py --megatron ckpt/run1 --out hf-out [--dtype bf16]

ALP parameters (alp_log_sigma) and optimizer state are dropped, the vocabulary padding
removed; the output loads with AutoModelForCausalLM.from_pretrained. --out is written
atomically and never over an input; --force replaces only an earlier output of this tool.
Exit codes: 0 done, 2 bad input (one line naming the file / tensor / flag), 130 / 143
interrupted (nothing is left behind). See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_alp.convert import checks  # noqa: E402  (standard library only)
from megatron_alp.convert.cli import dtype_choice, finish_line, quiet_third_party, run_cli  # noqa: E402
from megatron_alp.io_safety import check_output  # noqa: E402

PROG = "megatron_to_hf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatron_to_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True,
                   help="dist checkpoint folder (with metadata.json), or a Megatron-LM save root (latest iteration is used)")
    p.add_argument("--out", required=True, help="output HF folder (written atomically)")
    p.add_argument("--dtype", type=dtype_choice, default="auto",
                   help="output dtype: auto (the checkpoint's stored dtype; default), bf16, fp16 or fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--hf-config", default=None,
                   help="folder with config.json + tokenizer (default: the checkpoint's hf/ folder, or its parent's)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier output of this tool (never anything else)")
    p.add_argument("--allow-non-finite", action="store_true", help="export NaN / inf weights instead of refusing them")
    p.add_argument("--allow-non-float", action="store_true", help="export integer weights instead of refusing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on conversions of 256 MiB or more)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    # Cheap checks first: a bad path is reported before torch is imported.
    ckpt_dir = checks.resolve_checkpoint_dir(args.megatron)
    checks.check_dist_checkpoint_files(ckpt_dir)
    assets = checks.find_hf_assets(ckpt_dir, args.hf_config)
    check_output(args.out, tool=PROG, inputs=[args.megatron, ckpt_dir, assets], force=args.force)
    quiet_third_party(args.verbose)
    from megatron_alp.convert.megatron_to_hf import convert_megatron_to_hf

    report = convert_megatron_to_hf(
        args.megatron,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        hf_config=args.hf_config,
        force=args.force,
        progress=not args.no_progress,
        allow_non_finite=args.allow_non_finite,
        allow_non_float=args.allow_non_float,
    )
    print(finish_line(PROG, f"{report.model_type}, {report.tensors} tensors", report.bytes_written,
                      report.seconds, report.target), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
