"""The Megatron flags the trainer reads: what each means here, and their checks.

``megatron.training.arguments`` defines them (parallel sizes, batch sizes, optimizer, LR
schedule, checkpointing, exits, wandb / TensorBoard, and its RL group, reused where the
meaning matches); :data:`USED` lists them with their meaning in this trainer, for
``--help``. The checks run before any process group exists, ending with Megatron's own
``validate_args``.

**CPU workaround (one place, :func:`_cpu_device_queries`)**: megatron's ``validate_args``
asks ``torch.cuda.get_device_properties`` for the device architecture when TP or CP > 1
(to decide whether ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is required); on a machine without a
GPU that raises "Found no NVIDIA driver". When CUDA is absent we answer that query with an
architecture that has no such stream-ordering requirement, for the duration of the call only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from megatron_alp.parallel import ParallelConfig
from megatron_alp.train.args.common import given, positive, value

__all__ = ["USED", "check_batches", "check_checkpointing", "check_optimizer", "check_sampling", "optimizer_settings",
           "parallel_layout", "scheduler_settings", "sequence_lengths", "validate_with_megatron"]

USED: dict[str, dict[str, str]] = {
    "Megatron flags: layout and batches": {
        "--tensor-model-parallel-size": "TP size",
        "--pipeline-model-parallel-size": "PP size",
        "--num-layers-per-virtual-pipeline-stage": "layers per virtual pipeline stage (interleaved 1F1B)",
        "--sequence-parallel": "sequence parallelism (with TP > 1)",
        "--micro-batch-size": "sequences per micro-batch on one DP rank",
        "--global-batch-size": "sequences per optimizer step (micro x DP x accumulation; "
                               "default: one step per RL step's samples)",
        "--seq-length": "prompt + response bound (default: --rl-max-prompt-length + --rl-max-new-tokens)",
        "--train-iters": "RL steps to run",
        "--bf16": "bf16 model and gradients (fp32 otherwise; --fp16 is refused)",
        "--use-distributed-optimizer": "shard the optimizer state over DP",
        "--recompute-granularity": "activation recomputation: full or selective",
        "--seed": "seed of the model, the prompt order, the rollouts and ALP's noise",
        "--context-parallel-size": "must stay 1: the trainer's batch split is not CP-aware yet",
        "--fp16": "refused (use --bf16, or fp32 by default)",
    },
    "Megatron flags: model shape (from --hf-model's config.json; given, they must agree)": {
        "--num-layers": "transformer layers",
        "--hidden-size": "hidden size",
        "--ffn-hidden-size": "MLP size",
        "--num-attention-heads": "attention heads",
        "--num-query-groups": "KV heads",
        "--kv-channels": "head size",
        "--max-position-embeddings": "longest sequence; bounds --seq-length",
    },
    "Megatron flags: optimizer and schedule (counted in RL steps)": {
        "--lr": "peak learning rate of the policy (default 1e-6)",
        "--min-lr": "floor of a decaying schedule",
        "--lr-decay-style": "constant, linear, cosine, ...",
        "--lr-warmup-iters": "warm-up, in RL steps",
        "--lr-decay-iters": "decay length, in RL steps (default --train-iters)",
        "--weight-decay": "AdamW weight decay",
        "--clip-grad": "gradient-norm clip (0: off)",
        "--adam-beta1": "Adam beta1",
        "--adam-beta2": "Adam beta2",
        "--adam-eps": "Adam epsilon",
    },
    "Megatron flags: checkpoints, exits, logging": {
        "--save": "checkpoint folder (iter_N/); also the run folder unless --rl-run-dir",
        "--load": "resume from this checkpoint folder (or a converted one, with --finetune)",
        "--save-interval": "save every N RL steps (default: at the end)",
        "--finetune": "load weights only, start at step 0",
        "--no-load-optim": "do not load the optimizer state",
        "--no-load-rng": "do not load the RNG states",
        "--exit-interval": "save and exit after every N RL steps",
        "--exit-duration-in-mins": "save and exit after M minutes",
        "--exit-signal-handler": "SIGTERM / SIGUSR1: save and exit 0",
        "--wandb-project": "log metrics to wandb (offline without WANDB_API_KEY)",
        "--wandb-exp-name": "wandb run name",
        "--wandb-save-dir": "wandb folder",
        "--tensorboard-dir": "log metrics to TensorBoard",
        "--distributed-timeout-minutes": "timeout of every collective, NCCL's watchdog included "
                                         "(default here 30, not Megatron's 10)",
    },
    "Megatron flags: RL group, with their meaning here": {
        "--grpo-prompts-per-step": "prompts per RL step",
        "--grpo-group-size": "completions per prompt (the GRPO group)",
        "--grpo-iterations": "passes over the step's samples",
        "--grpo-clamp-eps-lower": "PPO clip bound clip_low (only when given; the preset's otherwise)",
        "--grpo-clamp-eps-upper": "PPO clip bound clip_high (only when given)",
        "--grpo-kl-beta": "KL-to-reference weight kl_coef (only when given)",
        "--grpo-entropy-term-weight": "entropy bonus entropy_coef (only when given)",
        "--rl-default-temperature": "sampling temperature, 0.01 <= T <= 2; the trainer's log-probs use it too",
        "--rl-default-top-p": "must stay 1 (or 0): truncated sampling would bias every ratio",
        "--rl-default-top-k": "must stay -1 (or 0), as --rl-default-top-p",
        "--rl-generation-lag": "the engine generates with the policy of K updates ago",
        "--rl-partial-rollouts": "with --rl-async-mode fully-async: sequences are generated in "
                                 "segments that continue across weight updates (docs/async.md)",
        "--rl-verify-model-weights-swap": "after each sync, compare the engine's weights with what was sent",
    },
}
"""Every Megatron flag the trainer reads, by help section, with its meaning here."""


def timeout_minutes(args: argparse.Namespace, argv: Sequence[str]) -> float:
    """Megatron's ``--distributed-timeout-minutes``; when not given, a generous default
    (``parallel.DEFAULT_TIMEOUT_MINUTES``) rather than Megatron's 10."""
    from megatron_alp.parallel import DEFAULT_TIMEOUT_MINUTES

    if not given(argv, "--distributed-timeout-minutes"):
        return DEFAULT_TIMEOUT_MINUTES
    minutes = args.distributed_timeout_minutes
    if minutes is None or not minutes > 0:
        raise ValueError(f"--distributed-timeout-minutes={minutes} is invalid; expected minutes > 0")
    return float(minutes)


def parallel_layout(args: argparse.Namespace, hf: Any, world_size: int | None,
                    argv: Sequence[str] = ()) -> tuple[ParallelConfig, int, int]:
    """(ParallelConfig, world size, DP size); the model's shapes must fit the layout."""
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--context-parallel-size", "--num-layers-per-virtual-pipeline-stage"):
        if value(args, flag) is not None:
            positive(flag, value(args, flag))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per = args.num_layers_per_virtual_pipeline_stage
        if args.num_layers % (per * pp):
            raise ValueError(
                f"--num-layers-per-virtual-pipeline-stage={per}: num_layers={args.num_layers} is "
                f"not divisible by {per} x PP={pp}"
            )
        vpp = args.num_layers // (per * pp)
    parallel = ParallelConfig(
        timeout_minutes=timeout_minutes(args, argv),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=cp,
        sequence_parallel=bool(args.sequence_parallel) and tp > 1,
        seed=args.seed,
    )
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        world_size = int(env) if env else (args.nproc or parallel.model_parallel_size)
    dp = parallel.data_parallel_size(world_size)
    from megatron_alp.models import gpt_args_from_hf, validate_layout

    validate_layout(gpt_args_from_hf(hf), parallel, world_size=world_size)
    return parallel, world_size, dp


def check_batches(args: argparse.Namespace, dp: int) -> int:
    """Batch sizes and the RL group's counts; returns the global batch size."""
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    positive("--micro-batch-size", mbs)
    if gbs is not None:
        positive("--global-batch-size", gbs)
    positive("--grpo-prompts-per-step", args.grpo_prompts_per_step)
    positive("--grpo-group-size", args.grpo_group_size)
    positive("--grpo-iterations", args.grpo_iterations)
    positive("--train-iters", args.train_iters)
    if args.rl_generation_lag < 0:
        raise ValueError(f"--rl-generation-lag={args.rl_generation_lag} is invalid; expected >= 0")
    samples = args.grpo_prompts_per_step * args.grpo_group_size
    if gbs is None:
        gbs = samples
    if gbs % (mbs * dp):
        raise ValueError(
            f"--global-batch-size={gbs} must be a multiple of --micro-batch-size x data-parallel "
            f"size = {mbs} x {dp} = {mbs * dp} (global = micro x DP x accumulation steps)"
        )
    if samples % gbs:
        raise ValueError(
            f"samples per RL step = --grpo-prompts-per-step x --grpo-group-size = "
            f"{args.grpo_prompts_per_step} x {args.grpo_group_size} = {samples} must be a multiple "
            f"of --global-batch-size={gbs} (the mini-batch of one optimizer step)"
        )
    args.global_batch_size = gbs
    return gbs


def check_sampling(args: argparse.Namespace) -> None:
    """Temperature in the engines' range; no truncated sampling."""
    if args.rl_default_top_p not in (0, 1, 0.0, 1.0) or args.rl_default_top_k not in (-1, 0):
        raise ValueError(
            f"--rl-default-top-p={args.rl_default_top_p} / --rl-default-top-k="
            f"{args.rl_default_top_k}: truncated sampling is refused — the engine's processed "
            "log-probs renormalise over the kept tokens while the trainer's log-probs apply the "
            "temperature only, so every importance ratio would be biased; use top-p 1 (or 0) "
            "and top-k -1"
        )
    if args.rl_default_temperature <= 0:
        raise ValueError(
            f"--rl-default-temperature={args.rl_default_temperature} is invalid; RL needs sampling "
            "(a temperature > 0)"
        )
    from megatron_alp.rollout.base import MAX_TEMPERATURE, MIN_TEMPERATURE

    if args.rl_default_temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"--rl-default-temperature={args.rl_default_temperature} is below {MIN_TEMPERATURE}: "
            f"vLLM clamps it to {MIN_TEMPERATURE}, so rollout and trainer log-probs would disagree"
        )
    if args.rl_default_temperature > MAX_TEMPERATURE:
        # refused here rather than at the first rollout, whatever the engine
        raise ValueError(
            f"--rl-default-temperature={args.rl_default_temperature} is above {MAX_TEMPERATURE}, "
            f"which vLLM (0.33) rejects; expected {MIN_TEMPERATURE} <= T <= {MAX_TEMPERATURE:g}"
        )


def sequence_lengths(args: argparse.Namespace, argv: Sequence[str]) -> tuple[int, int]:
    """(seq_length, max prompt length) from --seq-length / --rl-max-prompt-length / --rl-max-new-tokens."""
    max_prompt = args.rl_max_prompt_length
    if args.seq_length is None or not given(argv, "--seq-length"):
        max_prompt = max_prompt or 1024
        seq_length = max_prompt + args.rl_max_new_tokens
    else:
        seq_length = args.seq_length
        max_prompt = max_prompt or seq_length - args.rl_max_new_tokens
        if max_prompt < 1:
            raise ValueError(
                f"--seq-length={seq_length} leaves no room for a prompt next to "
                f"--rl-max-new-tokens={args.rl_max_new_tokens}"
            )
    if seq_length > args.max_position_embeddings:
        raise ValueError(
            f"prompt + response length {seq_length} (--rl-max-prompt-length {max_prompt} + "
            f"--rl-max-new-tokens {args.rl_max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={args.max_position_embeddings}"
        )
    args.seq_length = seq_length
    return seq_length, max_prompt


def check_checkpointing(args: argparse.Namespace, inputs: dict[str, Path]) -> Path | None:
    """--load / --save / --save-interval / exits / precision / recompute / CP; returns --load."""
    load = Path(args.load) if args.load else None
    if load is not None:
        from megatron_alp.train.checkpoint import find_checkpoint

        find_checkpoint(load, required=not (args.save and Path(args.save).resolve() == load.resolve()))
    from megatron_alp.train.checkpoint import check_save_path

    if args.save:
        check_save_path(Path(args.save), inputs)
    if args.save_interval is not None and args.save_interval < 1:
        raise ValueError(f"--save-interval={args.save_interval} is invalid; expected >= 1")
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    if args.save and args.save_interval is None:
        args.save_interval = args.train_iters  # megatron requires one; ours: save at the end
    if args.exit_signal_handler and not args.save:
        raise ValueError("--exit-signal-handler saves a checkpoint before exiting: it needs --save DIR")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ValueError(f"--exit-duration-in-mins={args.exit_duration_in_mins} is invalid; expected > 0")
    if args.fp16:
        raise ValueError("--fp16 is not supported (use --bf16, or fp32 by default)")
    if args.recompute_granularity not in (None, "full", "selective"):
        raise ValueError(f"--recompute-granularity={args.recompute_granularity!r}: allowed full, selective")
    if args.context_parallel_size > 1:
        raise ValueError(
            "--context-parallel-size > 1 is not supported by the trainer yet (ALP and the "
            "objectives are CP-ready; the trainer's batch split is not)"
        )
    return load


def check_optimizer(args: argparse.Namespace) -> None:
    """Ranges of the optimizer and schedule flags (torch's Adam would refuse them on every
    rank after start-up; here they are one line before any rank starts)."""
    lr = args.lr
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"--lr={lr} is invalid; expected a learning rate >= 0")
    min_lr = args.min_lr
    if min_lr is not None and not (math.isfinite(min_lr) and min_lr >= 0):
        raise ValueError(f"--min-lr={min_lr} is invalid; expected >= 0 (and <= --lr)")
    peak = lr if lr is not None else 1e-6
    if min_lr and min_lr > peak:
        raise ValueError(f"--min-lr={min_lr} is above --lr={peak}; expected 0 <= --min-lr <= --lr")
    for flag in ("--weight-decay", "--start-weight-decay", "--end-weight-decay", "--clip-grad", "--adam-eps"):
        v = value(args, flag)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag}={v} is invalid; expected a finite number >= 0")
    for flag in ("--adam-beta1", "--adam-beta2"):
        v = value(args, flag)
        if not 0 <= v < 1:
            raise ValueError(f"{flag}={v} is invalid; expected 0 <= beta < 1")
    for flag in ("--lr-warmup-iters", "--seed"):
        v = value(args, flag)
        if v is not None and v < 0:
            raise ValueError(f"{flag}={v} is invalid; expected an integer >= 0")
    for flag in ("--lr-decay-iters", "--exit-interval", "--seq-length"):
        v = value(args, flag)
        if v is not None:
            positive(flag, v)


def optimizer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Megatron ``OptimizerConfig`` fields the trainer passes on."""
    return dict(
        lr=args.lr if args.lr is not None else 1e-6,
        min_lr=args.min_lr or 0.0,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
    )


def scheduler_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``OptimizerParamScheduler`` settings, in RL steps."""
    wd = args.weight_decay
    return dict(
        lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=args.lr_warmup_iters or 0,
        lr_decay_iters=args.lr_decay_iters or args.train_iters,
        start_weight_decay=args.start_weight_decay if args.start_weight_decay is not None else wd,
        end_weight_decay=args.end_weight_decay if args.end_weight_decay is not None else wd,
        weight_decay_incr_style=args.weight_decay_incr_style,
    )


@contextlib.contextmanager
def _cpu_device_queries():
    """See the module docstring: the one CPU workaround for megatron's validate_args."""
    from megatron.training import arguments as margs

    from megatron_alp import platform

    if platform.cuda_available():
        yield
        return
    saved = margs.get_device_arch_version
    margs.get_device_arch_version = lambda: 10  # no CUDA_DEVICE_MAX_CONNECTIONS rule on CPU
    try:
        yield
    finally:
        margs.get_device_arch_version = saved


def validate_with_megatron(args: argparse.Namespace, world_size: int) -> None:
    """Megatron's own ``validate_args`` (its assertions become one-line ValueErrors)."""
    from megatron.training.arguments import validate_args

    args.world_size = world_size
    args.rank = int(os.environ.get("RANK", "0"))
    out = io.StringIO()
    try:
        with _cpu_device_queries(), contextlib.redirect_stdout(out):
            validate_args(args)
    except AssertionError as e:
        why = str(e).strip()
        if not why:  # a bare assert: name the condition megatron checked
            import traceback

            frame = traceback.extract_tb(e.__traceback__)[-1]
            why = f"`{frame.line}` (megatron/training/arguments.py line {frame.lineno})"
        raise ValueError(f"megatron rejected the arguments: {why}") from None
