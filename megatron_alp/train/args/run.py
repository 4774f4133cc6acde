"""The run group: model, prompts, reward, rollout engine, evaluation, run folder, ranks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from megatron_alp.train.args.common import given, positive, value

__all__ = ["ROLLOUT_DTYPES", "add_run_flags", "check_run", "engine_sleep_level", "hf_config",
           "fill_model_args", "input_paths"]

ROLLOUT_DTYPES = ("bf16", "fp32", "fp8")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("megatron-alp run")
    g.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML defaults: a configs/ preset name or file (policy_loss / alp / "
                        "advantages sections) and an optional `train:` section of flag values; "
                        "the command line overrides it")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="HF model folder: architecture (config.json), tokenizer, and the initial "
                        "weights unless --load resumes a checkpoint")
    g.add_argument("--rl-prompt-data", default=None, metavar="FILE",
                   help="training prompts, JSONL or Parquet with fields `prompt` and `answer`")
    g.add_argument("--rl-eval-data", default=None, metavar="FILE",
                   help="evaluation prompts (same format); evaluated every --rl-eval-interval steps")
    g.add_argument("--rl-reward", default="math-verify", metavar="NAME",
                   help="reward function: math-verify (last \\boxed{} vs answer, symbolic) or "
                        "exact-match (default: math-verify)")
    g.add_argument("--rl-rollout-engine", default="local", metavar="NAME",
                   help="rollout engine registry name: local (HF transformers in-process, the CPU "
                        "default), fleet, vllm, ... (default: local)")
    g.add_argument("--rl-rollout-dtype", default="bf16", choices=ROLLOUT_DTYPES,
                   help="rollout engine precision: bf16 (like a vLLM fleet), fp32, or fp8 (vLLM: "
                        "quantization=fp8 on BF16 weights; local engine: W8A8 e4m3 emulation, "
                        "docs/rollout.md) (default: bf16)")
    g.add_argument("--rl-engine-sleep-level", default="auto", choices=("auto", "0", "1", "2"),
                   help="a colocated engine (--rl-rollout-engine vllm) frees its GPU memory while "
                        "the trainer trains: 1 offloads its weights to host memory, 2 drops them "
                        "(every sync re-sends all weights, so 2 loses nothing); it wakes at the next "
                        "weight sync. 0: never sleep. auto: 2 for engines that can sleep, else 0 "
                        "(default: auto)")
    g.add_argument("--rl-max-new-tokens", type=int, default=256, metavar="N",
                   help="maximum response tokens per completion (default: 256)")
    g.add_argument("--rl-max-prompt-length", type=int, default=None, metavar="N",
                   help="longer prompts are refused (default: --seq-length - --rl-max-new-tokens, "
                        "or 1024 when --seq-length is not given)")
    g.add_argument("--rl-eval-interval", type=int, default=0, metavar="N",
                   help="evaluate every N RL steps and at the end (0: only at the end when "
                        "--rl-eval-data is given; default 0)")
    g.add_argument("--rl-eval-samples", type=int, default=4, metavar="N",
                   help="completions per eval prompt (mean@n and unbiased pass@k; default 4)")
    g.add_argument("--rl-mismatch-by-layer-interval", type=int, default=0, metavar="N",
                   help="every N RL steps log mismatch/layer_NN: each decoder layer's relative "
                        "output divergence, engine numerics (--rl-rollout-dtype) vs FP32, on the "
                        "step's tokens (docs/train.md; 0: off, the default)")
    g.add_argument("--rl-advantage-estimator", default=None, metavar="NAME",
                   help="advantage estimator (grpo, grpo-no-std, rloo; default: the preset's, grpo)")
    g.add_argument("--rl-run-dir", default=None, metavar="DIR",
                   help="where metrics.jsonl, config.json and plots go (default: --save, else "
                        "runs/latest)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="ranks to spawn when started as `python -m megatron_alp.train` (not under "
                        "torchrun); default TP x PP x CP")


# ----------------------------------------------------------------------------- checks
def hf_config(path: str | None) -> Any:
    """``--hf-model``'s ``config.json`` read by transformers (ValueError naming the folder)."""
    if not path:
        raise ValueError("--hf-model DIR is required (the HF folder with config.json and tokenizer)")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--hf-model {folder}: no config.json there (expected an HF model folder)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ValueError(f"--hf-model {folder}/config.json: transformers cannot read it ({e})") from None


def fill_model_args(args: argparse.Namespace, argv: Sequence[str], hf: Any) -> Any:
    """Megatron's architecture flags from the HF config (an explicit flag must agree)."""
    from megatron_alp.models import gpt_args_from_hf

    g = gpt_args_from_hf(hf)
    want = {
        "num_layers": g.num_layers,
        "hidden_size": g.hidden_size,
        "ffn_hidden_size": g.ffn_hidden_size,
        "num_attention_heads": g.num_attention_heads,
        "num_query_groups": g.num_query_groups,
        "kv_channels": g.kv_channels,
        "max_position_embeddings": g.max_position_embeddings,
    }
    for name, value in want.items():
        flag = "--" + name.replace("_", "-")
        have = getattr(args, name, None)
        if given(argv, flag) and have is not None and have != value:
            raise ValueError(
                f"{flag}={have} disagrees with --hf-model config.json ({name}={value}); "
                "leave it out (the architecture comes from the HF config)"
            )
        setattr(args, name, value)
    args.group_query_attention = g.num_query_groups != g.num_attention_heads
    args.untie_embeddings_and_output_weights = not g.tie_word_embeddings
    args.position_embedding_type = "rope"
    args.normalization = "RMSNorm"
    args.swiglu = True
    return g


def check_run(args: argparse.Namespace) -> None:
    """Numbers of the run group."""
    positive("--rl-max-new-tokens", args.rl_max_new_tokens)
    positive("--rl-eval-samples", args.rl_eval_samples)
    for flag in ("--rl-max-prompt-length", "--nproc"):
        if value(args, flag) is not None:
            positive(flag, value(args, flag))
    if args.rl_eval_interval < 0:
        raise ValueError(f"--rl-eval-interval={args.rl_eval_interval} is invalid; expected >= 0")
    if args.rl_mismatch_by_layer_interval < 0:
        raise ValueError(f"--rl-mismatch-by-layer-interval={args.rl_mismatch_by_layer_interval} is "
                         "invalid; expected >= 0 (0: off)")


def check_registries(args: argparse.Namespace, cfg_data: dict) -> str:
    """Reward, engine and advantage estimator by registry name; returns the estimator."""
    from megatron_alp.rewards import available_rewards
    from megatron_alp.rl.advantages import available_advantage_estimators
    from megatron_alp.rollout import available_engines

    if args.rl_reward not in available_rewards():
        raise ValueError(f"--rl-reward {args.rl_reward!r} is unknown; available: {', '.join(available_rewards())}")
    if args.rl_rollout_engine not in available_engines():
        raise ValueError(
            f"--rl-rollout-engine {args.rl_rollout_engine!r} is unknown; available: "
            f"{', '.join(available_engines())}"
        )
    estimator = args.rl_advantage_estimator or (cfg_data.get("advantages") or {}).get("estimator", "grpo")
    if estimator not in available_advantage_estimators():
        raise ValueError(
            f"--rl-advantage-estimator {estimator!r} is unknown; available: "
            f"{', '.join(available_advantage_estimators())}"
        )
    return estimator


def input_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The run's inputs by flag (prompt files checked to exist)."""
    if not args.rl_prompt_data:
        raise ValueError("--rl-prompt-data FILE is required (JSONL or Parquet with prompt, answer)")
    for flag, value in (("--rl-prompt-data", args.rl_prompt_data), ("--rl-eval-data", args.rl_eval_data)):
        if value and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    inputs = {"--hf-model": Path(args.hf_model), "--rl-prompt-data": Path(args.rl_prompt_data)}
    if args.rl_eval_data:
        inputs["--rl-eval-data"] = Path(args.rl_eval_data)
    return inputs


def run_dir_flag(args: argparse.Namespace) -> str:
    """The flag that chose the run folder (for messages)."""
    if args.rl_run_dir:
        return "--rl-run-dir"
    return "--save (the run folder without --rl-run-dir)" if args.save else "the default run folder"


def check_run_dir(args: argparse.Namespace, inputs: dict[str, Path]) -> Path:
    """The run folder: never overlapping an input, and written only if this trainer wrote it
    (``megatron_alp/rundir.py``). Returns it."""
    from megatron_alp.train.checkpoint import overlapping_input
    from megatron_alp.rundir import check_run_dir as check_owned

    if args.rl_run_dir:
        hit = overlapping_input(Path(args.rl_run_dir), inputs)
        if hit:
            raise ValueError(
                f"--rl-run-dir {args.rl_run_dir} overlaps {hit[0]} {hit[1]} (equal, containing or "
                "inside it); metrics, config.json and plots are written there: choose another folder"
            )
    run_dir = Path(args.rl_run_dir or args.save or "runs/latest")
    check_owned(run_dir, run_dir_flag(args))
    return run_dir


def engine_sleep_level(args: argparse.Namespace) -> int:
    """``--rl-engine-sleep-level``: auto -> 2 where the engine can sleep; an explicit level
    for an engine that cannot (the local engine, a fleet on its own GPUs) is an error."""
    from megatron_alp.rollout import engine_can_sleep

    can = engine_can_sleep(args.rl_rollout_engine)
    if args.rl_engine_sleep_level == "auto":
        return 2 if can else 0
    level = int(args.rl_engine_sleep_level)
    if level and not can:
        raise ValueError(
            f"--rl-engine-sleep-level {level}: the {args.rl_rollout_engine!r} engine cannot sleep "
            "(only a colocated engine, --rl-rollout-engine vllm, shares the trainer's GPUs); "
            "use 0 or auto"
        )
    return level
