"""One run of untrusted Python under bubblewrap: the core the pool and the service share.

Isolation is bubblewrap's (``bwrap``), not ours: the program runs in fresh user, PID, IPC,
network, UTS and cgroup namespaces (no network interface but a private loopback), with a
mount namespace that holds only read-only binds of the system (``/usr`` and its ``/bin``,
``/lib*`` links) and of the Python installation, a fresh ``/proc``, a minimal read-only
``/dev``, and three private size-limited tmpfs: ``/work`` (the working directory, holding
the program as ``main.py``), ``/tmp`` and ``/dev/shm``; the root itself is read-only.
No ``/etc``, no ``/home``, no project tree; the environment is cleared (``--clearenv``)
and rebuilt from a fixed list. ``--die-with-parent``, ``--new-session`` (no terminal
injection) and ``--disable-userns`` (no nested user namespaces) are on, and a seccomp
filter (:mod:`~megatron_alp.sandbox.seccomp`) denies ptrace, keyrings, bpf, mounts,
namespaces, modules and the like.

Limits are kernel rlimits, set by ``prlimit`` on the bwrap process and inherited by
everything it starts: address space, CPU time, processes, file size, open files, no core
files. RLIMIT_NPROC counts processes *per real uid*, and root is exempt from it, so when
this process is root each concurrent run gets its own unprivileged uid (``slot_uid``,
reserved by the pool with a lock file) and bwrap itself runs unprivileged as that uid.
Without root the run keeps our uid and the process limit is "what this uid already runs
plus ``max_processes``" (weaker: concurrent runs share it; see ``docs/sandbox.md``).

Memory of the whole run: a cgroup per run (:mod:`~megatron_alp.sandbox.cgroup`) limited to
``memory_mb`` where the host lets us make one; as root, SysV shared memory is bounded by
the run's own IPC namespace (``shmall``, ``shm_rmid_forced``); what cannot be bounded is
denied by seccomp (``shmget`` without root, ``memfd_create`` without a cgroup).

Lifetime: every link of the launch chain has ``PR_SET_PDEATHSIG=SIGKILL`` (``setpriv``;
set again after the uid change, which clears it), so a run dies with the thread that
started it, i.e. with its owner; bwrap is init of the run's PID namespace, and its death
takes every process of the run. The wall-clock limit kills the launcher's process group
and the cgroup. As root, the run also ends by checking that no process of its uid is
left (and killing any it finds), so nothing outlives its request.

bwrap reports the program's exit status on ``--json-status-fd``; a run without that record
is a failure of the sandbox (``killed_by="sandbox"``), never the program's exit code.

Without a working bwrap nothing runs: :func:`find_bwrap` / :meth:`SandboxPool.check` raise
:class:`SandboxUnavailable` saying what to install. There is no unisolated fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import time

from megatron_alp.sandbox import registry
from megatron_alp.sandbox.cgroup import CgroupParent, RunCgroup, find_parent, sigkill_until_gone
from megatron_alp.sandbox.seccomp import DENIED, build_filter
from megatron_alp.sandbox.types import SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = ["Isolation", "default_python", "find_bwrap"]

_INSTALL_HINT = (
    "install bubblewrap: 'apt-get install bubblewrap' (Debian/Ubuntu; scripts/bootstrap.sh "
    "does it when run as root), 'dnf install bubblewrap' (Fedora/RHEL), or ask your cluster "
    "admins; the sandbox never runs untrusted code without isolation"
)
_MiB = 1 << 20
# Processes of the uid that are not the user's program: bwrap outside, bwrap as PID 1,
# and the zombie of the previous run's PID 1 that the host's init may not have reaped yet.
_BWRAP_PROCESSES = 3
_PAGE = os.sysconf("SC_PAGE_SIZE")
_SH = "/bin/sh"
# bwrap's last --json-status-fd document: the program's exit status (128 + n for signal n).
_EXIT_RE = re.compile(r'"exit-code"\s*:\s*(-?\d+)')
# After the wall-clock kill, how long to wait for the pipes to close and the uid to empty.
_REAP_S = 5.0


def find_bwrap(path: str | None = None) -> str:
    """Absolute path of a runnable ``bwrap``; :class:`SandboxUnavailable` naming what to install."""
    found = shutil.which(path or "bwrap")
    if not found:
        where = f"{path!r}" if path else "'bwrap' on PATH"
        raise SandboxUnavailable(f"bubblewrap not found ({where}); {_INSTALL_HINT}")
    return os.path.realpath(found)


def _others_can_run(path: str) -> bool:
    # Every ancestor must be searchable by "others" and the file readable + executable,
    # since an unprivileged slot uid has to reach it (e.g. a pyenv under /root cannot).
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
        if not (mode & stat.S_IROTH and mode & stat.S_IXOTH):
            return False
        d = os.path.dirname(real)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def default_python(for_other_uid: bool) -> str:
    """The interpreter the sandbox runs: this Python's base interpreter, or (when the code
    runs as another uid that cannot reach it) the system ``/usr/bin/python3``."""
    import sys

    base = getattr(sys, "_base_executable", None) or sys.executable
    if not for_other_uid or _others_can_run(base):
        return base
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand) and _others_can_run(cand):
            return cand
    raise SandboxUnavailable(
        f"no Python interpreter the sandbox's unprivileged uid can run: {base} is not "
        "readable by other users and /usr/bin/python3 is missing; install python3 "
        "('apt-get install python3') or pass python=PATH (--python) pointing to one"
    )


@functools.lru_cache(maxsize=8)
def _python_prefix(python: str) -> str:
    out = subprocess.run(
        [python, "-I", "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True, text=True, timeout=30, env={},
    )
    if out.returncode != 0:
        raise ValueError(f"sandbox python {python!r} does not run: {out.stderr.strip()[-300:]}")
    return os.path.realpath(out.stdout.strip())


@functools.lru_cache(maxsize=8)
def _bwrap_features(bwrap: str) -> frozenset[str]:
    text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    return frozenset(f for f in ("--size", "--disable-userns") if f in text)


class _Capture:
    """Keeps the head and tail of a byte stream, counts what it drops."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:  # trim rarely, not per chunk
                del self.tail[: len(self.tail) - self.tail_cap]

    def text(self) -> tuple[str, bool]:
        tail = self.tail[-self.tail_cap:] if self.tail_cap else b""
        dropped = self.total - len(self.head) - len(tail)
        if dropped <= 0:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace"), False
        marker = f"\n...[truncated {dropped} bytes of {self.total}]...\n".encode()
        return (bytes(self.head) + marker + bytes(tail)).decode("utf-8", "replace"), True


def _pids_of_uid(uid: int, *, live_only: bool = False) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                if live_only:
                    with open(f"/proc/{name}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                    if state in ("Z", "X"):
                        continue
                pids.append(int(name))
            except (OSError, IndexError):
                pass  # exited meanwhile
    return pids


def _kill_uid(uid: int, deadline_s: float) -> int:
    """SIGKILL every process of ``uid`` until none is left; returns how many were seen.
    Zombies run nothing (bwrap's PID-1 process is left as one, reparented to the host's
    init, until that reaps it; it holds no resources but a PID), so only live ones count."""
    return sigkill_until_gone(lambda: _pids_of_uid(uid, live_only=True), deadline_s, f"sandbox uid {uid}")


def _classify(exit_code: int | None, timed_out: bool, stderr: str) -> str | None:
    """Which limit ended or broke the run (heuristics on the exit status and stderr tail)."""
    if timed_out:
        return "timeout"
    if exit_code is None:
        return None
    if exit_code == 128 + signal.SIGXCPU:
        return "cpu"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if "[Errno 27] File too large" in tail:
        return "file_size"
    if "BlockingIOError: [Errno 11]" in tail or "can't start new thread" in tail:
        return "processes"
    if exit_code > 128:
        return "signal"
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Isolation:
    """How untrusted code is started: the bwrap command line and its limits.

    ``python`` is the host interpreter run inside (default: :func:`default_python`);
    ``site_dirs`` are extra host directories (e.g. a site-packages with numpy/sympy) bound
    read-only and put on ``PYTHONPATH``; ``bwrap`` a path to bubblewrap (default: PATH);
    ``cgroup`` where per-run memory cgroups go: ``"auto"``, ``"off"`` or a directory
    (:func:`~megatron_alp.sandbox.cgroup.find_parent`).
    """

    python: str | None = None
    site_dirs: tuple[str, ...] = ()
    bwrap: str | None = None
    cgroup: str = "auto"

    def __post_init__(self) -> None:
        for d in self.site_dirs:
            if not os.path.isdir(d):
                raise ValueError(f"sandbox site_dirs entry {d!r} is not a directory")

    @property
    def as_root(self) -> bool:
        """Whether runs get their own unprivileged uid (we are root)."""
        return os.geteuid() == 0

    @functools.cached_property
    def _bwrap(self) -> str:
        return find_bwrap(self.bwrap)

    @functools.cached_property
    def _util_linux(self) -> dict[str, str]:
        tools = {name: shutil.which(name) for name in ("prlimit", "unshare", "setpriv")}
        missing = sorted(k for k, v in tools.items() if v is None)
        if missing or not os.path.exists(_SH):
            raise SandboxUnavailable(
                f"{', '.join(missing or [_SH])} not found; install util-linux "
                "('apt-get install util-linux'); the sandbox sets its limits with them"
            )
        return tools  # type: ignore[return-value]

    @functools.cached_property
    def _python(self) -> str:
        py = self.python or default_python(self.as_root)
        if not os.path.exists(py):
            raise ValueError(f"sandbox python {py!r} does not exist")
        return py

    @functools.cached_property
    def ipc_limits(self) -> bool:
        """Whether runs get an IPC namespace with small SysV shm limits: as root, where a
        new IPC namespace's ``/proc/sys/kernel/shm*`` can be written (not in a container
        whose ``/proc/sys`` is read-only: there ``shmget`` is denied instead)."""
        if not self.as_root:
            return False
        probe = subprocess.run(
            [self._util_linux["unshare"], "--ipc", "--", _SH, "-c",
             "echo 1 > /proc/sys/kernel/shm_rmid_forced"],
            capture_output=True, timeout=30, env={},
        )
        return probe.returncode == 0

    @functools.cached_property
    def cgroups(self) -> tuple[CgroupParent | None, str]:
        """Where per-run memory cgroups go (None: nowhere here) and why."""
        return find_parent(self.cgroup)

    def guards(self) -> dict[str, str]:
        """How memory and lifetime are bounded on this host, in words (``/health``)."""
        parent, why = self.cgroups
        return {
            "memory_cgroup": why if parent else f"none ({why})",
            "sysv_ipc": ("IPC namespace limits (shmall = memory_mb, shm_rmid_forced, "
                         "msgmni = 16)" if self.ipc_limits else "shmget and msgget denied "
                         "(EPERM; not root, or /proc/sys read-only)"),
            "memfd_create": ("allowed, counted by the run's memory cgroup" if parent
                             else "denied (EPERM; no memory cgroup)"),
            "seccomp": f"{len(DENIED)} calls denied",
        }

    def denied_extra(self, uid: int | None) -> tuple[str, ...]:
        """Calls denied on top of ``seccomp.DENIED`` for a run as ``uid``."""
        extra = []
        if uid is None or not self.ipc_limits:  # no IPC namespace of ours to bound them in
            extra += ["shmget", "msgget"]
        if self.cgroups[0] is None:  # nothing would count memfd pages
            extra.append("memfd_create")
        return tuple(extra)

    def reap(self) -> int:
        """Kill what runs of dead owners left (in our cgroup parent; without root, also
        launchers in our run registry); how many processes. Slot uids: the pool's."""
        parent = self.cgroups[0]
        n = parent.reap() if parent is not None else 0
        if not self.as_root:
            n += registry.reap()
        return n

    def _launcher(self, limits: SandboxLimits, uid: int | None,
                  cgroup: RunCgroup | None) -> list[str]:
        """setpriv (dies with us) -> [as root: unshare + sh: IPC namespace and its shm
        limits; sh: join the cgroup] -> [as root: setpriv to the slot uid]."""
        tools = self._util_linux
        # Dies when the thread that started it does (PR_SET_PDEATHSIG; the run() that
        # started it waits for it, so that thread outlives it unless the owner dies).
        argv = [tools["setpriv"], "--pdeathsig", "SIGKILL", "--"]
        script = ["set -e"]
        if cgroup is not None:
            script.append(f"echo 0 > {shlex.quote(cgroup.procs_file)}")
        if uid is not None and self.ipc_limits:
            # As root: own IPC namespace with small SysV shm limits (a segment survives
            # detaching, so RLIMIT_AS does not see it: shmall bounds them all, and
            # shm_rmid_forced removes any no process has attached), and own PID
            # namespace whose init (bwrap, after the uid drop) takes every process of
            # the run with it. setpriv drops to the slot uid and sets the parent-death
            # signal again (a uid change clears it).
            mem = limits.memory_mb * _MiB
            # SysV message queues: kernel memory, msgmnb (16 KiB) each; 16 queues at most.
            for key, value in (("shmmax", mem), ("shmall", mem // _PAGE), ("shmmni", 32),
                               ("shm_rmid_forced", 1), ("msgmni", 16)):
                script.append(f"echo {value} > /proc/sys/kernel/{key}")
            argv += [tools["unshare"], "--ipc", "--pid", "--kill-child", "--"]
        elif uid is not None:
            argv += [tools["unshare"], "--pid", "--kill-child", "--"]
        if len(script) > 1:
            script.append('exec "$@"')
            argv += [_SH, "-c", "\n".join(script), "sandbox-launch"]
        if uid is not None:
            argv += [tools["setpriv"], f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                     "--pdeathsig", "SIGKILL", "--"]
        return argv

    def argv(self, limits: SandboxLimits, fds: dict[str, int], uid: int | None,
             cgroup: RunCgroup | None = None) -> list[str]:
        """The full command: setpriv (dies with us) -> [unshare, sh: IPC namespace, shm
        limits, cgroup; setpriv: uid] -> prlimit (rlimits) -> bwrap (namespaces, mounts,
        seccomp) -> python. ``fds``: ``code``, ``seccomp`` and ``status`` descriptors."""
        feats = _bwrap_features(self._bwrap)
        tools = self._util_linux
        py = self._python
        prefix = _python_prefix(py)
        nproc = limits.max_processes + _BWRAP_PROCESSES
        if uid is None:
            # Shared uid: the limit must sit above what this uid already runs.
            nproc += len(_pids_of_uid(os.getuid())) * 4  # threads count too; be generous
        cpu = limits.cpu_s
        argv = self._launcher(limits, uid, cgroup)
        argv += [
            tools["prlimit"],
            f"--as={limits.memory_mb * _MiB}",
            f"--cpu={cpu}:{cpu + 1}",
            f"--nproc={nproc}",
            f"--fsize={limits.max_file_mb * _MiB}",
            f"--nofile={limits.max_open_files}",
            "--core=0",
            "--",
            self._bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try",
        ]
        if uid is None or not self.ipc_limits:
            argv += ["--unshare-ipc"]  # else the IPC namespace is unshare's (limits set)
        argv += ["--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox",
                 "--seccomp", str(fds["seccomp"]), "--json-status-fd", str(fds["status"])]
        if "--disable-userns" in feats:
            argv += ["--disable-userns"]
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = "/" + name
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        if not (prefix == "/usr" or prefix.startswith("/usr/")):
            argv += ["--ro-bind", prefix, prefix]
        py_path = []
        for i, d in enumerate(self.site_dirs):
            dest = f"/opt/site/{i}"
            argv += ["--ro-bind", os.path.realpath(d), dest]
            py_path.append(dest)
        argv += ["--proc", "/proc", "--dev", "/dev"]
        # /dev is a tmpfs without a size limit: read-only below (device nodes stay usable),
        # with a size-limited /dev/shm for POSIX shared memory (multiprocessing needs it).
        for mnt in ("/tmp", "/work", "/dev/shm"):
            if "--size" in feats:
                argv += ["--size", str(limits.workdir_mb * _MiB)]
            argv += ["--tmpfs", mnt]
        argv += ["--file", str(fds["code"]), "/work/main.py"]
        # bwrap's root is a tmpfs without a size limit: read-only once the tree is built.
        argv += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", "/work"]
        env = {"HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        if py_path:
            env["PYTHONPATH"] = ":".join(py_path)
        for k, v in env.items():
            argv += ["--setenv", k, v]
        # -s: no user site-packages; -B: no .pyc writes. Not -I, which would drop PYTHONPATH.
        argv += [py, "-s", "-B", "/work/main.py"]
        return argv

    def run(self, code: str, limits: SandboxLimits, *, uid: int | None) -> SandboxResult:
        """Run ``code`` once under ``limits``; ``uid`` is a reserved slot uid (root only) or
        None (our own uid). Blocks until the run and every process it started are gone."""
        if uid is not None and not self.as_root:
            raise ValueError(f"slot uid {uid} needs root; run with uid=None")
        self._bwrap  # noqa: B018 (a missing bubblewrap is the first thing to say)
        parent = self.cgroups[0]
        cg = None
        if parent is not None:
            # The run's total: every process, tmpfs, memfd and shm page it charges.
            cg = parent.create(limits.memory_mb * _MiB, limits.max_processes + _BWRAP_PROCESSES)
        try:
            return self._run(code, limits, uid, cg)
        finally:
            if cg is not None:
                cg.kill()
                cg.remove()

    def _run(self, code: str, limits: SandboxLimits, uid: int | None,
             cg: RunCgroup | None) -> SandboxResult:
        try:
            bpf = build_filter(self.denied_extra(uid))
        except ValueError as e:
            raise SandboxUnavailable(f"no seccomp filter for this machine: {e}") from None
        code_fd = os.memfd_create("sandbox-main.py", os.MFD_CLOEXEC)
        bpf_fd = os.memfd_create("sandbox-seccomp", os.MFD_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            for fd, data in ((code_fd, code.encode("utf-8", "surrogatepass")), (bpf_fd, bpf)):
                os.write(fd, data)
                os.lseek(fd, 0, os.SEEK_SET)
            fds = {"code": code_fd, "seccomp": bpf_fd, "status": status_w}
            argv = self.argv(limits, fds, uid, cg)
            start = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=tuple(fds.values()), env={}, start_new_session=True, close_fds=True,
                # As root, drop supplementary groups here; setpriv sets uid/gid.
                extra_groups=[] if uid is not None else None,
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            for fd in (code_fd, bpf_fd, status_w):
                os.close(fd)
        # Without a slot uid or a cgroup, nothing else would lead a new owner to this run.
        record = registry.record(proc.pid) if uid is None and cg is None else None
        status_pipe = os.fdopen(status_r, "rb", buffering=0)
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        status = _Capture(1 << 14)
        deadline = start + limits.timeout_s
        timed_out = False
        try:
            timed_out = _pump(proc, {proc.stdout: out, proc.stderr: err, status_pipe: status},
                              deadline, cg)
            if not timed_out:
                # The pipes closed; the program may still run (it can close them itself).
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            if proc.poll() is None:
                _kill_tree(proc, cg)
            proc.wait()
            wall = time.monotonic() - start
            for f in (proc.stdout, proc.stderr, status_pipe):
                f.close()
            if cg is not None:
                cg.kill()
            if uid is not None:
                # The PID namespace died with bwrap; this is the belt to those braces.
                _kill_uid(uid, _REAP_S)
            registry.forget(record)
        stdout, out_trunc = out.text()
        stderr, err_trunc = err.text()
        m = _EXIT_RE.search(status.text()[0])
        program_exit = int(m.group(1)) if m else None
        oom = cg is not None and cg.oom_killed()
        sandbox_error = None
        if timed_out:
            exit_code, killed_by = None, "timeout"
        elif oom:
            exit_code, killed_by = program_exit, "memory"
        elif program_exit is None:
            # bwrap reports the program's exit on the status pipe; without that record the
            # sandbox itself failed (bwrap refused to start, or was killed).
            exit_code, killed_by = None, "sandbox"
            sandbox_error = _sandbox_error(proc.returncode, stderr)
        else:
            exit_code = program_exit
            killed_by = _classify(exit_code, False, stderr)
        return SandboxResult(
            stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=timed_out,
            killed_by=killed_by, wall_s=wall, stdout_truncated=out_trunc,
            stderr_truncated=err_trunc, sandbox_error=sandbox_error,
        )


def _sandbox_error(rc: int, stderr: str) -> str:
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    msgs = [ln for ln in stderr.splitlines() if ln.startswith(("bwrap:", "sandbox-launch:",
                                                              "setpriv:", "prlimit:", "unshare:"))]
    said = f"; it said: {msgs[-1][:300]!r}" if msgs else ""
    return (f"the sandbox failed before the program's exit was reported: its launcher "
            f"(setpriv/unshare/prlimit/bwrap) {how}{said}")


def _kill_tree(proc: subprocess.Popen, cg: RunCgroup | None) -> None:
    # The launcher leads its own process group (start_new_session); the PID-namespace
    # init (bwrap) is in it and takes the namespace with it; bwrap's own PID-1 child dies
    # with bwrap (--die-with-parent). The cgroup, where there is one, holds them all.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if cg is not None:
        cg.kill()


def _pump(proc: subprocess.Popen, captures: dict, deadline: float,
          cg: RunCgroup | None = None) -> bool:
    """Read both pipes until EOF or the deadline; True when the deadline killed the run."""
    sel = selectors.DefaultSelector()
    for f in captures:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    timed_out = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0 and not timed_out:
                timed_out = True
                _kill_tree(proc, cg)
                # pipes close once the namespace is gone; keep draining until then
                deadline = time.monotonic() + _REAP_S
                continue
            if left <= 0:
                break  # cannot happen short of a stuck kernel; give up on the pipes
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    captures[key.fileobj].feed(data)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return timed_out
