"""Run a function on N gloo ranks (spawned processes) and get every rank's result back.

Starting ranks costs seconds (torch + megatron-core imports), so a :class:`RankGroup`
starts its processes once and then runs many bodies on them::

    with RankGroup(world_size=4) as group:
        results = group.run(body, layout="tp2pp2")   # body(**kw) on every rank

A body is a module-level function (it is pickled by reference); it runs with
torch.distributed initialised (gloo on CPU, the CPU backend of ``megatron_alp.platform``
active; NCCL with one GPU per rank where the machine has enough GPUs) and sets up its own
Megatron layout, e.g. ``with parallel.model_parallel(cfg):``.
It returns something picklable. If any rank raises, the group is killed and
:class:`RankFailure` carries that rank's traceback; if the ranks do not all answer within
the timeout (a hang in a collective), the group is killed and ``TimeoutError`` names the
silent ranks. A killed group restarts by itself on the next ``run``, so one failing test
does not take the rest of a module down.

On a machine with CUDA, ranks use NCCL and GPU ``rank`` only when there are at least
``world_size`` visible GPUs; with fewer (e.g. ``RankGroup(4)`` on a 1-2 GPU machine) the
group runs on gloo + CPU, by setting ``MEGATRON_ALP_FORCE_CPU=1`` in the ranks
(``force_cpu=`` chooses explicitly).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

__all__ = ["RankFailure", "RankGroup", "describe_exit", "free_port", "run_on_ranks", "visible_gpus"]

_POLL_S = 0.2


class RankFailure(RuntimeError):
    """A body raised on one or more ranks; the message holds the first failing traceback."""


def describe_exit(code: int | None) -> str:
    """A process's exit as a person reads it: ``killed by SIGKILL`` for a negative
    return code (a signal), ``exit code N`` otherwise (``128 + N`` from a shell is
    named too)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 130:
        return "exit code 130 (interrupted: SIGINT)"
    if code > 128:
        try:
            return f"exit code {code} (128 + {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent() -> None:
    # Ranks are not daemonic (a daemonic process may not start children, and
    # megatron's dist_checkpointing save starts a multiprocessing Manager), so they watch
    # their parent instead: when it is gone (kill -9 included) the rank exits.
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def visible_gpus() -> int:
    """CUDA devices this process may use (0 without CUDA or under ``MEGATRON_ALP_FORCE_CPU``)."""
    import torch

    from megatron_alp import platform

    if platform.force_cpu() or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    tasks: mp.Queue,
    results: mp.Queue,
    force_cpu: bool = False,
) -> None:
    _exit_with_parent()
    from megatron_alp.platform import FORCE_CPU_ENV

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        # one node: local rank = rank, i.e. GPU `rank` when the group runs on GPUs
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        **{FORCE_CPU_ENV: "1" if force_cpu else "0"},
    )
    try:
        import torch

        torch.set_num_threads(threads)
        from megatron_alp import parallel

        parallel.init_distributed(rank=rank, world_size=world_size, master_port=port)
        results.put(("ready", rank, True, None))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put(("ready", rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            out = fn(*args, **kwargs)
            results.put((call_id, rank, True, out))
        except BaseException:  # noqa: BLE001
            results.put((call_id, rank, False, traceback.format_exc()))
    try:
        parallel.teardown()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


class RankGroup:
    """A persistent group of ``world_size`` ranks (see the module docstring).

    ``force_cpu``: True runs gloo + CPU whatever the machine; False uses the GPUs where
    CUDA is visible (NCCL, GPU ``rank`` per rank; ValueError if there are fewer GPUs than
    ranks); None (default) uses the GPUs only when there is one per rank.
    """

    def __init__(
        self,
        world_size: int,
        *,
        timeout_s: float = 300.0,
        start_timeout_s: float = 120.0,
        force_cpu: bool | None = None,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        gpus = visible_gpus()
        if force_cpu is None:
            force_cpu = world_size > gpus
        elif not force_cpu and 0 < gpus < world_size:
            raise ValueError(
                f"RankGroup(world_size={world_size}, force_cpu=False) needs one GPU per rank, "
                f"but {gpus} are visible; use force_cpu=None or True to run on gloo + CPU"
            )
        self.force_cpu = bool(force_cpu)
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._calls = 0

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "RankGroup":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        """Spawn the ranks and wait until torch.distributed is up on all of them."""
        if self.alive:
            return
        self.kill()
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, threads, self._tasks[r], self._results,
                      self.force_cpu),
                daemon=False,
                name=f"rank{r}",
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        # Non-daemonic ranks would be joined (forever) at interpreter exit: kill first.
        atexit.register(self.kill)
        self._collect("ready", self.start_timeout_s, what="start-up")

    def close(self) -> None:
        """Stop the ranks cleanly (teardown of their process groups), then reap them."""
        if self.alive:
            for q in self._tasks:
                q.put(None)
            deadline = time.monotonic() + 30
            for p in self._procs:
                p.join(max(0.1, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Kill every rank at once (used after a failure or a hang)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        self._procs = []

    # -- running -----------------------------------------------------------------------
    def run(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results ordered by rank."""
        if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", ""):
            raise ValueError(
                f"RankGroup.run needs a module-level function (pickled by reference), got {fn!r}"
            )
        self.start()
        self._calls += 1
        call_id = self._calls
        for q in self._tasks:
            q.put((call_id, fn, args, kwargs))
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(call_id, timeout_s or self.timeout_s, what=name)

    def _collect(self, call_id: Any, timeout_s: float, *, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) < self.world_size:
            try:
                cid, rank, ok, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [
                    (i, p.exitcode)
                    for i, p in enumerate(self._procs)
                    if not p.is_alive() and i not in results
                ]
                if dead:
                    self.kill()
                    raise RankFailure(
                        f"{what}: " + "; ".join(
                            f"rank {r} died ({describe_exit(c)})" for r, c in dead
                        ) + " before answering (its output is above)"
                    )
                if time.monotonic() > deadline:
                    silent = [r for r in range(self.world_size) if r not in results]
                    self.kill()
                    raise TimeoutError(
                        f"{what}: rank(s) {silent} did not answer within {timeout_s:.0f} s "
                        "(a hang in a collective?); the group was killed"
                    )
                continue
            if cid != call_id:
                continue  # a late answer from an earlier, abandoned call
            if not ok:
                # a rank that died (kill -9, OOM killer) makes its peers fail in their
                # collectives: name the dead one first, it is the cause
                time.sleep(1.0)
                dead = [(i, p.exitcode) for i, p in enumerate(self._procs)
                        if i != rank and not p.is_alive()]
                self.kill()
                cause = "".join(f"rank {i} died ({describe_exit(c)}); " for i, c in dead)
                raise RankFailure(f"{cause}{what} failed on rank {rank}:\n{payload}")
            results[rank] = payload
        return [results[r] for r in range(self.world_size)]


def run_on_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = 300.0,
    force_cpu: bool | None = None,
    **kwargs: Any,
) -> list[Any]:
    """One-shot: start ``world_size`` ranks, run ``fn`` on each, stop them, return results."""
    with RankGroup(world_size, timeout_s=timeout_s, force_cpu=force_cpu) as group:
        return group.run(fn, *args, **kwargs)
