"""Log-probs + entropy of a micro-batch's logits: the chunked bf16 pass vs the previous fp32 one.

    python benchmarks/logprobs_memory.py [--batch 4 --seq 1024 --vocab 32768 --rounds 5]

Variants, on the same bf16 logits ``[batch, seq, vocab]`` (the model's output):

* ``previous`` — what the trainer did before issue 18.5: ``Float16Module``'s fp32 upcast
  of the whole tensor, then ``vocab_parallel_logprobs`` with everything in fp32 at once
  (emulated here with ``chunk_bytes`` larger than the tensor: one chunk, the same
  arithmetic as the old code; the old backward reused the forward's fp32 probabilities
  where this emulation recomputes them, so the peaks differ somewhat: the old code
  measured 14.5 x in ``tests/unit/test_rl_logprobs_memory.py``'s case);
* ``chunked`` — the current path: bf16 logits in, fp32 row chunks of ``CHUNK_BYTES``.

Each round runs both (order alternating), forward with entropy + backward (the update)
and forward only (the log-prob pass); printed: the paired time ratio chunked / previous
(median and min over rounds) and the peak extra memory of each, in multiples of the bf16
logits (CUDA: ``max_memory_allocated`` above the memory held before; CPU: the running sum
of the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_alp.rl.logprobs import CHUNK_BYTES, vocab_parallel_logprobs


def _peak(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES >> 20)
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(a.batch, a.seq, a.vocab, generator=g)).bfloat16().to(dev)
    target = torch.randint(0, a.vocab - 7, (a.batch, a.seq), generator=g).to(dev)
    size = logits.numel() * logits.element_size()
    kw = dict(temperature=0.9, vocab_size=a.vocab - 7, with_entropy=True)
    chunk = {"previous": 1 << 62, "chunked": a.chunk_mib << 20}

    def update(name: str) -> None:
        x = logits.detach().requires_grad_()
        inp = x.float() if name == "previous" else x
        lp, ent = vocab_parallel_logprobs(inp, target, chunk_bytes=chunk[name], check_target=False, **kw)
        (lp.sum() + 0.1 * ent.sum()).backward()

    def logprob_pass(name: str) -> None:
        with torch.no_grad():
            inp = logits.float() if name == "previous" else logits
            vocab_parallel_logprobs(inp, target, chunk_bytes=chunk[name], check_target=False, **kw)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    print(f"[logprobs] {dev}, logits [{a.batch}, {a.seq}, {a.vocab}] bf16 = {size / 2**20:.0f} MiB, "
          f"chunk {a.chunk_mib} MiB, {a.rounds} rounds", flush=True)
    for what, fn in (("update (fwd+bwd)", update), ("log-prob pass (fwd)", logprob_pass)):
        for name in chunk:  # warm-up
            fn(name)
        ratios, times = [], {n: [] for n in chunk}
        for r in range(a.rounds):
            order = list(chunk) if r % 2 == 0 else list(reversed(chunk))
            t = {n: timed(lambda n=n: fn(n)) for n in order}
            for n in chunk:
                times[n].append(t[n])
            ratios.append(t["chunked"] / t["previous"])
        peaks = {n: _peak(lambda n=n: fn(n), dev) / size for n in chunk}
        print(f"[logprobs] {what}: time chunked/previous median {statistics.median(ratios):.2f} "
              f"min {min(ratios):.2f} (previous median {statistics.median(times['previous']) * 1e3:.0f} ms); "
              f"peak extra memory x bf16 logits: previous {peaks['previous']:.2f}, "
              f"chunked {peaks['chunked']:.2f}", flush=True)


if __name__ == "__main__":
    main()
