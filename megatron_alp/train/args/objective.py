"""The objective group: ``--rl-loss PRESET`` and ``--rl-loss-<field>`` of ``PolicyLossConfig``.

Precedence: preset defaults < YAML ``policy_loss`` < explicit flags. Megatron's RL group
already carries four of the fields (``--grpo-clamp-eps-lower/upper`` are the PPO clip
bounds, ``--grpo-kl-beta`` the KL weight, ``--grpo-entropy-term-weight`` the entropy
weight); they are used only when given, since Megatron's own defaults differ from the
paper's presets.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from megatron_alp.rl.losses import PolicyLossConfig, available_policy_losses, policy_loss_config
from megatron_alp.train.args.common import given, value
from megatron_alp.train.fieldargs import add_dataclass_flags, given_fields

__all__ = ["MEGATRON_LOSS_FLAGS", "add_objective_flags", "resolve_loss"]

MEGATRON_LOSS_FLAGS = {
    "clip_low": "--grpo-clamp-eps-lower",
    "clip_high": "--grpo-clamp-eps-upper",
    "kl_coef": "--grpo-kl-beta",
    "entropy_coef": "--grpo-entropy-term-weight",
}
"""PolicyLossConfig fields that Megatron's RL group already carries."""
_DESTS: dict[str, str] = {}


def add_objective_flags(parser: argparse.ArgumentParser) -> None:
    title = "megatron-alp objective"
    group = parser.add_argument_group(title, "--rl-loss-* override fields of the --rl-loss preset; "
                                      "clip bounds, KL and entropy weights are Megatron's --grpo-* flags")
    group.add_argument("--rl-loss", default=None, metavar="PRESET",
                       help=f"policy-loss preset: {', '.join(available_policy_losses())} (default: "
                            "the --config preset's, else token-alp)")
    _DESTS.update(add_dataclass_flags(
        parser, PolicyLossConfig, prefix="rl-loss", title=title, group=group,
        skip=tuple(MEGATRON_LOSS_FLAGS) + ("perturbation",),
    ))


def resolve_loss(args: argparse.Namespace, argv: Sequence[str], cfg_path: Path | None,
                 cfg_data: dict) -> tuple[str, PolicyLossConfig]:
    """(preset name, PolicyLossConfig) from the preset, the YAML section and the flags."""
    from megatron_alp.train.args.config_file import section_fields

    loss_yaml = section_fields(cfg_path, "policy_loss", cfg_data, PolicyLossConfig, extra=("preset",))
    yaml_preset = loss_yaml.pop("preset", None)
    preset = args.rl_loss or yaml_preset or "token-alp"
    overrides = dict(loss_yaml)
    overrides.update(given_fields(args, _DESTS))
    for field, flag in MEGATRON_LOSS_FLAGS.items():
        if given(argv, flag):
            overrides[field] = value(args, flag)
    try:
        return preset, policy_loss_config(preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--rl-loss {preset}: {e}") from None
