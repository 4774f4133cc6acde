"""Run presets from YAML (``configs/*.yaml``): the objective, ALP and the advantage estimator.

A preset file has three optional sections; every key is a field of the named dataclass
and overrides its default (unknown keys are an error naming the file and the key)::

    policy_loss:            # megatron_alp.rl.PolicyLossConfig; `preset` picks the base
      preset: token-alp
      kl_coef: 0.001
    alp:                    # megatron_alp.perturbation.ALPConfig
      init_std: 0.02
    advantages:
      estimator: grpo       # megatron_alp.rl.advantages registry name

``load_preset("token-alp")`` reads ``configs/token-alp.yaml`` from the repository;
a path reads that file. The objective and ALP must agree: a loss preset with
``perturbation: alp`` needs ``alp.enabled`` and vice versa.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.rl.advantages import available_advantage_estimators
from megatron_alp.rl.losses import PolicyLossConfig, policy_loss_config

__all__ = ["CONFIG_DIR", "RunPreset", "available_presets", "load_preset", "resolve_preset_path"]

# The repository's configs/, reached through the package's `configs` link (and shipped as
# package data, so a non-editable install has it too).
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunPreset:
    """A parsed preset file."""

    name: str
    """The file's stem (``token-alp``)."""
    policy_loss: PolicyLossConfig
    alp: ALPConfig
    advantage_estimator: str


def available_presets() -> list[str]:
    """Names of the YAML presets shipped in ``configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _fields(cls: type, section: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(names)}")
    return section


def resolve_preset_path(name_or_path: str | Path) -> Path:
    """``configs/<name>.yaml`` for a preset name, the path itself for a ``.yaml`` file.

    ValueError naming the value and listing the shipped presets when neither exists.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown preset {str(name_or_path)!r}; available: {', '.join(available_presets())}"
            )
    if not path.is_file():
        raise ValueError(f"preset file {path} does not exist")
    return path


def load_preset(name_or_path: str | Path) -> RunPreset:
    """Read a preset by name (``configs/<name>.yaml``) or by path; validate it."""
    path = resolve_preset_path(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - {"policy_loss", "alp", "advantages", "train"})
    if unknown:
        raise ValueError(
            f"{path}: unknown section(s) {unknown}; valid: advantages, alp, policy_loss, train"
        )
    loss = dict(data.get("policy_loss") or {})
    base = loss.pop("preset", None)
    if base is None:
        raise ValueError(f"{path}: policy_loss.preset is required (a registered loss name)")
    loss_cfg = policy_loss_config(base, **_fields(PolicyLossConfig, loss, f"{path}: policy_loss"))
    alp_section = dict(data.get("alp") or {})
    alp_section.setdefault("enabled", loss_cfg.perturbation == "alp")
    alp_cfg = ALPConfig(**_fields(ALPConfig, alp_section, f"{path}: alp"))
    if alp_cfg.enabled != (loss_cfg.perturbation == "alp"):
        raise ValueError(
            f"{path}: alp.enabled={alp_cfg.enabled} but policy_loss perturbation="
            f"{loss_cfg.perturbation!r}; ALP objectives need the noise and the others must not have it"
        )
    adv = dict(data.get("advantages") or {})
    estimator = adv.pop("estimator", "grpo")
    if adv:
        raise ValueError(f"{path}: advantages: unknown key(s) {sorted(adv)}; valid: ['estimator']")
    if estimator not in available_advantage_estimators():
        raise ValueError(
            f"{path}: advantages.estimator={estimator!r}; valid: {available_advantage_estimators()}"
        )
    return RunPreset(name=path.stem, policy_loss=loss_cfg, alp=alp_cfg, advantage_estimator=estimator)
