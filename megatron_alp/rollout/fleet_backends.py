"""How the fleet client talks to one engine and to the weight-broadcast group.

Two kinds of engine process, one interface (:class:`Endpoint`):

* :class:`TwinEndpoint` — the CPU twin (``engine_server.py``): JSON over HTTP, weights
  by a gloo broadcast (:class:`GlooSender`);
* :class:`VLLMEndpoint` — ``vllm serve MODEL --worker-extension-cls
  megatron_alp.rollout.vllm_worker.WeightSyncExtension --logprobs-mode
  processed_logprobs`` started with ``VLLM_SERVER_DEV_MODE=1`` (which exposes
  ``/collective_rpc`` and ``/reset_prefix_cache``; vllm 0.10.2
  ``entrypoints/openai/api_server.py``, 0.33 ``entrypoints/serve/dev/``): OpenAI
  ``/v1/completions`` for generation, weights by NCCL (:class:`NcclSender`) into every
  worker of the engine — or, for vLLM's CPU backend (the workers report
  ``transport="gloo"``), by the twin's gloo broadcast, loaded at commit
  (``vllm_worker.commit_weights``).

Transport failures (connection refused or reset, timeouts, HTTP 5xx) raise
:class:`EngineDown` — the client retries elsewhere; HTTP 4xx (a bad request, i.e. a bug
or bad input) raises :class:`EngineError`, which is not retried.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Protocol, Sequence

import torch

from megatron_alp.rollout.base import Completion, SamplingParams, WeightBucket
from megatron_alp.rollout.vllm_support import (
    BucketMeta,
    abort_communicator,
    require_pynccl,
    require_reset,
    wait_for_stream,
)
from megatron_alp.rollout.weight_group import GlooGroup, broadcast_bucket
from megatron_alp.rollout.wire import (
    completion_from_dict,
    completions_from_openai,
    openai_completion_request,
    sampling_to_dict,
)

__all__ = [
    "Endpoint",
    "EngineDown",
    "EngineError",
    "GlooSender",
    "NcclSender",
    "TwinEndpoint",
    "VLLMEndpoint",
    "http_json",
]


class EngineDown(RuntimeError):
    """The engine did not answer (dead, unreachable, timed out, or failed internally)."""


class EngineError(RuntimeError):
    """The engine refused the request (HTTP 4xx): retrying elsewhere would not help."""


def http_json(url: str, body: dict | None = None, *, timeout: float) -> Any:
    """GET (``body`` None) or POST JSON; the decoded answer (None for an empty body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        if 400 <= e.code < 500:
            raise EngineError(f"{url}: HTTP {e.code}: {detail}") from None
        raise EngineDown(f"{url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
            TimeoutError, OSError) as e:
        raise EngineDown(f"{url}: {type(e).__name__}: {e}") from None
    return json.loads(raw) if raw else None


class Endpoint(Protocol):
    """One engine process as the fleet client sees it."""

    url: str

    def health(self, *, timeout: float) -> dict[str, Any]:
        """``{"instance": str | None, "weight_version": int | None}``; raises EngineDown."""
        ...

    def generate(self, rows: Sequence[tuple[int, int, Sequence[int]]], sp: SamplingParams, *,
                 timeout: float) -> tuple[list[Completion], int | None]:
        """Completions of the rows in order, and the weight version that produced them."""
        ...

    def members(self, *, timeout: float) -> int:
        """Processes of this engine that join the weight group (vLLM: TP x PP workers)."""
        ...

    def join(self, *, host: str, port: int, rank: int, world_size: int, epoch: int,
             timeout_s: float) -> None:
        """Join the weight group (blocks until every member has joined)."""
        ...

    def receive_bucket(self, meta: BucketMeta, *, epoch: int, timeout: float) -> None:
        """Receive one bucket by broadcast (blocks until received and loaded)."""
        ...

    def commit(self, version: int, *, epoch: int, timeout: float) -> None:
        """All buckets sent: serve ``version`` from now on (prefix cache reset)."""
        ...

    # Optional: ``capacity(*, timeout) -> int | None``, the completions the engine
    # schedules at once (the client's in-flight cap; the twin says it in /health).


def _prompt_runs(rows: Sequence[tuple[int, int, Sequence[int]]]) -> list[tuple[int, int, list[int], int]]:
    """``rows`` as runs ``(prompt_index, first sample, prompt, n)`` of consecutive samples
    of one prompt, in order."""
    runs: list[tuple[int, int, list[int], int]] = []
    for i, j, p in rows:
        if runs and runs[-1][0] == i and runs[-1][1] + runs[-1][3] == j and runs[-1][2] == list(p):
            i0, j0, p0, n = runs[-1]
            runs[-1] = (i0, j0, p0, n + 1)
        else:
            runs.append((i, j, list(p), 1))
    return runs


def _meta_body(meta: BucketMeta) -> dict[str, Any]:
    return dict(names=list(meta.names), dtypes=list(meta.dtypes), shapes=[list(s) for s in meta.shapes])


class TwinEndpoint:
    """A CPU twin engine (``engine_server.py``) at ``url``."""

    kind = "twin"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def health(self, *, timeout: float) -> dict[str, Any]:
        ans = http_json(self.url + "/health", timeout=timeout)
        if not isinstance(ans, dict) or "instance" not in ans:
            # vllm serve answers /health with an empty 200: the wrong backend was chosen.
            raise EngineError(f"{self.url}/health answered {ans!r}, not a CPU twin engine's "
                              "status (a vllm serve engine? use backend='vllm', "
                              "--rl-fleet-backend vllm)")
        return ans

    def generate(self, rows, sp, *, timeout):
        body = dict(rows=[[i, j, list(p)] for i, j, p in rows], sampling=sampling_to_dict(sp))
        ans = http_json(self.url + "/generate", body, timeout=timeout)
        return [completion_from_dict(r) for r in ans["completions"]], int(ans["weight_version"])

    def members(self, *, timeout: float) -> int:
        return 1

    def join(self, *, host, port, rank, world_size, epoch, timeout_s):
        http_json(self.url + "/weights/join", dict(host=host, port=port, rank=rank,
                  world_size=world_size, epoch=epoch, timeout_s=timeout_s), timeout=timeout_s + 30)

    def receive_bucket(self, meta, *, epoch, timeout):
        http_json(self.url + "/weights/bucket", dict(epoch=epoch, **_meta_body(meta)), timeout=timeout)

    def commit(self, version, *, epoch, timeout):
        http_json(self.url + "/weights/commit", dict(epoch=epoch, version=version), timeout=timeout)

    def digest(self, *, timeout: float = 60) -> dict[str, str]:
        """sha256 per parameter (tests: engine weights equal the sender's)."""
        return http_json(self.url + "/weights/digest", timeout=timeout)


class VLLMEndpoint:
    """A ``vllm serve`` engine at ``url`` serving ``model`` (the served model name).

    ``model`` None leaves the request's ``model`` out, which vLLM answers with the model
    it serves (vllm 0.10.2 ``serving_engine.py`` / 0.33 ``serve/engine/serving.py``
    ``_is_model_supported``: an empty name is accepted): the trainer knows the policy's
    HF folder, but not necessarily the exact string each ``vllm serve`` was started with.
    """

    kind = "vllm"

    def __init__(self, url: str, model: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.transport: str | None = None  # "nccl" (GPU workers) / "gloo" (CPU), from health()

    def health(self, *, timeout: float) -> dict[str, Any]:
        # vLLM has no weight version (the client tracks it) and no instance id: the
        # workers' process identities stand for one (vllm_worker.weight_sync_info), so an
        # engine restarted between two probes is seen as new — stale weights, outside
        # the weight group — instead of serving checkpoint weights as the current ones.
        http_json(self.url + "/health", timeout=timeout)
        infos = self._rpc("weight_sync_info", [], timeout=timeout)
        ids = sorted(str(r.get("instance")) for r in infos if isinstance(r, dict))
        kinds = {str(r.get("transport", "nccl")) for r in infos if isinstance(r, dict)}
        if len(kinds) > 1:
            raise EngineError(f"{self.url}: its workers take different weight transports {sorted(kinds)}")
        self.transport = kinds.pop() if kinds else None
        return dict(instance=",".join(ids) or None, weight_version=None)

    def generate(self, rows, sp, *, timeout):
        # One request per prompt group (samples j0 .. j0 + n - 1 of one prompt): vLLM
        # schedules its n samples together on this engine, sharing the cached prompt
        # (issue 17, defect 14). The fleet sends one group a request by default; more
        # groups in one request (rows_per_request) are sent one after another.
        out = []
        for i, j0, prompt, n in _prompt_runs(rows):
            ans = http_json(self.url + "/v1/completions",
                            openai_completion_request(self.model, prompt, sp, i, j0, n), timeout=timeout)
            out.extend(completions_from_openai(ans, i, j0, n))
        return out, None

    def capacity(self, *, timeout: float) -> int | None:
        """Sequences this engine's scheduler runs at once (``max_num_seqs``, or 0.33's
        lower ``max_num_active_seqs``), asked of its workers (``scheduler_limits``)."""
        infos = self._rpc("scheduler_limits", [], timeout=timeout)
        counts = []
        for r in infos:
            if isinstance(r, dict):
                counts += [int(str(v)) for k, v in r.items()
                           if k in ("max_num_seqs", "max_num_active_seqs") and v not in (None, "None")]
        return min(counts) if counts else None

    def _rpc(self, method: str, args: list[Any], *, timeout: float) -> list[Any]:
        # Arguments are plain JSON values (the server hands them to msgpack unchanged).
        try:
            ans = http_json(self.url + "/collective_rpc",
                            dict(method=method, args=args, timeout=timeout), timeout=timeout + 30)
        except EngineError as e:
            if "HTTP 404" in str(e):  # the dev endpoints exist only in dev mode
                raise EngineError(f"{e}; start vllm serve with VLLM_SERVER_DEV_MODE=1 (fleet_launch "
                                  "does) for /collective_rpc and /reset_prefix_cache") from None
            raise
        return (ans or {}).get("results", [])

    def members(self, *, timeout: float) -> int:
        return len(self._rpc("weight_sync_info", [], timeout=timeout))

    def join(self, *, host, port, rank, world_size, epoch, timeout_s):
        self._rpc("init_weight_sync", [host, port, rank, world_size, int(timeout_s)], timeout=timeout_s)

    def receive_bucket(self, meta, *, epoch, timeout):
        m = _meta_body(meta)
        self._rpc("receive_bucket", [m["names"], m["dtypes"], m["shapes"], float(timeout)],
                  timeout=timeout)

    def commit(self, version, *, epoch, timeout, retry_s: float = 20.0):
        # 0.33 answers {"success": bool}; 0.10.2 an empty 200 (its reset is unchecked).
        # False means blocks are still held (a request the client gave up on is still
        # running, an async KV transfer is in flight): vllm 0.33 serve/dev/cache/
        # api_router.py says "callers may retry". Still False after retry_s: the engine
        # is reported down (EngineDown), so it is marked stale and serves nothing until a
        # later sync succeeds, instead of the whole update failing with RuntimeError.
        # CPU workers load everything they buffered now (one reload_weights: whole
        # layers); GPU workers loaded each bucket as it came (nothing to do).
        if self.transport == "gloo":
            self._rpc("commit_weights", [], timeout=timeout)
        deadline = time.monotonic() + retry_s
        while True:
            ans = http_json(self.url + "/reset_prefix_cache", {}, timeout=timeout)
            try:
                require_reset(ans.get("success") if isinstance(ans, dict) else None, self.url)
                return
            except RuntimeError as e:
                if time.monotonic() >= deadline:
                    raise EngineDown(str(e)) from None
            time.sleep(0.5)


class GlooSender:
    """Rank 0 of the twin's gloo weight group (hosts the store on ``host:port``)."""

    def __init__(self, host: str, port: int, world_size: int, *, timeout_s: float) -> None:
        self.group = GlooGroup(host, port, 0, world_size, timeout_s=timeout_s)

    def connect(self) -> None:
        self.group.connect()

    def send(self, bucket: WeightBucket) -> None:
        broadcast_bucket(self.group, bucket)

    def close(self) -> None:
        self.group = None  # type: ignore[assignment]


class NcclSender:
    """Rank 0 of a vLLM fleet's NCCL weight group, on this process's current GPU
    (the engines run on other GPUs: their own processes, their own devices)."""

    def __init__(self, host: str, port: int, world_size: int, *, timeout_s: float) -> None:
        # Imported here, before any engine is asked to join: a trainer environment
        # without vLLM fails at once, not after the engines' rendezvous timeout.
        try:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
        except ImportError as e:
            raise ImportError(
                f"the vLLM fleet's weight sender runs in the trainer and needs vLLM there ({e}): "
                "pip install 'megatron-alp[vllm]' in the trainer's environment, the same vLLM "
                "version as the engines'"
            ) from None
        self._classes = (PyNcclCommunicator, StatelessProcessGroup)
        self.args = (host, port, world_size, timeout_s)
        self.comm: Any = None

    def connect(self) -> None:
        PyNcclCommunicator, StatelessProcessGroup = self._classes
        host, port, world, timeout_s = self.args
        pg = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world,
                                          store_timeout=int(timeout_s))
        self.comm = PyNcclCommunicator(pg, device=torch.cuda.current_device())
        require_pynccl(self.comm, "fleet weight sender")

    def send(self, bucket: WeightBucket) -> None:
        if self.comm is None:
            raise RuntimeError("fleet weight sender: not connected (or a previous broadcast "
                               "timed out and the group was aborted)")
        stream = torch.cuda.current_stream()
        dev = torch.device("cuda", torch.cuda.current_device())
        for _, t in bucket:
            self.comm.broadcast(t.detach().to(dev).contiguous(), src=0, stream=stream)
        # Bounded: a member that died mid-bucket would make synchronize() hang forever.
        comm, self.comm = self.comm, None
        wait_for_stream(stream, self.args[3], comm, "fleet weight sender")
        self.comm = comm

    def close(self) -> None:
        """Abort the communicator: a dropped PyNcclCommunicator is never destroyed by
        vLLM 0.10.2, and each epoch's would keep its NCCL buffers on the GPU."""
        comm, self.comm = self.comm, None
        if comm is not None:
            abort_communicator(comm)
