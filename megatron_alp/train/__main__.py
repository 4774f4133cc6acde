"""``torchrun --nproc-per-node N -m megatron_alp.train ...`` or ``python -m megatron_alp.train ...``.

Under torchrun (``RANK`` / ``WORLD_SIZE`` set) every process is one rank. Started with
plain ``python``, the command validates its arguments, then starts ``--nproc`` ranks
itself (default TP x PP x CP) as child processes of this one — gloo on a machine without
a GPU, NCCL with one GPU per rank otherwise — forwards SIGTERM / SIGINT / SIGUSR1 to them,
and exits with the first non-zero exit code (0 when every rank succeeded; 130 after
SIGINT, with one line naming the last checkpoint). Bad arguments exit 2 with one line
naming the flag, before any rank starts.

Rank 0 speaks; every rank's output goes to ``RUN_DIR/logs/rank_N.log`` (rank 0's also to
this terminal). When a rank fails, each failed rank is named with its exit (a signal by
name: ``killed by SIGKILL``) and the tail of its log, rank 0 included. Third-party
warnings are filtered (``--verbose`` or ``MEGATRON_ALP_VERBOSE=1`` shows them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_alp.train.arguments import TrainConfig

_CHILD = "MEGATRON_ALP_TRAIN_CHILD"


def _quiet() -> None:
    """Filter third-party warnings unless asked for them (before the heavy imports)."""
    if os.environ.get("MEGATRON_ALP_VERBOSE") == "1":
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    for name in ("torch.utils.cpp_extension", "megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def _watch_parent() -> None:
    """A spawned rank exits when the launcher dies (kill -9 included)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


def _print_config(cfg: "TrainConfig") -> None:
    """The effective configuration: where it is written, and in full with ``--verbose``
    (about 130 lines of JSON would otherwise bury the progress lines)."""
    from megatron_alp.train.arguments import config_json

    where = Path(cfg.run.run_dir) / "config.json"
    if os.environ.get("MEGATRON_ALP_VERBOSE") == "1":
        print("[train] configuration:\n" + config_json(cfg), flush=True)
    else:
        print(f"[train] configuration: {where} (printed here with --verbose)", flush=True)


def _run_rank(argv: list[str]) -> int:
    import torch.distributed as dist

    from megatron_alp import parallel
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.loop import run
    from megatron_alp.train.signals import interrupted_line

    cfg = parse_args(argv)
    parallel.init_distributed()
    speaks = dist.get_rank() == 0 and os.environ.get(_CHILD) != "1"  # under torchrun
    if speaks:
        _print_config(cfg)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        if speaks:  # under our launcher, the launcher says it
            print(interrupted_line(cfg.save), file=sys.stderr, flush=True)
        return 130
    finally:
        parallel.teardown()
    return 0 if result is not None else 1


def _copy_out(src, *sinks) -> threading.Thread:
    """Copy rank 0's output pipe to the terminal and its log file as it comes."""

    def pump() -> None:
        fd = src.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            for sink in sinks:
                try:
                    sink.write(chunk)
                    sink.flush()
                except (OSError, ValueError):
                    pass

    t = threading.Thread(target=pump, daemon=True, name="rank0-output")
    t.start()
    return t


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _report_failures(failed: list[tuple[int, int]], logs: Path) -> None:
    """Name every failed rank, its exit and the tail of its log (rank 0 included)."""
    from megatron_alp.launch import describe_exit

    first = failed[0][0]
    for r, c in failed:
        log = logs / f"rank_{r}.log"
        lines = _tail(log, 25 if r == first else 8)
        what = "failed first" if r == first and len(failed) > 1 else "failed"
        print(f"[train] rank {r} {what}: {describe_exit(c)}; last {len(lines)} lines of {log}:",
              file=sys.stderr)
        for line in lines:
            print(f"  | {line}", file=sys.stderr)
    sys.stderr.flush()


def _launch(argv: list[str], nproc: int, run_dir: Path, save: Path | None = None) -> int:
    from megatron_alp.launch import free_port
    from megatron_alp.rundir import claim_run_dir

    claim_run_dir(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    files = []
    pumps = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env[_CHILD] = "1"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        f = open(logs / f"rank_{r}.log", "wb")
        files.append(f)
        if r == 0:  # to the terminal and to its log (the tail is printed if it dies)
            env["PYTHONUNBUFFERED"] = "1"  # a pipe now, not the terminal: keep lines prompt
            p = subprocess.Popen([sys.executable, "-m", "megatron_alp.train", *argv], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            pumps += [_copy_out(p.stdout, sys.stdout.buffer, f), _copy_out(p.stderr, sys.stderr.buffer, f)]
        else:
            p = subprocess.Popen([sys.executable, "-m", "megatron_alp.train", *argv], env=env,
                                 stdout=f, stderr=subprocess.STDOUT)
        procs.append(p)
    interrupted = False

    def forward(signum, frame):  # noqa: ARG001
        nonlocal interrupted
        interrupted = interrupted or signum == signal.SIGINT
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = 0
    try:
        while True:
            states = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(states) if c not in (None, 0)]
            if failed:
                c = failed[0][1]
                code = c if c > 0 else 1
                time.sleep(2.0)  # let the others report / notice
                # ranks that failed by themselves meanwhile (not the ones killed below)
                later = [(r, p.returncode) for r, p in enumerate(procs)
                         if r not in dict(failed) and p.poll() not in (None, 0)]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for t in pumps:
                    t.join(2.0)
                if interrupted:
                    code = 130
                else:
                    _report_failures(failed + later, logs)
                break
            if all(s == 0 for s in states):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in pumps:
            t.join(2.0)
        for f in files:
            f.close()
    if interrupted:
        from megatron_alp.train.signals import interrupted_line

        print(interrupted_line(save), file=sys.stderr, flush=True)
        return 130
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        os.environ["MEGATRON_ALP_VERBOSE"] = "1"
    _quiet()
    child = os.environ.get(_CHILD) == "1"
    if child:
        _watch_parent()
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return _run_rank(argv)
        from megatron_alp.train.arguments import parse_args

        cfg = parse_args(argv)
        nproc = cfg.world_size
        _print_config(cfg)
        print(f"[train] starting {nproc} rank(s) (TP={cfg.parallel.tensor_model_parallel_size}, "
              f"PP={cfg.parallel.pipeline_model_parallel_size}, DP={cfg.data_parallel_size}) ...", flush=True)
        return _launch(argv, nproc, Path(cfg.run.run_dir), cfg.save)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any rank started (ranks: _launch / _run_rank)
        print("[train] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
