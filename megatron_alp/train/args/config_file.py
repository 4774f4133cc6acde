"""``--config FILE.yaml``: a ``configs/`` preset or a YAML file of defaults.

Sections: ``policy_loss`` (a preset name and ``PolicyLossConfig`` fields), ``alp``
(``ALPConfig`` fields), ``advantages`` (``estimator``) and ``train`` (flag names to values,
put before the command line so that the command line wins). Every problem names the
file, the section and key, the value and what was expected.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["SECTIONS", "read_config", "yaml_train_argv"]

SECTIONS = ("advantages", "alp", "policy_loss", "train")


def read_config(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The file a ``--config`` value names and its top-level mapping (sections checked)."""
    from megatron_alp.presets import resolve_preset_path

    try:
        path = resolve_preset_path(name_or_path)
    except ValueError as e:
        raise ValueError(f"--config {name_or_path}: {e}") from None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"--config {path}: not valid YAML{where}: {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections at the top level, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ValueError(f"--config {path}: section `{name}` must be a mapping of keys to values, "
                             f"got {type(data[name]).__name__} {data[name]!r}")
    advantages = data.get("advantages") or {}
    bad = sorted(set(advantages) - {"estimator"})
    if bad:
        raise ValueError(f"--config {path}: advantages.{bad[0]} is not a known key; valid: estimator")
    return path, data


def yaml_train_argv(path: Path | None, section: Any) -> list[str]:
    """The ``train:`` section as command-line words (true: the bare flag; false / null: left out)."""
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
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def check_train_section(parser: argparse.ArgumentParser, path: Path, section: dict | None,
                        parse: Any) -> None:
    """Parse the ``train:`` section alone so that an unknown key or a bad value names the file
    and the key (``parse(words)`` raises ValueError with argparse's one-line message)."""
    for key, value in (section or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in parser._option_string_actions:  # noqa: SLF001 - argparse's own table
            from megatron_alp.train.args.parser import suggest

            raise ValueError(f"--config {path}: train.{key} is not a trainer flag ({flag}){suggest(parser, flag)}")
        words = yaml_train_argv(path, {key: value})
        if not words:
            continue
        try:
            parse(words)
        except ValueError as e:
            raise ValueError(f"--config {path}: train.{key}: {value!r}: {e}") from None


def section_fields(path: Path | None, section: str, data: dict, cls: type, *,
                   extra: Sequence[str] = ()) -> dict[str, Any]:
    """``data[section]`` checked against the fields of ``cls`` (and ``extra`` keys)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)} | set(extra)
    values = dict(data.get(section) or {})
    unknown = sorted(set(values) - fields, key=str)
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), sorted(fields), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; valid: {', '.join(sorted(fields))}"
        raise ValueError(f"--config {path}: {section}.{unknown[0]} is not a field of {cls.__name__}{hint}")
    return values
