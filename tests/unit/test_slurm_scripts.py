"""The SLURM templates' task geometry, rendered for a 3-node allocation (issue 18, items 3-4).

The scripts run for real under bash with stand-ins for srun / scontrol / torchrun /
python (``slurm_stubs``: they record each call and lay tasks out as srun does, including
its habit of taking sbatch's exported ``SLURM_NTASKS`` as the task count). Oracles: the
counts a person asks for — one torchrun agent per trainer node, one task per GPU under
``LAUNCHER=srun`` with ranks 0..N-1 each once, one engine launcher per fleet node.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.unit.slurm_stubs import flag_value, render

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "examples/slurm"


def _per_node(calls: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(c["node"] for c in calls))


TRAIN_ARGS = ["--config", "token-alp", "--hf-model", "/data/m", "--rl-prompt-data", "/data/t.jsonl"]


def test_train_sbatch_torchrun_starts_one_agent_per_node(tmp_path):
    calls = render(tmp_path, SLURM / "train.sbatch", *TRAIN_ARGS)
    runs = [c for c in calls if c["kind"] == "torchrun"]
    assert _per_node(runs) == {"node9": 1, "node10": 1, "node11": 1}
    for c in runs:
        assert flag_value(c["argv"], "--nnodes") == "3" and flag_value(c["argv"], "--nproc-per-node") == "8"
        assert flag_value(c["argv"], "--rdzv-endpoint") == "node9:29500"
        # the grace torchrun gives its ranks after forwarding SIGTERM: past torch's 30 s
        # default, inside the 600 s that --signal=B:USR1@600 leaves
        assert 60 <= int(flag_value(c["argv"], "--shutdown-timeout")) < 600
        tail = c["argv"][c["argv"].index("-m"):]
        assert tail[:2] == ["-m", "megatron_alp.train"] and "--exit-signal-handler" in tail


def test_train_sbatch_srun_launcher_starts_one_rank_per_gpu(tmp_path):
    calls = render(tmp_path, SLURM / "train.sbatch", *TRAIN_ARGS, LAUNCHER="srun")
    ranks = [c for c in calls if c["kind"] == "python"]
    assert len(ranks) == 24, f"{len(ranks)} ranks for 3 nodes x 8 GPUs"
    assert sorted(int(c["env"]["RANK"]) for c in ranks) == list(range(24))
    assert {c["env"]["WORLD_SIZE"] for c in ranks} == {"24"}
    assert _per_node(ranks) == {"node9": 8, "node10": 8, "node11": 8}
    for node in ("node9", "node10", "node11"):
        local = sorted(int(c["env"]["LOCAL_RANK"]) for c in ranks if c["node"] == node)
        assert local == list(range(8)), (node, local)
    rank0 = next(c for c in ranks if c["env"]["RANK"] == "0")
    assert {c["env"]["MASTER_ADDR"] for c in ranks} == {rank0["node"]}


@pytest.mark.parametrize("train_nodes,fleet_nodes", [(1, 2), (2, 1)])
def test_fleet_sbatch_geometry_and_sync_host(tmp_path, train_nodes, fleet_nodes):
    calls = render(tmp_path, SLURM / "fleet.sbatch", *TRAIN_ARGS, MODEL="/data/m",
                   TRAIN_NODES=str(train_nodes), FLEET_NODES=str(fleet_nodes))
    nodes = [f"node{9 + k}" for k in range(3)]
    agents = [c for c in calls if c["kind"] == "torchrun"]
    assert _per_node(agents) == {n: 1 for n in nodes[:train_nodes]}
    fleets = [c for c in calls if c["kind"] == "python" and "megatron_alp.rollout.fleet_launch" in c["argv"]]
    assert _per_node(fleets) == {n: 1 for n in nodes[train_nodes:]}
    for c in agents:
        assert flag_value(c["argv"], "--nnodes") == str(train_nodes)
        # rank 0's own address, found by rank 0: with node9 / node10 torchrun's c10d
        # rendezvous makes node10 (sorted first) rank 0's node, not the list's first node
        assert flag_value(c["argv"], "--rl-fleet-sync-host") == "auto"
        endpoints = flag_value(c["argv"], "--rl-fleet-endpoints").split(",")
        assert len(endpoints) == 8 * fleet_nodes
        assert {e.split("//")[1].split(":")[0] for e in endpoints} == set(nodes[train_nodes:])


def test_sandbox_sbatch_runs_one_service_per_node(tmp_path):
    calls = render(tmp_path, SLURM / "sandbox.sbatch", STUB_SRUN_EXEC="0")
    (step,) = [c for c in calls if c["kind"] == "srun"]
    assert collections.Counter(t["node"] for t in step["tasks"]) == {"node9": 1, "node10": 1, "node11": 1}
