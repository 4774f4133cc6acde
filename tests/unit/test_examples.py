"""The examples' configurations parse (the GPU recipe is validated on CPU, without ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def qwen2_config_folder(folder: Path, **dims) -> Path:
    """An HF folder holding only a Qwen2 ``config.json`` with these sizes (no weights)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6, **dims,
    }))
    return folder


def _qwen25_15b(folder: Path) -> Path:
    return qwen2_config_folder(
        folder, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=True,
    )


def test_qwen25_math_recipe_parses_with_its_paper_settings(tmp_path):
    from megatron_alp.train.arguments import parse_args

    model = _qwen25_15b(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    cfg = parse_args([
        "--config", str(REPO / "examples/qwen2.5-1.5b-math/config.yaml"),
        "--hf-model", str(model), "--rl-prompt-data", str(data), "--save", str(tmp_path / "save"),
    ], world_size=4)
    assert (cfg.run.prompts_per_step, cfg.run.group_size, cfg.global_batch_size, cfg.micro_batch_size) == (512, 8, 32, 8)
    assert cfg.loss_preset == "token-alp" and cfg.alp.enabled and cfg.alp.init_std == 0.02
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.dual_clip_c) == (0.5, 3.0, 10.0)
    assert (cfg.loss.kl_coef, cfg.loss.kl_estimator) == (0.001, "k3")
    assert cfg.optimizer["lr"] == 1e-6 and cfg.bf16 and cfg.use_distributed_optimizer
    assert cfg.run.max_prompt_length == 2048 and cfg.run.max_new_tokens == 2048
    assert cfg.data_parallel_size == 4


def test_every_shipped_preset_is_a_valid_trainer_config(tmp_path):
    from megatron_alp.presets import available_presets
    from megatron_alp.train.arguments import parse_args

    model = _qwen25_15b(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    for name in available_presets():
        cfg = parse_args(["--config", name, "--hf-model", str(model), "--rl-prompt-data", str(data),
                          "--train-iters", "1", "--micro-batch-size", "1", "--grpo-prompts-per-step", "2",
                          "--grpo-group-size", "2"], world_size=1)
        assert cfg.alp.enabled == (cfg.loss.perturbation == "alp"), name


@pytest.mark.slow
def test_configs_ship_in_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("megatron_alp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert sum(n.startswith("megatron_alp/configs/") and n.endswith(".yaml") for n in names) == 10


@pytest.mark.parametrize("script", ["examples/slurm/fleet.sbatch", "examples/qwen2.5-1.5b-math/run.sh"])
def test_scripts_that_start_vllm_engines_point_the_trainer_at_them(script):
    """A script that launches `fleet_launch --backend vllm` must run the trainer with
    `--rl-fleet-backend vllm`: the default (twin) speaks the CPU twin's protocol, and
    vllm serve's empty /health answer crashed the client."""
    import re

    text = (REPO / script).read_text()
    assert "fleet_launch --backend vllm" in text
    assert set(re.findall(r"--rl-fleet-backend\s+(\S+)", text)) == {"vllm"}, script


def test_fleet_sbatch_stops_every_fleet_node():
    text = (REPO / "examples/slurm/fleet.sbatch").read_text()
    assert "kill %1" not in text  # only the first fleet node's launcher: `wait` never ended
    assert 'kill "${FLEET_PIDS[@]}"' in text and "FLEET_PIDS+=($!)" in text
