"""The trainer's parser: Megatron's flags plus the trainer's groups, errors in one line, two helps.

:func:`build_parser` adds megatron-core's own flags (``add_megatron_arguments``, so each
means what it means there) and the trainer's groups to a :class:`TrainerParser`, whose
errors raise :class:`UsageError` (a ``ValueError``: one line, no usage dump; the command
exits 2) instead of printing Megatron's ~830-line usage. :func:`parse_words` replays the
few steps of ``megatron.training.arguments.parse_args`` (0.19.2) that follow its parse.

``--help`` prints the trainer's own groups (run, objective, ALP, fleet, multi-turn) and the
Megatron flags it reads, each with its meaning here (:data:`~.megatron.USED`);
``--help-all`` prints Megatron's whole parser as well.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import sys
from typing import Sequence

__all__ = ["PROG", "TrainerParser", "UsageError", "build_parser", "help_text", "parse_words", "suggest"]

PROG = "python -m megatron_alp.train"
USAGE = (f"{PROG} --hf-model DIR --rl-prompt-data FILE [--config FILE.yaml] [flags]\n"
         f"       torchrun --nproc-per-node N -m megatron_alp.train [same flags]")
DESCRIPTION = (
    "RL for LLMs with Adaptive Layerwise Perturbation on Megatron-Core. Started with python it "
    "checks the flags, then spawns --nproc ranks (default TP x PP); under torchrun each process "
    "is a rank. Bad input: one line naming the flag, exit 2, before any rank starts. "
    "docs/train.md explains every flag."
)


class UsageError(ValueError):
    """A command-line or YAML value argparse refused (one line; the command exits 2)."""


class TrainerParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(" ".join(str(message).split()))


def suggest(parser: argparse.ArgumentParser, flag: str) -> str:
    """``"; did you mean --x?"`` for a mistyped flag (empty when nothing is close)."""
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, list(parser._option_string_actions), n=1, cutoff=0.75)  # noqa: SLF001
    return f"; did you mean {close[0]}?" if close else ""


def add_trainer_groups(parser: argparse.ArgumentParser) -> None:
    """The trainer's own groups, in ``--help`` order."""
    from megatron_alp.train.args.alp import add_alp_flags
    from megatron_alp.train.args.async_rl import add_async_flags
    from megatron_alp.train.args.fleet import add_fleet_flags
    from megatron_alp.train.args.multiturn import add_multiturn_flags
    from megatron_alp.train.args.objective import add_objective_flags
    from megatron_alp.train.args.run import add_run_flags

    add_run_flags(parser)
    add_objective_flags(parser)
    add_alp_flags(parser)
    add_fleet_flags(parser)
    add_async_flags(parser)
    add_multiturn_flags(parser)


def _add_help_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("help and output")
    g.add_argument("-h", "--help", action="store_true", help="the trainer's flags (this text)")
    g.add_argument("--help-all", action="store_true",
                   help="this text and then every flag of Megatron's parser")
    g.add_argument("--verbose", action="store_true",
                   help="print the effective configuration and third-party warnings")


def build_parser() -> TrainerParser:
    """Megatron's flags and the trainer's groups on one :class:`TrainerParser`."""
    from megatron.training.arguments import add_megatron_arguments

    parser = TrainerParser(prog=PROG, usage=USAGE, description=DESCRIPTION, allow_abbrev=False,
                           add_help=False)
    add_megatron_arguments(parser)
    add_trainer_groups(parser)
    _add_help_flags(parser)
    return parser


def parse_words(parser: TrainerParser, words: Sequence[str]) -> argparse.Namespace:
    """Parse ``words``; an unknown flag or stray value is a :class:`UsageError` naming it.

    Then the steps of megatron's ``parse_args`` (megatron/training/arguments.py, 0.19.2,
    lines 133-166) that the trainer needs: the explicit-global-batch note, RANK /
    WORLD_SIZE, and MSC off (its ``--yaml-cfg`` is refused: ``--config`` is the YAML here).
    """
    args, extra = parser.parse_known_args(list(words))
    if extra:
        word = extra[0]
        if word.startswith("-"):
            raise UsageError(f"unknown flag {word}{suggest(parser, word)} (--help lists the trainer's "
                             "flags, --help-all every Megatron flag)")
        raise UsageError(f"unexpected value {word!r}: no flag takes it (a flag that takes one value "
                         "was given several, or a value lacks its flag)")
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    if args.yaml_cfg is not None:
        raise UsageError(f"--yaml-cfg {args.yaml_cfg}: Megatron's experimental YAML is not read by "
                         "this trainer; use --config FILE.yaml")
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    from megatron.core.msc_utils import MultiStorageClientFeature

    if args.enable_msc and not args.disable_msc_deprecated:
        raise UsageError("--enable-msc is not supported by this trainer (checkpoints are local files)")
    MultiStorageClientFeature.disable()
    return args


def _escape_help_percents(parser: argparse.ArgumentParser) -> None:
    """THE workaround for Megatron's help text: argparse %-formats every help string, and
    megatron-core 0.19.2 generates some from TransformerConfig docstrings that hold a bare
    ``%`` (``--moe-paged-stash-buffer-size-factor-cuda``: "... 10%) ..."), which makes
    ``format_help`` raise "unsupported format character". A help string that does not
    format is escaped (``%`` -> ``%%``) so it prints as written; the others are untouched."""
    formatter = parser._get_formatter()  # noqa: SLF001
    for action in parser._actions:  # noqa: SLF001
        if not action.help or action.help is argparse.SUPPRESS:
            continue
        try:
            formatter._expand_help(action)  # noqa: SLF001 - exactly what format_help will do
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


_METAVARS = {"--save": "DIR", "--load": "DIR", "--wandb-save-dir": "DIR", "--tensorboard-dir": "DIR",
             "--wandb-project": "NAME", "--wandb-exp-name": "NAME", "--exit-duration-in-mins": "M"}


def _trainer_titles() -> set[str]:
    short = TrainerParser(add_help=False)
    add_trainer_groups(short)
    _add_help_flags(short)
    return {g.title for g in short._action_groups[2:]}  # noqa: SLF001 - [0:2]: argparse's own two


def help_text(full: TrainerParser, *, everything: bool = False) -> str:
    """``--help``: the trainer's groups, then the Megatron flags it reads with their meaning
    here; with ``everything`` (``--help-all``) every other group of Megatron's parser follows."""
    from megatron_alp.train.args.megatron import USED

    ours = _trainer_titles()
    used = {id(full._option_string_actions[f]) for flags in USED.values() for f in flags}  # noqa: SLF001
    others = [a for g in full._action_groups if g.title not in ours  # noqa: SLF001
              for a in g._group_actions if id(a) not in used]  # noqa: SLF001
    short = TrainerParser(prog=PROG, usage=USAGE, description=DESCRIPTION, add_help=False,
                          epilog=None if everything else
                          f"Megatron's other {len(others)} flags (most unused here): --help-all")
    add_trainer_groups(short)
    for title, flags in USED.items():
        group = short.add_argument_group(title)
        for flag, meaning in flags.items():
            action = copy.copy(full._option_string_actions[flag])  # noqa: SLF001
            default = action.default
            shown = "" if default in (None, False) or action.nargs == 0 else f" (default: {default})"
            action.help = meaning + shown
            if action.metavar is None and action.choices is None and action.nargs != 0:
                action.metavar = _METAVARS.get(flag) or {int: "N", float: "X"}.get(action.type, "VALUE")
            group._add_action(action)  # noqa: SLF001 - a display-only parser
    _add_help_flags(short)
    _escape_help_percents(short)
    text = short.format_help()
    if not everything:
        return text
    _escape_help_percents(full)
    formatter = full._get_formatter()  # noqa: SLF001 - what format_help does, minus our groups
    for g in full._action_groups:  # noqa: SLF001
        if g.title in ours or not g._group_actions:  # noqa: SLF001
            continue
        formatter.start_section(f"megatron: {g.title}")
        formatter.add_text(g.description)
        formatter.add_arguments(g._group_actions)  # noqa: SLF001
        formatter.end_section()
    rule = "=" * 20
    return (text + f"\n{rule} every group of Megatron's parser (megatron-core's own help; the trainer "
            f"ignores most) {rule}\n\n" + formatter.format_help())


def print_help_if_asked(argv: Sequence[str]) -> None:
    """``-h`` / ``--help`` / ``--help-all`` on the command line: print and exit 0."""
    if not any(a in ("-h", "--help", "--help-all") for a in argv):
        return
    sys.stdout.write(help_text(build_parser(), everything="--help-all" in argv))
    sys.stdout.flush()
    raise SystemExit(0)
