"""Live export throughput: TP=2 model of ~1B parameters on CPU, against the raw transport.

    python benchmarks/export_throughput.py [--layers 20] [--bucket-mb 512] [--rounds 3]

Spawns 2 gloo ranks (TP=2), builds a Qwen2-shaped model (hidden 2048, 16 heads / 4 KV
heads, FFN 5504, vocab 32000; 20 layers ~ 1.0B parameters, fp32 master weights), runs a
first (cold) export, then paired, interleaved rounds (A B A B ...) of

* A = export: ``export_hf_buckets`` end to end (TP gather over gloo, un-fusing, bf16
  cast), consuming each bucket as an engine would (summing its bytes);
* B = raw: the same TP shards, already in bf16, gathered onto TP rank 0 into buffers
  allocated once — the bytes that must cross ranks, nothing else;

and prints both times per round, the ratio raw / export (min, median), the peak extra
RSS of the sending rank per round against the bucket bound (sampled every 5 ms), and a
plain fp32 -> bf16 copy of the same tensors on one rank for reference.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def _body(layers: int, bucket_mb: int, rounds: int) -> dict | None:
    import psutil
    import torch
    import torch.distributed as dist

    from megatron_alp import parallel
    from megatron_alp.convert.live_export import export_hf_buckets
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.tiny import tiny_hf_config

    hf = tiny_hf_config(
        "qwen2", hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=5504, num_hidden_layers=layers, vocab_size=32000,
    )
    args = gpt_args_from_hf(hf)
    cfg = parallel.ParallelConfig(tensor_model_parallel_size=2)
    with parallel.model_parallel(cfg) as info:
        from megatron.core import parallel_state as ps

        chunks = build_model(args, transformer_config(args, cfg, perform_initialization=False))
        n_params = sum(p.numel() for c in chunks for p in c.parameters()) * 2
        proc = psutil.Process()
        tp_group = ps.get_tensor_model_parallel_group()
        # Raw transport baseline: the same TP shards in bf16 gathered onto TP rank 0 into
        # buffers allocated once (no cast, no mapping, no buckets): what must cross ranks.
        shards = [p.detach().to(torch.bfloat16) for c in chunks for p in c.parameters()
                  if getattr(p, "tensor_model_parallel", False)]
        recv = [[torch.empty_like(t) for _ in range(2)] for t in shards] if info.tp_rank == 0 else None

        def export_round() -> tuple[float, int, int, int, list]:
            base = proc.memory_info().rss
            peak = [base]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            dist.barrier()
            t0 = time.perf_counter()
            sent, n_buckets, biggest, shapes = 0, 0, 0, []
            for bucket in export_hf_buckets(chunks, hf, dtype=torch.bfloat16, bucket_bytes=bucket_mb << 20):
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                sent += size
                biggest = max(biggest, size)
                n_buckets += bool(bucket)
                shapes += [tuple(t.shape) for _, t in bucket]
                del bucket
            dt = time.perf_counter() - t0
            stop.set()
            sampler.join()
            return dt, sent, n_buckets, peak[0] - base, shapes

        def raw_round() -> float:
            dist.barrier()
            t0 = time.perf_counter()
            first = dist.get_global_rank(tp_group, 0)
            for k, t in enumerate(shards):
                dist.gather(t, recv[k] if recv is not None else None, dst=first, group=tp_group)
            return time.perf_counter() - t0

        first_s, sent, n_buckets, first_rss, shapes = export_round()
        export_s, raw_s, rss = [], [], []
        for _ in range(rounds):  # paired, interleaved: A B A B ...
            e, _, _, x, _ = export_round()
            export_s.append(e)
            rss.append(x)
            raw_s.append(raw_round())
        if info.rank != 0:
            return None
        raw_bytes = sum(t.numel() * t.element_size() for t in shards)
        # Plain copy of the same tensors and bytes: fp32 source -> bf16 destination.
        srcs = [torch.randn(s) for s in shapes]
        t0 = time.perf_counter()
        for s in srcs:
            torch.empty(s.shape, dtype=torch.bfloat16).copy_(s)
        copy_s = time.perf_counter() - t0
        return dict(params=n_params, bytes=sent, first_s=first_s, first_rss=first_rss,
                    export_s=export_s, raw_s=raw_s, raw_bytes=raw_bytes, copy_s=copy_s,
                    buckets=n_buckets, extra_rss=rss, bucket_bytes=bucket_mb << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20, help="decoder layers (20 ~ 1.0B params)")
    p.add_argument("--bucket-mb", type=int, default=512, help="bucket bound in MiB (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (export, raw) after a first export")
    ns = p.parse_args()
    import os

    from megatron_alp.launch import run_on_ranks

    # Make glibc return freed buffers to the OS at once, so that the ranks' RSS follows
    # live memory (by default freed blocks up to 32 MiB stay in the heap and RSS only grows).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    r = run_on_ranks(2, _body, ns.layers, ns.bucket_mb, ns.rounds, timeout_s=3000)[0]
    gb = r["bytes"] / 1e9
    print(f"model: {r['params'] / 1e9:.2f}B parameters, TP=2 on CPU/gloo; exported {gb:.2f} GB bf16 "
          f"in {r['buckets']} buckets (bound {r['bucket_bytes'] / 2**20:.0f} MiB)")
    print(f"first export (cold): {r['first_s']:.2f} s, peak extra RSS {r['first_rss'] / 2**20:.0f} MiB")
    ratios = [raw / exp for raw, exp in zip(r["raw_s"], r["export_s"])]
    for k, (e, w, x) in enumerate(zip(r["export_s"], r["raw_s"], r["extra_rss"])):
        print(f"round {k}: export {e:.2f} s ({gb / e:.2f} GB/s), raw TP gather of the same shards "
              f"{w:.2f} s, raw/export {w / e:.2f}, peak extra RSS {x / 2**20:.0f} MiB "
              f"({x / r['bucket_bytes']:.2f} x bucket)")
    print(f"raw/export time ratio: min {min(ratios):.2f}, median {statistics.median(ratios):.2f} "
          f"(1.0 = the export runs at the transport's speed)")
    print(f"copy: {r['copy_s']:.2f} s = {gb / r['copy_s']:.2f} GB/s (same tensors, fp32 -> bf16, one rank)")
    print(f"peak extra RSS / bucket bound: max {max(r['extra_rss']) / r['bucket_bytes']:.2f}")


if __name__ == "__main__":
    main()
