"""``SandboxPool``: the in-process face of the sandbox, for a single machine.

At most ``max_concurrency`` programs run at once; each takes a *slot*. When this process
is root, a slot is an unprivileged uid reserved for this pool by an exclusive lock file
(``/tmp/megatron-alp-sandbox/uid-<uid>.lock``), so per-uid limits (RLIMIT_NPROC) are per
run, and the end-of-run sweep that kills any process left under that uid can only hit the
run that just finished, even with several pools (a trainer and a service) on one host.

Every run dies with the process that owns the pool (the parent-death signal on the
launcher chain; see :mod:`~megatron_alp.sandbox.isolation`). A pool starting up also reaps
what a pool killed with SIGKILL may have left: processes of slot uids whose lock is free
(as root), run cgroups whose owner is gone (where cgroups are used), and launchers in the
run registry (:mod:`~megatron_alp.sandbox.registry`; neither root nor cgroups).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import queue
import threading
from typing import Sequence

from megatron_alp.sandbox.isolation import _REAP_S, Isolation, _kill_uid
from megatron_alp.sandbox.types import SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = ["SandboxPool"]

_LOCK_DIR = "/tmp/megatron-alp-sandbox"
# Reserved range for slot uids: above ordinary users, below nobody (65534).
_UID_BASE = 61000
_UID_SPAN = 4000


def _lock_uid(uid: int) -> int | None:
    """Lock ``uid``'s slot file and kill what a dead holder left under it; the lock fd,
    or None when a live pool holds it."""
    fd = os.open(f"{_LOCK_DIR}/uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # another pool holds it
        return None
    try:
        _kill_uid(uid, _REAP_S)  # a pool killed with SIGKILL released it mid-run
    except BaseException:
        os.close(fd)
        raise
    return fd


def reap_dead_slots() -> int:
    """As root: kill the processes of every slot uid whose lock no live pool holds (what
    pools killed with SIGKILL left); how many uids were checked."""
    if os.geteuid() != 0 or not os.path.isdir(_LOCK_DIR):
        return 0
    n = 0
    for name in os.listdir(_LOCK_DIR):
        if name.startswith("uid-") and name.endswith(".lock") and name[4:-5].isdigit():
            fd = _lock_uid(int(name[4:-5]))
            if fd is not None:
                os.close(fd)
                n += 1
    return n


def _reserve_uids(n: int, base: int) -> list[tuple[int, int]]:
    """Lock ``n`` free slot uids from ``base`` up; returns (uid, lock fd) pairs."""
    os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
    got: list[tuple[int, int]] = []
    for uid in range(base, base + _UID_SPAN):
        if len(got) == n:
            return got
        fd = _lock_uid(uid)
        if fd is not None:
            got.append((uid, fd))
    for _, fd in got:
        os.close(fd)
    raise RuntimeError(f"no {n} free sandbox uids in [{base}, {base + _UID_SPAN})")


class SandboxPool:
    """Runs untrusted Python isolated, at most ``max_concurrency`` at a time.

    ``limits`` are the defaults of every run (a run may pass its own); ``python``,
    ``site_dirs``, ``bwrap`` and ``cgroup`` (``"auto"``, ``"off"`` or a directory for the
    per-run memory cgroups) configure :class:`~megatron_alp.sandbox.isolation.Isolation`.
    Construction checks that isolation works and raises
    :class:`~megatron_alp.sandbox.types.SandboxUnavailable` (saying what to install) if not.
    Thread-safe; ``run`` blocks while all slots are busy.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 8,
        limits: SandboxLimits | None = None,
        python: str | None = None,
        site_dirs: Sequence[str] = (),
        bwrap: str | None = None,
        cgroup: str = "auto",
        uid_base: int = _UID_BASE,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"SandboxPool max_concurrency must be >= 1, got {max_concurrency}")
        self.limits = limits or SandboxLimits()
        self.max_concurrency = max_concurrency
        self.isolation = Isolation(python=python, site_dirs=tuple(site_dirs), bwrap=bwrap,
                                   cgroup=cgroup)
        self.isolation.cgroups  # noqa: B018 (a bad cgroup= fails here, before any uid is taken)
        self.reaped = self.isolation.reap()
        """Processes of dead owners' runs killed at start-up (their run cgroups, or without
        root and cgroups the run registry's launchers); slot uids are swept as well."""
        self._locks: list[int] = []
        self._slots: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        if self.isolation.as_root:
            reap_dead_slots()
            reserved = _reserve_uids(max_concurrency + 1, uid_base)
            self._locks = [fd for _, fd in reserved]
            uids = [uid for uid, _ in reserved]
            self._check_uid = uids.pop()
            for uid in uids:
                self._slots.put(uid)
        else:
            self._check_uid = None
            for _ in range(max_concurrency):
                self._slots.put(None)
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="sandbox"
        )
        self._lock = threading.Lock()
        try:
            self.check()
        except BaseException:
            self.close()  # release the uids and threads before refusing
            raise

    def check(self) -> None:
        """Raise ``SandboxUnavailable`` unless an isolated run works right now."""
        res = self.isolation.run("print(6 * 7)", SandboxLimits(timeout_s=30.0), uid=self._check_uid)
        if res.stdout.strip() != "42":
            why = f"; {res.sandbox_error}" if res.sandbox_error else ""
            raise SandboxUnavailable(
                f"bubblewrap cannot start an isolated Python here (exit {res.exit_code}, "
                f"stderr: {res.stderr.strip()[-500:]!r}{why}); see docs/sandbox.md ('What "
                "to install'): it needs unprivileged user namespaces. Untrusted code is not run."
            )

    def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        """Run one program (blocking) and return its structured result."""
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        if not isinstance(code, str):
            raise ValueError(f"sandbox code must be str, got {type(code).__name__}")
        slot = self._slots.get()
        try:
            return self.isolation.run(code, limits or self.limits, uid=slot)
        finally:
            self._slots.put(slot)

    def submit(
        self, code: str, limits: SandboxLimits | None = None
    ) -> concurrent.futures.Future[SandboxResult]:
        """Run one program in the pool's threads; a future of its result."""
        return self._executor.submit(self.run, code, limits)

    def run_batch(
        self, codes: Sequence[str], limits: SandboxLimits | None = None
    ) -> list[SandboxResult]:
        """Run many programs, ``max_concurrency`` at a time; results in input order."""
        futures = [self.submit(c, limits) for c in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for running programs, then release the slots."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
