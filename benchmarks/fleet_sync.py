"""Fleet weight sync (CPU twin) against the raw gloo transport of the same bytes.

    python benchmarks/fleet_sync.py [--layers 8] [--hidden 1024] [--bucket-mb 64] [--rounds 3]

One twin engine process (``engine_server``, bf16) and this process as the sender. Paired,
interleaved rounds (A B A B ...):

* A = sync: ``FleetEngine.update_weights`` of the model's bf16 tensors in buckets of
  ``--bucket-mb`` (HTTP metadata per bucket, gloo broadcast, the engine loads into its
  model, commit);
* B = raw: a bare receiver process joins a gloo group and receives the same tensors by
  the same broadcasts into buffers it allocated once, nothing else.

Prints per-round times, the ratio raw / sync (1.0 = the sync runs at transport speed;
min and median over rounds) and the engine's peak extra RSS during a sync against the
bucket bound (sampled every 5 ms). The first sync (which also forms the weight group)
is reported separately.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time


def _raw_receiver(host: str, conn) -> None:
    import torch

    from megatron_alp.rollout.weight_group import GlooGroup

    torch.set_num_threads(1)
    buffers = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        port, metas = msg
        if buffers is None:  # allocated and touched once: the rounds time the transport only
            buffers = [torch.zeros([int(x) for x in s], dtype=getattr(torch, d))
                       for names, dtypes, shapes in metas for d, s in zip(dtypes, shapes)]
        g = GlooGroup(host, port, 1, 2, timeout_s=120)
        conn.send("joined")
        g.connect()
        for t in buffers:
            g.broadcast(t)
        conn.send("done")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_alp.launch import free_port
    from megatron_alp.models.tiny import tiny_hf_config
    from megatron_alp.rollout import create_engine
    from megatron_alp.rollout.fleet_launch import LocalFleet
    from megatron_alp.rollout.vllm_support import bucket_meta
    from megatron_alp.rollout.weight_group import GlooGroup, broadcast_bucket

    cfg = tiny_hf_config("qwen2", hidden_size=a.hidden, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                         vocab_size=32000)
    tmp = tempfile.TemporaryDirectory()
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp.name)
    state = [(n, p.detach()) for n, p in model.named_parameters()]
    buckets, cur, size = [], [], 0
    for n, t in state:
        b = t.numel() * t.element_size()
        if cur and size + b > a.bucket_mb << 20:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((n, t))
        size += b
    buckets.append(cur)
    total = sum(t.numel() * t.element_size() for _, t in state)
    print(f"model: {total / 1e9:.3f} GB bf16 in {len(buckets)} buckets of <= {a.bucket_mb} MiB", flush=True)

    fleet = LocalFleet(1, model=tmp.name, backend="twin", dtype="bfloat16", startup_timeout_s=300)
    engine = create_engine("fleet", endpoints=fleet.endpoints, sync_timeout_s=300)
    eproc = psutil.Process(fleet.procs[0].pid)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    raw = ctx.Process(target=_raw_receiver, args=("127.0.0.1", child), daemon=True)
    raw.start()
    metas = []
    for b in buckets:
        m = bucket_meta(b)
        metas.append((list(m.names), list(m.dtypes), [list(s) for s in m.shapes]))

    def sync() -> tuple[float, int]:
        base = eproc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], eproc.memory_info().rss)
                time.sleep(0.005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        engine.update_weights(buckets)
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        return dt, peak[0] - base

    def raw_round() -> float:
        port = free_port()
        g = GlooGroup("127.0.0.1", port, 0, 2, timeout_s=120)
        parent.send((port, metas))
        parent.recv()
        g.connect()
        t0 = time.perf_counter()
        for b in buckets:
            broadcast_bucket(g, b)
        assert parent.recv() == "done"
        return time.perf_counter() - t0

    try:
        first, first_peak = sync()
        print(f"first sync (forms the group): {first:.3f} s, engine peak extra RSS "
              f"{first_peak / 2**20:.0f} MiB", flush=True)
        ratios, peaks = [], []
        for r in range(a.rounds):
            ts, pk = sync()
            tr = raw_round()
            ratios.append(tr / ts)
            peaks.append(pk)
            print(f"round {r}: sync {ts:.3f} s ({total / ts / 1e9:.2f} GB/s), raw {tr:.3f} s "
                  f"({total / tr / 1e9:.2f} GB/s), raw/sync {tr / ts:.2f}, engine peak extra "
                  f"{pk / 2**20:.0f} MiB = {pk / (a.bucket_mb << 20):.2f} x bucket", flush=True)
        print(f"raw/sync: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}; engine "
              f"peak extra / bucket: max {max(peaks) / (a.bucket_mb << 20):.2f}")
    finally:
        parent.send(None)
        engine.close()
        fleet.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
