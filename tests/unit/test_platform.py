"""Device and backend selection on a machine that shows CUDA (issue 13, defects 2 and 3).

There is no GPU here, so a "CUDA visible" host is simulated by making
``torch.cuda.is_available`` / ``device_count`` answer as such a host would, and by
recording ``torch.cuda.set_device`` instead of calling it; everything else runs for real.
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp import launch, parallel, platform


@pytest.fixture
def cuda_host(monkeypatch):
    """Two visible GPUs; ``set_device`` calls are recorded."""
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch.device(dev)))
    monkeypatch.delenv(platform.FORCE_CPU_ENV, raising=False)
    return calls


def test_force_cpu_switch_selects_gloo_and_the_cpu_on_a_cuda_host(cuda_host, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert platform.backend() == "nccl" and platform.cuda_available()
    # LOCAL_RANK modulo the visible GPUs: one GPU per rank, or one visible GPU each
    assert platform.device() == torch.device("cuda", 1)
    for value in ("1", "true", "YES"):
        monkeypatch.setenv(platform.FORCE_CPU_ENV, value)
        assert platform.force_cpu() and not platform.cuda_available()
        assert platform.backend() == "gloo" and platform.device() == torch.device("cpu")
        assert platform.current_device() == torch.device("cpu")
        assert platform.select_device() == torch.device("cpu") and cuda_host == []
    monkeypatch.setenv(platform.FORCE_CPU_ENV, "0")
    assert platform.backend() == "nccl"
    monkeypatch.setenv(platform.FORCE_CPU_ENV, "maybe")
    with pytest.raises(ValueError, match=r"MEGATRON_ALP_FORCE_CPU='maybe' is not a boolean"):
        platform.backend()


def test_rank_group_runs_on_cpu_when_ranks_outnumber_gpus(cuda_host):
    assert launch.visible_gpus() == 2
    assert launch.RankGroup(4).force_cpu is True  # 4 ranks, 2 GPUs: gloo + CPU
    assert launch.RankGroup(2).force_cpu is False  # one GPU per rank: NCCL
    assert launch.RankGroup(2, force_cpu=True).force_cpu is True
    with pytest.raises(ValueError, match=r"world_size=4, force_cpu=False\) needs one GPU per rank"):
        launch.RankGroup(4, force_cpu=False)


def test_rank_group_on_a_cpu_host_defaults_to_cpu():
    if platform.force_cpu() or not torch.cuda.is_available():
        assert launch.RankGroup(2).force_cpu is True


def test_device_is_selected_even_when_torch_distributed_is_already_up(cuda_host, monkeypatch):
    """init_distributed used to return before set_device: every rank stayed on cuda:0."""
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not dist.is_initialized()
    # a real (one-rank gloo) group set up by "someone else", e.g. a launcher
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{launch.free_port()}", rank=0, world_size=1
    )
    try:
        assert parallel.init_distributed() == (0, 1)
    finally:
        dist.destroy_process_group()
    assert cuda_host == [torch.device("cuda", 1)]


def test_cpu_backend_stays_inert_where_cuda_is_used(cuda_host):
    if platform.cpu_backend_active():
        pytest.skip("the CPU backend was activated earlier in this process")
    current_device = torch.cuda.current_device
    assert platform.activate() is False
    assert not platform.cpu_backend_active() and torch.cuda.current_device is current_device
