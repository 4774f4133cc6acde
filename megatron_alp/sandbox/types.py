"""Limits and results of one sandboxed run: plain data, shared by the pool, the service and
its client (they travel as JSON between the last two).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["KILLED_BY", "SandboxLimits", "SandboxResult", "SandboxUnavailable"]

KilledBy = Literal["timeout", "cpu", "memory", "processes", "file_size", "signal", "sandbox"]
KILLED_BY: tuple[str, ...] = ("timeout", "cpu", "memory", "processes", "file_size", "signal",
                              "sandbox")

# Each limit's type and range: (float allowed, lowest, highest). Ints must be real ints
# (not bool, not 2.5 or 2.0): a limit reaches prlimit, bwrap and buffer sizes as is.
_RANGES: dict[str, tuple[bool, float, float]] = {
    "timeout_s": (True, 0.0, 7 * 86400.0),  # > lowest (exclusive), the rest >=
    "cpu_s": (False, 1, 7 * 86400),
    "memory_mb": (False, 32, 1 << 24),
    "max_processes": (False, 1, 1 << 16),
    "max_file_mb": (False, 1, 1 << 24),
    "workdir_mb": (False, 1, 1 << 24),
    "max_open_files": (False, 16, 1 << 20),
    "max_output_bytes": (False, 64, 1 << 30),
}


class SandboxUnavailable(RuntimeError):
    """The isolation tool is missing or does not work here: untrusted code is NOT run."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxLimits:
    """Per-run resource limits (see ``docs/sandbox.md`` for how each is enforced)."""

    timeout_s: float = 10.0
    """Wall-clock limit; past it the whole process tree is killed (``timed_out``)."""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU): SIGXCPU at the limit, SIGKILL one second later."""
    memory_mb: int = 1024
    """Address space per process (RLIMIT_AS), MiB: larger allocations fail (MemoryError);
    where a memory cgroup is available, also the whole run's memory (OOM kill past it)."""
    max_processes: int = 32
    """Processes + threads the code may have at once (RLIMIT_NPROC on a per-slot uid)."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE), MiB."""
    workdir_mb: int = 64
    """Size of each private tmpfs (the working directory ``/work``, ``/tmp`` and
    ``/dev/shm``), MiB."""
    max_open_files: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 64 * 1024
    """Bytes kept of stdout and of stderr each (head and tail, a marker in between); the
    rest is read and dropped, so a chatty program neither blocks nor fills memory."""

    def __post_init__(self) -> None:
        for name, (real, low, high) in _RANGES.items():
            v = getattr(self, name)
            kind = "a number" if real else "an integer"
            ok_type = (isinstance(v, (int, float)) if real else isinstance(v, int)) \
                and not isinstance(v, bool)
            if not ok_type:
                raise ValueError(f"SandboxLimits.{name} must be {kind}, got "
                                 f"{type(v).__name__} {v!r}")
            in_range = (low < v <= high) if name == "timeout_s" else (low <= v <= high)
            if not in_range:  # also refuses NaN and infinities
                op = ">" if name == "timeout_s" else ">="
                lo, hi = (f"{low:g}", f"{high:g}") if real else (low, high)
                raise ValueError(f"SandboxLimits.{name} must be {op} {lo} and <= {hi}, "
                                 f"got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SandboxLimits":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sandbox limit(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def capped_by(self, ceiling: "SandboxLimits") -> "SandboxLimits":
        """Each limit no larger than ``ceiling``'s (a service never grants more than its own)."""
        return SandboxLimits(**{
            f.name: min(getattr(self, f.name), getattr(ceiling, f.name))
            for f in dataclasses.fields(self)
        })


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxResult:
    """What one run of untrusted code produced."""

    stdout: str
    """Captured standard output (UTF-8, undecodable bytes replaced), truncated with a marker."""
    stderr: str
    """Captured standard error, truncated the same way."""
    exit_code: int | None
    """The program's exit status; ``128 + n`` when signal n ended it; None when we killed
    it at the wall-clock limit."""
    timed_out: bool
    """The wall-clock limit was reached and the process tree was killed."""
    killed_by: KilledBy | None
    """Which limit ended or broke the run, if one did: ``timeout``, ``cpu``, ``memory``
    (allocation refused), ``processes`` (fork refused), ``file_size`` (write refused), or
    ``signal`` (another fatal signal), or ``sandbox`` (the sandbox itself failed, see
    ``sandbox_error``; ``exit_code`` is then None). None for a normal exit, error or not."""
    wall_s: float
    """Wall-clock seconds from start to the last byte of output."""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    sandbox_error: str | None = None
    """When ``killed_by == "sandbox"``: what failed (bwrap refused to start, or the
    sandbox's own processes were killed), so it does not read as the program's error."""

    @property
    def ok(self) -> bool:
        """Exited 0 within its limits."""
        return self.exit_code == 0 and not self.timed_out and self.killed_by is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SandboxResult":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("stdout", "stderr", "exit_code", "timed_out",
                                     "killed_by", "wall_s") if n not in d)
        if missing:
            raise ValueError(f"sandbox result is missing field(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})
