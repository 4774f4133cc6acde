#!/usr/bin/env python
"""Logits of a Megatron checkpoint under a TP / PP layout vs HF transformers.

    python tools/convert/verify.py --hf Qwen2.5-0.5B --megatron ckpt/q05 --tp 2 --pp 2

Spawns tp x pp gloo/NCCL ranks itself, or runs under torchrun (WORLD_SIZE set; any
multiple of tp x pp). Prints max |delta logits| over the real vocabulary and top-1
agreement on fixed prompts. Exit codes: 0 OK, 1 beyond --atol / --min-top1, 2 bad input
(checked before any rank starts: paths, flags, and that --hf and the checkpoint describe
the same architecture), 130 / 143 interrupted. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_alp.convert import checks  # noqa: E402  (standard library only)
from megatron_alp.convert.cli import (  # noqa: E402
    non_negative_float,
    positive_int,
    quiet_third_party,
    run_cli,
)

PROG = "verify"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="verify.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model folder (the oracle: weights, config, tokenizer)")
    p.add_argument("--megatron", required=True, help="Megatron dist checkpoint folder")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages per rank (default none)")
    p.add_argument("--seq-len", type=positive_int, default=24, help="tokens per prompt (default 24)")
    p.add_argument("--atol", type=non_negative_float, default=1e-3, help="largest allowed |delta logits| (default 1e-3)")
    p.add_argument("--min-top1", type=non_negative_float, default=0.99, help="smallest allowed top-1 agreement (default 0.99)")
    p.add_argument("--timeout", type=non_negative_float, default=1800, help="seconds the spawned ranks may take (default 1800)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings")
    return p.parse_args(argv)


def _layout(args):
    from megatron_alp.parallel import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
    )


def _report(ref, got, args) -> int:
    from megatron_alp.convert.verify import compare_logits

    report = compare_logits(ref, got)
    ok = report.ok(args.atol, args.min_top1)
    verdict = "OK" if ok else f"FAIL (atol {args.atol:g}, min top-1 {args.min_top1:g})"
    print(f"verify tp={args.tp} pp={args.pp} vpp={args.vpp}: {report} -> {verdict}", flush=True)
    return 0 if ok else 1


def _run(args: argparse.Namespace) -> int:
    if args.min_top1 > 1:
        raise ValueError(f"--min-top1={args.min_top1}: expected a fraction in [0, 1]")
    # Cheap checks first (no torch): exit 2 here, never a rank started for a bad path.
    checks.check_hf_folder(args.hf, flag="--hf")
    ckpt_dir = checks.resolve_checkpoint_dir(args.megatron)
    checks.check_dist_checkpoint_files(ckpt_dir)
    assets = checks.find_hf_assets(ckpt_dir, None)
    checks.check_same_model(Path(args.hf), assets, a_flag="--hf", b_what="the checkpoint's")
    quiet_third_party(args.verbose)
    from megatron_alp.convert.io_utils import load_hf_config
    from megatron_alp.convert.verify import hf_reference_logits, megatron_logits, prompt_batch
    from megatron_alp.models import gpt_args_from_hf
    from megatron_alp.models.builder import validate_layout

    layout = _layout(args)
    model_args = gpt_args_from_hf(load_hf_config(args.hf, flag="--hf"))
    torchrun = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if torchrun else layout.model_parallel_size
    validate_layout(model_args, layout, world_size=world)
    tokens = prompt_batch(args.hf, seq_len=args.seq_len, vocab_size=model_args.vocab_size)
    if not torchrun:
        ref = hf_reference_logits(args.hf, tokens)  # before the ranks start: one copy at a time
        from megatron_alp.launch import RankGroup

        with RankGroup(world, timeout_s=args.timeout) as group:
            got = [g for g in group.run(megatron_logits, args.megatron, layout, tokens) if g is not None]
        return _report(ref, got[0], args)

    import torch
    import torch.distributed as dist

    from megatron_alp import parallel

    parallel.init_distributed()
    got = megatron_logits(args.megatron, layout, tokens)
    code = torch.tensor([0])
    if got is not None:  # the one rank holding the logits compares
        code[0] = _report(hf_reference_logits(args.hf, tokens), got, args)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    parallel.teardown()
    return int(code[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
