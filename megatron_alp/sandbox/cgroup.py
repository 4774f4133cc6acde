"""One memory cgroup per sandboxed run, where the host lets us make one.

A cgroup counts every page the run charges: anonymous memory of all its processes
together, tmpfs and ``memfd`` pages, SysV shared memory, page tables. Its limit is the
run's ``memory_mb``; past it the kernel's OOM killer ends the run (``killed_by="memory"``).
The cgroup is also the run's kill switch (``cgroup.kill``, or SIGKILL to every member)
and how a restarted owner finds and reaps runs a dead one left (:meth:`CgroupParent.reap`).

Where run cgroups go (:func:`find_parent`):

- cgroup v2: a directory with ``memory`` in its ``cgroup.subtree_control`` that we may
  write, given explicitly (``--cgroup DIR``: e.g. a systemd ``Delegate=yes`` unit's
  sub-cgroup), or found automatically when our own cgroup already enables ``memory`` for
  its children (the hierarchy's root: a root service in a container or VM of its own).
  v2 forbids processes in a cgroup whose children use controllers, so we never move
  ourselves to make that happen; a user who wants cgroups on a delegated v2 tree passes
  the prepared directory.
- cgroup v1 (hybrid hosts, like the project's CPU machine): a child of our own cgroup
  in the ``memory`` hierarchy, when we may write there (root, or a delegated tree).

Run cgroups are named ``megatron-alp-sandbox-<owner pid>-<owner start time>-<n>``
directly under that directory (no intermediate directory, so nothing of ours is left
behind once the runs end), and removed when their run ends.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time
from typing import Callable

__all__ = ["CgroupParent", "RunCgroup", "find_parent", "sigkill_until_gone"]

_PREFIX = "megatron-alp-sandbox-"
_seq = itertools.count()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _start_time(pid: int) -> str | None:
    try:
        return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _mounts() -> list[tuple[str, str, str, str]]:
    """(fstype, hierarchy root, mount point, super options) of every cgroup mount."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        pre, _, post = line.partition(" - ")
        f, p = pre.split(), post.split()
        if len(p) >= 3 and p[0] in ("cgroup", "cgroup2"):
            out.append((p[0], f[3], f[4], p[2]))
    return out


def _own_dir(fstype: str, root: str, mnt: str, opts: str) -> str | None:
    """Our own cgroup's directory under this mount, if the mount shows it."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        v1_memory = "memory" in ctrls.split(",") and "memory" in opts.split(",")
        if (fstype == "cgroup2" and ctrls == "") or (fstype == "cgroup" and v1_memory):
            if root != "/" and not (path == root or path.startswith(root + "/")):
                return None
            rel = path[len(root):] if root != "/" else path
            return os.path.normpath(mnt + "/" + rel.lstrip("/"))
    return None


def sigkill_until_gone(pids: Callable[[], list[int]], deadline_s: float, what: str) -> int:
    """SIGKILL whatever ``pids()`` lists until it lists nothing; returns how many distinct
    processes were seen. Raises RuntimeError naming ``what`` past ``deadline_s``."""
    seen: set[int] = set()
    end = time.monotonic() + deadline_s
    while True:
        left = pids()
        if not left:
            return len(seen)
        seen.update(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # exited meanwhile
        if time.monotonic() > end:
            raise RuntimeError(f"{what} still has processes {left} after SIGKILL")
        time.sleep(0.01)


@dataclasses.dataclass(frozen=True)
class CgroupParent:
    """A directory run cgroups are made in: ``version`` 1 (memory hierarchy) or 2."""

    path: str
    version: int

    def create(self, memory_bytes: int, pids_max: int | None = None) -> "RunCgroup":
        """A new run cgroup limited to ``memory_bytes`` (and ``pids_max`` tasks on v2)."""
        me = os.getpid()
        name = f"{_PREFIX}{me}-{_start_time(me)}-{next(_seq)}"
        path = os.path.join(self.path, name)
        os.mkdir(path, 0o755)
        try:
            if self.version == 2:
                _write(f"{path}/memory.max", str(memory_bytes))
                if os.path.exists(f"{path}/memory.swap.max"):
                    _write(f"{path}/memory.swap.max", "0")
                _write(f"{path}/memory.oom.group", "1")  # an OOM kills the whole run
                if pids_max is not None and os.path.exists(f"{path}/pids.max"):
                    _write(f"{path}/pids.max", str(pids_max))
            else:
                _write(f"{path}/memory.limit_in_bytes", str(memory_bytes))
                if os.path.exists(f"{path}/memory.memsw.limit_in_bytes"):
                    _write(f"{path}/memory.memsw.limit_in_bytes", str(memory_bytes))
        except OSError:
            os.rmdir(path)
            raise
        return RunCgroup(path, self.version)

    def leftovers(self) -> list[str]:
        """Run cgroups under this parent whose owner process is gone."""
        found = []
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        for name in names:
            if not name.startswith(_PREFIX):
                continue
            try:
                pid_s, start, _ = name[len(_PREFIX):].split("-")
                pid = int(pid_s)
            except ValueError:
                continue
            if _start_time(pid) != start:  # owner dead (or its pid reused)
                found.append(os.path.join(self.path, name))
        return found

    def reap(self) -> int:
        """Kill every process of every run cgroup a dead owner left, remove them; returns
        how many processes were killed."""
        killed = 0
        for path in self.leftovers():
            cg = RunCgroup(path, self.version)
            killed += cg.kill()
            cg.remove()
        return killed


@dataclasses.dataclass(frozen=True)
class RunCgroup:
    """One run's cgroup."""

    path: str
    version: int

    @property
    def procs_file(self) -> str:
        """Write ``0`` here to move the writing process in."""
        return f"{self.path}/cgroup.procs"

    def pids(self) -> list[int]:
        """Processes in the cgroup now."""
        try:
            return [int(x) for x in _read(self.procs_file).split()]
        except OSError:
            return []

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this run."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in _read(f"{self.path}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill(self, deadline_s: float = 5.0) -> int:
        """SIGKILL every process of the cgroup until it is empty; how many there were."""
        if self.version == 2 and os.path.exists(f"{self.path}/cgroup.kill"):
            try:
                _write(f"{self.path}/cgroup.kill", "1")
            except OSError:
                pass
        return sigkill_until_gone(self.pids, deadline_s, f"sandbox cgroup {self.path}")

    def remove(self) -> None:
        """Remove the (empty) cgroup; retried briefly while the last exits are accounted."""
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                self.kill()
                time.sleep(0.01)
        os.rmdir(self.path)


def _v2_usable(path: str) -> bool:
    try:
        return ("memory" in _read(f"{path}/cgroup.subtree_control").split()
                and os.access(path, os.W_OK))
    except OSError:
        return False


def find_parent(setting: str = "auto") -> tuple[CgroupParent | None, str]:
    """Where run cgroups go, and a sentence saying why (or why none).

    ``setting``: ``"auto"``, ``"off"``, or a directory (cgroup v2 with ``memory`` in its
    ``cgroup.subtree_control``, or a cgroup v1 memory-hierarchy directory).
    """
    if setting == "off":
        return None, "memory cgroups turned off (cgroup='off')"
    try:
        mounts = _mounts()
    except OSError as e:
        return None, f"cannot read the cgroup mounts: {e}"
    if setting != "auto":
        path = os.path.realpath(setting)
        if _v2_usable(path):
            return CgroupParent(path, 2), f"cgroup v2 under {path} (given)"
        if os.path.exists(f"{path}/memory.limit_in_bytes") and os.access(path, os.W_OK):
            return CgroupParent(path, 1), f"cgroup v1 memory under {path} (given)"
        raise ValueError(
            f"sandbox cgroup {setting!r} is neither a writable cgroup v2 directory with "
            "'memory' in its cgroup.subtree_control nor a writable cgroup v1 memory directory"
        )
    reasons = []
    for fstype, root, mnt, opts in mounts:
        own = _own_dir(fstype, root, mnt, opts)
        if own is None:
            continue
        if fstype == "cgroup2":
            if _v2_usable(own):
                return CgroupParent(own, 2), f"cgroup v2 under {own}"
            reasons.append(f"cgroup v2 at {own} does not enable 'memory' for children we "
                           "may create")
        elif os.path.exists(f"{own}/memory.limit_in_bytes"):
            if os.access(own, os.W_OK):
                return CgroupParent(own, 1), f"cgroup v1 memory under {own}"
            reasons.append(f"cgroup v1 memory directory {own} is not writable by us")
    return None, "; ".join(reasons) or "no cgroup hierarchy with a memory controller is mounted"
