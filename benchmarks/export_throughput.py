"""Live export throughput: TP=2 model of ~1B parameters on CPU, against a plain copy.

    python benchmarks/export_throughput.py [--layers 20] [--bucket-mb 512]

Spawns 2 gloo ranks (TP=2), builds a Qwen2-shaped model (hidden 2048, 16 heads / 4 KV
heads, FFN 5504, vocab 32000; 20 layers ~ 1.0B parameters, fp32 master weights), then
on the sending rank measures side by side:

* export: ``export_hf_buckets`` end to end (TP gather over gloo, un-fusing, bf16 cast),
  consuming each bucket as an engine would (summing its bytes);
* copy: a plain ``dst.copy_(src)`` of the same tensors (fp32 -> bf16, the same bytes
  written) on one rank, no communication.

It prints GB/s of both, their ratio, and the peak extra RSS of the sending rank during
the export against the bucket size (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import threading
import time


def _body(layers: int, bucket_mb: int) -> dict | None:
    import psutil
    import torch

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
        chunks = build_model(args, transformer_config(args, cfg, perform_initialization=False))
        n_params = sum(p.numel() for c in chunks for p in c.parameters()) * 2
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        sent, n_buckets, biggest = 0, 0, 0
        shapes = []
        for bucket in export_hf_buckets(chunks, hf, dtype=torch.bfloat16, bucket_bytes=bucket_mb << 20):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            sent += size
            biggest = max(biggest, size)
            n_buckets += bool(bucket)
            shapes += [tuple(t.shape) for _, t in bucket]
            del bucket
        export_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if info.rank != 0:
            return None
        # Plain copy of the same tensors and bytes: fp32 source -> bf16 destination.
        srcs = [torch.randn(s) for s in shapes]
        t0 = time.perf_counter()
        for s in srcs:
            torch.empty(s.shape, dtype=torch.bfloat16).copy_(s)
        copy_s = time.perf_counter() - t0
        return dict(params=n_params, bytes=sent, export_s=export_s, copy_s=copy_s,
                    buckets=n_buckets, biggest=biggest, extra_rss=peak[0] - base,
                    bucket_bytes=bucket_mb << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20, help="decoder layers (20 ~ 1.0B params)")
    p.add_argument("--bucket-mb", type=int, default=512, help="bucket bound in MiB (default 512)")
    ns = p.parse_args()
    import os

    from megatron_alp.launch import run_on_ranks

    # Make glibc return freed buffers to the OS at once, so that the ranks' RSS follows
    # live memory (by default freed blocks up to 32 MiB stay in the heap and RSS only grows).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    r = run_on_ranks(2, _body, ns.layers, ns.bucket_mb, timeout_s=3000)[0]
    gb = r["bytes"] / 1e9
    print(f"model: {r['params'] / 1e9:.2f}B parameters, TP=2 on CPU/gloo; exported {gb:.2f} GB bf16 "
          f"in {r['buckets']} buckets (largest {r['biggest'] / 2**20:.0f} MiB, bound {r['bucket_bytes'] / 2**20:.0f} MiB)")
    print(f"export: {r['export_s']:.2f} s = {gb / r['export_s']:.2f} GB/s")
    print(f"copy:   {r['copy_s']:.2f} s = {gb / r['copy_s']:.2f} GB/s  (same tensors, fp32 -> bf16)")
    print(f"ratio export/copy throughput: {r['copy_s'] / r['export_s']:.2f}")
    print(f"peak extra RSS on the sending rank: {r['extra_rss'] / 2**20:.0f} MiB "
          f"({r['extra_rss'] / r['bucket_bytes']:.2f} x bucket bound)")


if __name__ == "__main__":
    main()
