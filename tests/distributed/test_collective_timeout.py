"""Collective timeouts (issue 18.2): the timeout follows ``--distributed-timeout-minutes``,
and a phase where rank 0 works alone for longer than it does not kill the job.

On a GPU job every rank but 0 used to wait for rank 0's rollouts inside an NCCL
broadcast (``loop._broadcast``), under a fixed 10-minute watchdog: a 7B multi-turn step's
generation takes longer. Here, on gloo ranks, the collective timeout is made tiny (2 s)
and rank 0 is busy for 5 s before the trainer's broadcast: the other rank waits in
``parallel.wait_for_rank`` (a gloo group with a 24 h timeout) and the broadcast then
succeeds. The oracle that the tiny timeout is real: a plain collective on Megatron's
tensor-parallel group, entered 5 s early, fails after about 2 s.
"""

from __future__ import annotations

import datetime
import time

import pytest

from megatron_alp.launch import RankGroup

TIMEOUT_S = 2.0
BUSY_S = 5.0


@pytest.fixture(scope="module")
def group():
    with RankGroup(2, timeout_s=120) as g:
        yield g


def _layout(tp: int = 1):
    from megatron_alp.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=tp, timeout_minutes=TIMEOUT_S / 60)


def _restore_default_timeout() -> None:
    import torch.distributed as dist

    dist.set_timeout(datetime.timedelta(minutes=30))  # the group outlives this body


def broadcast_after_rank0_alone_body() -> tuple[object, float]:
    import torch.distributed as dist

    from megatron_alp import parallel
    from megatron_alp.train.loop import _broadcast

    with parallel.model_parallel(_layout()):
        try:
            obj = None
            if dist.get_rank() == 0:
                time.sleep(BUSY_S)  # rollouts on rank 0 only
                obj = {"samples": [1, 2, 3]}
            t0 = time.perf_counter()
            got = _broadcast(obj)
            waited = time.perf_counter() - t0
            # and the default group still works with the tiny timeout once both are there
            t = __import__("torch").ones(1)
            dist.all_reduce(t)
            return got, waited, float(t)
        finally:
            _restore_default_timeout()


def test_rank0_alone_longer_than_the_collective_timeout_passes(group):
    out = group.run(broadcast_after_rank0_alone_body)
    for got, waited, total in out:
        assert got == {"samples": [1, 2, 3]} and total == 2.0
    # rank 1 waited through rank 0's whole busy phase, longer than the collective timeout
    assert out[1][1] > TIMEOUT_S + 1


def timeout_follows_the_config_body() -> tuple[str, float]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_alp import parallel

    with parallel.model_parallel(_layout(tp=2)):
        try:
            if dist.get_rank() == 0:
                time.sleep(BUSY_S)
                return "late", 0.0
            t0 = time.perf_counter()
            try:
                dist.all_reduce(torch.ones(1), group=ps.get_tensor_model_parallel_group())
            except Exception as e:  # noqa: BLE001 - gloo's timeout error
                return type(e).__name__ + ": " + str(e)[:80], time.perf_counter() - t0
            return "no timeout", time.perf_counter() - t0
        finally:
            _restore_default_timeout()


def test_megatron_groups_follow_the_timeout(group):
    """The oracle: a collective with a peer 5 s late fails after ~2 s (Megatron's own
    groups get ``ParallelConfig.timeout_minutes``, not their default 30 minutes)."""
    try:
        out = group.run(timeout_follows_the_config_body)
    finally:
        group.kill()  # the timed-out group is not reused
    what, elapsed = out[1]
    assert what != "no timeout", what
    assert TIMEOUT_S - 0.5 < elapsed < BUSY_S, (what, elapsed)


def test_flag_sets_the_timeout(tmp_path):
    from megatron_alp.parallel import DEFAULT_TIMEOUT_MINUTES
    from megatron_alp.train.arguments import parse_args
    from tests.unit.test_examples import _qwen25_15b

    model = _qwen25_15b(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    base = ["--hf-model", str(model), "--rl-prompt-data", str(data), "--micro-batch-size", "1",
            "--grpo-prompts-per-step", "2", "--grpo-group-size", "2", "--train-iters", "1"]
    assert parse_args(base, world_size=1).parallel.timeout_minutes == DEFAULT_TIMEOUT_MINUTES == 30
    cfg = parse_args(base + ["--distributed-timeout-minutes", "90"], world_size=1)
    assert cfg.parallel.timeout_minutes == 90
    with pytest.raises(ValueError, match="--distributed-timeout-minutes=0 is invalid"):
        parse_args(base + ["--distributed-timeout-minutes", "0"], world_size=1)
