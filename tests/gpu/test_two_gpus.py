"""Two GPUs, NCCL, one rank per GPU: layouts agree, the distributed optimizer updates
sigma like the plain one, every rank draws the same step key, metrics reduce on the GPU."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.gpu_env import needs_cuda, needs_two_gpus

pytestmark = [needs_cuda, needs_two_gpus]


@pytest.fixture(scope="module")
def group():
    from megatron_alp.launch import RankGroup

    with RankGroup(2, timeout_s=900) as g:
        assert not g.force_cpu  # one GPU per rank: NCCL
        yield g


def test_ranks_use_nccl_and_their_own_gpu(group):
    from tests.gpu import two_gpu_bodies as b

    info = group.run(b.device_info)
    assert [i["backend"] for i in info] == ["nccl", "nccl"]
    assert [i["current"] for i in info] == [0, 1]


def test_tp2_sp_and_pp2_match_tp1_sigma_grads_included(group):
    from tests.layouts import merge_ranks
    from tests.gpu import two_gpu_bodies as b

    per_rank = group.run(b.layouts)
    ref = merge_ranks(per_rank, "tp1")
    sigma = [n for n in ref["grads"] if n.endswith("alp_log_sigma")]
    assert len(sigma) == 4 and all(float(ref["grads"][n]) != 0 for n in sigma)
    for run in ("tp2_sp", "pp2", "tp2_sp_full"):
        got = merge_ranks(per_rank, run)
        assert got["grads"].keys() == ref["grads"].keys(), run
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, atol=2e-4, rtol=2e-3, msg=f"{run}: {name}")
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                                   atol=1e-4, rtol=0, msg=run)


def test_distributed_optimizer_updates_sigma_like_the_plain_one_bf16(group):
    from tests.gpu import two_gpu_bodies as b

    for res in group.run(b.dist_optimizer):
        plain, dist_opt = res[False], res[True]
        assert plain["before"] == dist_opt["before"]
        for name, (value, dtype) in plain["after"].items():
            assert dtype == torch.float32
            assert value != plain["before"][name]  # sigma moved
            assert dist_opt["after"][name][0] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_step_key_is_the_same_on_every_rank_with_and_without_te_tracker(group):
    from tests.gpu import two_gpu_bodies as b

    res = group.run(b.step_keys)
    for name, r in res[0].items():
        assert r["all"][0] == r["all"][1], name  # same keys on both TP ranks
        assert r["keys"][0] != r["keys"][1], name  # and a new key per step
    assert "te=False" in res[0]


def test_metrics_reduce_over_nccl_with_gpu_and_host_inputs(group):
    from tests.gpu import two_gpu_bodies as b

    res = group.run(b.metrics_nccl)
    want = res[0]["single_process"]
    for r in res:
        for where in ("cuda", "cpu"):
            assert r[where].keys() == want.keys()
            for k, v in want.items():
                assert r[where][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (where, k)
