#!/usr/bin/env python
"""Logits of a Megatron checkpoint under a TP / PP layout vs HF transformers.

    python tools/convert/verify.py --hf Qwen2.5-0.5B --megatron ckpt/q05 --tp 2 --pp 2

Spawns tp x pp gloo/NCCL ranks itself, or runs under torchrun (WORLD_SIZE set; any
multiple of tp x pp). Prints max |delta logits| over the real vocabulary and top-1
agreement on fixed prompts; exits 1 beyond --atol / --min-top1, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model folder (the oracle: weights, config, tokenizer)")
    p.add_argument("--megatron", required=True, help="Megatron dist checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (default none)")
    p.add_argument("--seq-len", type=int, default=24, help="tokens per prompt (default 24)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed |delta logits| (default 1e-3)")
    p.add_argument("--min-top1", type=float, default=0.99, help="smallest allowed top-1 agreement (default 0.99)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the spawned ranks may take (default 1800)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_alp.convert.io_utils import load_hf_config
    from megatron_alp.convert.verify import hf_reference_logits, megatron_logits, prompt_batch
    from megatron_alp.models import gpt_args_from_hf
    from megatron_alp.models.builder import validate_layout

    try:
        layout = _layout(args)
        model_args = gpt_args_from_hf(load_hf_config(args.hf))
        torchrun = "WORLD_SIZE" in os.environ
        world = int(os.environ["WORLD_SIZE"]) if torchrun else layout.model_parallel_size
        validate_layout(model_args, layout, world_size=world)
        tokens = prompt_batch(args.hf, seq_len=args.seq_len, vocab_size=model_args.vocab_size)
    except ValueError as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
