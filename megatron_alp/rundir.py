"""The run folder (``--rl-run-dir``, default ``--save``, else ``runs/latest``): written only if ours.

The trainer writes ``config.json``, ``metrics.jsonl`` (through ``metrics.jsonl.part``),
``logs/rank_N.log`` there, and ``python -m megatron_alp.plot`` writes ``plots/``. The
converters' rule (``megatron_alp/io_safety.py``) applies: a folder is written only if this
trainer claimed it — its top level holds :data:`MARKER` — or if it holds none of those
names (or is a ``--save`` folder whose latest checkpoint this trainer wrote, from before
the marker). A folder with a foreign ``config.json`` (say) and no marker is refused with one
line, before any rank starts; a run of its own (marker present) is resumed and appended to.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MARKER", "OWNED", "check_run_dir", "claim_run_dir"]

MARKER = ".megatron-alp-run"
"""Written into a run folder when the trainer first uses it."""
OWNED = ("config.json", "metrics.jsonl", "metrics.jsonl.part", "logs", "plots")
"""What the trainer (and the plot command) write in a run folder."""


def _holds_trainer_checkpoint(run_dir: Path) -> bool:
    """A ``--save`` folder of this trainer (run folder by default) written before the marker
    existed: its latest checkpoint carries the checkpoint marker (``train/checkpoint.py``)."""
    try:
        step = (run_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return step.isdigit() and (run_dir / f"iter_{int(step):07d}" / ".megatron-alp-checkpoint").is_file()


def check_run_dir(run_dir: Path, flag: str) -> None:
    """ValueError naming ``flag``, the folder and a foreign file, unless the trainer may write there."""
    run_dir = Path(run_dir)
    if (run_dir / MARKER).is_file() or _holds_trainer_checkpoint(run_dir):
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{flag} {run_dir} exists and is not a folder")
    foreign = [name for name in OWNED if os.path.lexists(run_dir / name)]
    if foreign:
        raise ValueError(
            f"{flag} {run_dir} holds {foreign[0]} but no {MARKER}: this trainer did not write it "
            f"and never replaces what it did not write; choose another run folder (--rl-run-dir), "
            f"or move {', '.join(foreign)} away"
        )


def claim_run_dir(run_dir: Path, flag: str = "--rl-run-dir") -> None:
    """Check again (the folder may have changed since parsing), create it and write the marker."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, flag)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write("megatron-alp trainer run folder: config.json, metrics.jsonl, logs/, plots/\n")
