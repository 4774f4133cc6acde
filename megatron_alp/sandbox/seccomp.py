"""The sandbox's seccomp filter: a classic BPF program, written by hand, for bwrap's ``--seccomp``.

bubblewrap loads it (with ``PR_SET_NO_NEW_PRIVS``) right before it executes the program,
so it binds the program and everything the program starts, but not bwrap itself. It is an
allow-list's opposite, a short deny list of the kernel interfaces an untrusted Python
program has no use for and that widen the kernel's attack surface or could undo the
sandbox (``DENIED``, each answered ``EPERM``):

- tracing and reading other processes: ``ptrace``, ``process_vm_readv/writev``,
  ``pidfd_getfd``, ``kcmp``, ``perf_event_open``;
- kernel keyrings: ``keyctl``, ``add_key``, ``request_key``;
- ``bpf``, ``userfaultfd``, ``io_uring_setup/enter/register``;
- the mount family: ``mount``, ``umount2``, ``pivot_root``, ``move_mount``,
  ``open_tree``, ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``, ``mount_setattr``;
- namespaces: ``unshare``, ``setns``, and ``clone`` with any ``CLONE_NEW*`` flag;
  ``clone3`` (its flags sit in memory a filter cannot read) gets ``ENOSYS``, on which the
  C library falls back to ``clone``, so threads and ``fork`` keep working;
- modules and kexec: ``init_module``, ``finit_module``, ``delete_module``, ``kexec_load``,
  ``kexec_file_load``;
- host administration: ``acct``, ``swapon``, ``swapoff``, ``reboot``, ``sethostname``,
  ``setdomainname``, ``syslog``, ``quotactl``, ``quotactl_fd``, ``open_by_handle_at``,
  ``name_to_handle_at``, ``clock_settime``, ``settimeofday``, ``adjtimex``,
  ``clock_adjtime``, ``lookup_dcookie``, ``vhangup``, ``fanotify_init`` (and on x86-64
  ``iopl``, ``ioperm``, ``uselib``, ``nfsservctl``);
- ``memfd_secret`` (memory outside every accounting).

``extra`` names more calls to deny: the isolation adds ``shmget`` and ``msgget`` when it
cannot bound the run's SysV shared memory and message queues (an IPC namespace whose
limits it set), and ``memfd_create`` when no memory cgroup bounds the run
(see ``docs/sandbox.md``). Only the native ABI passes: a call made through another one
(i386 ``int 0x80`` or x32 on x86-64, AArch32 on arm64) is refused with ``EPERM``, since
its numbers differ. Architectures: x86-64 and AArch64; elsewhere :func:`build_filter`
raises ``ValueError`` and the sandbox refuses to run (:class:`SandboxUnavailable`).
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["DENIED", "build_filter", "syscall_numbers"]

# <linux/audit.h>: AUDIT_ARCH_X86_64 = EM_X86_64 | 64BIT | LE, AUDIT_ARCH_AARCH64 likewise.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000

# Numbers from the kernel's uapi headers (asm/unistd_64.h for x86-64,
# asm-generic/unistd.h for arm64), checked against the host headers by the tests.
_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
        "kcmp": 312, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
        "request_key": 249, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "mount": 165, "umount2": 166,
        "pivot_root": 155, "move_mount": 429, "open_tree": 428, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 272, "setns": 308, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "acct": 163,
        "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "syslog": 103, "quotactl": 179, "quotactl_fd": 443,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "clock_settime": 227,
        "settimeofday": 164, "adjtimex": 159, "clock_adjtime": 305, "lookup_dcookie": 212,
        "vhangup": 153, "fanotify_init": 300, "memfd_secret": 447, "iopl": 172,
        "ioperm": 173, "uselib": 134, "nfsservctl": 180,
        # conditional / special
        "clone": 56, "clone3": 435, "shmget": 29, "msgget": 68, "memfd_create": 319,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
        "kcmp": 272, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "mount": 40, "umount2": 39,
        "pivot_root": 41, "move_mount": 429, "open_tree": 428, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 97, "setns": 268, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "acct": 89,
        "swapon": 224, "swapoff": 225, "reboot": 142, "sethostname": 161,
        "setdomainname": 162, "syslog": 116, "quotactl": 60, "quotactl_fd": 443,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "clock_settime": 112,
        "settimeofday": 170, "adjtimex": 171, "clock_adjtime": 266, "lookup_dcookie": 18,
        "vhangup": 58, "fanotify_init": 262, "memfd_secret": 447,
        "clone": 220, "clone3": 435, "shmget": 194, "msgget": 186, "memfd_create": 279,
    },
}
_SPECIAL = ("clone", "clone3", "shmget", "msgget", "memfd_create")
DENIED: tuple[str, ...] = tuple(n for n in _NUMBERS["x86_64"] if n not in _SPECIAL)
"""Calls always answered ``EPERM`` (those an architecture lacks are skipped there)."""

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
# CLONE_NEWPID | CLONE_NEWNET (CLONE_NEWTIME is 0x80, which clone() reads as part of the
# exit signal: only unshare and clone3 take it, and both are denied).
_CLONE_NEW_MASK = 0x7E020000

# Classic BPF opcodes (<linux/bpf_common.h>, <linux/filter.h>) and seccomp return values.
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16  # args[0]'s low word (little endian)


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def syscall_numbers(arch: str | None = None) -> dict[str, int]:
    """The filter's syscall table for ``arch`` (default: this machine)."""
    arch = arch or _machine()
    if arch not in _NUMBERS:
        raise ValueError(f"no seccomp syscall table for architecture {arch!r} "
                         f"(have: {sorted(_NUMBERS)})")
    return dict(_NUMBERS[arch])


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, native order


def build_filter(extra: tuple[str, ...] = (), arch: str | None = None) -> bytes:
    """The compiled filter (``struct sock_filter[]`` bytes) for ``arch`` (default: here)."""
    arch = arch or _machine()
    nums = syscall_numbers(arch)
    unknown = sorted(set(extra) - set(nums))
    if unknown:
        raise ValueError(f"unknown syscall(s) to deny {unknown}; known: {sorted(nums)}")
    deny = sorted({nums[n] for n in DENIED if n in nums} | {nums[n] for n in extra})
    eperm = _SECCOMP_RET_ERRNO | errno.EPERM
    enosys = _SECCOMP_RET_ERRNO | errno.ENOSYS
    # Layout: header, one JEQ per denied number (to DENY), clone3 -> ENOSYS, clone -> the
    # flags check, ALLOW, DENY. Jump offsets count instructions after the jump.
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH[arch]),  # native ABI: go on; else DENY (patched below)
        ("deny", 0, 0, 0),  # type: ignore[list-item]
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch == "x86_64":
        prog.append(("jge_x32", 0, 0, _X32_SYSCALL_BIT))  # type: ignore[arg-type]
    for nr in deny:
        prog.append(("jeq_deny", 0, 0, nr))  # type: ignore[arg-type]
    prog += [
        (_JEQ_K, 0, 1, nums["clone3"]),
        (_RET_K, 0, 0, enosys),
        (_JEQ_K, 0, 2, nums["clone"]),  # not clone: ALLOW (two ahead)
        (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
        (_JSET_K, 1, 0, _CLONE_NEW_MASK),  # any CLONE_NEW*: DENY
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        (_RET_K, 0, 0, eperm),
    ]
    deny_at = len(prog) - 1
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if code == "deny":
            out.append(_insn(_RET_K, 0, 0, eperm))
        elif code == "jeq_deny":
            out.append(_insn(_JEQ_K, deny_at - i - 1, 0, k))
        elif code == "jge_x32":
            out.append(_insn(_JGE_K, deny_at - i - 1, 0, k))
        else:
            out.append(_insn(code, jt, jf, k))
    if len(out) > 255:  # jump offsets are one byte
        raise ValueError(f"seccomp filter of {len(out)} instructions is too long")
    return b"".join(out)
