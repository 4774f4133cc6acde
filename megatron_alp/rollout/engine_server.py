"""The CPU twin of a fleet engine: ``LocalEngine`` served as its own process.

    python -m megatron_alp.rollout.engine_server --model HF_DIR --port 8100 [--dtype float32]

Same shape as a ``vllm serve`` fleet engine, so the fleet client (``fleet.py``), its
balancing, retries and weight broadcast run for real on a CPU machine:

``GET /health``         ``{"instance", "weight_version", "pid", "max_num_seqs", ...}``
                        (``instance`` is new at every start: the client sees a restart;
                        ``max_num_seqs`` = ``--max-batch-size``)
``POST /generate``      ``{"rows": [[i, j, prompt_ids], ...], "sampling": {...}}`` ->
                        ``{"completions": [[i, j, ids, logprobs, reason], ...],
                        "weight_version": v}``
``POST /weights/join``  ``{"host", "port", "rank", "world_size", "epoch", "timeout_s"}``:
                        join the gloo weight group (``weight_group.py``); blocks until
                        every member has joined
``POST /weights/bucket`` ``{"epoch", "names", "dtypes", "shapes"}``: receive the bucket's
                        tensors by broadcast from rank 0 and load them
``POST /weights/commit`` ``{"epoch", "version"}``: every parameter arrived -> the engine
                        serves weight version ``version``
``GET /weights/digest`` ``{name: sha256 of the tensor's bytes}`` (per-tensor checks)

Generation requests are queued and decoded together by one worker thread (rows of
requests with the same sampling settings share a batch, up to ``--max-batch-size``);
weight loading takes the same lock, so it never interleaves with a decode, and from the
first bucket of an update to its commit no decode starts (an in-flight update: the engine
finishes the batch it is decoding, loads the whole bucket set, then resumes), so every
batch is decoded by exactly one weight version, the one it reports.

``--simulate-tokens-per-s R`` simulates an engine on its own GPU: a decode batch that
made n tokens holds the engine for at least n / R seconds (the CPU sleeps, it does not
compute), so trainer and engines overlap in wall time on a machine whose cores they
share (``benchmarks/async_throughput.py``). ``/health`` reports ``busy_s``, the seconds
spent decoding (simulated time included), from which the client measures idle time. Errors are
answered as HTTP 4xx/5xx with ``{"error": message}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from megatron_alp.rollout.local import LocalEngine
from megatron_alp.rollout.weight_group import GlooGroup, receive_tensors
from megatron_alp.rollout.wire import completion_to_dict, sampling_from_dict

__all__ = ["EngineServer", "main"]


class _Job:
    def __init__(self, rows: list, sampling: Any) -> None:
        self.rows, self.sampling = rows, sampling
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class EngineServer:
    """A :class:`LocalEngine` behind HTTP plus a gloo weight-receiving member."""

    def __init__(self, engine: LocalEngine, host: str, port: int, *,
                 simulate_tokens_per_s: float | None = None) -> None:
        self.engine = engine
        self.instance = uuid.uuid4().hex
        self.weight_version = 0
        self.lock = threading.Lock()  # decode XOR weight load
        self.resumed = threading.Condition(self.lock)  # no decode starts while `updating`
        self.updating = False  # between an update's first bucket and its commit
        self.simulate_tokens_per_s = simulate_tokens_per_s
        self.busy_s = 0.0
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.group: GlooGroup | None = None
        self.epoch = -1
        self._seen: set[str] = set()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        threading.Thread(target=self._decode_loop, daemon=True).start()

    # -- generation: one worker thread batches queued jobs ---------------------------------
    def _decode_loop(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            rows = len(first.rows)
            held: list[_Job] = []
            while rows < self.engine.max_batch_size:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job.sampling == first.sampling:
                    batch.append(job)
                    rows += len(job.rows)
                else:
                    held.append(job)
            for job in held:
                self.jobs.put(job)
            try:
                with self.resumed, torch.inference_mode():
                    while self.updating:  # an update is loading: decode after its commit
                        self.resumed.wait()
                    t0 = time.perf_counter()
                    comps = self.engine.generate_rows([r for j in batch for r in j.rows], first.sampling)
                    version = self.weight_version
                    if self.simulate_tokens_per_s:  # the simulated device is busy this long
                        made = sum(len(c.token_ids) for c in comps)
                        time.sleep(max(0.0, made / self.simulate_tokens_per_s - (time.perf_counter() - t0)))
                    self.busy_s += time.perf_counter() - t0
                k = 0
                for job in batch:
                    job.result = (comps[k : k + len(job.rows)], version)
                    k += len(job.rows)
            except BaseException as e:  # noqa: BLE001 - answered to the clients
                for job in batch:
                    job.error = e
            for job in batch:
                job.done.set()

    def generate(self, body: dict) -> dict:
        rows = [(int(i), int(j), [int(t) for t in p]) for i, j, p in body["rows"]]
        job = _Job(rows, sampling_from_dict(body["sampling"]))
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        comps, version = job.result
        return dict(completions=[completion_to_dict(c) for c in comps], weight_version=version)

    # -- weights ------------------------------------------------------------------------
    def join(self, body: dict) -> dict:
        group = GlooGroup(body["host"], int(body["port"]), int(body["rank"]),
                          int(body["world_size"]), timeout_s=float(body["timeout_s"]))
        group.connect()
        with self.resumed:  # a new epoch: whatever update was loading is abandoned
            self.group, self.epoch = group, int(body["epoch"])
            self._seen = set()
            self.updating = False
            self.resumed.notify_all()
        return dict(rank=group.rank, epoch=self.epoch)

    def receive_bucket(self, body: dict) -> dict:
        if self.group is None or int(body["epoch"]) != self.epoch:
            raise ValueError(f"bucket for weight-group epoch {body['epoch']}, this engine is in "
                             f"epoch {self.epoch}")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        twice = [n for n in names if n in self._seen] or [n for k, n in enumerate(names) if n in names[:k]]
        params = dict(self.engine.model.named_parameters())
        staged_meta, n_bytes = [], 0
        # Whole bucket under the lock, and no decode until the commit: no decode reads a
        # half-written model, nor one holding some buckets of the next version.
        with self.lock, torch.no_grad():
            self.updating = True
            for name, dt, shape in zip(names, dtypes, shapes, strict=True):
                p = params.get(name)
                if (p is not None and not twice and str(p.dtype).removeprefix("torch.") == dt
                        and list(p.shape) == [int(s) for s in shape] and p.is_contiguous()):
                    # Same dtype and shape: receive straight into the parameter (no
                    # staging buffer, no copy; the sync runs at the transport's speed).
                    self.group.broadcast(p.data)
                    n_bytes += p.numel() * p.element_size()
                else:
                    staged_meta.append((name, dt, shape))
                    # Keep the broadcasts in order: receive this one now, staged.
                    t = receive_tensors(self.group, [name], [dt], [shape])[0][1]
                    staged_meta[-1] = (name, t)
                    n_bytes += t.numel() * t.element_size()
            if twice:
                raise ValueError(f"weight stream sent {twice[0]!r} twice in one update")
            if staged_meta:  # other dtype (e.g. bf16 stream into an fp32 engine) or unknown
                self.engine.update_weights([staged_meta], strict=False)
        self._seen.update(names)
        return dict(bytes=n_bytes)

    def commit(self, body: dict) -> dict:
        with self.resumed:
            params = {n for n, _ in self.engine.model.named_parameters()}
            missing = sorted(params - self._seen)
            self._seen = set()
            self.engine.weights_loaded()  # broadcasts into p.data bypass update_weights
            if missing:
                raise ValueError(f"weight update did not send {len(missing)} parameter(s): {missing[:8]}")
            self.weight_version = int(body["version"])
            self.updating = False
            self.resumed.notify_all()
            return dict(weight_version=self.weight_version)

    def digest(self) -> dict:
        with self.lock:
            return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    for n, p in self.engine.model.named_parameters()}

    def health(self) -> dict:
        # max_num_seqs: rows decoded together (the fleet client's in-flight cap, as
        # vLLM's scheduler limit is for a vllm serve engine).
        return dict(instance=self.instance, weight_version=self.weight_version, pid=os.getpid(),
                    max_num_seqs=self.engine.max_batch_size, busy_s=self.busy_s,
                    model_type=self.engine.model.config.model_type,
                    dtype=str(self.engine.dtype).removeprefix("torch."))

    # -- HTTP -----------------------------------------------------------------------------
    def _handler_class(self) -> type:
        server = self
        routes = {
            ("GET", "/health"): lambda b: server.health(),
            ("GET", "/weights/digest"): lambda b: server.digest(),
            ("POST", "/generate"): server.generate,
            ("POST", "/weights/join"): server.join,
            ("POST", "/weights/bucket"): server.receive_bucket,
            ("POST", "/weights/commit"): server.commit,
        }

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                route = routes.get((method, self.path))
                if route is None:
                    return self._answer(404, dict(error=f"no route {method} {self.path}"))
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(n)) if n else {}
                    self._answer(200, route(body))
                except (ValueError, KeyError) as e:
                    self._answer(400, dict(error=f"{type(e).__name__}: {e}"))
                except Exception as e:  # noqa: BLE001 - reported to the client
                    traceback.print_exc()
                    self._answer(500, dict(error=f"{type(e).__name__}: {e}"))

            def _answer(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, *args: Any) -> None:  # quiet: one line per request is noise
                pass

        return Handler

    def serve_forever(self) -> None:
        self.httpd.serve_forever()


def _watch_parent(parent: int) -> None:
    """Exit this process once ``parent`` is no longer its parent (it died, perhaps before
    this process got here: the engine was re-parented). A local fleet starts its engines
    in their own sessions, so no signal reaches them when the trainer is killed."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    """Command line entry (see the module docstring); usage errors exit 2."""
    p = argparse.ArgumentParser(prog="python -m megatron_alp.rollout.engine_server",
                                description="Serve a LocalEngine as a fleet engine (CPU twin).")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (like vLLM), float32, or fp8 (the W8A8 emulation, docs/rollout.md)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--simulate-tokens-per-s", type=float, default=None, metavar="R",
                   help="simulate an engine on its own GPU: a decode batch that made n tokens "
                        "takes at least n / R seconds (sleeping, not computing; default: off)")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="exit when process PID (the one that started this engine) is gone: a "
                        "local fleet's engines do not outlive a trainer killed with SIGKILL")
    args = p.parse_args(argv)
    if args.exit_with_parent is not None:
        _watch_parent(args.exit_with_parent)
    if args.simulate_tokens_per_s is not None and not args.simulate_tokens_per_s > 0:
        p.error(f"--simulate-tokens-per-s={args.simulate_tokens_per_s} is invalid; expected tokens/s > 0")
    if not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a folder (an HF model folder is expected)")
    torch.set_num_threads(args.threads)
    try:
        engine = LocalEngine(args.model, dtype=args.dtype, max_batch_size=args.max_batch_size)
        server = EngineServer(engine, args.host, args.port,
                              simulate_tokens_per_s=args.simulate_tokens_per_s)
    except (ValueError, OSError) as e:
        print(f"engine_server: {e}", file=sys.stderr)
        return 2
    print(f"engine_server: serving {args.model} on http://{args.host}:{args.port} "
          f"(instance {server.instance})", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
