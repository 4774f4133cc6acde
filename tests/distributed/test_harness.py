"""The rank harness itself: results by rank, the failing rank's traceback, no hangs."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_alp.launch import RankFailure, RankGroup


def rank_and_sum() -> tuple[int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), float(t)


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait forever for rank 1
    return 0


def hang_on_rank_zero() -> int:
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins
    return dist.get_rank()


def kill9_rank_zero() -> int:
    import os
    import signal

    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return dist.get_rank()


def backend_and_switch() -> tuple[str, str, str]:
    import os

    from megatron_alp import platform

    return dist.get_backend(), str(platform.device()), os.environ.get(platform.FORCE_CPU_ENV, "")


def test_rank_group_results_failures_and_timeouts():
    with RankGroup(2, timeout_s=60, force_cpu=True) as group:
        # ranks that outnumber the GPUs (or forced) run gloo + CPU, also on a GPU host
        assert group.run(backend_and_switch) == [("gloo", "cpu", "1")] * 2
        assert group.run(rank_and_sum) == [(0, 3.0), (1, 3.0)]
        with pytest.raises(RankFailure, match=r"(?s)fail_on_rank_one failed on rank 1:.*ValueError: boom on purpose"):
            group.run(fail_on_rank_one)
        assert not group.alive  # killed, not left waiting in the barrier
        # the next run restarts the group by itself
        assert group.run(rank_and_sum) == [(0, 3.0), (1, 3.0)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\] did not answer within 5 s"):
            group.run(hang_on_rank_zero, timeout_s=5)
        assert time.monotonic() - t0 < 30
        assert not group.alive
        # a rank killed by a signal is named with the signal (issue 18.8)
        with pytest.raises(RankFailure, match=r"rank 0 died \(killed by SIGKILL\)"):
            group.run(kill9_rank_zero, timeout_s=60)
    with pytest.raises(ValueError, match="module-level function"):
        RankGroup(1).run(lambda: 0)


def sweep_layouts_count_threads() -> list[int]:
    import os

    from megatron_alp import parallel
    from megatron_alp.parallel import ParallelConfig

    counts = []
    for cfg in [ParallelConfig(tensor_model_parallel_size=2), ParallelConfig(pipeline_model_parallel_size=2)] * 3:
        with parallel.model_parallel(cfg):
            pass
        counts.append(len(os.listdir("/proc/self/task")))
    return counts


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc")
def test_layout_sweeps_do_not_leak_group_threads():
    # megatron-core's destroy_model_parallel() leaves its gloo groups (and their threads)
    # alive; parallel.destroy_model_parallel() destroys them.
    with RankGroup(2, timeout_s=120) as group:
        counts = group.run(sweep_layouts_count_threads)[0]
    assert counts[-1] == counts[1], counts
