"""Smoke job: a tiny model trained a few steps under TP x PP, checked against TP=1.

    python -m megatron_alp.smoke                 # spawns 4 gloo ranks: TP=2 x PP=2
    torchrun --nproc-per-node 4 -m megatron_alp.smoke --tp 2 --pp 2

Builds a tiny Qwen2-style GPTModel with megatron-core, loads the same seeded weights
into a TP=1 layout and the requested one, runs ``--steps`` Adam steps of next-token
cross-entropy over ``--micro-batches`` micro-batches through megatron-core's schedules
(1F1B when PP > 1), prints the losses, and exits non-zero if the two layouts disagree by
more than ``--tol``. Until the RL trainer lands this is the project's main job.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_alp.parallel import ParallelConfig


def _at_least(low: float, kind: type):
    """argparse type: a ``kind`` number >= ``low``, the flag named by argparse on error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value

    return parse


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_alp.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=_at_least(1, int), default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=_at_least(1, int), default=2, help="pipeline-parallel size (default 2)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    p.add_argument("--model-type", default="qwen2", help="qwen2 | qwen3 | llama (default qwen2)")
    p.add_argument("--steps", type=_at_least(1, int), default=3, help="optimizer steps (default 3)")
    p.add_argument("--micro-batches", type=_at_least(1, int), default=4, help="micro-batches per step (default 4)")
    p.add_argument("--tol", type=_at_least(0.0, float), default=1e-5, help="max |loss - TP1 loss| allowed")
    p.add_argument(
        "--nproc", type=_at_least(1, int), default=None,
        help="ranks to spawn when not started by torchrun (default tp*pp)",
    )
    return p.parse_args(argv)


def _body(ns: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_alp.testing.layouts import canonical_state, run_layout
    from megatron_alp.models.tiny import tiny_batches, tiny_hf_config

    rank = dist.get_rank()
    hf = tiny_hf_config(ns.model_type)
    full = canonical_state(hf, seed=1)
    batches = tiny_batches(ns.micro_batches, seed=2)
    layout = ParallelConfig(
        tensor_model_parallel_size=ns.tp, pipeline_model_parallel_size=ns.pp, sequence_parallel=ns.sp
    )

    def report(name: str):
        def on_step(step: int, losses: list[float]) -> None:
            from megatron.core import parallel_state as ps

            first_replica = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            if losses and first_replica:
                mean = sum(losses) / len(losses)
                print(f"[smoke] {name:>10} step {step + 1}/{ns.steps}: loss {mean:.6f}", flush=True)
        return on_step

    t0 = time.perf_counter()
    got = run_layout(hf, layout, full, batches, steps=ns.steps, on_step=report(f"tp{ns.tp}pp{ns.pp}"))
    t1 = time.perf_counter()
    ref = run_layout(hf, ParallelConfig(), full, batches, steps=ns.steps, on_step=report("tp1"))
    return dict(rank=rank, got=got["losses"], ref=ref["losses"], seconds=t1 - t0)


def _compare(results: list[dict], ns: argparse.Namespace) -> int:
    got = next(r["got"] for r in results if r["got"] is not None)
    ref = next(r["ref"] for r in results if r["ref"] is not None)
    diff = max(abs(a - b) for ga, ra in zip(got, ref) for a, b in zip(ga, ra))
    secs = max(r["seconds"] for r in results)
    ok = diff <= ns.tol
    print(
        f"[smoke] TP={ns.tp} x PP={ns.pp}{' +SP' if ns.sp else ''} vs TP=1: max |delta loss| = "
        f"{diff:.2e} over {ns.steps} steps x {ns.micro_batches} micro-batches "
        f"({secs:.1f} s) -> {'OK' if ok else 'MISMATCH'}",
        flush=True,
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    cfg = ParallelConfig(
        tensor_model_parallel_size=ns.tp, pipeline_model_parallel_size=ns.pp, sequence_parallel=ns.sp
    )
    from megatron_alp.models import gpt_args_from_hf, validate_layout
    from megatron_alp.models.tiny import tiny_hf_config

    # Clear errors (heads / layers not divisible, ...) before any rank starts.
    validate_layout(gpt_args_from_hf(tiny_hf_config(ns.model_type)), cfg)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

        from megatron_alp import parallel

        cfg.data_parallel_size(int(os.environ["WORLD_SIZE"]))
        parallel.init_distributed()
        result = _body(ns)
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        code = _compare(results, ns) if dist.get_rank() == 0 else 0
        parallel.teardown()
        return code
    from megatron_alp.launch import run_on_ranks

    nproc = ns.nproc or cfg.model_parallel_size
    cfg.data_parallel_size(nproc)  # clear error before any rank starts
    print(f"[smoke] starting {nproc} gloo ranks (TP={ns.tp}, PP={ns.pp}) ...", flush=True)
    return _compare(run_on_ranks(nproc, _body, ns, timeout_s=1800), ns)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # bad flags: the message names the value and what is allowed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
