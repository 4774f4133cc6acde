"""The trainer's arguments: megatron-core's own parser plus our groups, mapped to small configs.

megatron-core's own flags (``add_megatron_arguments``) are parsed with the trainer's groups
on one parser (``args/parser.py``: one-line errors, ``--help`` / ``--help-all``), so every
Megatron flag means what it means there (parallel sizes, batch sizes, optimizer, LR schedule,
checkpointing, exits, wandb / TensorBoard). Its RL group is reused where the meaning
matches (``--grpo-*``, ``--rl-default-temperature/-top-p/-top-k``, ``--rl-generation-lag``,
``--rl-verify-model-weights-swap``). Ours come in one group each: ``--alp-*`` (generated
from :class:`~megatron_alp.perturbation.ALPConfig`), ``--rl-loss`` + ``--rl-loss-*``
(:class:`~megatron_alp.rl.PolicyLossConfig`), and the run group (model, data, reward,
engine, eval). ``--config FILE.yaml`` supplies defaults (a ``configs/`` preset, or a file
with a ``train:`` section of flag values); the command line overrides it.

Each group's flags and checks live in one module of ``megatron_alp/train/args/`` (run,
objective, ALP, fleet, multi-turn, the Megatron flags the trainer reads, the YAML file);
:func:`parse_args` calls them in order and assembles :class:`TrainConfig`.

Every problem is a ``ValueError`` naming the flag, the value and what is allowed, raised
before any process group exists. The model architecture comes from ``--hf-model``'s
``config.json`` (Megatron's ``--num-layers``, ``--hidden-size`` ... must agree if given).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from megatron_alp.parallel import ParallelConfig
from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.rl.losses import PolicyLossConfig
from megatron_alp.train.args import megatron as mg
from megatron_alp.train.args import run as run_args
from megatron_alp.train.args.alp import resolve_alp
from megatron_alp.train.args.async_rl import async_config
from megatron_alp.train.async_rollouts import AsyncConfig
from megatron_alp.train.args.config_file import check_train_section, read_config, yaml_train_argv
from megatron_alp.train.args.fleet import engine_kwargs
from megatron_alp.train.args.multiturn import check_multiturn
from megatron_alp.train.args.objective import resolve_loss
from megatron_alp.train.args.parser import TrainerParser, UsageError, build_parser, parse_words, print_help_if_asked
from megatron_alp.train.args.run import ROLLOUT_DTYPES

__all__ = ["ROLLOUT_DTYPES", "RunConfig", "TrainConfig", "UsageError", "config_json", "parse_args"]

@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """What the RL loop needs beyond Megatron's model / optimizer settings."""

    hf_model: Path
    """HF folder: initial weights (unless --load), tokenizer, architecture."""
    prompt_data: Path
    """Training prompts: JSONL or Parquet with ``prompt`` and ``answer``."""
    eval_data: Path | None
    """Evaluation prompts (same format); None: no evaluation."""
    reward: str
    """Reward function name (``megatron_alp.rewards`` registry)."""
    rollout_engine: str
    """Rollout engine name (``megatron_alp.rollout`` registry)."""
    rollout_dtype: str
    """Engine precision: bf16 (like a vLLM fleet), fp32 (parity checks) or fp8."""
    prompts_per_step: int
    """Prompts per RL step (``--grpo-prompts-per-step``)."""
    group_size: int
    """Completions per prompt (``--grpo-group-size``)."""
    iterations: int
    """Passes over the step's samples (``--grpo-iterations``)."""
    generation_lag: int
    """The engine generates with the policy of this many updates ago (``--rl-generation-lag``)."""
    temperature: float
    """Sampling temperature, also applied to the trainer's log-probs."""
    top_p: float
    """Always 1: truncated sampling would bias the ratios (refused at parse time)."""
    top_k: int
    """Always -1 (see ``top_p``)."""
    max_new_tokens: int
    """Response length bound (``--rl-max-new-tokens``)."""
    max_prompt_length: int
    """Longer prompts are refused (``--rl-max-prompt-length``)."""
    eval_interval: int
    """Evaluate every N steps (and at the last step); 0: only at the last step."""
    eval_samples: int
    """Completions per eval prompt (mean@n, pass@k)."""
    advantage_estimator: str
    """Advantage estimator registry name."""
    verify_weights_swap: bool
    """Compare the engine's weights with what was sent after each sync."""
    engine_sleep_level: int
    """0: the engine keeps its GPU memory while the trainer trains; 1 / 2: a colocated
    engine sleeps (vLLM sleep levels) after each rollout and wakes at the next weight sync."""
    engine_kwargs: dict
    """Engine-specific ``create_engine`` arguments (the fleet's endpoints, backend, sync address)."""
    run_dir: Path
    """metrics.jsonl, config.json, logs/ and plots/ go here."""
    nproc: int | None
    """Ranks to spawn when not under torchrun (None: TP x PP x CP)."""
    max_turns: int = 1
    """Model turns per trajectory; 1 = single-turn (no sandbox), > 1 = tool-integrated
    multi-turn rollouts (``megatron_alp.rollout.multiturn``)."""
    sandbox: str = "local"
    """Where the code runs: ``local`` (an in-process ``SandboxPool``) or the URL(s)
    ``http://HOST:PORT[,...]`` of ``python -m megatron_alp.sandbox.serve`` services."""
    sandbox_concurrency: int = 8
    """Programs run at once (pool slots, or requests in flight to the service)."""
    sandbox_timeout_s: float = 10.0
    """Wall-clock limit of one program (``SandboxLimits.timeout_s``; local pool only)."""
    sandbox_memory_mb: int = 1024
    """Address-space limit of one program, MiB (``SandboxLimits.memory_mb``; local pool only)."""
    mismatch_by_layer_interval: int = 0
    """Every N steps log ``mismatch/layer_NN`` (``megatron_alp.train.layer_mismatch``); 0: off."""
    async_cfg: AsyncConfig = dataclasses.field(default_factory=AsyncConfig)
    """How rollouts overlap training (``--rl-async-mode``; ``train/async_rollouts.py``)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """The whole validated configuration of one run (see the module docstring)."""

    parallel: ParallelConfig
    world_size: int
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    train_iters: int
    bf16: bool
    recompute_granularity: str | None
    use_distributed_optimizer: bool
    optimizer: dict[str, Any]
    """Megatron ``OptimizerConfig`` fields (lr, min_lr, weight_decay, clip_grad, adam_*)."""
    scheduler: dict[str, Any]
    """``OptimizerParamScheduler`` settings (decay style, warmup, decay iters) in RL steps."""
    save: Path | None
    load: Path | None
    save_interval: int | None
    finetune: bool
    no_load_optim: bool
    no_load_rng: bool
    exit_interval: int | None
    exit_duration_in_mins: float | None
    exit_signal_handler: bool
    wandb_project: str | None
    wandb_exp_name: str | None
    wandb_save_dir: str | None
    tensorboard_dir: str | None
    seed: int
    loss_preset: str
    loss: PolicyLossConfig
    alp: ALPConfig
    run: RunConfig
    argv: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """A JSON-able view of the effective configuration (printed and checkpointed)."""

        def conv(x: Any) -> Any:
            if dataclasses.is_dataclass(x):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, Path):
                return str(x)
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x

        return conv(self)


# ----------------------------------------------------------------------------- parsing
def _run_config(args: Any, *, max_prompt: int, estimator: str, run_dir: Path,
                async_cfg: AsyncConfig) -> RunConfig:
    """The checked flags of the run, fleet and multi-turn groups as a :class:`RunConfig`."""
    return RunConfig(
        hf_model=Path(args.hf_model),
        prompt_data=Path(args.rl_prompt_data),
        eval_data=Path(args.rl_eval_data) if args.rl_eval_data else None,
        reward=args.rl_reward,
        rollout_engine=args.rl_rollout_engine,
        rollout_dtype=args.rl_rollout_dtype,
        prompts_per_step=args.grpo_prompts_per_step,
        group_size=args.grpo_group_size,
        iterations=args.grpo_iterations,
        generation_lag=args.rl_generation_lag,
        temperature=float(args.rl_default_temperature),
        top_p=1.0,
        top_k=-1,
        max_new_tokens=args.rl_max_new_tokens,
        max_prompt_length=max_prompt,
        eval_interval=args.rl_eval_interval,
        eval_samples=args.rl_eval_samples,
        advantage_estimator=estimator,
        verify_weights_swap=bool(args.rl_verify_model_weights_swap),
        engine_sleep_level=run_args.engine_sleep_level(args),
        engine_kwargs=engine_kwargs(args),
        run_dir=run_dir,
        nproc=args.nproc,
        max_turns=args.rl_max_turns,
        sandbox=args.rl_sandbox,
        sandbox_concurrency=args.rl_sandbox_concurrency,
        sandbox_timeout_s=float(args.rl_sandbox_timeout_s),
        sandbox_memory_mb=args.rl_sandbox_memory_mb,
        mismatch_by_layer_interval=args.rl_mismatch_by_layer_interval,
        async_cfg=async_cfg,
    )


def parse_args(argv: Sequence[str] | None = None, *, world_size: int | None = None) -> TrainConfig:
    """Parse and validate the trainer's command line (see the module docstring).

    ``world_size`` defaults to ``WORLD_SIZE`` (torchrun), else ``--nproc``, else TP x PP x CP.
    Every problem is a one-line ``ValueError`` (:class:`UsageError` for what argparse refuses);
    ``-h`` / ``--help`` / ``--help-all`` print the help and raise ``SystemExit(0)``.
    Each argument group checks its own flags (``megatron_alp/train/args/``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    print_help_if_asked(argv)
    parser = build_parser()
    # --config first: its `train:` flags go before the command line so that it wins.
    pre = TrainerParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    cfg_path, cfg_data = (None, {})
    if known.config:
        cfg_path, cfg_data = read_config(known.config)
        check_train_section(parser, cfg_path, cfg_data.get("train"), lambda w: parse_words(parser, w))
    full_argv = yaml_train_argv(cfg_path, cfg_data.get("train")) + argv
    args = parse_words(parser, full_argv)

    hf = run_args.hf_config(args.hf_model)
    run_args.fill_model_args(args, full_argv, hf)
    preset, loss = resolve_loss(args, full_argv, cfg_path, cfg_data)
    alp = resolve_alp(args, cfg_path, cfg_data, preset, loss)
    run_args.check_run(args)
    mg.check_optimizer(args)
    parallel, world_size, dp = mg.parallel_layout(args, hf, world_size, full_argv)
    gbs = mg.check_batches(args, dp)
    mg.check_sampling(args)
    seq_length, max_prompt = mg.sequence_lengths(args, full_argv)
    estimator = run_args.check_registries(args, cfg_data)
    inputs = run_args.input_paths(args)
    load = mg.check_checkpointing(args, inputs)
    run_dir = run_args.check_run_dir(args, inputs)
    check_multiturn(args)
    mg.validate_with_megatron(args, world_size)

    run = _run_config(args, max_prompt=max_prompt, estimator=estimator, run_dir=run_dir,
                      async_cfg=async_config(args, full_argv))
    return TrainConfig(
        parallel=parallel,
        world_size=world_size,
        data_parallel_size=dp,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=gbs,
        seq_length=seq_length,
        train_iters=args.train_iters,
        bf16=bool(args.bf16),
        recompute_granularity=args.recompute_granularity,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        optimizer=mg.optimizer_settings(args),
        scheduler=mg.scheduler_settings(args),
        save=Path(args.save) if args.save else None,
        load=load,
        save_interval=args.save_interval,
        finetune=bool(args.finetune),
        no_load_optim=bool(args.no_load_optim),
        no_load_rng=bool(args.no_load_rng),
        exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins,
        exit_signal_handler=bool(args.exit_signal_handler),
        wandb_project=args.wandb_project or None,
        wandb_exp_name=args.wandb_exp_name or None,
        wandb_save_dir=args.wandb_save_dir or None,
        tensorboard_dir=args.tensorboard_dir or None,
        seed=args.seed,
        loss_preset=preset,
        loss=loss,
        alp=alp,
        run=run,
        argv=tuple(argv),
    )


def config_json(cfg: TrainConfig) -> str:
    """The effective configuration as indented JSON."""
    return json.dumps(cfg.describe(), indent=2, sort_keys=True, default=str)
