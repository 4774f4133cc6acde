"""``SandboxClient``: the trainer's side of the sandbox HTTP service (``serve.py``).

Same interface as :class:`~megatron_alp.sandbox.pool.SandboxPool` (``run``, ``run_batch``),
so rollout code takes either. A 503 (the service's queue is full) or a refused connection
is retried with exponential backoff (honouring ``Retry-After``) until ``retry_for_s``; a run
is *not* retried after the service accepted it, so a program is never executed twice by
the client.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.parse
from typing import Any, Sequence

from megatron_alp.sandbox.types import SandboxLimits, SandboxResult

__all__ = ["SandboxClient", "SandboxClientGroup", "SandboxServiceError", "sandbox_client"]


class SandboxServiceError(RuntimeError):
    """The service answered with an error (bad request, too large, server error)."""


class SandboxClient:
    """Client of ``python -m megatron_alp.sandbox.serve`` at ``url`` (``http://host:port``).

    ``max_concurrency`` bounds this client's requests in flight (``run_batch``);
    ``request_timeout_s`` bounds one HTTP exchange (it must exceed the run's wall-clock
    limit plus queueing); ``retry_for_s`` bounds how long a 503 / refused connection is
    retried.
    """

    def __init__(
        self,
        url: str,
        *,
        max_concurrency: int = 8,
        request_timeout_s: float = 300.0,
        retry_for_s: float = 120.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"sandbox url must look like http://HOST:PORT, got {url!r}")
        if max_concurrency < 1:
            raise ValueError(f"SandboxClient max_concurrency must be >= 1, got {max_concurrency}")
        self.host, self.port = parts.hostname, parts.port
        self.request_timeout_s = request_timeout_s
        self.retry_for_s = retry_for_s
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="sandbox-client"
        )

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        end = time.monotonic() + self.retry_for_s
        delay = 0.05
        while True:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.request_timeout_s)
            try:
                headers = {"Content-Type": "application/json"} if data is not None else {}
                try:
                    conn.request(method, path, body=data, headers=headers)
                except (ConnectionRefusedError, ConnectionResetError) as e:
                    # Not accepted: the program did not start; safe to retry.
                    retry_after, err = None, e
                else:
                    resp = conn.getresponse()
                    payload = resp.read()
                    if resp.status == 503:
                        ra = resp.getheader("Retry-After")
                        retry_after = float(ra) if ra else None
                        err = SandboxServiceError(f"503 from sandbox service: {payload[:200]!r}")
                    elif resp.status != 200:
                        raise SandboxServiceError(
                            f"sandbox service {method} {path} -> {resp.status}: "
                            f"{payload[:500].decode('utf-8', 'replace')}"
                        )
                    else:
                        return json.loads(payload)
            finally:
                conn.close()
            if time.monotonic() > end:
                raise SandboxServiceError(
                    f"sandbox service at {self.host}:{self.port} busy or down for "
                    f"{self.retry_for_s:.0f} s: {err}"
                )
            time.sleep(min(retry_after if retry_after is not None else delay, 5.0))
            delay = min(delay * 2, 2.0)

    def health(self) -> dict[str, Any]:
        """The service's ``/health`` document."""
        return self._request("GET", "/health", None)

    def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        """Run one program on the service (blocking)."""
        body: dict[str, Any] = {"code": code}
        if limits is not None:
            body["limits"] = limits.to_dict()
        return SandboxResult.from_dict(self._request("POST", "/run", body))

    def run_batch(
        self, codes: Sequence[str], limits: SandboxLimits | None = None
    ) -> list[SandboxResult]:
        """Run many programs, ``max_concurrency`` requests at a time; results in input order."""
        futures = [self._executor.submit(self.run, c, limits) for c in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the client's threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SandboxClientGroup:
    """Several sandbox services (one per node) behind the same ``run`` / ``run_batch``.

    Program ``k`` of a batch goes to service ``k % len(urls)``; each service gets at most
    ``max_concurrency`` requests in flight. Same retry rules as :class:`SandboxClient`.
    """

    def __init__(self, urls: Sequence[str], *, max_concurrency: int = 8, **kw: Any) -> None:
        if not urls:
            raise ValueError("SandboxClientGroup needs at least one url")
        self.clients = [SandboxClient(u, max_concurrency=max_concurrency, **kw) for u in urls]
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency * len(self.clients), thread_name_prefix="sandbox-group"
        )
        self._next = 0

    def health(self) -> list[dict[str, Any]]:
        """Every service's ``/health`` document."""
        return [c.health() for c in self.clients]

    def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        """Run one program on the next service (round robin)."""
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        return client.run(code, limits)

    def run_batch(
        self, codes: Sequence[str], limits: SandboxLimits | None = None
    ) -> list[SandboxResult]:
        """Spread the programs over the services; results in input order."""
        n = len(self.clients)
        futures = [self._executor.submit(self.clients[k % n].run, c, limits) for k, c in enumerate(codes)]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop every client's threads."""
        self._executor.shutdown(wait=True)
        for c in self.clients:
            c.close()

    def __enter__(self) -> "SandboxClientGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sandbox_client(urls: str, *, max_concurrency: int = 8, **kw: Any) -> SandboxClient | SandboxClientGroup:
    """A client for ``http://HOST:PORT`` or a comma-separated list of such URLs (a group)."""
    parts = [u.strip() for u in urls.split(",") if u.strip()]
    if len(parts) == 1:
        return SandboxClient(parts[0], max_concurrency=max_concurrency, **kw)
    return SandboxClientGroup(parts, max_concurrency=max_concurrency, **kw)
