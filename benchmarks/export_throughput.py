"""Live export throughput: TP=2 model of ~1B parameters on CPU, against the raw transport.

    python benchmarks/export_throughput.py [--layers 20] [--bucket-mb 512] [--rounds 3] [--fresh-buffers]
        [--param-dtype fp32|bf16]

Spawns 2 gloo ranks (TP=2), builds a Qwen2-shaped model (hidden 2048, 16 heads / 4 KV
heads, FFN 5504, vocab 32000; 20 layers ~ 1.0B parameters, fp32 master weights, or bf16 ones as a ``--bf16`` trainer holds them), runs a
first (cold) export, then paired, interleaved rounds (A B C A B C ...) of

* A = export: ``export_hf_buckets`` end to end (TP transfers over gloo, un-fusing, bf16
  cast), consuming each bucket as an engine would (summing its bytes); with one
  ``ExportBuffers`` kept across rounds as the trainer keeps it across syncs, or a fresh
  buffer per bucket with ``--fresh-buffers``;
* B = raw send/recv: TP rank 1's shards, already in bf16, sent point to point (all
  posted at once) to TP rank 0 into buffers allocated once — the bytes that must cross
  ranks, nothing else;
* C = raw gather: the same shards gathered onto TP rank 0 with ``dist.gather`` (the
  baseline of the first version of this benchmark; it also copies rank 0's own shards);

and prints the times per round, the ratios raw / export (min, median), the peak extra RSS
of the sending rank per round above its RSS before the first export (the buffers kept
between rounds included) against the bucket bound (sampled every 5 ms), the seconds
each rank spends per phase inside the export, and a plain fp32 -> bf16 copy of the same
tensors on one rank for reference.

On a machine with 2 CUDA GPUs the ranks run on them over NCCL (the launcher picks NCCL
when every rank has a GPU): times are taken after a device sync and the memory column is
the CUDA allocator's peak above its level before the first export.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time


def _body(layers: int, bucket_mb: int, rounds: int, reuse: bool, param_dtype: str = "fp32") -> dict | None:
    import psutil
    import torch
    import torch.distributed as dist

    from megatron_alp import parallel
    from megatron_alp.convert.live_export import ExportBuffers, export_hf_buckets
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
        if param_dtype == "bf16":  # what a --bf16 trainer exports from (Float16Module's params)
            for c in chunks:
                c.to(torch.bfloat16)
        n_params = sum(p.numel() for c in chunks for p in c.parameters()) * 2
        device = next(chunks[0].parameters()).device
        on_gpu = device.type == "cuda"  # NCCL ranks: time after a device sync, GPU memory

        def sync() -> None:
            if on_gpu:
                torch.cuda.synchronize(device)

        proc = psutil.Process()
        tp_group = ps.get_tensor_model_parallel_group()
        first, second = (dist.get_global_rank(tp_group, r) for r in range(2))
        # Raw transport baselines: the same TP shards in bf16 (no cast, no mapping, no
        # buckets), received into buffers allocated once: what must cross ranks.
        shards = [p.detach().to(torch.bfloat16) for c in chunks for p in c.parameters()
                  if getattr(p, "tensor_model_parallel", False)]
        # zeros, not empty: their pages are touched now, so that they are not counted as the
        # export's extra RSS after the first raw round
        recv = [[torch.zeros_like(t) for _ in range(2)] for t in shards] if info.tp_rank == 0 else None
        profiles: list[dict[str, float]] = []
        buffers = ExportBuffers() if reuse else None
        sync()
        base = torch.cuda.memory_allocated(device) if on_gpu else proc.memory_info().rss
        # before the first export: kept buffers count as extra
        cpu: dict[str, list[float]] = {"export": [], "p2p": []}

        def cpu_s() -> float:  # this process, all threads (gloo's included)
            u = resource.getrusage(resource.RUSAGE_SELF)
            return u.ru_utime + u.ru_stime

        def export_round() -> tuple[float, int, int, int, list]:
            peak = [proc.memory_info().rss]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            if on_gpu:  # the allocator's own peak instead of host RSS
                torch.cuda.reset_peak_memory_stats(device)
            else:
                sampler.start()
            prof: dict[str, float] = {}
            profiles.append(prof)
            dist.barrier()
            c0 = cpu_s()
            t0 = time.perf_counter()
            sent, n_buckets, shapes = 0, 0, []
            stream = export_hf_buckets(chunks, hf, dtype=torch.bfloat16, bucket_bytes=bucket_mb << 20,
                                       buffers=buffers, profile=prof)
            for bucket in stream:
                t1 = time.perf_counter()
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                n_buckets += bool(bucket)
                shapes += [tuple(t.shape) for _, t in bucket]
                del bucket  # what a streaming consumer holds: nothing past its bucket
                prof["consumer"] = prof.get("consumer", 0.0) + time.perf_counter() - t1
            sync()
            dt = time.perf_counter() - t0
            cpu["export"].append(cpu_s() - c0)
            if on_gpu:
                peak[0] = torch.cuda.max_memory_allocated(device)
            else:
                stop.set()
                sampler.join()
            return dt, sent, n_buckets, peak[0] - base, shapes

        def raw_p2p_round() -> float:
            dist.barrier()
            c0 = cpu_s()
            t0 = time.perf_counter()
            if recv is not None:
                works = [dist.irecv(r[1], src=second, group=tp_group) for r in recv]
            else:
                works = [dist.isend(t, dst=first, group=tp_group) for t in shards]
            for w in works:
                w.wait()
            sync()
            dt = time.perf_counter() - t0
            cpu["p2p"].append(cpu_s() - c0)
            return dt

        def raw_gather_round() -> float:
            dist.barrier()
            t0 = time.perf_counter()
            for k, t in enumerate(shards):
                dist.gather(t, recv[k] if recv is not None else None, dst=first, group=tp_group)
            sync()
            return time.perf_counter() - t0

        first_s, sent, n_buckets, first_rss, shapes = export_round()
        export_s, p2p_s, gather_s, rss = [], [], [], []
        for _ in range(rounds):  # paired, interleaved: A B C A B C ...
            e, _, _, x, _ = export_round()
            export_s.append(e)
            rss.append(x)
            p2p_s.append(raw_p2p_round())
            gather_s.append(raw_gather_round())
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (profiles[1:], cpu["export"][1:], cpu["p2p"]))  # warm rounds
        if info.rank != 0:
            return None
        p2p_bytes = sum(t.numel() * t.element_size() for t in shards)  # rank 1's half
        # Plain copy of the same tensors and bytes: fp32 source -> bf16 destination.
        srcs = [torch.randn(s, device=device) for s in shapes]
        sync()
        t0 = time.perf_counter()
        for s in srcs:
            torch.empty(s.shape, dtype=torch.bfloat16, device=device).copy_(s)
        sync()
        copy_s = time.perf_counter() - t0
        return dict(params=n_params, bytes=sent, first_s=first_s, first_rss=first_rss,
                    export_s=export_s, p2p_s=p2p_s, gather_s=gather_s, p2p_bytes=p2p_bytes,
                    copy_s=copy_s, buckets=n_buckets, extra_rss=rss, bucket_bytes=bucket_mb << 20,
                    profiles=per_rank, device=str(device), backend=dist.get_backend())


def _ratios(raw: list[float], export: list[float]) -> str:
    r = [a / b for a, b in zip(raw, export)]
    return f"min {min(r):.2f}, median {statistics.median(r):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20, help="decoder layers (20 ~ 1.0B params)")
    p.add_argument("--bucket-mb", type=int, default=512, help="bucket bound in MiB (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (export, raw) after a first export")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the model's parameter dtype: fp32 (the export casts every shard) or bf16 "
                        "(a --bf16 trainer: no cast, pieces go out as they are); default fp32")
    p.add_argument("--fresh-buffers", action="store_true",
                   help="export with reuse_buffer=False (a fresh buffer per bucket)")
    ns = p.parse_args()
    if ns.layers < 1 or ns.bucket_mb < 1 or ns.rounds < 1:
        p.error(f"--layers, --bucket-mb and --rounds must be >= 1, got {ns.layers}, {ns.bucket_mb}, {ns.rounds}")
    import os

    from megatron_alp.launch import run_on_ranks

    # Make glibc return freed buffers to the OS at once, so that the ranks' RSS follows
    # live memory (by default freed blocks up to 32 MiB stay in the heap and RSS only grows).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    r = run_on_ranks(2, _body, ns.layers, ns.bucket_mb, ns.rounds, not ns.fresh_buffers, ns.param_dtype, timeout_s=3000)[0]
    gb = r["bytes"] / 1e9
    where = "CPU/gloo" if r["device"] == "cpu" else f"{r['device']}/{r['backend']}"
    mem = "RSS" if r["device"] == "cpu" else "GPU memory (allocator peak)"
    print(f"model: {r['params'] / 1e9:.2f}B {ns.param_dtype} parameters, TP=2 on {where}; exported {gb:.2f} GB bf16 "
          f"in {r['buckets']} buckets (bound {r['bucket_bytes'] / 2**20:.0f} MiB), "
          f"{'fresh buffers' if ns.fresh_buffers else 'ExportBuffers kept'}; "
          f"{r['p2p_bytes'] / 1e9:.2f} GB cross ranks")
    print(f"first export (cold): {r['first_s']:.2f} s, peak extra {mem} {r['first_rss'] / 2**20:.0f} MiB")
    for k, (e, w, g, x) in enumerate(zip(r["export_s"], r["p2p_s"], r["gather_s"], r["extra_rss"])):
        print(f"round {k}: export {e:.2f} s ({gb / e:.2f} GB/s), raw send/recv {w:.2f} s, raw gather "
              f"{g:.2f} s, raw/export {w / e:.2f} (send/recv) {g / e:.2f} (gather), peak extra {mem} "
              f"{x / 2**20:.0f} MiB ({x / r['bucket_bytes']:.2f} x bucket)")
    print(f"raw send/recv / export time ratio: {_ratios(r['p2p_s'], r['export_s'])} "
          "(1.0 = the export runs at the transport's speed)")
    print(f"raw gather / export time ratio: {_ratios(r['gather_s'], r['export_s'])}")
    print(f"copy: {r['copy_s']:.2f} s = {gb / r['copy_s']:.2f} GB/s (same tensors, fp32 -> bf16, one rank)")
    print(f"peak extra {mem} / bucket bound: max {max(r['extra_rss']) / r['bucket_bytes']:.2f}")
    for rank, (profs, cpu_e, cpu_p) in enumerate(r["profiles"]):
        phases = sorted({k for p in profs for k in p})
        cells = ", ".join(f"{k} {statistics.median(p.get(k, 0.0) for p in profs):.3f}" for k in phases)
        print(f"rank {rank} seconds per phase (median of warm rounds): {cells}")
        print(f"rank {rank} CPU seconds (user + sys, all threads; median): export "
              f"{statistics.median(cpu_e):.3f}, raw send/recv {statistics.median(cpu_p):.3f}")
    cores = os.cpu_count()
    tot_e = sum(statistics.median(c) for _, c, _ in r["profiles"])
    tot_p = sum(statistics.median(c) for _, _, c in r["profiles"])
    print(f"both ranks: export {tot_e:.3f} CPU s, raw send/recv {tot_p:.3f} CPU s on {cores} cores: "
          f"CPU-time ratio raw/export {tot_p / tot_e:.2f}")


if __name__ == "__main__":
    main()
