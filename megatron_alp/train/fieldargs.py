"""Command-line flags generated from a frozen config dataclass, help text from its field docs.

``ALPConfig`` and ``PolicyLossConfig`` document every field with a docstring under it;
:func:`add_dataclass_flags` turns each field into ``--{prefix}-{field}`` (booleans get a
``--no-`` twin) whose help is that docstring, so ``--help`` and the config never drift
apart. Defaults are ``None`` ("not given") so that presets and YAML files can supply the
value and an explicit flag can override it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from typing import Any

__all__ = ["add_dataclass_flags", "field_docs", "given_fields"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry a string literal below them."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}-{name.replace('_', '-')}"


def _parser_type(cls: type, field: dataclasses.Field) -> tuple[Any, list[str] | None]:
    hints = typing.get_type_hints(cls)
    hint = hints[field.name]
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return str, [str(a) for a in args]
    if hint is bool:
        return bool, None
    base = [a for a in args if a is not type(None)] if args else [hint]
    if base and typing.get_origin(base[0]) is typing.Literal:
        return str, [str(a) for a in typing.get_args(base[0])]
    t = base[0] if base else str
    return (t if t in (int, float, str) else str), None


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str,
    title: str,
    skip: tuple[str, ...] = (),
    renames: dict[str, str] | None = None,
    group: Any = None,
) -> dict[str, str]:
    """Add one flag per field of ``cls`` in a new argument group; return ``{dest: field}``.

    ``skip`` fields get no flag (another flag carries them); ``renames`` maps a field to
    a flag name of its own; ``group`` (an argument group of ``parser``) receives the flags
    instead of a new group titled ``title``. Optional fields accept ``none`` for None.
    """
    group = group if group is not None else parser.add_argument_group(title)
    docs = field_docs(cls)
    dests: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = (renames or {}).get(f.name) or _flag(prefix, f.name)
        dest = flag.lstrip("-").replace("-", "_")
        default = f.default if f.default is not dataclasses.MISSING else None
        ptype, choices = _parser_type(cls, f)
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", docs.get(f.name, "")).replace("``", "`")  # reST -> text
        help_text = f"{doc} (default: {default!r})".replace("%", "%%")
        if ptype is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            optional = f.default is None

            def convert(value: str, _t=ptype, _opt=optional, _flag=flag):
                if _opt and value.lower() == "none":
                    return None
                try:
                    return _t(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(
                        f"{_flag} expects {_t.__name__}{' or none' if _opt else ''}, got {value!r}"
                    ) from None

            convert.__name__ = ptype.__name__
            group.add_argument(flag, dest=dest, type=convert, choices=choices, default=None,
                               metavar=("{" + ",".join(choices) + "}") if choices else ptype.__name__.upper(),
                               help=help_text)
        dests[dest] = f.name
    return dests


def given_fields(ns: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """``{field: value}`` for the flags of :func:`add_dataclass_flags` that were given."""
    return {field: getattr(ns, dest) for dest, field in dests.items() if getattr(ns, dest, None) is not None}
