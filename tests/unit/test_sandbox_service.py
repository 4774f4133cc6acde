"""The sandbox HTTP service and its client: API errors, back-pressure, hostile code while
serving, graceful shutdown on SIGTERM, and 200 concurrent requests at concurrency 8.
Loopback addresses only."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatron_alp.sandbox import SandboxClient, SandboxLimits
from megatron_alp.sandbox.serve import SandboxServer

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap not installed (apt-get install bubblewrap)"
)

LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=2, memory_mb=512, max_processes=16,
                       max_output_bytes=4096)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def server():
    s = SandboxServer(max_concurrency=8, max_queue=256, max_request_bytes=64 * 1024,
                      limits=LIMITS).start()
    yield s
    s.shutdown(grace_s=10)


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def test_health_and_run(server):
    with SandboxClient(server.url) as c:
        h = c.health()
        assert h["status"] == "ok" and h["max_concurrency"] == 8
        res = c.run("print('hello')")
        assert res.ok and res.stdout == "hello\n"


def test_api_errors_name_the_problem(server):
    status, doc, _ = _raw(server.url, "POST", "/run", b"not json",
                          {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in doc["error"]
    status, doc, _ = _raw(server.url, "POST", "/run", json.dumps({"code": 3}).encode())
    assert status == 400 and "'code' must be a string" in doc["error"]
    status, doc, _ = _raw(server.url, "POST", "/run",
                          json.dumps({"code": "1", "limits": {"nope": 1}}).encode())
    assert status == 400 and "nope" in doc["error"]
    status, doc, _ = _raw(server.url, "POST", "/run",
                          json.dumps({"code": "x" * 100_000}).encode())
    assert status == 413 and "max-request-bytes" in doc["error"]
    status, doc, _ = _raw(server.url, "GET", "/nowhere")
    assert status == 404


def test_request_limits_are_capped_by_the_service(server):
    with SandboxClient(server.url) as c:
        t = time.monotonic()
        res = c.run("import time\ntime.sleep(30)", SandboxLimits(timeout_s=100.0))
        assert res.timed_out and res.killed_by == "timeout"
        assert time.monotonic() - t < LIMITS.timeout_s + 2.0
        lower = c.run("import time\ntime.sleep(30)", SandboxLimits(timeout_s=0.5))
        assert lower.timed_out and lower.wall_s < 2.0


def test_hostile_code_does_not_stop_the_service(server):
    hostile = [
        "while True:\n    pass",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "x = bytearray(10 * 2**30)",
        "print('z' * (100 << 20))",
        "import time\ntime.sleep(60)",
    ]
    with SandboxClient(server.url, max_concurrency=8) as c:
        futures = [c._executor.submit(c.run, code) for code in hostile]
        time.sleep(0.3)  # the hostile runs are going
        t = time.monotonic()
        benign = c.run("print(2 + 2)")
        # served beside the hostile runs, not queued behind them: answered before the
        # sleeping one's wall-clock timeout frees a slot (a 2 s bound flaked at load 20)
        assert time.monotonic() - t < LIMITS.timeout_s and benign.stdout == "4\n"
        results = [f.result() for f in futures]
    assert results[0].killed_by in ("cpu", "timeout") and results[1].killed_by in ("cpu", "timeout")
    assert results[2].killed_by == "memory"
    assert results[3].stdout_truncated and results[4].timed_out


def test_back_pressure_answers_503():
    s = SandboxServer(max_concurrency=1, max_queue=1, limits=LIMITS).start()
    try:
        body = json.dumps({"code": "import time\ntime.sleep(1.0)\nprint('done')"}).encode()
        statuses: list[int] = []
        lock = threading.Lock()

        def one() -> None:
            st, _, headers = _raw(s.url, "POST", "/run", body)
            with lock:
                statuses.append(st)
                if st == 503:
                    assert headers.get("Retry-After") == "1"

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses).count(200) == 2 and statuses.count(503) == 3, statuses
        assert s.health()["rejected"] == 3
        # The client retries a 503 and gets through.
        with SandboxClient(s.url, max_concurrency=5) as c:
            res = c.run_batch(["print(7)"] * 5)
        assert [r.stdout for r in res] == ["7\n"] * 5
    finally:
        s.shutdown(grace_s=10)


def _load(url: str, n: int) -> tuple[list[float], float]:
    codes = [f"import os\nprint('req-{i}', {i} * 7, len(os.listdir('/work')))" for i in range(n)]
    lat: list[float] = [0.0] * n
    with SandboxClient(url, max_concurrency=n) as c:
        def timed(i: int):
            t = time.monotonic()
            r = c.run(codes[i])
            lat[i] = time.monotonic() - t
            return r
        t0 = time.monotonic()
        futures = [c._executor.submit(timed, i) for i in range(n)]
        results = [f.result() for f in futures]
        total = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"req-{i} {i * 7} 1\n" for i in range(n)]
    return lat, total


def test_load_200_concurrent_requests_concurrency_8():
    s = SandboxServer(max_concurrency=8, max_queue=256, limits=LIMITS).start()
    try:
        lat, total = _load(s.url, 200)
        h = s.health()
        # every request ran exactly once: none lost, none duplicated, none refused
        assert h["completed"] == 200 and h["rejected"] == 0
        assert h["running"] == 0 and h["queued"] == 0
    finally:
        s.shutdown(grace_s=10)
    assert max(lat) < 60.0, max(lat)


def test_sigterm_finishes_accepted_requests_then_exits():
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_alp.sandbox.serve", "--host", "127.0.0.1", "--port", "0",
         "--concurrency", "2", "--timeout-s", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        out: list = []
        with SandboxClient(url, retry_for_s=0) as c:
            t = threading.Thread(
                target=lambda: out.append(c.run("import time\ntime.sleep(1.5)\nprint('done')")))
            t.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(Exception):  # draining: 503, then connection refused
                c.run("print('late')")
            t.join()
        assert out and out[0].stdout == "done\n"
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_usage_error_exits_2():
    env = {**os.environ, "PYTHONPATH": REPO}
    res = subprocess.run(
        [sys.executable, "-m", "megatron_alp.sandbox.serve", "--concurrency", "0", "--port", "0"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert res.returncode == 2 and "--concurrency must be >= 1, got 0" in res.stderr
    assert "Traceback" not in res.stderr


# --- issue 20: every bad request gets a status; slow clients; kill -9 of the service ---

def test_deeply_nested_json_is_400(server):
    depth = 30_000
    body = b'{"code": "1", "limits": ' + b"[" * depth + b"]" * depth + b"}"
    status, doc, _ = _raw(server.url, "POST", "/run", body)
    assert status == 400 and "nested too deeply" in doc["error"], doc
    huge = b'{"code": "1", "limits": {"cpu_s": 1' + b"0" * 5000 + b"}}"
    status, doc, _ = _raw(server.url, "POST", "/run", huge)
    assert status == 400 and "not JSON" in doc["error"], doc  # past int's digit limit
    assert _raw(server.url, "GET", "/health")[0] == 200


def test_non_ascii_content_length_is_400(server):
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall("POST /run HTTP/1.0\r\nContent-Length: \u00b2\r\n\r\n{}".encode("latin-1"))
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400"), reply
    assert "Content-Length must be a decimal byte count, got '\u00b2'" in json.loads(body)["error"]


@pytest.mark.parametrize("field,value,kind", [
    ("workdir_mb", 2.5, "an integer, got float 2.5"),
    ("max_output_bytes", 100.5, "an integer, got float 100.5"),
    ("cpu_s", 1.5, "an integer, got float 1.5"),
    ("max_processes", True, "an integer, got bool True"),
    ("timeout_s", "3", "a number, got str '3'"),
])
def test_wrongly_typed_limits_are_400_before_anything_runs(server, field, value, kind):
    before = server.health()["completed"]
    body = json.dumps({"code": "print('ran')", "limits": {field: value}}).encode()
    status, doc, _ = _raw(server.url, "POST", "/run", body)
    assert status == 400, doc
    assert doc["error"] == f"field 'limits': SandboxLimits.{field} must be {kind}"
    assert server.health()["completed"] == before  # nothing ran


def test_slow_clients_meet_a_deadline_and_a_connection_cap():
    import socket

    s = SandboxServer(max_concurrency=1, max_queue=1, max_connections=3, request_timeout_s=1.0,
                      limits=LIMITS).start()
    host, port = s.url.removeprefix("http://").split(":")
    slow = []
    try:
        t0 = time.monotonic()
        for _ in range(3):  # each sends a header line now and then, never finishing
            c = socket.create_connection((host, int(port)), timeout=10)
            c.sendall(b"POST /run HTTP/1.0\r\n")
            slow.append(c)
        assert _wait_for_connections(s, 3)
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.0 503") and b"--max-connections" in reply, reply
        assert b"Retry-After: 1" in reply
        replies = []
        for c in slow:
            c.settimeout(0.2)
            got = b""
            while time.monotonic() - t0 < 15.0:  # without a deadline it would never end
                try:
                    c.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
                try:
                    chunk = c.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                got += chunk
            replies.append((got, time.monotonic() - t0))
        for got, took in replies:
            assert got.startswith(b"HTTP/1.0 408"), got
            assert took < 1.0 + 3.0, took  # the deadline, plus slack for a loaded machine
        assert _wait_for_connections(s, 0)
        assert _raw(s.url, "GET", "/health")[0] == 200  # served again once they are gone
        assert s.health()["rejected"] == 1
    finally:
        for c in slow:
            c.close()
        s.shutdown(grace_s=10)


def _wait_for_connections(s: SandboxServer, n: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if s.httpd.connections == n:
            return True
        time.sleep(0.01)
    return False


def test_kill_9_of_the_service_kills_its_runs_and_a_restart_reaps():
    import secrets

    from tests.unit.test_sandbox_hardening import (
        _dead_owner_cgroups, _sleep_program, _token_pids, _wait_for,
    )

    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "megatron_alp.sandbox.serve", "--host", "127.0.0.1",
           "--port", "0", "--concurrency", "1", "--timeout-s", "600"]
    token = str(secrets.randbelow(10**9))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        url = re.search(r"serving on (http://\S+)", proc.stdout.readline()).group(1)
        body = json.dumps({"code": _sleep_program(token)}).encode()
        threading.Thread(target=lambda: _quiet_raw(url, body), daemon=True).start()
        assert _wait_for(lambda: _token_pids(token), 10), "the run did not start"
        proc.kill()
        proc.wait()
        t = time.monotonic()
        assert _wait_for(lambda: not _token_pids(token), 1.0), _token_pids(token)
        assert time.monotonic() - t <= 1.0
        # the restarted service reaps the run cgroup the dead one left
        again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, cwd=REPO)
        try:
            assert "serving on" in again.stdout.readline()
            assert _dead_owner_cgroups(proc.pid) == []
        finally:
            again.send_signal(signal.SIGTERM)
            assert again.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _token_pids(token):
            os.kill(pid, signal.SIGKILL)


def _quiet_raw(url: str, body: bytes) -> None:
    try:
        _raw(url, "POST", "/run", body)
    except (OSError, http.client.HTTPException):
        pass  # the service is killed mid-request
