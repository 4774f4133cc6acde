"""The multi-turn recipes' configurations parse with the paper's settings (the GPU recipe
is validated on CPU, without ranks; the CPU example's config with its scripted engine)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.test_examples import qwen2_config_folder

REPO = Path(__file__).resolve().parents[2]


def _qwen25_7b(folder: Path) -> Path:
    return qwen2_config_folder(
        folder, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=False,
    )


def test_qwen25_7b_multiturn_recipe_has_the_paper_settings(tmp_path):
    from megatron_alp.train.arguments import parse_args

    model = _qwen25_7b(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    cfg = parse_args([
        "--config", str(REPO / "examples/qwen2.5-7b-multiturn/config.yaml"),
        "--hf-model", str(model), "--rl-prompt-data", str(data), "--save", str(tmp_path / "save"),
        "--rl-sandbox", "http://sandbox-node:8090,http://sandbox-node2:8090",
    ], world_size=8)
    run = cfg.run
    assert (run.prompts_per_step, run.group_size, cfg.global_batch_size, cfg.micro_batch_size) == (128, 16, 512, 1)
    assert (run.max_prompt_length, run.max_new_tokens, cfg.seq_length) == (16000, 8000, 24000)
    assert run.max_turns == 5 and run.sandbox.startswith("http://sandbox-node:8090,")
    assert cfg.loss_preset == "seq-alp" and cfg.loss.ratio_level == "sequence"
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.dual_clip_c, cfg.loss.kl_coef) == (0.5, 3.0, 3.0, 0.0)
    assert cfg.alp.enabled and cfg.alp.init_std == 1e-6 and cfg.alp.lr == 5e-4 and cfg.alp.layer_start == 0
    assert cfg.optimizer["lr"] == 1e-6 and run.reward == "math-verify" and run.temperature == 1.0
    assert cfg.parallel.tensor_model_parallel_size == 4 and cfg.parallel.sequence_parallel
    assert cfg.data_parallel_size == 2


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_cpu_multiturn_example_config_parses(tmp_path):
    import importlib.util

    from megatron_alp.models.tiny import tiny_hf_config
    from megatron_alp.train.arguments import parse_args

    spec = importlib.util.spec_from_file_location(
        "multiturn_cpu_scripted_engine", REPO / "examples/multiturn_cpu/scripted_engine.py")
    import sys

    if spec.name not in sys.modules:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    folder = tmp_path / "model"
    tiny_hf_config("qwen2", max_position_embeddings=128).save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+2=?", "answer": "3"}\n')
    cfg = parse_args(["--config", str(REPO / "examples/multiturn_cpu/config.yaml"), "--hf-model", str(folder),
                      "--rl-prompt-data", str(data), "--save", str(tmp_path / "ckpt")], world_size=2)
    assert cfg.run.max_turns == 3 and cfg.run.sandbox == "local"
    assert cfg.run.rollout_engine == "scripted-first-turn" and cfg.loss_preset == "seq-alp"
    assert cfg.seq_length <= 128
