"""The sandbox as an HTTP service, for clusters: ``python -m megatron_alp.sandbox.serve``.

API (JSON over HTTP/1.0, one request per connection):

- ``POST /run`` ``{"code": str, "limits": {...}?}`` -> 200 and a
  :class:`~megatron_alp.sandbox.types.SandboxResult` as JSON. Per-request ``limits``
  override the service's defaults field by field but are capped by them (a request can
  ask for less, never more). 400 for a malformed body (the message names the field:
  bad JSON, JSON nested too deeply, a limit of the wrong type or out of range), or a
  Content-Length that is not a decimal number; 411 without Content-Length, 413 above
  ``--max-request-bytes``, 408 when the request is not fully received within
  ``--request-timeout-s``, 503 with ``Retry-After`` when ``--concurrency`` runs are going
  and ``--queue`` more are waiting (back-pressure), when ``--max-connections`` connections
  are open, or while shutting down.
- ``GET /health`` -> 200 ``{"status": "ok" | "draining", "running", "queued",
  "completed", "rejected", "connections", "max_concurrency", "max_queue",
  "max_connections", "limits", "guards"}``.

SIGTERM / SIGINT: stop accepting, let every accepted request finish (``--grace-s``), then
exit 0. Binds 127.0.0.1 by default; the service has no authentication, so on a cluster
bind it to a private interface only (see ``docs/sandbox.md``).
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from megatron_alp.sandbox.pool import SandboxPool
from megatron_alp.sandbox.types import SandboxLimits, SandboxUnavailable

__all__ = ["SandboxServer", "main"]

_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only ("²".isdigit() is True)


def _raw_response(status: int, reason: str, doc: dict[str, Any], extra: str = "") -> bytes:
    body = json.dumps(doc).encode()
    return (f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class _RequestDeadline(TimeoutError):
    """The whole request was not received in time (the stdlib handler catches TimeoutError)."""


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each with a timeout of what is left of one request deadline, so
    a client that sends a byte now and then cannot hold a connection open past it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline: float | None = deadline
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise _RequestDeadline("request not received within the deadline")
            self.sock.settimeout(left)
        try:
            return self.sock.recv_into(b)
        except TimeoutError:
            if self.deadline is not None:
                self.expired = True
                raise _RequestDeadline("request not received within the deadline") from None
            raise


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "megatron-alp-sandbox/1"
    # A client that stalls must not hold a handler thread forever: reading the request has
    # one deadline (--request-timeout-s, _DeadlineReader), and each send of the answer a
    # timeout of the same length (set in setup(); this is only the stdlib's first value).
    timeout = 60

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        self.connection.settimeout(owner.request_timeout_s)
        self._reader = _DeadlineReader(self.connection,
                                       time.monotonic() + owner.request_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        super().handle_one_request()  # catches TimeoutError: the connection is then closed
        if self._reader.expired:
            try:
                self.connection.settimeout(1.0)
                limit = self.server.owner.request_timeout_s
                self.connection.sendall(_raw_response(408, "Request Timeout", {
                    "error": f"request not received within {limit:g} s (--request-timeout-s)"}))
            except OSError:
                pass

    def _received(self) -> None:
        """The request is in: no more read deadline (the run may take its time)."""
        self._reader.deadline = None
        self.connection.settimeout(self.server.owner.request_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._received()
        if self.path == "/health":
            self._send(200, self.server.owner.health())
        else:
            self._send(404, {"error": f"no such path {self.path!r}; try GET /health or POST /run"})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        owner = self.server.owner
        if self.path != "/run":
            self._send(404, {"error": f"no such path {self.path!r}; try POST /run"})
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._send(411, {"error": "POST /run needs a Content-Length header"})
            return
        if not _CONTENT_LENGTH.fullmatch(length.strip()):
            self.close_connection = True
            self._send(400, {"error": f"Content-Length must be a decimal byte count, got "
                                      f"{length[:40]!r}"})
            return
        if int(length) > owner.max_request_bytes:
            self.close_connection = True
            self._send(413, {"error": f"request of {int(length)} bytes exceeds the limit of "
                                      f"{owner.max_request_bytes} (--max-request-bytes)"})
            return
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            return  # the client closed early: nobody to answer
        self._received()
        try:
            code, limits = owner.parse(raw)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # a bug: say so, keep serving
            self._send(500, {"error": f"{type(e).__name__} while reading the request: {e}"})
            return
        if not owner.admit():
            self._send(503, {"error": "sandbox service busy or shutting down; retry later"},
                       {"Retry-After": "1"})
            return
        try:
            result = owner.pool.run(code, limits)
        except Exception as e:  # a bug or an exhausted host: report it, keep serving
            owner.release(ok=False)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        owner.release(ok=True)
        self._send(200, result.to_dict())


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handlers: graceful shutdown
    request_queue_size = 1024  # listen backlog: bursts wait in the kernel, not refused

    def __init__(self, addr: tuple[str, int], owner: "SandboxServer") -> None:
        self.owner = owner
        self.connections = 0
        self._conn_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most ``max_connections``; beyond, 503 at once."""
        with self._conn_lock:
            full = self.connections >= self.owner.max_connections
            if not full:
                self.connections += 1
        if not full:
            super().process_request(request, client_address)
            return
        self.owner.count_rejected()
        try:
            request.settimeout(0.5)
            request.sendall(_raw_response(503, "Service Unavailable", {
                "error": f"sandbox service has {self.owner.max_connections} connections open "
                         "(--max-connections); retry later"}, "Retry-After: 1\r\n"))
            request.shutdown(socket.SHUT_WR)
            request.recv(65536, socket.MSG_DONTWAIT)  # what the client sent: no RST on close
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1


class SandboxServer:
    """The HTTP service around a :class:`SandboxPool` (see the module docstring).

    ``max_concurrency`` programs run at once, ``max_queue`` more may wait; beyond that
    requests get 503. ``limits`` are the defaults and the ceiling of every request.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_concurrency: int = 8,
        max_queue: int = 256,
        max_request_bytes: int = 1 << 20,
        request_timeout_s: float = 30.0,
        max_connections: int | None = None,
        limits: SandboxLimits | None = None,
        python: str | None = None,
        site_dirs: tuple[str, ...] = (),
        cgroup: str = "auto",
        verbose: bool = False,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_request_bytes < 64:
            raise ValueError(f"max_request_bytes must be >= 64, got {max_request_bytes}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if max_connections is None:
            # every admitted request holds a connection; a few more for /health
            max_connections = max_concurrency + max_queue + 16
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.limits = limits or SandboxLimits()
        self.pool = SandboxPool(
            max_concurrency=max_concurrency, limits=self.limits, python=python,
            site_dirs=site_dirs, cgroup=cgroup,
        )
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.verbose = verbose
        self._lock = threading.Lock()
        self._admitted = 0
        self._completed = 0
        self._rejected = 0
        self._draining = False
        self._thread: threading.Thread | None = None
        self.stopped = threading.Event()
        """Set once :meth:`shutdown` has finished."""
        try:
            self.httpd = _HTTPServer((host, port), self)
        except OSError:
            self.pool.close()  # release the slot uids
            raise

    @property
    def url(self) -> str:
        """``http://host:port`` the service listens on."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def parse(self, raw: bytes) -> tuple[str, SandboxLimits]:
        """Validate a /run body; ValueError naming the bad field."""
        try:
            doc = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
            raise ValueError(f"request body is not JSON: {e}") from None
        except RecursionError:
            raise ValueError("request body is JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise ValueError(f"request body must be a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"code", "limits"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; expected 'code' and optional 'limits'")
        code = doc.get("code")
        if not isinstance(code, str):
            raise ValueError(f"field 'code' must be a string, got {type(code).__name__}")
        req = doc.get("limits") or {}
        if not isinstance(req, dict):
            raise ValueError(f"field 'limits' must be an object, got {type(req).__name__}")
        try:
            asked = SandboxLimits.from_dict({**self.limits.to_dict(), **req})
        except (TypeError, ValueError) as e:
            raise ValueError(f"field 'limits': {e}") from None
        return code, asked.capped_by(self.limits)

    def count_rejected(self) -> None:
        """Count a request refused before it reached :meth:`admit`."""
        with self._lock:
            self._rejected += 1

    def admit(self) -> bool:
        """Take a place (running or queued) or refuse (back-pressure / draining)."""
        with self._lock:
            if self._draining or self._admitted >= self.max_concurrency + self.max_queue:
                self._rejected += 1
                return False
            self._admitted += 1
            return True

    def release(self, *, ok: bool) -> None:
        """Give the place back once the run answered."""
        with self._lock:
            self._admitted -= 1
            self._completed += int(ok)

    def health(self) -> dict[str, Any]:
        """The /health document."""
        with self._lock:
            admitted = self._admitted
            return {
                "status": "draining" if self._draining else "ok",
                "running": min(admitted, self.max_concurrency),
                "queued": max(admitted - self.max_concurrency, 0),
                "completed": self._completed,
                "rejected": self._rejected,
                "connections": self.httpd.connections,
                "max_concurrency": self.max_concurrency,
                "max_queue": self.max_queue,
                "max_connections": self.max_connections,
                "limits": self.limits.to_dict(),
                "guards": self.pool.isolation.guards(),
            }

    def start(self) -> "SandboxServer":
        """Serve in a background thread (tests, embedding); returns self."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sandbox-http",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown` (e.g. from a signal handler)."""
        self.httpd.serve_forever()

    def shutdown(self, grace_s: float = 60.0) -> None:
        """Refuse new work, stop accepting, let accepted requests finish (up to ``grace_s``)."""
        with self._lock:
            self._draining = True
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._lock:
                if self._admitted == 0:
                    break
            time.sleep(0.05)
        self.httpd.shutdown()  # returns once serve_forever has stopped
        self.httpd.server_close()  # joins the handler threads
        self.pool.close()
        if self._thread is not None:
            self._thread.join()
        self.stopped.set()


def _parser() -> argparse.ArgumentParser:
    d = SandboxLimits()
    p = argparse.ArgumentParser(
        prog="python -m megatron_alp.sandbox.serve",
        description="HTTP service that runs untrusted Python under bubblewrap (docs/sandbox.md).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    p.add_argument("--concurrency", type=int, default=8, help="programs run at once")
    p.add_argument("--queue", type=int, default=256, help="requests that may wait; then 503")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest /run body")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="a request must be fully received within this; then 408")
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections served at once; beyond, 503 (default: concurrency + "
                        "queue + 16)")
    p.add_argument("--cgroup", default="auto",
                   help="where per-run memory cgroups go: auto, off, or a directory "
                        "(docs/sandbox.md, 'Memory')")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="on SIGTERM, how long accepted requests may take to finish")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="wall-clock limit per run")
    p.add_argument("--cpu-s", type=int, default=d.cpu_s, help="CPU seconds per process")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb, help="address space per process")
    p.add_argument("--max-processes", type=int, default=d.max_processes, help="processes per run")
    p.add_argument("--max-file-mb", type=int, default=d.max_file_mb, help="largest file written")
    p.add_argument("--workdir-mb", type=int, default=d.workdir_mb, help="size of /work and /tmp")
    p.add_argument("--max-output-bytes", type=int, default=d.max_output_bytes,
                   help="bytes kept of stdout and of stderr each")
    p.add_argument("--python", default=None, help="interpreter run inside (default: automatic)")
    p.add_argument("--site-dir", action="append", default=[],
                   help="extra read-only package directory on the sandbox's PYTHONPATH")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM / SIGINT; usage errors exit 2, a missing bwrap 1."""
    p = _parser()
    a = p.parse_args(argv)
    try:
        limits = SandboxLimits(
            timeout_s=a.timeout_s, cpu_s=a.cpu_s, memory_mb=a.memory_mb,
            max_processes=a.max_processes, max_file_mb=a.max_file_mb, workdir_mb=a.workdir_mb,
            max_output_bytes=a.max_output_bytes,
        )
        if a.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {a.concurrency}")
        server = SandboxServer(
            host=a.host, port=a.port, max_concurrency=a.concurrency, max_queue=a.queue,
            max_request_bytes=a.max_request_bytes, request_timeout_s=a.request_timeout_s,
            max_connections=a.max_connections, limits=limits, python=a.python,
            site_dirs=tuple(a.site_dir), cgroup=a.cgroup, verbose=a.verbose,
        )
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except SandboxUnavailable as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # port in use, bad address
        p.exit(2, f"{p.prog}: error: cannot listen on {a.host}:{a.port}: {e}\n")

    def on_signal(signum: int, _frame: object) -> None:
        # shutdown() waits for serve_forever, so it must run outside the serving thread.
        threading.Thread(target=server.shutdown, args=(a.grace_s,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"[sandbox] serving on {server.url} (concurrency {a.concurrency}, queue {a.queue})",
          flush=True)
    server.serve_forever()
    # serve_forever returned: shutdown is under way in its thread; wait for it to finish.
    server.stopped.wait()
    print("[sandbox] stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
