"""``FleetEngine``: one client for a fleet of engine processes (``create_engine("fleet")``).

The trainer's view of many engines on other GPUs and nodes — ``vllm serve`` processes
(``backend="vllm"``) or their CPU twins (``backend="twin"``, ``engine_server.py``):

* **generation**: a generation is cut into requests of whole prompt groups (a prompt's
  ``n`` samples always travel together, so they land on one engine and share its prefix
  cache; ``rows_per_request`` packs several small groups into one request) that are kept
  in flight on every engine at once, up to the engine's capacity in completions
  (``max_in_flight``, else what the engine reports: vLLM's ``max_num_seqs``, the twin's
  batch size), always sent to the engine with the fewest completions outstanding. A
  request that fails (engine dead, unreachable,
  timed out, aborted, or answering with another weight version) goes back to the queue
  and is sent to another engine; each completion (prompt i, sample j) is accepted
  exactly once, so nothing is lost or duplicated. Completions are seeded per (i, j)
  (``completion_seed``), so a retried request draws the same tokens anywhere.
* **weights**: ``update_weights(stream)`` forms (or reuses) one broadcast group of this
  process (rank 0) and every live engine — every worker of a vLLM engine — under an
  *epoch*; a change of membership (an engine died or restarted) forms a new epoch on a
  new port. Per bucket, each engine is told the names/dtypes/shapes and receives the
  tensors by broadcast (gloo for the twin, NCCL for vLLM), then loads them; a final
  commit makes it serve the new weight version (vLLM: prefix cache reset). An engine
  serves generations only while it holds the current version: a restarted engine
  (weights of the checkpoint it loaded) waits for the next sync. Errors name the engine.

Without ``endpoints``, the client starts its own single-node fleet of ``num_engines``
processes (``fleet_launch.LocalFleet``) from ``model`` and stops it in :meth:`close`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Sequence

import torch

from megatron_alp.rollout.base import (
    Completion,
    SamplingParams,
    WeightBucket,
    check_ratio_sampling,
    register_engine,
)
from megatron_alp.rollout.fleet_backends import (
    EngineDown,
    EngineError,
    GlooSender,
    NcclSender,
    TwinEndpoint,
    VLLMEndpoint,
)
from megatron_alp.rollout.vllm_support import bucket_meta

__all__ = ["FleetEngine", "FleetError", "check_sync_host", "own_address", "trainer_gpus"]

BACKENDS = ("twin", "vllm")
DEFAULT_CAPACITY = {"twin": 64, "vllm": 256}
"""Completions kept in flight on an engine that does not say (the twin's default
``--max-batch-size``; vLLM's ``max_num_seqs`` default off H100/H200-class GPUs, vllm
0.33 ``engine/arg_utils.py`` ``get_batch_defaults``)."""
MAX_CLIENT_THREADS = 4096
"""Requests on the wire at once over the whole fleet (one client thread each); more
wait in the client until a thread is free."""


class FleetError(RuntimeError):
    """The fleet could not serve a request (no engine left, too many failures, a sync failed)."""


@dataclasses.dataclass
class _EngineState:
    endpoint: Any
    up: bool = True
    instance: str | None = None
    version: int | None = 0
    in_flight: int = 0  # completions (sequences) outstanding on this engine
    capacity: int | None = None  # completions it may hold at once (None: not asked yet)
    served: int = 0
    failures: int = 0
    last_error: str = ""
    stale: bool = False  # seen down: until the next sync its weights are not trusted


def trainer_gpus(environ: dict[str, str] | None = None, current: int | None = None) -> list[int]:
    """GPU indices (this process's view) that a locally started vLLM fleet must not use.

    The trainer's ranks on this node use ``cuda:<LOCAL_RANK>`` (``platform.device``), so
    indices ``0 .. LOCAL_WORLD_SIZE - 1`` are theirs, plus this process's current GPU (the
    weight sender): an engine there would fail vLLM's free-memory check and NCCL's
    "Duplicate GPU detected" (issue 10, defect 1).
    """
    import os

    env = os.environ if environ is None else environ
    try:
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE={env.get('LOCAL_WORLD_SIZE')!r} is not an integer") from None
    if current is None:
        import torch

        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return sorted(set(range(max(local, 1))) | {int(current)})


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def check_sync_host(sync_host: str, endpoints: Sequence[str]) -> None:
    """Refuse a loopback ``sync_host`` when an engine runs on another machine.

    The weight group's rendezvous listens on ``sync_host`` (vLLM's
    ``StatelessProcessGroup.create`` binds it); an engine elsewhere would try its *own*
    127.0.0.1 and fail only after the rendezvous timeout (``--rl-fleet-sync-host``)."""
    import ipaddress
    from urllib.parse import urlsplit

    if not all(ipaddress.ip_address(a).is_loopback for a in _addresses(sync_host) or {"0.0.0.0"}):
        return
    local = _addresses(socket.gethostname()) | {"127.0.0.1", "::1"}
    for url in endpoints:
        host = urlsplit(url).hostname or ""
        addrs = _addresses(host)
        if addrs and not any(ipaddress.ip_address(a).is_loopback or a in local for a in addrs):
            raise ValueError(
                f"fleet engine {url} runs on another machine but sync_host={sync_host!r} is a "
                "loopback address it cannot reach: give this trainer's address as the engines "
                "see it (--rl-fleet-sync-host)"
            )


def group_units(rows: list, n: int, rows_per_request: int) -> list[list]:
    """Cut ``rows`` (prompt-major, ``n`` samples a prompt) into requests of whole prompt
    groups: as many groups as fit in ``rows_per_request`` completions, at least one.

    A prompt's samples are never split over requests, so they reach one engine and its
    prefix cache computes the prompt once (issue 17, defect 14: one completion a request
    spread a group over every engine, and each engine prefilled the prompt again)."""
    per = max(1, rows_per_request // max(n, 1)) * max(n, 1)
    return [rows[s : s + per] for s in range(0, len(rows), per)]


def own_address(endpoints: Sequence[str]) -> str:
    """This machine's address as the engines at ``endpoints`` reach it (``sync_host="auto"``).

    127.0.0.1 when every engine runs on this machine (or none is given: a local fleet);
    otherwise the address of the interface that routes to the first remote engine (a UDP
    ``connect`` picks it and sends nothing), or this host's FQDN if there is no route.
    Call it on the process that sends the weights (the trainer's rank 0): under torchrun
    that need not be the first node of the allocation (its c10d rendezvous ranks nodes by
    sorted FQDN).
    """
    from urllib.parse import urlsplit

    local = _addresses(socket.gethostname()) | {"127.0.0.1", "::1"}
    for url in endpoints:
        parts = urlsplit(url)
        addrs = sorted(_addresses(parts.hostname or ""), key=lambda a: ":" in a)  # IPv4 first
        if not addrs or all(_is_loopback(a) or a in local for a in addrs):
            continue
        family = socket.AF_INET6 if ":" in addrs[0] else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((addrs[0], parts.port or 80))
                return s.getsockname()[0]
        except OSError:
            return socket.getfqdn()
    return "127.0.0.1"


def _is_loopback(addr: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(addr.split("%")[0]).is_loopback


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@register_engine("fleet")
class FleetEngine:
    """Client of a fleet of engine processes (see the module docstring).

    ``endpoints``: engine base URLs (``http://host:port``) or ready ``Endpoint`` objects
    (``fleet_backends.Endpoint``); None starts a local fleet of
    ``num_engines`` from ``model`` (an HF folder, config or model; saved to a temporary
    folder if not a folder) with ``dtype``. ``sync_host`` is this process's address as
    the engines reach it (``"auto"``: :func:`own_address`); ``sync_port`` the first rendezvous port (epoch e uses
    ``sync_port + e``; None picks free ports). A request is tried at most ``max_attempts``
    times (on other engines first). ``max_in_flight``: completions (sequences) kept in
    flight per engine; None asks each engine once per start — vLLM's ``max_num_seqs``
    (1024 on an H100 by default in 0.33), the twin's ``--max-batch-size`` — falling back
    to ``DEFAULT_CAPACITY``. ``rows_per_request``: completions per request, rounded to
    whole prompt groups (default 16 for the twin; 1, i.e. one prompt's group, for vLLM,
    which serves a group as one ``n``-sample request). ``allow_truncation`` lets top-p / top-k
    through (see ``check_ratio_sampling``). ``served_model_name`` (vLLM) is sent as the
    request's ``model``; None lets each server answer with the model it serves. A local
    vLLM fleet never takes the trainer's GPUs (:func:`trainer_gpus`) unless
    ``launch_kwargs["reserve_gpus"]`` says otherwise. Engines that do not answer yet are
    waited for up to ``startup_wait_s`` (a ``vllm serve`` takes minutes to come up).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | None = None,
        *,
        backend: str = "twin",
        model: Any = None,
        num_engines: int = 2,
        dtype: str = "bfloat16",
        served_model_name: str | None = None,
        sync_host: str = "127.0.0.1",
        sync_port: int | None = None,
        request_timeout_s: float = 600.0,
        sync_timeout_s: float = 300.0,
        health_timeout_s: float = 10.0,
        max_in_flight: int | None = None,
        rows_per_request: int | None = None,
        max_attempts: int = 4,
        allow_truncation: bool = False,
        launch_kwargs: dict[str, Any] | None = None,
        startup_wait_s: float = 900.0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"fleet backend {backend!r} is not one of {BACKENDS}")
        for name, v in (("max_in_flight", max_in_flight), ("max_attempts", max_attempts),
                        ("num_engines", num_engines), ("rows_per_request", rows_per_request)):
            if v is not None and v < 1:
                raise ValueError(f"fleet {name} must be >= 1, got {v}")
        self.backend = backend
        self.model_dir = model if isinstance(model, str) else None  # verify_weights' reference
        self.fleet: Any = None
        self._tmp: Any = None
        if endpoints is None:
            if model is None:
                raise ValueError("fleet engine: give endpoints=[...] or model=... to launch a local fleet")
            from megatron_alp.rollout.fleet_launch import LocalFleet

            path = self._model_folder(model)
            self.model_dir = path
            launch = dict(launch_kwargs or {})
            if backend == "vllm" and "reserve_gpus" not in launch:
                launch["reserve_gpus"] = trainer_gpus()
            self.fleet = LocalFleet(num_engines, model=path, backend=backend, dtype=dtype, **launch)
            endpoints = self.fleet.endpoints
            served_model_name = served_model_name or path
        if not endpoints:
            raise ValueError("fleet engine: endpoints is empty")
        urls = [u for u in endpoints if isinstance(u, str)]
        if sync_host == "auto":
            sync_host = own_address(urls)
        check_sync_host(sync_host, urls)
        eps = [u if not isinstance(u, str) else
               TwinEndpoint(u) if backend == "twin" else VLLMEndpoint(u, served_model_name)
               for u in endpoints]  # objects: ready Endpoint implementations
        self.engines = [_EngineState(ep) for ep in eps]
        self.sync_host, self.sync_port = sync_host, sync_port
        self.request_timeout_s, self.sync_timeout_s = request_timeout_s, sync_timeout_s
        self.health_timeout_s = health_timeout_s
        self.max_in_flight, self.max_attempts = max_in_flight, max_attempts
        self.rows_per_request = rows_per_request or (16 if backend == "twin" else 1)
        self.allow_truncation = allow_truncation
        self.version = 0
        self.epoch = -1
        self._members: tuple = ()
        self._sender: Any = None
        self._sender_cls: Any = GlooSender if backend == "twin" else NcclSender
        self.stats = dict(requests=0, retries=0, engine_failures=0, syncs=0, epochs=0)
        self._lock = threading.Lock()
        self._sched = threading.Lock()  # engine picks and in-flight counts (several callers)
        # Threads start as requests need them: at most one per request in flight.
        self._pool = cf.ThreadPoolExecutor(
            max_workers=min(MAX_CLIENT_THREADS, max(16, len(self.engines) * (max_in_flight or 1024))),
            thread_name_prefix="fleet")
        self.refresh()
        self._await_engines(startup_wait_s)

    def _model_folder(self, model: Any) -> str:
        if isinstance(model, str):
            return model
        from transformers import AutoModelForCausalLM, PretrainedConfig

        self._tmp = tempfile.TemporaryDirectory(prefix="fleet-model-")
        hf = AutoModelForCausalLM.from_config(model) if isinstance(model, PretrainedConfig) else model
        hf.save_pretrained(self._tmp.name)
        return self._tmp.name

    # -- engine health -------------------------------------------------------------------
    def refresh(self) -> None:
        """Ask every engine whether it is up, which instance it is and its weight version
        (and restart the engines of a local fleet that exited: ``LocalFleet.supervise``)."""
        if self.fleet is not None:
            for line in self.fleet.supervise():
                print(f"[fleet] {line}", file=sys.stderr, flush=True)
        def probe(st: _EngineState) -> None:
            try:
                h = st.endpoint.health(timeout=self.health_timeout_s)
            except (EngineDown, EngineError) as e:
                self._mark_down(st, str(e))
                return
            if st.instance is not None and h.get("instance") not in (None, st.instance):
                st.stale = True  # restarted: a new process with the checkpoint's weights
                st.capacity = None  # perhaps started with other settings
            st.instance = h.get("instance")
            if st.capacity is None:
                st.capacity = self._capacity(st, h)
            if h.get("weight_version") is not None:
                st.version = int(h["weight_version"])
            st.up = True

        list(self._pool.map(probe, self.engines))

    def _capacity(self, st: _EngineState, health: dict[str, Any]) -> int:
        """Completions engine ``st`` may hold at once: ``max_in_flight`` if given, else
        what the engine reports (its ``/health``, or ``Endpoint.capacity``), else the
        backend's default. The old fixed cap of 64 requests starved vLLM 0.33, which
        schedules up to ``max_num_seqs`` sequences per step (issue 17, defect 14)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        said = health.get("max_num_seqs")
        if said is None and hasattr(st.endpoint, "capacity"):
            try:
                said = st.endpoint.capacity(timeout=self.health_timeout_s)
            except (EngineDown, EngineError, ValueError, TypeError) as e:
                print(f"[fleet] {st.endpoint.url} did not say how many sequences it schedules "
                      f"({e}); keeping {DEFAULT_CAPACITY[self.backend]} in flight",
                      file=sys.stderr, flush=True)
        try:
            n = int(said) if said is not None else 0
        except (TypeError, ValueError):
            n = 0
        return n if n >= 1 else DEFAULT_CAPACITY[self.backend]

    def _await_engines(self, wait_s: float) -> None:
        """Give engines that are still starting up to ``wait_s`` to answer.

        ``examples/`` start ``fleet_launch`` and the trainer side by side; ``vllm serve``
        answers ``/health`` only after loading the model and capturing CUDA graphs
        (minutes), and the trainer's first ``update_weights`` used to find no engine up
        and fail. Engines still down after ``wait_s`` are left to the usual handling
        (down; they join a later sync when they come up)."""
        deadline = time.monotonic() + wait_s
        said = False
        while not all(st.up for st in self.engines) and time.monotonic() < deadline:
            if not said:
                down = [st.endpoint.url for st in self.engines if not st.up]
                print(f"[fleet] waiting up to {wait_s:.0f} s for {len(down)} engine(s) to "
                      f"start: {', '.join(down)}", file=sys.stderr, flush=True)
                said = True
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            self.refresh()

    def _mark_down(self, st: _EngineState, why: str) -> None:
        with self._lock:
            if st.up:
                self.stats["engine_failures"] += 1
            st.up, st.stale, st.last_error = False, True, why
            st.failures += 1

    def _serving(self, st: _EngineState) -> bool:
        # The twin reports its version; a vLLM engine's is what the last commit set.
        return st.up and not st.stale and st.version == self.version

    # -- generation ----------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """n completions per prompt, ordered by (prompt_index, sample_index)."""
        check_ratio_sampling(sampling, allow_truncation=self.allow_truncation)
        for i, p in enumerate(prompt_token_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        rows = [(i, j, list(p)) for i, p in enumerate(prompt_token_ids) for j in range(sampling.n)]
        self.refresh()
        done = self._serve(rows, sampling, any_version=False)
        return [done[(i, j)][0] for i, j, _ in rows]

    def generate_rows(
        self, rows: Sequence[tuple[int, int, Sequence[int]]], sampling: SamplingParams
    ) -> list[tuple[Completion, int]]:
        """One completion per row ``(prompt_index, sample_index, prompt_ids)`` in row order,
        each with the fleet weight version that produced it (asynchronous rollouts,
        ``megatron_alp.train.async_rollouts``). Unlike :meth:`generate`, an answer made
        under an earlier version than the client's is accepted and labelled with it:
        weights may be pushed while these rows are decoded (an in-flight update). Thread
        safe: several threads may call it while another runs :meth:`update_weights`.
        Only engines that report their version (the twin) can label completions."""
        if self.backend != "twin":
            raise FleetError("fleet: versioned generation (asynchronous rollouts) needs engines "
                             f"that report their weight version; the {self.backend!r} backend does not")
        check_ratio_sampling(sampling, allow_truncation=self.allow_truncation)
        rows = [(int(i), int(j), list(p)) for i, j, p in rows]
        done = self._serve(rows, sampling, any_version=True)
        return [done[(i, j)] for i, j, _ in rows]

    def _serve(self, rows: list, sampling: SamplingParams, *, any_version: bool) -> dict:
        """Send ``rows`` as requests of whole prompt groups until every row is answered once;
        ``{(i, j): (Completion, version)}``."""
        queue = [(unit, ()) for unit in group_units(rows, sampling.n, self.rows_per_request)]
        done: dict[tuple[int, int], tuple[Completion, int]] = {}
        running: dict[cf.Future, tuple[_EngineState, list, tuple]] = {}
        while queue or running:
            while queue:
                unit, failed_on = queue[0]
                with self._sched:  # callers in several threads share the engines' counts
                    st = self._pick(len(unit), avoid=failed_on)
                    if st is None:
                        break
                    st.in_flight += len(unit)
                    self.stats["requests"] += 1
                queue.pop(0)
                fut = self._pool.submit(st.endpoint.generate, unit, sampling,
                                        timeout=self.request_timeout_s)
                running[fut] = (st, unit, failed_on)
            if not running:
                self._no_engine()  # raises unless an engine came back
                continue
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                st, unit, failed_on = running.pop(fut)
                with self._sched:
                    st.in_flight -= len(unit)
                why = self._accept(st, unit, fut, done, any_version=any_version)
                if why is None:
                    continue
                failed_on = failed_on + (id(st),)
                if len(failed_on) >= self.max_attempts:
                    raise FleetError(f"fleet: a request of prompt {unit[0][0]} failed "
                                     f"{len(failed_on)} times; last: {why}")
                with self._sched:
                    self.stats["retries"] += 1
                queue.insert(0, (unit, failed_on))  # retried first: the rollout's tail is short
        missing = [(i, j) for i, j, _ in rows if (i, j) not in done]
        assert not missing and len(done) == len(rows), missing[:4]
        return done

    def _pick(self, size: int, avoid: tuple = ()) -> _EngineState | None:
        """The serving engine with the fewest completions in flight that has room for
        ``size`` more (an idle engine always has: a group larger than the capacity still
        goes out, whole), preferring engines that have not failed this request before."""
        def room(st: _EngineState) -> bool:
            cap = st.capacity or DEFAULT_CAPACITY[self.backend]
            return st.in_flight == 0 or st.in_flight + size <= cap

        ok = [st for st in self.engines if self._serving(st) and room(st)]
        if not ok:
            return None
        fresh = [st for st in ok if id(st) not in avoid]
        if not fresh and any(id(st) not in avoid and self._serving(st) for st in self.engines):
            return None  # a fresh engine is busy: wait for it rather than repeat a failure
        return min(fresh or ok, key=lambda st: (st.in_flight, st.served))

    def _accept(self, st: _EngineState, unit: list, fut: cf.Future, done: dict, *,
                any_version: bool = False) -> str | None:
        """Store a finished request's completions; the reason it must be retried, or None."""
        try:
            comps, version = fut.result()
        except EngineError as e:
            raise FleetError(f"fleet: engine {st.endpoint.url} refused a request: {e}") from None
        except EngineDown as e:
            self._mark_down(st, str(e))
            return str(e)
        if version is not None and version != self.version and not any_version:
            st.version = version
            return f"{st.endpoint.url} answered with weight version {version}, expected {self.version}"
        keys = [(i, j) for i, j, _ in unit]
        if [(c.prompt_index, c.sample_index) for c in comps] != keys:
            return f"{st.endpoint.url} answered other completions than asked"
        bad = [c for c in comps if c.finish_reason not in ("stop", "length")]
        if bad:  # vLLM aborted them (e.g. the engine is shutting down): retry, never "stop"
            return f"{st.endpoint.url}: completion {keys[0]} finished with {bad[0].finish_reason!r}"
        for c in comps:  # exactly once: a unit is only ever accepted from one answer
            assert (c.prompt_index, c.sample_index) not in done
            done[(c.prompt_index, c.sample_index)] = (c, self.version if version is None else version)
        st.served += len(comps)
        return None

    def _no_engine(self) -> None:
        for _ in range(3):  # a probe racing a commit may have read the version before it
            time.sleep(0.5)
            self.refresh()
            if any(self._serving(st) for st in self.engines):
                return
        lines = [f"{st.endpoint.url}: " + ("down: " + st.last_error if not st.up else
                 f"holds weight version {st.version}, current is {self.version}"
                 + (" (restarted or failed: waits for the next update_weights)" if st.stale else ""))
                 for st in self.engines]
        raise FleetError("fleet: no engine can serve the current weights:\n  " + "\n  ".join(lines))

    def busy_seconds(self) -> tuple[float, int] | None:
        """(seconds the engines spent decoding since they started, summed; engines that
        said), from each twin's ``/health`` (``busy_s``): the engines' idle fraction is
        measured from its growth. None when no engine reports it (vLLM)."""
        total, n = 0.0, 0
        for st in self.engines:
            try:
                h = st.endpoint.health(timeout=self.health_timeout_s)
            except (EngineDown, EngineError):
                continue
            if h.get("busy_s") is not None:
                total += float(h["busy_s"])
                n += 1
        return (total, n) if n else None

    # -- weights -------------------------------------------------------------------------
    def update_weights(self, stream: Iterable[WeightBucket]) -> dict[str, Any]:
        """Broadcast every bucket to every live engine; then they serve the new version."""
        t0 = time.perf_counter()
        self.refresh()
        live = [st for st in self.engines if st.up]
        it = iter(stream)
        try:
            if not live:
                raise FleetError("fleet: no engine is up to receive weights: " + "; ".join(
                    f"{st.endpoint.url}: {st.last_error}" for st in self.engines))
            live = self._ensure_group(live)
            target = self.version + 1
            n_bytes = n_buckets = 0
            for bucket in it:
                if not bucket:
                    continue
                meta = bucket_meta(bucket)
                self._collective(live, lambda st: st.endpoint.receive_bucket(
                    meta, epoch=self.epoch, timeout=self.sync_timeout_s),
                    alongside=lambda: self._sender.send(bucket), what=f"bucket {n_buckets}")
                n_bytes += meta.nbytes
                n_buckets += 1
            self._collective(live, lambda st: st.endpoint.commit(
                target, epoch=self.epoch, timeout=self.sync_timeout_s), what="commit")
        except BaseException:
            self._drop_sender()  # a failed sync re-forms the group
            self._members = ()
            # The stream is usually a collective export: the trainer's other ranks are
            # iterating it in lockstep, so exhaust it before raising (nothing hangs).
            for _ in it:
                pass
            raise
        self.version = target
        for st in live:
            st.version, st.stale = target, False
        self.stats["syncs"] += 1
        return dict(engines=len(live), buckets=n_buckets, bytes=n_bytes,
                    seconds=time.perf_counter() - t0, epoch=self.epoch)

    def verify_weights(self, buckets: Iterable[WeightBucket]) -> dict[str, float]:
        """``--rl-verify-model-weights-swap``: every engine that serves the current version
        holds the weights in ``buckets`` (the last sync's). Twins: sha256 per tensor.
        vLLM engines hide their parameters (CPU build) or shard and fuse them, so each
        engine's log-probs on a fixed probe batch are compared with an HF model holding
        the weights sent (``probe.py``). Returns the worst difference per engine URL
        (0.0 for an exact twin match); raises ``RuntimeError`` naming the engine."""
        buckets = list(buckets)
        serving = [st for st in self.engines if self._serving(st)]
        if not serving:
            raise RuntimeError("--rl-verify-model-weights-swap: no engine serves the current weights")
        out: dict[str, float] = {}
        if self.backend == "twin":
            import hashlib

            want = {n: hashlib.sha256(t.detach().to("cpu").contiguous().view(torch.uint8).numpy()
                                      .tobytes()).hexdigest() for b in buckets for n, t in b}
            for st in serving:
                got = st.endpoint.digest(timeout=self.sync_timeout_s)
                bad = [n for n in want if got.get(n) != want[n]]
                if bad:
                    raise RuntimeError(f"--rl-verify-model-weights-swap: engine {st.endpoint.url}: "
                                       f"{len(bad)} tensors differ from the weights sent, e.g. {bad[:3]}")
                out[st.endpoint.url] = 0.0
            return out
        from megatron_alp.rollout.probe import reference_model, verify_by_probe

        if self.model_dir is None:
            raise RuntimeError("--rl-verify-model-weights-swap: the fleet client was given no "
                               "model folder (model=...) to build the reference from")
        model, dtype = reference_model(self.model_dir, buckets)
        for st in serving:
            def gen(prompts, sp, ep=st.endpoint):
                rows = [(i, 0, p) for i, p in enumerate(prompts)]
                return ep.generate(rows, sp, timeout=self.request_timeout_s)[0]

            out[st.endpoint.url] = verify_by_probe(gen, model, dtype, f"engine {st.endpoint.url}")
        return out

    def _ensure_group(self, live: list[_EngineState]) -> list[_EngineState]:
        """The current group if its members are still the live engines, else a new epoch;
        an engine that fails to join is dropped and the group formed again without it
        (no bucket has been sent yet). Returns the members."""
        while True:
            members = tuple((st.endpoint.url, st.instance) for st in live)
            if members == self._members and self._sender is not None and not any(st.stale for st in live):
                return live
            try:
                self._form_group(live)
                return live
            except FleetError:
                survivors = [st for st in live if st.up]
                if not survivors or len(survivors) == len(live):
                    raise
                live = survivors

    def _form_group(self, live: list[_EngineState]) -> None:
        self.epoch += 1
        self.stats["epochs"] += 1
        port = (self.sync_port + self.epoch) if self.sync_port is not None else _free_port(self.sync_host)
        sizes = self._collective(live, lambda st: st.endpoint.members(timeout=self.sync_timeout_s),
                                 what="member count")
        world = 1 + sum(sizes)
        self._drop_sender()  # the previous epoch's communicator (its GPU buffers) goes
        sender = self._sender_class(live)(self.sync_host, port, world, timeout_s=self.sync_timeout_s)
        offsets = [1 + sum(sizes[:k]) for k in range(len(live))]
        ranks = {id(st): off for st, off in zip(live, offsets)}
        try:
            self._collective(live, lambda st: st.endpoint.join(
                host=self.sync_host, port=port, rank=ranks[id(st)], world_size=world,
                epoch=self.epoch, timeout_s=self.sync_timeout_s),
                alongside=sender.connect, what=f"join epoch {self.epoch}")
        except BaseException:
            sender.close()
            raise
        self._sender = sender
        self._members = tuple((st.endpoint.url, st.instance) for st in live)

    def _sender_class(self, live: list[_EngineState]) -> Any:
        """gloo for twins and for vLLM's CPU backend (its workers say ``transport="gloo"``),
        NCCL for vLLM on GPUs; a group must be one or the other."""
        if self.backend == "twin":
            return self._sender_cls
        kinds = {getattr(st.endpoint, "transport", None) or "nccl" for st in live}
        if len(kinds) > 1:
            raise FleetError("fleet: the engines take different weight transports (GPU and CPU "
                             "engines in one fleet): " + ", ".join(
                                 f"{st.endpoint.url}: {getattr(st.endpoint, 'transport', None)}"
                                 for st in live))
        return GlooSender if kinds == {"gloo"} else self._sender_cls

    def _collective(self, live: list[_EngineState], call: Any, *, alongside: Any = None,
                    what: str) -> list[Any]:
        """``call(st)`` on every engine in threads while ``alongside()`` runs here (the
        sender's half of a collective); errors name the engines that failed."""
        futs = [self._pool.submit(call, st) for st in live]
        side_error: BaseException | None = None
        try:
            if alongside is not None:
                alongside()
        except BaseException as e:  # noqa: BLE001 - reported with the engines' errors
            side_error = e
        results, failed = [], []
        for st, f in zip(live, futs):
            try:
                results.append(f.result(timeout=self.sync_timeout_s + 60))
            except (EngineDown, EngineError, cf.TimeoutError) as e:
                self._mark_down(st, str(e) or type(e).__name__)
                failed.append(f"{st.endpoint.url}: {e or type(e).__name__}")
        if failed or side_error is not None:
            msg = f"fleet weight sync ({what}) failed"
            if failed:
                msg += "; engines that did not answer: " + "; ".join(failed)
            if side_error is not None:
                msg += f"; sender: {type(side_error).__name__}: {side_error}"
            raise FleetError(msg)
        return results

    # -- lifecycle -----------------------------------------------------------------------
    def _drop_sender(self) -> None:
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.close()

    def close(self) -> None:
        """Stop the client's threads and, if it started them, the engine processes."""
        self._drop_sender()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
