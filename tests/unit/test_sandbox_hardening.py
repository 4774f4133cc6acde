"""Issue 20: the sandbox holds under hostile code. Memory cannot be held past the limit
through SysV shm or memfd, no run outlives a pool owner killed with SIGKILL and a new pool
reaps what a dead one left, the seccomp filter denies ptrace / keyctl / bpf and the rest of
its list, and a sandbox that fails is reported as such, not as the program's exit."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_alp.sandbox import SandboxLimits, SandboxPool
from megatron_alp.sandbox import seccomp
from megatron_alp.sandbox.cgroup import _PREFIX, find_parent

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap not installed (apt-get install bubblewrap)"
)

LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=4, memory_mb=256, max_processes=16,
                       max_file_mb=4, workdir_mb=16, max_output_bytes=4096)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Holds SysV segments past detaching (RLIMIT_AS no longer sees them): 8 x 16 MiB = 2x the
# limit of SMALL; prints how many MiB are still allocated at the end (IPC_STAT on each id).
SHM_PROGRAM = r"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
ids, why = [], "done"
for i in range(8):
    sid = libc.shmget(0, 16 << 20, 0o1600)
    if sid < 0:
        why = "shmget " + errno.errorcode[ctypes.get_errno()]
        break
    addr = libc.shmat(sid, None, 0)
    ctypes.memset(addr, 1, 16 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
    ids.append(sid)
buf = ctypes.create_string_buffer(256)
alive = sum(libc.shmctl(sid, 2, buf) == 0 for sid in ids)
print("held", alive * 16, why)
"""
# memfd pages belong to no mapping: 4 MiB (max_file_mb) per memfd up to 2x SMALL's limit.
MEMFD_PROGRAM = r"""
import os
fds, held = [], 0
while held < 128:
    fd = os.memfd_create("m")
    for _ in range(4):
        os.write(fd, b"x" * (1 << 20))
    fds.append(fd)
    held += 4
print("held", held)
"""
# Four processes of 120 MiB each: each is under RLIMIT_AS, together above the run's limit.
FORK_PROGRAM = r"""
import os, time
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        x = bytearray(120 << 20)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
print("exits", [os.waitpid(p, 0)[1] for p in kids])
"""


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(max_concurrency=2, limits=LIMITS)
    yield p
    p.close()


# A small memory limit keeps the hostile programs short on a loaded machine.
SMALL = dataclasses.replace(LIMITS, memory_mb=64, timeout_s=20.0)


def _has_cgroup(pool: SandboxPool) -> bool:
    return pool.isolation.cgroups[0] is not None


def test_sysv_shm_cannot_hold_more_than_the_limit(pool):
    res = pool.run(SHM_PROGRAM, SMALL)
    if pool.isolation.ipc_limits:
        held = int(res.stdout.split()[1]) if res.stdout.startswith("held") else 0
        assert held <= SMALL.memory_mb, res
        assert res.killed_by in (None, "memory"), res
    else:  # no IPC namespace of our own to bound (not root, /proc/sys read-only): refused
        assert "held 0 shmget EPERM" in res.stdout, res


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path's fallback")
def test_root_without_writable_ipc_sysctls_denies_shm():
    """As root where /proc/sys is read-only (a container), shmget is denied instead."""
    with SandboxPool(max_concurrency=1, limits=LIMITS) as p:
        p.isolation.__dict__["ipc_limits"] = False  # what the probe finds in such a host
        res = p.run(SHM_PROGRAM, SMALL)
        assert "held 0 shmget EPERM" in res.stdout, res
        assert p.run("print(6 * 7)").stdout == "42\n"
        assert "shmget and msgget denied" in p.isolation.guards()["sysv_ipc"]


def test_sysv_message_queues_are_bounded(pool):
    """SysV message queues hold kernel memory no rlimit sees: at most 16 queues (root's
    IPC namespace), or none (msgget denied)."""
    code = (
        "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nn = 0\n"
        "while n < 1000:\n"
        "    if libc.msgget(0, 0o1600) < 0:\n"
        "        print(n, errno.errorcode[ctypes.get_errno()])\n        break\n"
        "    n += 1\n"
        "else:\n    print(n, 'done')\n"
    )
    res = pool.run(code)
    want = "16 ENOSPC" if pool.isolation.ipc_limits else "0 EPERM"
    assert res.stdout.strip() == want, res


def test_memfd_cannot_hold_more_than_the_limit(pool):
    res = pool.run(MEMFD_PROGRAM, SMALL)
    assert "held 128" not in res.stdout, res
    if _has_cgroup(pool):
        assert res.killed_by == "memory", res
    else:
        assert "PermissionError" in res.stderr, res  # memfd_create denied without a cgroup


def test_memory_of_all_processes_together_is_bounded(pool):
    if not _has_cgroup(pool):
        pytest.skip(f"no memory cgroup here ({pool.isolation.cgroups[1]}): RLIMIT_AS bounds "
                    "each process, not their sum (docs/sandbox.md)")
    res = pool.run(FORK_PROGRAM)
    assert res.killed_by == "memory" or "[0, 0, 0, 0]" not in res.stdout, res
    ok = pool.run("x = bytearray(160 << 20)\nprint(len(x) >> 20)")  # under the limit: fine
    assert ok.ok and ok.stdout == "160\n", ok


def test_seccomp_denies_ptrace_keyctl_bpf(pool):
    code = r"""
import ctypes, errno, os, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *args)
    return errno.errorcode.get(ctypes.get_errno(), "OK") if r < 0 else "OK"
N = %s
print("ptrace", call(N["ptrace"], 16, 1, 0, 0))         # PTRACE_ATTACH to bwrap (PID 1)
print("keyctl", call(N["keyctl"], 0, -3, 0))            # KEYCTL_GET_KEYRING_ID session
print("bpf", call(N["bpf"], 0, 0, 0))                   # BPF_MAP_CREATE
print("unshare", call(N["unshare"], 0x00020000))        # CLONE_NEWNS
print("mount", call(N["mount"], b"none", b"/tmp", b"tmpfs", 0, 0))
print("clone3", call(N["clone3"], 0, 0))
t = threading.Thread(target=lambda: print("thread ok"))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(3)
print("fork", os.waitpid(pid, 0)[1] >> 8)
""" % (seccomp.syscall_numbers(),)
    res = pool.run(code)
    assert res.exit_code == 0, res
    got = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for name in ("ptrace", "keyctl", "bpf", "unshare", "mount"):
        assert got[name] == "EPERM", (name, res.stdout)
    # clone3 gets ENOSYS, so the C library falls back to clone: threads and fork work
    assert got["clone3"] == "ENOSYS" and got["thread"] == "ok" and got["fork"] == "3", res.stdout


@pytest.mark.parametrize("header", ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                                    "/usr/include/asm-generic/unistd.h"])
def test_seccomp_numbers_match_the_kernel_headers(header):
    arch = "x86_64" if "x86_64" in header else "aarch64"
    if not os.path.exists(header):
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    text = open(header).read()
    for name, nr in seccomp.syscall_numbers(arch).items():
        m = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
        if m:
            assert int(m.group(1)) == nr, (arch, name, nr, m.group(1))
        else:
            assert arch == "aarch64" and name in ("iopl", "ioperm", "uselib", "nfsservctl")


def _bpf_eval(prog: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """A classic-BPF interpreter (ld abs word, jeq / jge / jset k, ret k: what a seccomp
    filter of this kind uses), run on one struct seccomp_data."""
    import struct

    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            op = code & 0xF0
            taken = {0x10: acc == k, 0x30: acc >= k, 0x40: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_seccomp_filter_logic_per_architecture(arch):
    """The filter's decisions on both architectures (AArch64 cannot run here), read by an
    interpreter of the BPF program rather than by the builder's own bookkeeping."""
    audit = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[arch]
    nums = seccomp.syscall_numbers(arch)
    prog = seccomp.build_filter(("shmget",), arch=arch)
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    for name in seccomp.DENIED:
        if name in nums:
            assert _bpf_eval(prog, audit, nums[name]) == eperm, name
    assert _bpf_eval(prog, audit, nums["shmget"]) == eperm
    assert _bpf_eval(prog, audit, nums["memfd_create"]) == allow  # not asked for here
    assert _bpf_eval(prog, audit, nums["clone3"]) == enosys
    assert _bpf_eval(prog, audit, nums["clone"], 0x01200011) == allow  # fork's flags
    assert _bpf_eval(prog, audit, nums["clone"], 0x003D0F00) == allow  # pthread_create's
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                 0x40000000):  # each CLONE_NEW*
        assert _bpf_eval(prog, audit, nums["clone"], 0x01200011 | flag) == eperm, hex(flag)
    read_nr = {"x86_64": 0, "aarch64": 63}[arch]
    assert _bpf_eval(prog, audit, read_nr) == allow
    assert _bpf_eval(prog, 0x40000003, read_nr) == eperm  # i386 / a foreign ABI
    if arch == "x86_64":
        assert _bpf_eval(prog, audit, 0x40000000 | read_nr) == eperm  # x32


def test_seccomp_filter_shape():
    prog = seccomp.build_filter(("shmget",), arch="x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 256
    with pytest.raises(ValueError, match="unknown syscall"):
        seccomp.build_filter(("nope",))
    with pytest.raises(ValueError, match="no seccomp syscall table for architecture 'mips'"):
        seccomp.build_filter(arch="mips")


def _token_pids(token: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{name}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            argv = cmd.split(b"\0")
            # the run's sleep itself (the owner's own command line may hold the token too)
            if (os.path.basename(argv[0]) == b"sleep" and len(argv) > 1
                    and argv[1].endswith(token.encode()) and state not in ("Z", "X")):
                pids.append(int(name))
    return pids


def _sleep_program(token: str) -> str:
    # sleep's argument carries the token, so the test finds the run's process by name
    return f"import os\nos.execv('/bin/sleep', ['sleep', '3600.{token}'])\n"


def _wait_for(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _dead_owner_cgroups(pid: int) -> list[str]:
    parent = find_parent()[0]
    if parent is None:
        return []
    return [n for n in os.listdir(parent.path) if n.startswith(f"{_PREFIX}{pid}-")]


@pytest.mark.parametrize("who", ["root", "unprivileged"])
def test_kill_9_of_the_pool_owner_kills_its_runs(who):
    token = str(secrets.randbelow(10**9))
    script = (
        "import sys\n"
        "from megatron_alp.sandbox import SandboxPool, SandboxLimits\n"
        "p = SandboxPool(max_concurrency=1, uid_base=63000, limits=SandboxLimits(timeout_s=600))\n"
        "print('ready', p.isolation.as_root, p.isolation.cgroups[0] is None, flush=True)\n"
        f"p.run({_sleep_program(token)!r})\n"
    )
    cmd = [sys.executable, "-c", script]
    if who == "unprivileged":
        if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
            pytest.skip("needs root (to become an unprivileged user) and /usr/bin/python3")
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
               "/usr/bin/python3", "-c", script]
    elif os.geteuid() != 0:
        pytest.skip("the unprivileged case covers a non-root caller")
    owner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO}, cwd="/")
    try:
        line = owner.stdout.readline().strip()
        if not line and "No module named" in owner.stderr.read():
            pytest.skip("the system python cannot import the package")
        assert line.startswith(f"ready {who == 'root'} "), line
        no_cgroup = line.endswith("True")
        assert _wait_for(lambda: _token_pids(token), 10), "the run did not start"
        owner.kill()
        owner.wait()
        t = time.monotonic()
        assert _wait_for(lambda: not _token_pids(token), 1.0), _token_pids(token)
        assert time.monotonic() - t <= 1.0
        if who == "unprivileged":  # no cgroup for it here: its run was in the registry
            import glob

            records = glob.glob(f"/tmp/megatron-alp-sandbox-runs-65534/{owner.pid}-*")
            assert len(records) == int(no_cgroup), records
            for path in records:
                os.unlink(path)  # what the next pool of that user would reap
            return
        # a new pool removes the cgroup the dead owner could not
        SandboxPool(max_concurrency=1, uid_base=63000).close()
        assert _dead_owner_cgroups(owner.pid) == []
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in _token_pids(token):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: plants a leftover under a slot uid")
def test_new_pool_reaps_leftovers_of_a_dead_one():
    """What a dead owner left (a process under a free slot uid, a run cgroup of a dead pid)
    is killed when the next pool starts."""
    token = str(secrets.randbelow(10**9))
    uid = 63500
    os.makedirs("/tmp/megatron-alp-sandbox", mode=0o700, exist_ok=True)
    open(f"/tmp/megatron-alp-sandbox/uid-{uid}.lock", "a").close()
    stray = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                              "sleep", f"3600.{token}"], start_new_session=True)
    planted = []
    parent = find_parent()[0]
    if parent is not None:  # a run cgroup whose owner (pid 2**22 + 1: none) is gone
        path = os.path.join(parent.path, f"{_PREFIX}{2**22 + 1}-1-0")
        os.mkdir(path)
        planted.append(path)
        stray2 = subprocess.Popen(
            ["sh", "-c", f'echo 0 > {path}/cgroup.procs && exec sleep 3601.{token}'])
        assert _wait_for(lambda: open(f"{path}/cgroup.procs").read().strip(), 5)
    try:
        assert _wait_for(lambda: _token_pids(token), 5)
        with SandboxPool(max_concurrency=1, uid_base=63400) as p:
            assert p.reaped == len(planted)
        assert _wait_for(lambda: not _token_pids(token), 1.0), _token_pids(token)
        assert all(not os.path.exists(path) for path in planted)
    finally:
        for pid in _token_pids(token):
            os.kill(pid, signal.SIGKILL)
        stray.wait()
        if planted:
            stray2.wait()
        for path in planted:
            if os.path.exists(path):
                os.rmdir(path)


def test_run_registry_reaps_launchers_of_dead_owners():
    """Without root or cgroups, the registry leads a new owner to a launcher a dead one
    left; a live owner's runs are left alone."""
    from megatron_alp.sandbox import registry

    token = str(secrets.randbelow(10**9))
    dead = subprocess.Popen(["sleep", f"3600.{token}"], start_new_session=True)
    live = subprocess.Popen(["sleep", f"3601.{token}"], start_new_session=True)
    try:
        path = registry.record(live.pid)  # recorded by us: the owner is alive
        d = os.path.dirname(path)
        stale = os.path.join(d, f"{2**22 + 1}-1-0")  # an owner that no longer exists
        with open(stale, "w") as f:
            f.write(f"{dead.pid} {registry._start_time(dead.pid)}")
        assert registry.reap() == 1
        assert dead.wait(timeout=5) == -signal.SIGKILL
        assert live.poll() is None and os.path.exists(path) and not os.path.exists(stale)
        registry.forget(path)
        assert not os.path.exists(path)
    finally:
        for p in (dead, live):
            if p.poll() is None:
                p.kill()
            p.wait()


def _outer_bwrap(token: str) -> int | None:
    pids = _token_pids(token)
    if not pids:
        return None
    pid = pids[0]
    for _ in range(2):  # sleep <- bwrap (the sandbox's PID 1) <- bwrap (outside)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return pid if os.path.basename(f.read().split(b"\0")[0]) == b"bwrap" else None


def test_killed_outer_bwrap_is_a_sandbox_failure(pool):
    token = str(secrets.randbelow(10**9))
    fut = pool.submit(_sleep_program(token))
    assert _wait_for(lambda: _outer_bwrap(token) is not None, 10)
    os.kill(_outer_bwrap(token), signal.SIGKILL)
    res = fut.result(timeout=10)
    assert res.killed_by == "sandbox" and res.exit_code is None and not res.timed_out, res
    assert "sandbox failed" in res.sandbox_error, res
    assert not res.ok
    assert not _token_pids(token)


def test_program_exit_codes_still_read_as_the_programs(pool):
    res = pool.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert res.exit_code == 128 + signal.SIGTERM and res.killed_by == "signal", res
    assert res.sandbox_error is None


@pytest.mark.parametrize("field,value,expect", [
    ("workdir_mb", 2.5, "must be an integer, got float 2.5"),
    ("max_output_bytes", 100.5, "must be an integer, got float 100.5"),
    ("cpu_s", 1.5, "must be an integer, got float 1.5"),
    ("max_processes", True, "must be an integer, got bool True"),
    ("timeout_s", float("nan"), "must be > 0 and <= 604800, got nan"),
    ("timeout_s", "5", "must be a number, got str '5'"),
    ("memory_mb", 2**40, "must be >= 32 and <= 16777216"),
])
def test_limits_have_types_and_ranges(field, value, expect):
    with pytest.raises(ValueError, match=re.escape(f"SandboxLimits.{field} {expect}")):
        SandboxLimits(**{field: value})
    assert SandboxLimits(timeout_s=2).timeout_s == 2  # an int is a fine number of seconds


def test_result_round_trips_with_sandbox_error():
    from megatron_alp.sandbox import SandboxResult

    r = SandboxResult(stdout="", stderr="", exit_code=None, timed_out=False,
                      killed_by="sandbox", wall_s=0.1, sandbox_error="bwrap was killed")
    assert SandboxResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    old = {k: v for k, v in r.to_dict().items() if k != "sandbox_error"}  # an older service
    assert SandboxResult.from_dict(old).sandbox_error is None


def test_cgroup_setting_is_checked(tmp_path):
    assert find_parent("off") == (None, "memory cgroups turned off (cgroup='off')")
    with pytest.raises(ValueError, match="is neither a writable cgroup v2 directory"):
        find_parent(str(tmp_path))  # a plain directory is no cgroup
    with pytest.raises(ValueError, match="is neither a writable cgroup v2 directory"):
        SandboxPool(max_concurrency=1, cgroup=str(tmp_path))
    with SandboxPool(max_concurrency=1, cgroup="off") as p:
        assert p.isolation.guards()["memory_cgroup"].startswith("none")
        assert "PermissionError" in p.run("import os\nos.memfd_create('m')").stderr
