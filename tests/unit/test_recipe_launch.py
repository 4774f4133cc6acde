"""The shipped GPU recipes, from their launch scripts to a parsed trainer configuration, on CPU.

Each script (``examples/qwen2.5-1.5b-math/run.sh``, ``examples/qwen2.5-7b-multiturn/run.sh``
and ``slurm.sh`` -> ``examples/slurm/fleet.sbatch``, ``examples/slurm/train.sbatch`` with the
1.5B config) runs under bash with stand-ins for the launchers (``slurm_stubs``); the trainer
command it would start is then parsed by the trainer's own ``parse_args`` with the world
size the launch gives (an HF folder holding the real model's config.json, no weights).
The export plan of these models is checked in the export tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.unit.slurm_stubs import flag_value, read_log, render, stub_bin, stub_env
from tests.unit.test_examples import _qwen25_15b, qwen2_config_folder

REPO = Path(__file__).resolve().parents[2]


def _qwen25_7b(folder: Path) -> Path:
    # Qwen2.5-7B's config.json sizes
    return qwen2_config_folder(
        folder, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=False,
    )


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    return path


def _run(tmp_path: Path, script: str, **env: str) -> list[dict]:
    return render(tmp_path, REPO / script, nodes=None, **env)

def _trainer(calls: list[dict]) -> tuple[list[str], int, list[dict]]:
    """The trainer's argv (after ``-m megatron_alp.train``), its world size, its launches."""
    agents = [c for c in calls if c["kind"] == "torchrun"]
    assert agents, calls
    argv = agents[0]["argv"]
    assert all(a["argv"] == argv for a in agents)
    world = int(flag_value(argv, "--nnodes") if any(a.startswith("--nnodes") for a in argv) else 1) * int(
        flag_value(argv, "--nproc-per-node"))
    i = argv.index("-m")
    assert argv[i + 1] == "megatron_alp.train"
    return argv[i + 2:], world, agents


def _parse(argv: list[str], world: int):
    from megatron_alp.train.arguments import parse_args

    return parse_args(argv, world_size=world)


def test_qwen25_math_run_sh_parses_on_its_four_trainer_gpus(tmp_path, data):
    model = _qwen25_15b(tmp_path / "model")
    calls = _run(tmp_path, "examples/qwen2.5-1.5b-math/run.sh", MODEL=str(model), TRAIN=str(data),
                 SAVE=str(tmp_path / "save"))
    argv, world, _ = _trainer(calls)
    assert world == 4
    cfg = _parse(argv, world)
    assert cfg.loss_preset == "token-alp" and cfg.data_parallel_size == 4
    kw = cfg.run.engine_kwargs
    assert cfg.run.rollout_engine == "fleet" and kw["backend"] == "vllm"
    assert kw["endpoints"] == [f"http://127.0.0.1:{8100 + k}" for k in range(4)]
    fleet = [c for c in calls if c["kind"] == "python" and "megatron_alp.rollout.fleet_launch" in c["argv"]]
    assert len(fleet) == 1 and flag_value(fleet[0]["argv"], "--gpus") == "4,5,6,7"
    assert cfg.exit_signal_handler and cfg.save == cfg.load == tmp_path / "save"


def test_qwen25_7b_multiturn_run_sh_parses(tmp_path, data):
    model = _qwen25_7b(tmp_path / "model")
    calls = _run(tmp_path, "examples/qwen2.5-7b-multiturn/run.sh", MODEL=str(model), TRAIN=str(data),
                 SAVE=str(tmp_path / "save"))
    argv, world, _ = _trainer(calls)
    cfg = _parse(argv, world)
    assert (world, cfg.parallel.tensor_model_parallel_size, cfg.data_parallel_size) == (4, 4, 1)
    assert cfg.loss_preset == "seq-alp" and cfg.run.max_turns == 5
    assert cfg.run.sandbox == "http://127.0.0.1:8090"
    serve = [c for c in calls if c["kind"] == "python" and "megatron_alp.sandbox.serve" in c["argv"]]
    assert len(serve) == 1 and flag_value(serve[0]["argv"], "--port") == "8090"


def test_qwen25_7b_multiturn_on_slurm_parses_for_two_trainer_nodes(tmp_path, data):
    """slurm.sh -> sandbox.sbatch + fleet.sbatch (3 nodes: 2 trainer, 1 fleet)."""
    model = _qwen25_7b(tmp_path / "model")
    calls = _run(tmp_path, "examples/qwen2.5-7b-multiturn/slurm.sh", MODEL=str(model), TRAIN=str(data),
                 SAVE=str(tmp_path / "save"), TRAIN_NODES="2", FLEET_NODES="1", SANDBOX_NODES="1",
                 SANDBOX_OUT=str(tmp_path / "sandbox"))
    argv, world, agents = _trainer(calls)
    assert sorted(a["node"] for a in agents) == ["node10", "node9"]
    cfg = _parse(argv, world)
    assert (world, cfg.data_parallel_size) == (16, 4)
    assert cfg.run.engine_kwargs["sync_host"] == "auto"  # rank 0 resolves and shares it
    assert len(cfg.run.engine_kwargs["endpoints"]) == 8
    assert cfg.run.sandbox == "http://node900:8090"
    assert cfg.exit_signal_handler and cfg.save == tmp_path / "save"


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_qwen25_math_config_on_train_sbatch_parses(tmp_path, data, launcher):
    from tests.unit.slurm_stubs import fake_allocation

    model = _qwen25_15b(tmp_path / "model")
    log = tmp_path / "calls.jsonl"
    # the recipe's 4 trainer GPUs (its global batch of 32 x micro-batch 8 allows DP <= 4)
    env = stub_env(stub_bin(tmp_path / "bin"), log, LAUNCHER=launcher, GPUS_PER_NODE="4", **fake_allocation(1))
    args = ["--config", str(REPO / "examples/qwen2.5-1.5b-math/config.yaml"), "--hf-model", str(model),
            "--rl-prompt-data", str(data), "--rl-rollout-engine", "fleet", "--rl-fleet-backend", "vllm",
            "--rl-fleet-endpoints", "http://fleet0:8100,http://fleet0:8101"]
    r = subprocess.run(["bash", str(REPO / "examples/slurm/train.sbatch"), *args], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = read_log(log)
    if launcher == "torchrun":
        argv, world, _ = _trainer(calls)
    else:
        ranks = [c for c in calls if c["kind"] == "python"]
        world = int(ranks[0]["env"]["WORLD_SIZE"])
        argv = ranks[0]["argv"][2:]
        assert ranks[0]["argv"][:2] == ["-m", "megatron_alp.train"]
    cfg = _parse(argv, world)
    assert (world, cfg.data_parallel_size) == (4, 4)
    assert cfg.save == cfg.load == Path("runs/alp-train") and cfg.exit_signal_handler


# fleet_launch creating the recipes' --log-dir (issue 17, defect 10) is shown with real engine
# processes in tests/e2e/test_fleet_launch.py (a nested folder that does not exist).
