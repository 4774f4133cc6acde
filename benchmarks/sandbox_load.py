"""Sandbox load: N concurrent requests, concurrency C, over HTTP and in-process.

    python benchmarks/sandbox_load.py [--requests 200] [--concurrency 8] [--rounds 3]

Variants, run in interleaved rounds (A B C A B C ...), each sending ``--requests``
small programs (``print(i * 7)`` plus a listdir) at once:

* ``service``: ``SandboxServer`` on 127.0.0.1 (``--concurrency`` runs at once, the rest
  queued) and ``SandboxClient`` with one request in flight per program;
* ``pool``: ``SandboxPool.run_batch`` in-process, same concurrency;
* ``bare``: the same trusted programs under plain ``subprocess.run([python, -c])`` (in a
  session of their own, as the sandbox's launcher), all submitted at once,
  ``--concurrency`` running, **no isolation**: the floor, to price the isolation.

Latency is per request, from submission to result (so it includes queueing: with 200
requests and 8 slots most of it is waiting). Printed per variant: p50 / p99 latency and
throughput (min and median over rounds), and throughput ratios to ``bare``. Every output
is checked, so a lost or duplicated answer fails the run.

``--serial N`` adds the start-up cost of one run alone: N pairs (pool run, bare run,
pool run, ...), one at a time, printing the median and p90 wall time of each and their
median paired difference, the price of the isolation per program.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import subprocess
import sys
import threading
import time


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _codes(n: int) -> list[str]:
    return [f"import os\nprint({i} * 7, len(os.listdir('.')) > 0)" for i in range(n)]


def _check(outs: list[str], n: int) -> None:
    want = [f"{i * 7} True\n" for i in range(n)]
    bad = [i for i, (o, w) in enumerate(zip(outs, want)) if o != w]
    if len(outs) != n or bad:
        raise SystemExit(f"wrong outputs for requests {bad[:10]} (of {n})")


def _timed_batch(submit, codes: list[str], workers: int) -> tuple[list[float], float, list[str]]:
    lat = [0.0] * len(codes)

    def one(i: int) -> str:
        t = time.monotonic()
        out = submit(codes[i])
        lat[i] = time.monotonic() - t
        return out

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        outs = list(ex.map(one, range(len(codes))))
    return lat, time.monotonic() - t0, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serial", type=int, default=0,
                   help="also time N single runs, pool and bare alternating (0: skip)")
    a = p.parse_args()

    from megatron_alp.sandbox import SandboxClient, SandboxPool
    from megatron_alp.sandbox.serve import SandboxServer

    n, c = a.requests, a.concurrency
    server = SandboxServer(max_concurrency=c, max_queue=max(n, 1)).start()
    client = SandboxClient(server.url, max_concurrency=n)
    pool = SandboxPool(max_concurrency=c)
    py = pool.isolation._python  # the interpreter the sandbox runs, for a fair floor
    codes = _codes(n)

    slots = threading.Semaphore(c)

    def bare(code: str) -> str:
        with slots:  # same queueing as the others: n submitted at once, c running
            # A session of its own, as the sandbox's launcher has: with the kernel's
            # autogroup scheduling each session is its own CPU group, so on a busy host a
            # floor that shares our session would get less CPU than the sandbox does.
            return subprocess.run([py, "-s", "-B", "-c", code], capture_output=True, text=True,
                                  cwd="/tmp", start_new_session=True).stdout

    variants = {
        # the client sends all n at once; the service queues beyond c
        "service": (lambda code: client.run(code).stdout, n),
        "pool": (lambda code: pool.run(code).stdout, n),
        "bare": (bare, n),
    }
    stats: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, (submit, workers) in variants.items():
            lat, total, outs = _timed_batch(submit, codes, workers)
            _check(outs, n)
            stats[name].append((_pct(lat, 0.5), _pct(lat, 0.99), n / total))
            print(f"round {r} {name:8s} p50 {_pct(lat, .5) * 1e3:7.1f} ms  p99 "
                  f"{_pct(lat, .99) * 1e3:7.1f} ms  {n / total:6.1f} req/s", file=sys.stderr)
    serial: list[tuple[float, float]] = []
    for i in range(a.serial):
        code = _codes(i + 1)[i]
        t = time.monotonic()
        out_pool = pool.run(code).stdout
        t_pool = time.monotonic() - t
        t = time.monotonic()
        out_bare = bare(code)
        t_bare = time.monotonic() - t
        if out_pool != out_bare:
            raise SystemExit(f"serial run {i}: pool printed {out_pool!r}, bare {out_bare!r}")
        serial.append((t_pool, t_bare))
    h = server.health()
    server.shutdown(grace_s=10)
    client.close()
    pool.close()
    if h["completed"] != n * a.rounds or h["rejected"]:
        raise SystemExit(f"service completed {h['completed']} of {n * a.rounds}, "
                         f"rejected {h['rejected']}")

    bare_tp = statistics.median(s[2] for s in stats["bare"])
    print(f"\n{n} requests, concurrency {c}, {a.rounds} interleaved rounds; every output checked")
    print("| variant | p50 ms (min / median) | p99 ms (min / median) | req/s (max / median) "
          "| req/s vs bare (median) |")
    print("|---|---|---|---|---|")
    for name, ss in stats.items():
        p50 = [s[0] * 1e3 for s in ss]
        p99 = [s[1] * 1e3 for s in ss]
        tp = [s[2] for s in ss]
        print(f"| {name} | {min(p50):.0f} / {statistics.median(p50):.0f} | "
              f"{min(p99):.0f} / {statistics.median(p99):.0f} | "
              f"{max(tp):.1f} / {statistics.median(tp):.1f} | "
              f"{statistics.median(tp) / bare_tp:.2f} |")
    if serial:
        tp_, tb_ = [s[0] * 1e3 for s in serial], [s[1] * 1e3 for s in serial]
        diff = statistics.median(p - b for p, b in zip(tp_, tb_))
        print(f"\none run at a time, {len(serial)} pairs: pool median {statistics.median(tp_):.1f} "
              f"ms (p90 {_pct(tp_, 0.9):.1f}), bare median {statistics.median(tb_):.1f} ms "
              f"(p90 {_pct(tb_, 0.9):.1f}); isolation costs {diff:.1f} ms per run (median of "
              "paired differences)")


if __name__ == "__main__":
    main()
