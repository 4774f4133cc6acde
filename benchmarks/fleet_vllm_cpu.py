"""The vLLM CPU fleet beside the CPU twin, in one run (issue 17).

    PYTHONPATH=. python benchmarks/fleet_vllm_cpu.py [--engines 2] [--rounds 3] [--dtype bfloat16]

Needs ``.venv-vllm`` (``scripts/bootstrap_vllm.sh``); run with the trainer's ``.venv``.
One model (Qwen2-shaped, hidden 512, 8 heads of 64, 8 layers, the tiny example's
tokenizer) served by ``--engines`` twin engines and by as many ``vllm serve`` engines
(vllm-cpu, eager, ``TORCH_COMPILE_DISABLE=1``). Reported:

* engine start: wall time until every engine of the fleet answers ``/health``;
* generation: tokens/s of 16 prompts x 8 samples x 32 new tokens (ignore EOS), paired
  interleaved rounds (twin, vllm, twin, vllm, ...), ratio vllm / twin;
* weight sync: ``update_weights`` of the whole model, against a raw gloo broadcast of the
  same tensors to as many bare receivers (interleaved rounds); ratio raw / sync;
* prefix cache (vLLM): hit rate of prompt tokens (``vllm:prefix_cache_hits`` /
  ``queries``) of 16 prompts of 160 tokens (the CPU backend caches whole blocks of 128)
  with a prompt's 8 samples in one request unit (grouped rows: ``rows_per_request=8``,
  one engine) against spread rows (``rows_per_request=1``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _raw_receiver(host: str, rank: int, world: int, conn) -> None:
    import torch

    from megatron_alp.rollout.weight_group import GlooGroup

    torch.set_num_threads(1)
    buffers = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        port, specs = msg
        if buffers is None:  # allocated once: the rounds time the transport only
            buffers = [torch.zeros(s, dtype=getattr(torch, d)) for d, s in specs]
        g = GlooGroup(host, port, rank, world, timeout_s=120)
        conn.send("joined")
        g.connect()
        for t in buffers:
            g.broadcast(t)
        conn.send("done")


def _prefix_counters(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()

    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M))

    return total("vllm:prefix_cache_hits"), total("vllm:prefix_cache_queries")


def _build(folder: Path) -> None:
    import importlib.util

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.spec_from_file_location("prep", Path(__file__).parents[1] / "examples/tiny_cpu/prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)  # type: ignore[union-attr]
    train, _ = prep.task_rows()
    tok = prep.build_tokenizer([r["prompt"] for r in train] + ["Please reason step by step."])
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a = p.parse_args()
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_alp.launch import free_port
    from megatron_alp.rollout import SamplingParams, create_engine
    from megatron_alp.rollout.fleet_launch import LocalFleet
    from megatron_alp.rollout.weight_group import GlooGroup, broadcast_bucket

    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "model"
    _build(folder)
    dt = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    state = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    buckets, cur, size = [], [], 0
    for n, t in state:
        if cur and size + t.numel() * t.element_size() > 64 << 20:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((n, t))
        size += t.numel() * t.element_size()
    buckets.append(cur)
    total = sum(t.numel() * t.element_size() for _, t in state)
    print(f"model: {total / 1e6:.1f} MB {a.dtype}, {len(buckets)} buckets; {a.engines} engines per fleet", flush=True)

    fleets, engines, start_s = {}, {}, {}
    try:
        for backend, extra in (("twin", []), ("vllm", ["--enforce-eager"])):
            t0 = time.perf_counter()
            logs = Path(tmp.name) / f"logs-{backend}"
            logs.mkdir()
            fleets[backend] = LocalFleet(a.engines, model=str(folder), backend=backend, dtype=a.dtype,
                                         extra_args=extra, startup_timeout_s=600, log_dir=str(logs))
            start_s[backend] = time.perf_counter() - t0
            engines[backend] = create_engine("fleet", endpoints=fleets[backend].endpoints, backend=backend,
                                             model=str(folder), sync_timeout_s=300, startup_wait_s=60)
            print(f"{backend}: {a.engines} engines up in {start_s[backend]:.1f} s", flush=True)

        prompts = [[(11 * i + k) % 200 + 3 for k in range(40)] for i in range(16)]
        sp = SamplingParams(temperature=1.0, max_new_tokens=32, n=8, seed=1, ignore_eos=True)
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for r in range(a.engines):
            parent, child = ctx.Pipe()
            pr = ctx.Process(target=_raw_receiver, args=("127.0.0.1", r + 1, a.engines + 1, child), daemon=True)
            pr.start()
            pipes.append(parent)
            procs.append(pr)
        specs = [(str(t.dtype).removeprefix("torch."), list(t.shape)) for b in buckets for _, t in b]

        def raw_round() -> float:
            port = free_port()
            g = GlooGroup("127.0.0.1", port, 0, a.engines + 1, timeout_s=120)
            for c in pipes:
                c.send((port, specs))
            for c in pipes:
                c.recv()
            g.connect()
            t0 = time.perf_counter()
            for b in buckets:
                broadcast_bucket(g, b)
            for c in pipes:
                assert c.recv() == "done"
            return time.perf_counter() - t0

        first = {b: engines[b].update_weights(iter(buckets))["seconds"] for b in engines}
        print("first sync (forms the group): " + ", ".join(f"{b} {s:.2f} s" for b, s in first.items()))
        gen = {b: [] for b in engines}
        sync = {b: [] for b in engines}
        raw = []
        for r in range(a.rounds):
            for b, eng in engines.items():
                t0 = time.perf_counter()
                comps = eng.generate(prompts, sp)
                gen[b].append(sum(len(c.token_ids) for c in comps) / (time.perf_counter() - t0))
                sync[b].append(eng.update_weights(iter(buckets))["seconds"])
            raw.append(raw_round())
            print(f"round {r}: gen tok/s " + ", ".join(f"{b} {gen[b][-1]:.0f}" for b in engines)
                  + "; sync s " + ", ".join(f"{b} {sync[b][-1]:.3f}" for b in engines)
                  + f"; raw gloo {raw[-1]:.3f} s", flush=True)

        # vLLM's CPU backend caches in blocks of 128 tokens: a prompt shorter than that
        # is never a hit, so the prefix measurement uses 160-token prompts.
        long_prompts = [[(11 * i + k) % 200 + 3 for k in range(160)] for i in range(16)]
        hits = {}
        for label, rows in (("grouped (rows_per_request=8)", 8), ("spread (rows_per_request=1)", 1)):
            eng = create_engine("fleet", endpoints=fleets["vllm"].endpoints, backend="vllm", model=str(folder),
                                rows_per_request=rows, startup_wait_s=60)
            eng.update_weights(iter(buckets))  # resets the prefix caches
            before = [_prefix_counters(u) for u in fleets["vllm"].endpoints]
            eng.generate(long_prompts, SamplingParams(temperature=1.0, max_new_tokens=4, n=8, seed=2))
            after = [_prefix_counters(u) for u in fleets["vllm"].endpoints]
            h = sum(x[0] - y[0] for x, y in zip(after, before))
            q = sum(x[1] - y[1] for x, y in zip(after, before))
            hits[label] = h / q if q else float("nan")
            eng.close()
        med = statistics.median
        print("\nsummary")
        for b in engines:
            print(f"  {b:5s} start {start_s[b]:6.1f} s | gen {med(gen[b]):7.0f} tok/s | sync {med(sync[b]):.3f} s "
                  f"(raw gloo {med(raw):.3f} s: raw/sync {med(raw) / med(sync[b]):.2f})")
        print(f"  gen vllm/twin (median of paired rounds): "
              f"{med([v / t for v, t in zip(gen['vllm'], gen['twin'])]):.2f}")
        for label, rate in hits.items():
            print(f"  vllm prefix-cache hit rate, {label}: {rate:.2f}")
        for c in pipes:
            c.send(None)
    except BaseException:
        for log in sorted(Path(tmp.name).glob("logs-*/*.log")):
            print(f"--- {log}\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        for eng in engines.values():
            eng.close()
        for fl in fleets.values():
            fl.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
