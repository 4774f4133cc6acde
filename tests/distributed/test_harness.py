"""The rank harness itself: results by rank, the failing rank's traceback, no hangs."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_alp.testing.distributed import RankFailure, RankGroup


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


def test_rank_group_results_failures_and_timeouts():
    with RankGroup(2, timeout_s=60) as group:
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
    with pytest.raises(ValueError, match="module-level function"):
        RankGroup(1).run(lambda: 0)
