"""The trainer's arguments: megatron-core's own parser plus our groups, mapped to small configs.

``megatron.training.arguments.parse_args`` parses the command line, so every Megatron flag
means what it means there (parallel sizes, batch sizes, optimizer, LR schedule,
checkpointing, exits, wandb / TensorBoard). Its RL group is reused where the meaning
matches (``--grpo-*``, ``--rl-default-temperature/-top-p/-top-k``, ``--rl-generation-lag``,
``--rl-verify-model-weights-swap``). Ours come in one group each: ``--alp-*`` (generated
from :class:`~megatron_alp.perturbation.ALPConfig`), ``--rl-loss`` + ``--rl-loss-*``
(:class:`~megatron_alp.rl.PolicyLossConfig`), and the run group (model, data, reward,
engine, eval). ``--config FILE.yaml`` supplies defaults (a ``configs/`` preset, or a file
with a ``train:`` section of flag values); the command line overrides it.

Precedence for the objective: preset defaults < YAML ``policy_loss`` < explicit flags
(``--grpo-clamp-eps-lower/upper`` are the PPO clip bounds, ``--grpo-kl-beta`` the KL
weight, ``--grpo-entropy-term-weight`` the entropy weight — used only when given, since
Megatron's own defaults differ from the paper's presets).

Every problem is a ``ValueError`` naming the flag, the value and what is allowed, raised
before any process group exists. The model architecture comes from ``--hf-model``'s
``config.json`` (Megatron's ``--num-layers``, ``--hidden-size`` ... must agree if given).

**CPU workaround (one place, :func:`_validate_with_megatron`)**: megatron's
``validate_args`` asks ``torch.cuda.get_device_properties`` for the device architecture
when TP or CP > 1 (to decide whether ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is required); on a
machine without a GPU that raises "Found no NVIDIA driver". When CUDA is absent we answer
that query with an architecture that has no such stream-ordering requirement, for the
duration of the call only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from megatron_alp.parallel import ParallelConfig
from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.rl.losses import PolicyLossConfig, available_policy_losses, policy_loss_config
from megatron_alp.train.fieldargs import add_dataclass_flags, given_fields

__all__ = ["RunConfig", "TrainConfig", "parse_args"]

# PolicyLossConfig fields that Megatron's RL group already carries.
_MEGATRON_LOSS_FLAGS = {
    "clip_low": "--grpo-clamp-eps-lower",
    "clip_high": "--grpo-clamp-eps-upper",
    "kl_coef": "--grpo-kl-beta",
    "entropy_coef": "--grpo-entropy-term-weight",
}
ROLLOUT_DTYPES = ("bf16", "fp32")
_LOSS_DESTS: dict[str, str] = {}
_ALP_DESTS: dict[str, str] = {}


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
    """Engine precision: bf16 (like a vLLM fleet) or fp32 (parity checks)."""
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


# ----------------------------------------------------------------------------- our groups
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: our groups (ALP, objective, run)."""
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
    g.add_argument("--rl-reward", default="math-verify",
                   help="reward function: math-verify (last \\boxed{} vs answer, symbolic) or "
                        "exact-match (default: math-verify)")
    g.add_argument("--rl-rollout-engine", default="local",
                   help="rollout engine registry name: local (HF transformers in-process, the CPU "
                        "default), vllm, ... (default: local)")
    g.add_argument("--rl-rollout-dtype", default="bf16", choices=ROLLOUT_DTYPES,
                   help="rollout engine precision: bf16 (like a vLLM fleet) or fp32 (default: bf16)")
    g.add_argument("--rl-fleet-endpoints", default=None, metavar="URL[,URL...]",
                   help="--rl-rollout-engine fleet: engine base URLs (http://host:port, started by "
                        "python -m megatron_alp.rollout.fleet_launch); none: start --rl-fleet-engines "
                        "local engines")
    g.add_argument("--rl-engine-sleep-level", default="auto", choices=("auto", "0", "1", "2"),
                   help="a colocated engine (--rl-rollout-engine vllm) frees its GPU memory while "
                        "the trainer trains: 1 offloads its weights to host memory, 2 drops them "
                        "(every sync re-sends all weights, so 2 loses nothing); it wakes at the next "
                        "weight sync. 0: never sleep. auto: 2 for engines that can sleep, else 0 "
                        "(default: auto)")
    g.add_argument("--rl-fleet-backend", default="twin", choices=("twin", "vllm"),
                   help="fleet engine kind: twin (the CPU twin: LocalEngine served over HTTP + gloo "
                        "weight group) or vllm (vllm serve with our worker extension); default twin")
    g.add_argument("--rl-fleet-max-in-flight", type=int, default=None, metavar="N",
                   help="requests kept in flight per engine (each holds one client thread); "
                        "default 8 for the twin, 64 for vLLM — raise it for large vLLM engines "
                        "so their scheduler sees enough sequences to batch")
    g.add_argument("--rl-fleet-rows-per-request", type=int, default=None, metavar="N",
                   help="completions per request (a prompt's samples stay together so they share "
                        "the engine's prefix cache); default 16 for the twin, 1 for vLLM")
    g.add_argument("--rl-fleet-engines", type=int, default=2,
                   help="engines of a locally started fleet (no --rl-fleet-endpoints; default 2)")
    g.add_argument("--rl-fleet-sync-host", default="auto",
                   help="rank 0's address as the engines reach it (weight-sync rendezvous); "
                        "default auto: rank 0 finds its own (127.0.0.1 for engines on its machine, "
                        "else the interface routing to them) and shares it with every rank")
    g.add_argument("--rl-fleet-sync-port", type=int, default=None,
                   help="first weight-sync rendezvous port (default: a free one)")
    g.add_argument("--rl-max-new-tokens", type=int, default=256,
                   help="maximum response tokens per completion (default: 256)")
    g.add_argument("--rl-max-prompt-length", type=int, default=None,
                   help="longer prompts are refused (default: --seq-length - --rl-max-new-tokens, "
                        "or 1024 when --seq-length is not given)")
    g.add_argument("--rl-eval-interval", type=int, default=0,
                   help="evaluate every N RL steps and at the end (0: only at the end when "
                        "--rl-eval-data is given; default 0)")
    g.add_argument("--rl-eval-samples", type=int, default=4,
                   help="completions per eval prompt (mean@n and unbiased pass@k; default 4)")
    g.add_argument("--rl-advantage-estimator", default=None,
                   help="advantage estimator (grpo, grpo-no-std, rloo; default: the preset's, grpo)")
    g.add_argument("--rl-run-dir", default=None, metavar="DIR",
                   help="where metrics.jsonl, config.json and plots go (default: --save, else "
                        "runs/latest)")
    g.add_argument("--nproc", type=int, default=None,
                   help="ranks to spawn when started as `python -m megatron_alp.train` (not under "
                        "torchrun); default TP x PP x CP")
    g.add_argument("--rl-max-turns", type=int, default=1,
                   help="model turns per rollout: 1 = single-turn (default); N > 1 = multi-turn "
                        "tool-integrated reasoning: a fenced python block is run in the sandbox, "
                        "its output shown as an observation (masked from the loss), until a "
                        "\\boxed{} answer or N turns; --rl-max-new-tokens then bounds the whole "
                        "response (model + observation tokens)")
    g.add_argument("--rl-sandbox", default="local", metavar="local|URL",
                   help="where multi-turn code runs: local (an in-process bubblewrap pool on "
                        "the rollout rank) or http://HOST:PORT of `python -m "
                        "megatron_alp.sandbox.serve` (several, comma-separated: programs are "
                        "spread over them; default: local)")
    g.add_argument("--rl-sandbox-concurrency", type=int, default=8,
                   help="programs run at once (pool slots, or requests in flight per service; "
                        "default 8)")
    g.add_argument("--rl-sandbox-timeout-s", type=float, default=10.0,
                   help="wall-clock limit per program, local pool (the service has its own; "
                        "default 10)")
    g.add_argument("--rl-sandbox-memory-mb", type=int, default=1024,
                   help="address-space limit per program in MiB, local pool (default 1024)")
    g.add_argument("--rl-loss", default=None,
                   help=f"policy-loss preset: {', '.join(available_policy_losses())} (default: the "
                        "--config preset's, else token-alp)")
    _LOSS_DESTS.update(add_dataclass_flags(
        parser, PolicyLossConfig, prefix="rl-loss", title="megatron-alp objective (--rl-loss-* "
        "override fields of the --rl-loss preset; clip bounds, KL and entropy weights are "
        "Megatron's --grpo-* flags)",
        skip=tuple(_MEGATRON_LOSS_FLAGS) + ("perturbation",),
    ))
    _ALP_DESTS.update(add_dataclass_flags(
        parser, ALPConfig, prefix="alp", title="megatron-alp ALP (adaptive layerwise perturbation)",
        renames={"enabled": "--alp"},
    ))
    return parser


# ----------------------------------------------------------------------------- parsing
def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _yaml_train_argv(path: Path, section: Any) -> list[str]:
    if section is None:
        return []
    if not isinstance(section, dict):
        raise ValueError(f"{path}: `train` must be a mapping of flag names to values")
    out: list[str] = []
    for key, value in section.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        else:
            out += [flag, str(value)]
    return out


def _read_config(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    from megatron_alp.presets import resolve_preset_path

    path = resolve_preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping at the top level")
    return path, data


@contextlib.contextmanager
def _argv(argv: Sequence[str]):
    saved = sys.argv
    sys.argv = ["python -m megatron_alp.train", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _hf_config(path: str | None) -> Any:
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


def _fill_model_args(args: argparse.Namespace, argv: Sequence[str], hf: Any) -> Any:
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
        if _given(argv, flag) and have is not None and have != value:
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


def _validate_with_megatron(args: argparse.Namespace) -> None:
    from megatron.training.arguments import validate_args

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


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.rl_rollout_engine != "fleet":
        given = [flag for flag in ("--rl-fleet-endpoints", "--rl-fleet-sync-port",
                                   "--rl-fleet-max-in-flight", "--rl-fleet-rows-per-request")
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            raise ValueError(
                f"{given[0]} applies to --rl-rollout-engine fleet, not "
                f"{args.rl_rollout_engine!r}; drop it or add --rl-rollout-engine fleet"
            )
        return {}
    if args.rl_fleet_engines < 1:
        raise ValueError(f"--rl-fleet-engines={args.rl_fleet_engines} is invalid; expected >= 1")
    endpoints = [e.strip() for e in args.rl_fleet_endpoints.split(",")] if args.rl_fleet_endpoints else None
    if endpoints is not None and not all(e.startswith(("http://", "https://")) for e in endpoints):
        raise ValueError(
            f"--rl-fleet-endpoints {args.rl_fleet_endpoints!r}: expected comma-separated http://host:port URLs"
        )
    kw: dict[str, Any] = dict(backend=args.rl_fleet_backend, sync_host=args.rl_fleet_sync_host,
                              sync_port=args.rl_fleet_sync_port)
    for flag, key in (("--rl-fleet-max-in-flight", "max_in_flight"),
                      ("--rl-fleet-rows-per-request", "rows_per_request")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            _positive(flag, value)
            kw[key] = value
    if endpoints is None:
        kw["num_engines"] = args.rl_fleet_engines
    else:
        kw["endpoints"] = endpoints
    return kw


def _engine_sleep_level(args: argparse.Namespace) -> int:
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


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if value is None or value < minimum:
        raise ValueError(f"{name}={value} is invalid; expected an integer >= {minimum}")


def _validate_multiturn(args: argparse.Namespace) -> None:
    """Multi-turn flags; with a local sandbox, isolation must work here (its own message)."""
    _positive("--rl-max-turns", args.rl_max_turns)
    _positive("--rl-sandbox-concurrency", args.rl_sandbox_concurrency)
    if args.rl_max_turns == 1:
        return
    from megatron_alp.sandbox import SandboxLimits, SandboxUnavailable

    try:
        SandboxLimits(timeout_s=args.rl_sandbox_timeout_s, memory_mb=args.rl_sandbox_memory_mb)
    except ValueError as e:
        raise ValueError(f"--rl-sandbox-timeout-s / --rl-sandbox-memory-mb: {e}") from None
    if args.rl_sandbox != "local":
        from megatron_alp.sandbox import sandbox_client

        try:
            sandbox_client(args.rl_sandbox, max_concurrency=1).close()
        except ValueError as e:
            raise ValueError(f"--rl-sandbox {args.rl_sandbox!r}: expected local or URL[,URL...]; {e}") from None
        return
    # Only the process that will own the pool (the launcher, or rank 0) runs the check:
    # one isolated program, so a broken bubblewrap fails here, before any rank starts.
    if os.environ.get("RANK", "0") != "0":
        return
    from megatron_alp.sandbox import SandboxPool

    try:
        SandboxPool(max_concurrency=1).close()
    except SandboxUnavailable as e:
        raise ValueError(f"--rl-max-turns={args.rl_max_turns} needs a working sandbox "
                         f"(--rl-sandbox local): {e}") from None


def parse_args(argv: Sequence[str] | None = None, *, world_size: int | None = None) -> TrainConfig:
    """Parse and validate the trainer's command line (see the module docstring).

    ``world_size`` defaults to ``WORLD_SIZE`` (torchrun), else ``--nproc``, else TP x PP x CP.
    argparse errors exit 2 with argparse's message; everything else is a ``ValueError``.
    """
    from megatron.training.arguments import parse_args as megatron_parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    # --config first: its `train:` flags go before the command line so that it wins.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    cfg_path, cfg_data = (None, {})
    if known.config:
        cfg_path, cfg_data = _read_config(known.config)
        unknown = sorted(set(cfg_data) - {"policy_loss", "alp", "advantages", "train"})
        if unknown:
            raise ValueError(f"--config {cfg_path}: unknown section(s) {unknown}; valid: "
                             "advantages, alp, policy_loss, train")
    full_argv = _yaml_train_argv(cfg_path, cfg_data.get("train")) + argv
    with _argv(full_argv):
        args = megatron_parse_args(extra_args_provider=add_arguments)

    hf = _hf_config(args.hf_model)
    _fill_model_args(args, full_argv, hf)

    # --- the objective: preset < YAML policy_loss < explicit flags
    loss_yaml = dict(cfg_data.get("policy_loss") or {})
    yaml_preset = loss_yaml.pop("preset", None)
    preset = args.rl_loss or yaml_preset or "token-alp"
    overrides = dict(loss_yaml)
    overrides.update(given_fields(args, _LOSS_DESTS))
    for field, flag in _MEGATRON_LOSS_FLAGS.items():
        if _given(full_argv, flag):
            overrides[field] = getattr(args, flag.lstrip("-").replace("-", "_"))
    try:
        loss = policy_loss_config(preset, **overrides)
    except ValueError as e:
        raise ValueError(f"--rl-loss {preset}: {e}") from None

    # --- ALP: on exactly when the objective is an ALP one, unless told otherwise (refused)
    alp_fields = dict(cfg_data.get("alp") or {})
    alp_fields.update(given_fields(args, _ALP_DESTS))
    wants_alp = loss.perturbation == "alp"
    if "enabled" in alp_fields and alp_fields["enabled"] != wants_alp:
        raise ValueError(
            f"--alp={'on' if alp_fields['enabled'] else 'off'} contradicts --rl-loss {preset} "
            f"(perturbation={loss.perturbation!r}): ALP objectives need the noise and the others "
            "must not have it; choose an *-alp preset for ALP, or drop --alp/--no-alp"
        )
    alp_fields["enabled"] = wants_alp
    alp = ALPConfig(**alp_fields)

    # --- sizes
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

    mbs, gbs = args.micro_batch_size, args.global_batch_size
    _positive("--micro-batch-size", mbs)
    _positive("--grpo-prompts-per-step", args.grpo_prompts_per_step)
    _positive("--grpo-group-size", args.grpo_group_size)
    _positive("--grpo-iterations", args.grpo_iterations)
    _positive("--train-iters", args.train_iters)
    _positive("--rl-max-new-tokens", args.rl_max_new_tokens)
    _positive("--rl-eval-samples", args.rl_eval_samples)
    if args.rl_generation_lag < 0:
        raise ValueError(f"--rl-generation-lag={args.rl_generation_lag} is invalid; expected >= 0")
    if args.rl_eval_interval < 0:
        raise ValueError(f"--rl-eval-interval={args.rl_eval_interval} is invalid; expected >= 0")
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
    max_prompt = args.rl_max_prompt_length
    if args.seq_length is None or not _given(full_argv, "--seq-length"):
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
    if not args.rl_prompt_data:
        raise ValueError("--rl-prompt-data FILE is required (JSONL or Parquet with prompt, answer)")
    for flag, value in (("--rl-prompt-data", args.rl_prompt_data), ("--rl-eval-data", args.rl_eval_data)):
        if value and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    load = Path(args.load) if args.load else None
    if load is not None:
        from megatron_alp.train.checkpoint import find_checkpoint

        find_checkpoint(load, required=not (args.save and Path(args.save).resolve() == load.resolve()))
    from megatron_alp.train.checkpoint import check_save_path, overlapping_input

    inputs = {"--hf-model": Path(args.hf_model), "--rl-prompt-data": Path(args.rl_prompt_data)}
    if args.rl_eval_data:
        inputs["--rl-eval-data"] = Path(args.rl_eval_data)
    if args.save:
        check_save_path(Path(args.save), inputs)
    if args.rl_run_dir:
        hit = overlapping_input(Path(args.rl_run_dir), inputs)
        if hit:
            raise ValueError(
                f"--rl-run-dir {args.rl_run_dir} overlaps {hit[0]} {hit[1]} (equal, containing or "
                "inside it); metrics, config.json and plots are written there: choose another folder"
            )
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
    if cp > 1:
        raise ValueError(
            "--context-parallel-size > 1 is not supported by the trainer yet (ALP and the "
            "objectives are CP-ready; the trainer's batch split is not)"
        )

    _validate_multiturn(args)

    args.world_size = world_size
    args.rank = int(os.environ.get("RANK", "0"))
    _validate_with_megatron(args)

    run_dir = Path(args.rl_run_dir or args.save or "runs/latest")
    lr_decay_iters = args.lr_decay_iters or args.train_iters
    run = RunConfig(
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
        engine_sleep_level=_engine_sleep_level(args),
        engine_kwargs=_engine_kwargs(args),
        run_dir=run_dir,
        nproc=args.nproc,
        max_turns=args.rl_max_turns,
        sandbox=args.rl_sandbox,
        sandbox_concurrency=args.rl_sandbox_concurrency,
        sandbox_timeout_s=float(args.rl_sandbox_timeout_s),
        sandbox_memory_mb=args.rl_sandbox_memory_mb,
    )
    return TrainConfig(
        parallel=parallel,
        world_size=world_size,
        data_parallel_size=dp,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        seq_length=seq_length,
        train_iters=args.train_iters,
        bf16=bool(args.bf16),
        recompute_granularity=args.recompute_granularity,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        optimizer=dict(
            lr=args.lr if args.lr is not None else 1e-6,
            min_lr=args.min_lr or 0.0,
            weight_decay=args.weight_decay,
            clip_grad=args.clip_grad,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
        ),
        scheduler=dict(
            lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters or 0,
            lr_decay_iters=lr_decay_iters,
            start_weight_decay=args.start_weight_decay if args.start_weight_decay is not None else args.weight_decay,
            end_weight_decay=args.end_weight_decay if args.end_weight_decay is not None else args.weight_decay,
            weight_decay_incr_style=args.weight_decay_incr_style,
        ),
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
