"""Which signals save, and how fast: the trainer's side of a scheduler's "time is up".

    SIGTERM, SIGUSR1   with --exit-signal-handler: save a checkpoint, exit 0
    SIGINT (Ctrl-C)    no checkpoint; exit 130 with one line naming the last checkpoint
    SIGKILL            nothing can be done (torchrun sends it when its grace period ends)

A saving signal is acted on within a bounded time, not only at the end of an RL step
(minutes for a 7B model): :class:`ExitSignal` is looked at

* during rollouts and evaluation (rank 0 generates, the other ranks wait): the signal
  handler raises :class:`StepInterrupted` in rank 0's generation at once; the step is
  dropped (its prompts are drawn again after resume) and the last completed step is
  saved;
* after the log-prob pass: the step is dropped the same way;
* between the update's mini-batches: the step ends after the mini-batch in progress
  (the rest of its mini-batches are skipped, the log says how many) and is saved;
* at the end of every step (as before).

So the time from the signal to a saved checkpoint is at most one mini-batch (or the rest
of a log-prob pass or a weight sync) plus the checkpoint write. Under torchrun that must
fit in the agent's grace period: after forwarding SIGTERM, torchrun (torch 2.14.1,
``torch/distributed/elastic/multiprocessing/api.py`` ``_close(death_sig, timeout)``)
sends SIGKILL to the workers ``--shutdown-timeout`` seconds later (default 30, or
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``); ``examples/slurm/train.sbatch`` raises it to fit
the 10 minutes its ``--signal`` gives. docs/train.md, "Signals".
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Iterator

__all__ = ["SAVING_SIGNALS", "ExitSignal", "StepInterrupted", "interrupted_line", "last_checkpoint"]

SAVING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StepInterrupted(Exception):
    """A saving signal arrived while the step could still be dropped (rollouts, eval,
    before the update); the caller saves the last completed step and exits."""


class ExitSignal:
    """Records SIGTERM / SIGUSR1 (what SLURM's ``--signal`` and torchrun send) for a
    clean save-and-exit; inside :meth:`interruptible` it raises :class:`StepInterrupted`.

    ``enabled`` False (no ``--exit-signal-handler``) installs nothing: the signals keep
    their default action (SIGTERM ends the process).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.name: str | None = None
        self._interruptible = 0
        if enabled:
            for sig in SAVING_SIGNALS:
                signal.signal(sig, self._handler)

    @property
    def received(self) -> bool:
        return self.received_at is not None

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.name = signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = 0  # raise once: the handler may run again during cleanup
            raise StepInterrupted(f"{self.name} received")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A phase the signal may cut short (rank 0's generation): a signal received
        before or during it raises :class:`StepInterrupted` in the calling thread."""
        if self.received:
            raise StepInterrupted(f"{self.name} received")
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible = max(0, self._interruptible - 1)

    def since(self) -> float:
        """Seconds since the first signal (0 if none)."""
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at


def last_checkpoint(save: Path | None) -> str | None:
    """``iter_NNNNNNN`` of the latest complete checkpoint under ``save`` (None if none)."""
    if save is None:
        return None
    latest = Path(save) / "latest_checkpointed_iteration.txt"
    try:
        step = int(latest.read_text().strip())
    except (OSError, ValueError):
        return None
    return f"iter_{step:07d}"


def interrupted_line(save: Path | None) -> str:
    """The one line printed when SIGINT stops a run (it saves nothing)."""
    why = "(Ctrl-C saves nothing; SIGTERM with --exit-signal-handler saves)"
    if save is None:
        return f"[train] interrupted; no checkpoint (no --save) {why}"
    found = last_checkpoint(save)
    if found is None:
        return f"[train] interrupted; no checkpoint in {save} yet {why}"
    return f"[train] interrupted; last checkpoint {found} in {save} {why}"
