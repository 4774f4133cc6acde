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
    gpus_per_engine: int = 1, seed: int = 0, extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one engine process."""
    if backend == "twin":
        return [sys.executable, "-m", "megatron_alp.rollout.engine_server", "--model", model,
                "--host", host, "--port", str(port), "--dtype", dtype, *extra]
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
        # wheels' entry_points.txt) run by this interpreter: the same environment as the
        # trainer (its vLLM, for the NCCL group), whether or not its bin/ is on PATH.
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
                "--host", host, "--port", str(port),
                "--dtype", "bfloat16", "--logprobs-mode", "processed_logprobs",
                "--generation-config", "vllm",
                "--worker-extension-cls", "megatron_alp.rollout.vllm_worker.WeightSyncExtension",
                "--enable-prefix-caching", "--tensor-parallel-size", str(gpus_per_engine),
                "--seed", str(seed), *(["--quantization", "fp8"] if dtype == "fp8" else []), *extra]
    raise ValueError(f"fleet backend {backend!r} is not one of ('twin', 'vllm')")


class LocalFleet:
    """``num_engines`` engine processes on this node; :meth:`kill` / :meth:`restart` one."""

    def __init__(
        self, num_engines: int, *, model: str, backend: str = "twin", dtype: str = "bfloat16",
        host: str = "127.0.0.1", base_port: int | None = None, gpus: Sequence[int] | None = None,
        gpus_per_engine: int = 1, reserve_gpus: Sequence[int] = (), extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0, log_dir: str | None = None,
    ) -> None:
        from megatron_alp.launch import free_port

        self.backend, self.model, self.dtype, self.host = backend, model, dtype, host
        self.extra = list(extra_args)
        self.gpus_per_engine = gpus_per_engine
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        self.devices: list[list[int] | None] = [None] * num_engines
        if backend == "vllm":
            if gpus is None:
                import torch

                gpus = list(range(torch.cuda.device_count()))
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
                             extra=self.extra)
        out = open(os.path.join(self.log_dir, f"engine{k}.log"), "ab") if self.log_dir else subprocess.DEVNULL
        self.procs[k] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            self.wait_ready(k)

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
                raise RuntimeError(f"fleet engine {k} ({self.endpoints[k]}) exited during start-up "
                                   f"(code {None if proc is None else proc.returncode}); see its log")
            try:
                http_json(self.endpoints[k] + "/health", timeout=2)
                return
            except (EngineDown, EngineError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fleet engine {k} ({self.endpoints[k]}) not ready after "
                                       f"{self.startup_timeout_s:.0f} s") from None
                time.sleep(0.3)

    def kill(self, k: int) -> None:
        """SIGKILL engine k (and its children): a crash, as a test needs it."""
        proc = self.procs[k]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs[k] = None

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
    p.add_argument("--dtype", default="bfloat16", help="twin only (vLLM always runs bfloat16)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices as this process sees them, i.e. "
                   "after CUDA_VISIBLE_DEVICES (vllm; default: all)")
    p.add_argument("--gpus-per-engine", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--reserve-gpus", default="", help="GPUs never given to an engine (the trainer's)")
    p.add_argument("--log-dir", default=None)
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
    # SIGTERM (run.sh's trap, `kill`, srun forwarding) must stop the engines too: they run
    # in their own sessions, and the default action would end this process without its
    # `finally`, leaving every engine holding its GPUs.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fleet = LocalFleet(args.engines, model=args.model, backend=args.backend, dtype=args.dtype,
                           host=args.host, base_port=args.base_port,
                           gpus=ints(args.gpus, "--gpus"), gpus_per_engine=args.gpus_per_engine,
                           reserve_gpus=ints(args.reserve_gpus, "--reserve-gpus") or [],
                           extra_args=extra, log_dir=args.log_dir)
    except ValueError as e:
        p.error(str(e))
    print("\n".join(fleet.endpoints), flush=True)
    try:
        while all(proc is not None and proc.poll() is None for proc in fleet.procs):
            time.sleep(1)
        print("fleet_launch: an engine exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
