"""Output folders that can never destroy data: one rule for every tool that writes.

The converters (``tools/convert/*``) and, later, the trainer's ``--save`` use it. Standard
library only, so a CLI can check its output path before importing torch.

The rule:

* **Real paths.** Every path is resolved (``..``, symbolic links) before it is compared.
* **Never into an input.** An output that equals, contains or lies inside any input is
  refused, with or without ``--force``.
* **Never over somebody else's data.** An existing output folder is used only if it is
  empty, or with ``force`` if *this tool* wrote it: its top level holds the marker file
  :data:`MARKER` naming the tool. Anything else is refused, whatever the flags.
* **Atomic publish.** The tool writes into a hidden sibling ``.<name>.tmp-<host>-<pid>-<tag>``
  and renames it into place when complete (``renameat2(RENAME_NOREPLACE)`` on Linux). An
  output that appeared or changed while the tool ran is never replaced: that run fails
  (exit 2) and the other run's output stays as it was.
* **Leftovers.** An error, Ctrl-C or SIGTERM removes the temporary folder. After a kill -9
  or an out-of-memory kill, the next run of a tool to the same output removes the stale
  temporary folder of the dead process and says so (a replaced output that was moved
  aside, but not yet deleted, is put back if nothing took its place).

API::

    from megatron_alp import io_safety
    io_safety.install_signal_cleanup()               # SIGTERM / Ctrl-C -> Interrupted
    target = io_safety.check_output(out, tool="hf_to_megatron", inputs=[src], force=force)
    with io_safety.atomic_output_dir(target, expected_bytes=n) as tmp:
        ...write into tmp...                         # published when the block ends
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = [
    "MARKER",
    "Interrupted",
    "OutputError",
    "OutputTarget",
    "atomic_output_dir",
    "check_output",
    "describe_os_error",
    "human_bytes",
    "install_signal_cleanup",
    "remove_stale",
    "wrapped_interrupt",
]

MARKER = ".megatron_alp_output.json"
"""Written into every output folder (and every temporary folder) by :func:`atomic_output_dir`:
``{"tool", "state" ("incomplete" | "complete"), "host", "pid", "created_utc"}``."""

_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the file system or the process's limit"}
_ACCESS_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
_LOW_SPACE = 16 * 1024**2
"""A write that fails with less than this free on the file system is reported as disk full
(some writers, e.g. torch.distributed.checkpoint, turn a short write into an assertion)."""


class OutputError(ValueError):
    """A refused or failed output: the message names the path and what was expected."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT / SIGHUP turned into an exception, so every ``finally`` and context
    manager on the way up cleans up. ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (decimal units, as disks and HF shards count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True, slots=True)
class OutputTarget:
    """An output folder that passed :func:`check_output`, and what it was at that moment."""

    path: Path
    """Resolved absolute path of the output folder."""
    tool: str
    force: bool
    identity: tuple[int, int, str] | None
    """(device, inode, marker text) of the folder when checked; None if it did not exist."""
    was_empty: bool


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(p))).resolve(strict=False)


def _identity(path: Path) -> tuple[int, int, str] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    marker = path / MARKER
    try:
        text = marker.read_text()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        text = ""
    return (st.st_dev, st.st_ino, text)


def _marker_tool(folder: Path) -> tuple[str | None, str | None]:
    """(tool, state) from a folder's marker, (None, None) if it has none / a bad one."""
    try:
        rec = json.loads((folder / MARKER).read_text())
        return str(rec.get("tool")), str(rec.get("state"))
    except (OSError, ValueError, AttributeError):
        return None, None


def _writable_ancestor(path: Path) -> tuple[Path, str | None]:
    """The nearest existing ancestor of ``path`` and why it cannot be written (or None)."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return anc, "is not a folder"
    if not os.access(anc, os.W_OK | os.X_OK):
        try:  # os.access does not tell a read-only mount from a permission problem
            ro = os.statvfs(anc).f_flag & os.ST_RDONLY
        except OSError:
            ro = False
        return anc, "is on a read-only file system" if ro else "is not writable (permission denied)"
    return anc, None


def check_output(
    out: str | os.PathLike,
    *,
    tool: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    force: bool = False,
    flag: str = "--out",
) -> OutputTarget:
    """Check that ``out`` may be written by ``tool`` (see the module doc); cheap, no I/O
    beyond stat. Raises :class:`OutputError` naming ``flag``, the path and the reason."""
    if not tool or "/" in tool:
        raise AssertionError(f"bad tool name {tool!r}")
    path = _resolve(out)
    shown = f"{flag} {out}" + (f" (= {path})" if str(path) != os.fspath(out) else "")
    for inp in inputs:
        if inp is None:
            continue
        real = _resolve(inp)
        if path == real:
            raise OutputError(f"{shown} is the input {real}; choose another output folder")
        if real.is_relative_to(path):
            raise OutputError(
                f"{shown} contains the input {real}; writing there could destroy the input: "
                "choose an output folder outside it"
            )
        if path.is_relative_to(real):
            raise OutputError(f"{shown} lies inside the input {real}; choose an output folder outside it")
    if path == Path(path.anchor):
        raise OutputError(f"{shown} is the root of the file system")
    identity, was_empty = None, True
    if os.path.lexists(path):
        if not path.is_dir():
            raise OutputError(f"{shown} exists and is not a folder")
        identity = _identity(path)
        entries = [e.name for e in os.scandir(path)]
        was_empty = not entries
        if entries:
            owner, state = _marker_tool(path)
            if owner != tool or state != "complete":
                what = (f"it was written by {owner}" if owner and owner != tool
                        else f"it has no {MARKER} of {tool}; it holds {len(entries)} entries, "
                        f"e.g. {sorted(entries)[:3]}")
                raise OutputError(
                    f"{shown} is not empty and {what}: {tool} replaces only a folder it wrote "
                    "itself (or an empty one), even with --force; choose another folder, or "
                    "remove this one yourself"
                )
            if not force:
                raise OutputError(
                    f"{shown} is not empty: it holds an earlier output of {tool}; pass --force "
                    "to replace it"
                )
    anc, why = _writable_ancestor(path)
    if why:
        raise OutputError(f"cannot write {shown}: {anc} {why}")
    return OutputTarget(path=path, tool=tool, force=force, identity=identity, was_empty=was_empty)


# ---------------------------------------------------------------------------------------
# Atomic rename that never replaces


def _renameat2_noreplace() -> Callable[[str, str], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, noreplace = -100, 1

    def rename(src: str, dst: str) -> None:
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), dst)

    return rename


_RENAMEAT2 = _renameat2_noreplace() if sys.platform.startswith("linux") else None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (atomically on Linux)."""
    if _RENAMEAT2 is not None:
        try:
            _RENAMEAT2(str(src), str(dst))
            return
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            if e.errno not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: fs without the flag
                raise
    if os.path.lexists(dst):  # fallback: a small window between this test and the rename
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


# ---------------------------------------------------------------------------------------
# Stale temporary folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def remove_stale(path: str | os.PathLike, *, say: Callable[[str], None] | None = None) -> list[str]:
    """Remove the temporary folders that dead processes on this host left beside output
    ``path`` (``.<name>.tmp-*``); put back an output that was moved aside
    (``.<name>.old-*``) if nothing took its place, else remove it. Folders of live
    processes or of other hosts are left alone. Returns one message per action, each also
    passed to ``say``."""
    path = _resolve(path)
    done: list[str] = []
    if not path.parent.is_dir():
        return done
    host = _host_tag()
    for entry in sorted(path.parent.iterdir()):
        for kind in ("tmp", "old"):
            prefix = f".{path.name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            parts = entry.name[len(prefix):].split("-")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue  # not ours, or another host's: leave it
            pid = int(parts[1])
            if pid == os.getpid() or _pid_alive(pid) or not entry.is_dir():
                continue
            if kind == "old" and not os.path.lexists(path):
                with contextlib.suppress(FileExistsError):
                    _rename_noreplace(entry, path)
                    msg = f"restored {path} from {entry.name}, left aside by an interrupted run (pid {pid})"
                    done.append(msg)
                    if say:
                        say(msg)
                    continue
            size = _du(entry)
            shutil.rmtree(entry, ignore_errors=True)
            msg = (f"removed stale temporary folder {entry} ({human_bytes(size)}) left by an "
                   f"interrupted run (pid {pid})")
            done.append(msg)
            if say:
                say(msg)
    return done


# ---------------------------------------------------------------------------------------
# Errors


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it wraps: causes, contexts, and the per-rank failures of
    torch.distributed.checkpoint's CheckpointException (``{rank: (exception, trace)}``)."""
    seen: set[int] = set()
    stack: list = [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, *getattr(x, "args", ())]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():
                stack += list(v) if isinstance(v, tuple) else [v]


def describe_os_error(e: BaseException, where: Path) -> str | None:
    """A one-line reason if ``e`` (or an exception it wraps) is a disk-full, quota,
    read-only or permission error; None otherwise."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (_DISK_ERRNOS | _ACCESS_ERRNOS):
            return f"{(_DISK_ERRNOS | _ACCESS_ERRNOS)[x.errno]} while writing {where}"
    return None


def wrapped_interrupt(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM inside ``e``, if a library wrapped it in its own exception
    (torch.distributed.checkpoint does), so it can be re-raised as itself."""
    for x in _chain(e):
        if isinstance(x, KeyboardInterrupt):
            return x
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# ---------------------------------------------------------------------------------------
# The context manager


def _write_marker(folder: Path, tool: str, state: str, extra: dict | None = None) -> None:
    rec = {
        "tool": tool,
        "state": state,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **(extra or {}),
    }
    (folder / MARKER).write_text(json.dumps(rec, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output_dir(
    target: OutputTarget,
    *,
    expected_bytes: int | None = None,
    say: Callable[[str], None] | None = None,
    marker_extra: dict | None = None,
) -> Iterator[Path]:
    """Yield a fresh hidden temporary folder beside ``target.path``; publish it there
    atomically when the block ends without error (see the module doc).

    ``expected_bytes``: refuse up front when the file system has less free space.
    ``say``: where notes go (stale folders removed); default stderr. Any exception in the
    block removes the temporary folder; disk-full, quota, read-only and permission errors
    are re-raised as :class:`OutputError` saying so. An output that appeared or changed
    since :func:`check_output` is never replaced (OutputError; the result is discarded).
    """
    say = say or (lambda m: print(f"{target.tool}: {m}", file=sys.stderr, flush=True))
    path = target.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path.parent}: {describe_os_error(e, path.parent) or e}") from None
    remove_stale(path, say=say)
    if expected_bytes is not None:
        free = _free_bytes(path.parent)
        if free is not None and free < expected_bytes:
            raise OutputError(
                f"not enough space for {path}: the output needs about {human_bytes(expected_bytes)}, "
                f"the file system of {path.parent} has {human_bytes(free)} free"
            )
    tag = f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        _write_marker(tmp, target.tool, "incomplete", marker_extra)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {path}: {describe_os_error(e, tmp) or e}") from None
    try:
        yield tmp
        _write_marker(tmp, target.tool, "complete", marker_extra)
        _publish(tmp, target, tag)
    except BaseException as e:
        low = _free_bytes(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OutputError, KeyboardInterrupt, SystemExit)):
            raise
        interrupt = wrapped_interrupt(e)
        if interrupt is not None:
            raise interrupt from None
        reason = describe_os_error(e, path)
        if reason is None and low is not None and low < _LOW_SPACE:
            reason = f"no space left on device while writing {path} ({human_bytes(low)} free)"
        if reason is not None:
            raise OutputError(f"{reason}; nothing was written to {path}") from e
        raise


def _appeared(path: Path) -> OutputError:
    return OutputError(
        f"output {path} appeared or changed while this run was writing (another run writing "
        "to the same folder?); it was left as it is and this run's result was discarded"
    )


def _publish(tmp: Path, target: OutputTarget, tag: str) -> None:
    path = target.path
    now = _identity(path)
    if target.identity is None or target.was_empty:
        if target.identity is not None and now != target.identity:
            raise _appeared(path)
        if now is not None:
            try:  # an empty folder holds nothing to lose; rmdir refuses a non-empty one
                os.rmdir(path)
            except OSError:
                raise _appeared(path) from None
        try:
            _rename_noreplace(tmp, path)
        except FileExistsError:
            raise _appeared(path) from None
        return
    # --force over an output of this tool: move it aside, publish, then delete it.
    if now != target.identity:
        raise _appeared(path)
    old = path.parent / f".{path.name}.old-{tag}"
    _rename_noreplace(path, old)
    if _identity(old) != target.identity:  # swapped between the check and the rename
        with contextlib.suppress(OSError):
            _rename_noreplace(old, path)
        raise _appeared(path)
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:
        with contextlib.suppress(OSError):
            _rename_noreplace(old, path)
        raise _appeared(path) from None
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Signals

_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s)
_raised = False


def _handler(signum: int, frame) -> None:
    global _raised
    if _raised:  # a second signal must not interrupt the clean-up of the first
        return
    _raised = True
    raise Interrupted(signum)


def install_signal_cleanup() -> Callable[[], None]:
    """Turn SIGTERM (what schedulers send), SIGINT (Ctrl-C) and SIGHUP into
    :class:`Interrupted` in the main thread, once: context managers such as
    :func:`atomic_output_dir` then clean up on the way out, and later signals are ignored
    while they do. Call it from a command-line entry point; returns a function that puts
    the previous handlers back (a no-op outside the main thread, where Python cannot
    install handlers)."""
    global _raised
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _raised = False
    previous = {s: signal.signal(s, _handler) for s in _SIGNALS}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
