"""The ALP group: ``--alp/--no-alp`` and ``--alp-<field>`` of ``ALPConfig`` (help from its docs).

ALP is on exactly when the objective perturbs (``*-alp`` presets); ``--alp`` with another
preset, or ``--no-alp`` with an ALP preset, is refused. Precedence: ALPConfig defaults <
YAML ``alp`` < flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.rl.losses import PolicyLossConfig
from megatron_alp.train.fieldargs import add_dataclass_flags, given_fields

__all__ = ["add_alp_flags", "resolve_alp"]

_DESTS: dict[str, str] = {}


def add_alp_flags(parser: argparse.ArgumentParser) -> None:
    _DESTS.update(add_dataclass_flags(
        parser, ALPConfig, prefix="alp", title="megatron-alp ALP (adaptive layerwise perturbation)",
        renames={"enabled": "--alp"},
    ))
    parser._option_string_actions["--alp"].help = (  # noqa: SLF001 - the field's doc does not apply here
        "on exactly when the objective perturbs (the *-alp presets); --alp with another preset, or "
        "--no-alp with an ALP preset, is refused (default: the preset's)")


def resolve_alp(args: argparse.Namespace, cfg_path: Path | None, cfg_data: dict, preset: str,
                loss: PolicyLossConfig) -> ALPConfig:
    """The ALPConfig of the run: YAML ``alp`` < flags, ``enabled`` from the objective."""
    from megatron_alp.train.args.config_file import section_fields

    alp_fields = section_fields(cfg_path, "alp", cfg_data, ALPConfig)
    alp_fields.update(given_fields(args, _DESTS))
    wants_alp = loss.perturbation == "alp"
    if "enabled" in alp_fields and alp_fields["enabled"] != wants_alp:
        raise ValueError(
            f"--alp={'on' if alp_fields['enabled'] else 'off'} contradicts --rl-loss {preset} "
            f"(perturbation={loss.perturbation!r}): ALP objectives need the noise and the others "
            "must not have it; choose an *-alp preset for ALP, or drop --alp/--no-alp"
        )
    alp_fields["enabled"] = wants_alp
    return ALPConfig(**alp_fields)
