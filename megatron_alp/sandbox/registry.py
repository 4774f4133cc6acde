"""Which launcher process each run has, on disk: how a new owner finds what a dead one left
when neither slot uids (root) nor cgroups can tell.

One file per running run in ``/tmp/megatron-alp-sandbox-runs-<uid>/`` (ours, mode 0700),
named ``<owner pid>-<owner start time>-<n>`` and holding ``<launcher pid> <launcher start
time>``; removed when the run ends. A file whose owner is gone names a launcher that may
still run (its parent-death signal was not yet set when the owner died): :func:`reap`
kills that launcher's process group (bwrap outside; the sandbox dies with it).
Start times guard against reused pids.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat

__all__ = ["forget", "reap", "record"]

_seq = itertools.count()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _dir() -> str | None:
    """Our registry directory, or None when it cannot be trusted (not ours, a link)."""
    path = f"/tmp/megatron-alp-sandbox-runs-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def record(launcher_pid: int) -> str | None:
    """Note a run's launcher; the file to :func:`forget` when the run ends (None: no
    registry here)."""
    d = _dir()
    if d is None:
        return None
    me = os.getpid()
    path = f"{d}/{me}-{_start_time(me)}-{next(_seq)}"
    with open(path, "w") as f:
        f.write(f"{launcher_pid} {_start_time(launcher_pid)}")
    return path


def forget(path: str | None) -> None:
    """The run ended: drop its record."""
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def reap() -> int:
    """Kill the launchers recorded by owners that are gone; how many were still running."""
    d = _dir()
    if d is None:
        return 0
    killed = 0
    for name in os.listdir(d):
        try:
            pid_s, start, _ = name.split("-")
            if _start_time(int(pid_s)) == start:
                continue  # the owner is alive
            with open(f"{d}/{name}") as f:
                lpid_s, lstart = f.read().split()
            lpid = int(lpid_s)
        except (ValueError, OSError):
            continue
        if _start_time(lpid) == lstart:
            try:
                os.killpg(lpid, signal.SIGKILL)  # the launcher leads its own group
                killed += 1
            except OSError:
                pass
        forget(f"{d}/{name}")
    return killed
