"""ALP overhead: plain vs ALP vs the reference implementation's ALP, side by side on one model, one run.

    python benchmarks/alp_overhead.py [--hidden 512 --layers 4 --seq 512 --batch 2 ...]

Variants (same weights, same batch, one Megatron GPTModel per variant, TP=PP=1):

* ``plain``        — the plain layer spec;
* ``alp``          — ``with_alp`` (counter-based noise regenerated in backward), noise
                     kernel ``torch`` (eager reference) — the CPU path;
* ``alp-compile``  — the same, noise kernel ``compile`` (``torch.compile`` of the same
                     function: inductor C++ on CPU, Triton on GPU); ``--no-compile`` skips;
* ``alp-triton``   — on CUDA only, the hand-written fused Triton kernel;
* ``reference``    — the reference implementation's injection as its multi-turn patch
                     does it (learnable sigma): a fresh ``torch.Generator`` per layer
                     seeded ``counter * 100003 + rank + layer_idx`` before every
                     micro-batch forward, ``h + exp(log_sigma).to(h.dtype) * randn(...,
                     generator=g)`` inside ``torch.utils.checkpoint`` (non-reentrant), the
                     noise re-drawn identically from the re-seeded generator in the
                     recompute; see ``benchmarks/reference_alp.py`` for every fact and its
                     source;
* ``reference-st`` — the reference's single-turn patch: the same generator and seeds, no
                     checkpoint, so the noise is stored for backward.

Measured per variant:

* **step time**: one forward + backward of ``--micro-batches`` micro-batches (the part ALP
  touches; the optimizer step is identical for all variants and left out). After one
  warm-up step per variant (which pays the one-time costs: ``torch.compile``, Triton JIT,
  first-touch allocations), ``--repeats`` rounds; each round times every variant once, in
  an order rotated by one each round (A B C, B C A, ...), so that load drifts on a shared
  machine hit all variants alike and no variant always runs right after the same one.
  Every ratio is paired: variant / ``plain`` *of the same round*, reported as the min and
  the median over rounds (never a ratio of minima); absolute times as min and median;
* **noise op time**: the perturbation alone on one layer's ``[s, b, h]`` hidden states,
  forward + backward through autograd exactly as the layer runs it (ALP: ``add_noise``,
  whose backward regenerates ``eps`` for ``d loss / d sigma``; reference: the
  checkpointed injection, whose backward re-draws the noise in the recompute;
  reference-st: the stored-noise injection). Timed in the same rounds (best of 3 calls
  per round), times the number of layers and micro-batches, as a share of the same
  round's plain step; min and median over rounds;
* **activation memory**: bytes autograd keeps for backward (unique storages packed by
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded; the non-reentrant
  checkpoint's saved inputs pass through these hooks too) — exact on any device, and the
  quantity ALP promises not to grow;
* **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` over the step, above the
  memory held before it; on CPU the same quantity reconstructed from the allocation
  events of ``torch.profiler(profile_memory=True)`` (the peak of the running sum of
  allocations minus frees during the step), since the CPU allocator keeps no counter and
  RSS mixes in allocator caching and the other processes' pages;
* **torch.compile one-time cost** (``alp-compile``): the run starts with an empty inductor
  cache (``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` in a fresh temporary
  directory, removed at the end; ``--compile-cache default`` keeps torch's own, possibly
  warm, cache), so the warm-up step's excess over the warm median step is the cold
  compile cost as a user meets it at step 1. Then two fresh processes (``--compile-probe``)
  time the first call of the compiled ``add`` + ``dot`` alone on the same shape, both with
  one new, initially empty cache directory: the first is cold, the second reuses what the
  first wrote (warm cache, as a restarted job sees it). The timed rounds all run after
  the compile.

With ``--kernel-bandwidth`` on CUDA, the fused Triton kernel's effective bandwidth
(read + write of h) is compared with ``copy_`` of the same tensor.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform as py_platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=None, help="default: 2.75 x hidden, rounded to 64")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="micro-batch size")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=None,
        help="intra-op threads; default 1 without CUDA (OpenMP barriers on a small shared CPU "
        "turn every elementwise op into a multi-ms wait), torch's default with CUDA",
    )
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--kernel-bandwidth", action="store_true", help="CUDA only: fused kernel GB/s")
    p.add_argument("--json", default=None, help="write the results to this new file (an existing one is refused)")
    p.add_argument(
        "--compile-cache", choices=("fresh", "default"), default="fresh",
        help="inductor cache of this run: 'fresh' (an empty temporary directory: the cold "
        "compile cost) or 'default' (torch's own cache directory, possibly warm)",
    )
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json and os.path.lexists(args.json):
        p.error(f"--json {args.json}: exists; give a new file (results are never written over one)")
    return args


def _machine() -> str:
    cpu = py_platform.processor() or py_platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    try:
        parts.append(f"load average at start {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def _spec_transform(variant: str, sigma: float) -> Callable | None:
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from reference_alp import ReferencePerturbation, ReferenceSTPerturbation

    from megatron_alp.perturbation import ALPConfig, with_alp

    if variant == "plain":
        return None
    kernel = {"alp": "torch", "alp-compile": "compile", "alp-triton": "triton"}.get(variant, "torch")
    cfg = ALPConfig(init_std=sigma, kernel=kernel)
    if not variant.startswith("reference"):
        return functools.partial(with_alp, cfg=cfg)
    cls = ReferencePerturbation if variant == "reference" else ReferenceSTPerturbation

    def transform(spec):
        wrapped = with_alp(spec, cfg)
        sub = dataclasses.replace(
            wrapped.submodules, perturbation=ModuleSpec(module=cls, params={"alp_config": cfg})
        )
        return ModuleSpec(module=wrapped.module, params=wrapped.params, submodules=sub)

    return transform


def _saved_bytes(fn: Callable[[], torch.Tensor], params: set[int]) -> int:
    """Bytes of unique non-parameter storages autograd saves for backward during fn()."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if id(t) not in params and t.untyped_storage().data_ptr() not in seen:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    running, peak = 0, 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def _noise_op_fns(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, variants: list[str]
) -> dict[str, Callable[[], None]]:
    """One layer's perturbation, forward + backward through autograd, per variant (module doc)."""
    from reference_alp import (
        reference_inject,
        reference_micro_batch_seed,
        reference_noise,
    )
    from torch.utils.checkpoint import checkpoint

    from megatron_alp.perturbation.function import NoiseSite, add_noise
    from megatron_alp.perturbation.kernels import get_kernel

    h = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(h)
    log_sigma = torch.nn.Parameter(torch.tensor(args.sigma, device=device).log())
    site = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=args.batch, s_local=args.seq)
    seed = reference_micro_batch_seed(1)

    def backward(out: torch.Tensor) -> None:
        out.backward(g)
        h.grad = log_sigma.grad = None

    fns: dict[str, Callable[[], None]] = {}
    for v, name in (("alp", "torch"), ("alp-compile", "compile"), ("alp-triton", "triton")):
        if v in variants:
            fns[v] = functools.partial(lambda k: backward(add_noise(h, log_sigma, site, k)), get_kernel(name, device))
    if "reference" in variants:
        fns["reference"] = lambda: backward(
            checkpoint(
                reference_inject, h, log_sigma, torch.tensor(seed, device=device), 0, use_reentrant=False
            )
        )
    if "reference-st" in variants:

        def reference_st() -> None:
            with torch.no_grad():
                noise = reference_noise(h, seed)
            backward(h + log_sigma.exp().to(dtype) * noise)

        fns["reference-st"] = reference_st
    return fns


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _compile_probe(args: argparse.Namespace) -> None:
    """``--compile-probe``: first and second call of the compiled add + dot; one JSON line.

    Runs in a fresh process whose ``TORCHINDUCTOR_CACHE_DIR`` the parent chose; the time
    starts before ``torch.compile`` is called (its lazy imports are part of the cost).
    """
    _set_threads(args)
    from megatron_alp import platform
    from megatron_alp.perturbation.function import NoiseSite
    from megatron_alp.perturbation.kernels import get_kernel

    device = platform.device()
    dtype = getattr(torch, args.dtype)
    h = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype)
    sigma = torch.tensor(args.sigma, device=device)
    site = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=args.batch, s_local=args.seq)
    keys = site.row_keys(device)

    def call() -> None:
        k = get_kernel("compile", device)
        k.add(h, sigma, keys)
        k.dot(h, keys)

    first = _timed(call, device)
    second = _timed(call, device)
    print(json.dumps({"first_call_s": first, "second_call_s": second}))


def _run_compile_probes(args: argparse.Namespace) -> dict[str, Any]:
    """Two fresh ``--compile-probe`` processes sharing one new cache directory: cold, then warm cache."""
    import subprocess
    import sys
    import tempfile

    argv = [
        sys.executable, os.path.abspath(__file__), "--compile-probe", "--hidden", str(args.hidden),
        "--seq", str(args.seq), "--batch", str(args.batch), "--dtype", args.dtype, "--sigma", str(args.sigma),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="alp-inductor-probe-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        for name in ("cold_cache", "warm_cache"):
            proc = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                out[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
                continue
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _kernel_bandwidth(device: torch.device, dtype: torch.dtype, rounds: int = 7) -> dict[str, Any]:
    """GB/s of the fused kernels vs ``copy_`` of the same tensor, in interleaved rounds.

    ``add`` / ``dot`` take row keys computed on the host (``site.row_keys``, included in the
    time, as ``add_noise`` used to call them); ``add_at`` / ``dot_at`` compute them inside
    the kernel. Each round times every variant once, the order rotated by one each round;
    min and median over rounds of the times and of each variant's ratio to the same
    round's ``copy_``.
    """
    from megatron_alp.perturbation.function import NoiseSite
    from megatron_alp.perturbation.triton_noise import (
        triton_add,
        triton_add_at,
        triton_dot,
        triton_dot_at,
    )

    s, b, h = 4096, 8, 4096
    x = torch.randn(s, b, h, device=device, dtype=dtype)
    site = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=b, s_local=s)
    sigma = torch.tensor(0.01, device=device)
    out = torch.empty_like(x)
    variants: dict[str, tuple[Callable[[], Any], int]] = {
        "copy_": (lambda: out.copy_(x), 2),
        "add (host row keys)": (lambda: triton_add(x, sigma, site.row_keys(device)), 2),
        "add_at (in-kernel keys)": (lambda: triton_add_at(x, sigma, site), 2),
        "dot (host row keys)": (lambda: triton_dot(x, site.row_keys(device)), 1),
        "dot_at (in-kernel keys)": (lambda: triton_dot_at(x, site), 1),
    }

    def timed(fn: Callable[[], Any], n: int = 10) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    for fn, _ in variants.values():
        fn()  # compile / warm up
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(variants[name][0]))
    result: dict[str, Any] = {"shape": [s, b, h], "dtype": str(dtype), "rounds": rounds}
    for name, (_, passes) in variants.items():
        nbytes = passes * x.numel() * x.element_size()  # reads + writes of x
        result[name] = {
            "min_ms": 1e3 * min(times[name]),
            "median_ms": 1e3 * statistics.median(times[name]),
            "GBps": nbytes / min(times[name]) / 1e9,
            "time_vs_copy": _stats([t / c for t, c in zip(times[name], times["copy_"])]),
        }
    return result


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)


def _fresh_compile_cache() -> str:
    """Point inductor (and Triton) at a new empty directory: compiles in this process are cold."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="alp-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    return cache


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def main() -> None:
    args = _args()
    if args.compile_probe:
        _compile_probe(args)
        return
    cache_dir = _fresh_compile_cache() if args.compile_cache == "fresh" else None
    try:
        _run(args, cache_dir)
    finally:
        if cache_dir is not None:
            import shutil

            shutil.rmtree(cache_dir, ignore_errors=True)  # created above by this process


def _run(args: argparse.Namespace, cache_dir: str | None) -> None:
    _set_threads(args)
    from reference_alp import reference_micro_batch_seed, set_reference_seed

    from megatron_alp import parallel
    from megatron_alp.launch import free_port
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.sharding import load_full_state
    from megatron_alp.models.tiny import random_full_state, tiny_hf_config
    from megatron_alp.perturbation import perturbed

    ffn = args.ffn or int(round(args.hidden * 2.75 / 64)) * 64
    hf = tiny_hf_config(
        hidden_size=args.hidden, intermediate_size=ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=max(args.seq, 256),
    )
    gargs = gpt_args_from_hf(hf)
    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg, rank=0, world_size=1, master_port=free_port())
    from megatron_alp import platform

    device = platform.device()
    dtype = getattr(torch, args.dtype)
    tc = transformer_config(gargs, pcfg, params_dtype=dtype)
    full = random_full_state(build_model(gargs, tc), seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batches, args.batch, args.seq + 1), generator=gen)
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1).to(device)

    variants = ["plain", "alp"]
    if device.type == "cuda":
        variants.append("alp-triton")
    if not args.no_compile:
        variants.append("alp-compile")
    variants += ["reference", "reference-st"]
    models = {}
    for v in variants:
        m = build_model(gargs, tc, layer_spec_transform=_spec_transform(v, args.sigma))[0]
        load_full_state([m], full, strict=False)
        models[v] = m
    # The reference's actor counts micro-batch forwards and seeds every layer before each.
    forwards = dict.fromkeys(variants, 0)

    def loss_of(v: str, mb: int) -> torch.Tensor:
        model = models[v]
        if v.startswith("reference"):
            forwards[v] += 1
            set_reference_seed(model, reference_micro_batch_seed(forwards[v]))
        t = tokens[mb].to(device)
        with perturbed(key=1234, step=0, sample_offset=mb * args.batch):
            logits = model(t[:, :-1], pos, None)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten())

    def step(v: str) -> None:
        models[v].zero_grad(set_to_none=True)
        for mb in range(args.micro_batches):
            (loss_of(v, mb) / args.micro_batches).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, dict[str, Any]] = {v: {"times": [], "op_times": []} for v in variants}
    for v in variants:  # one-time costs (torch.compile, Triton JIT) outside the timed rounds
        results[v]["first_step_s"] = _timed(functools.partial(step, v), device)
    op_fns = _noise_op_fns(args, device, dtype, variants)
    for fn in op_fns.values():
        fn()  # warm-up
    n = len(variants)
    for r in range(args.repeats):
        for v in variants[r % n:] + variants[: r % n]:
            results[v]["times"].append(_timed(functools.partial(step, v), device))
        for v in variants[r % n:] + variants[: r % n]:
            if v in op_fns:
                results[v]["op_times"].append(min(_timed(op_fns[v], device) for _ in range(3)))
    plain_times = results["plain"]["times"]
    per_layer_work = args.layers * args.micro_batches
    for v in variants:
        r = results[v]
        m = models[v]
        params = {id(p) for p in m.parameters()}
        m.zero_grad(set_to_none=True)
        r["saved_bytes"] = _saved_bytes(functools.partial(loss_of, v, 0), params)
        m.zero_grad(set_to_none=True)
        r["peak_bytes"] = _peak_bytes(functools.partial(step, v), device)
        r["step_s"] = _stats(r["times"])
        r["step_vs_plain"] = _stats([t / p for t, p in zip(r["times"], plain_times)])
        if r["op_times"]:
            r["noise_op_s"] = _stats(r["op_times"])
            r["noise_ops_share"] = _stats([t * per_layer_work / p for t, p in zip(r["op_times"], plain_times)])
    compile_cost: dict[str, Any] = {}
    if "alp-compile" in results:
        rc = results["alp-compile"]
        compile_cost = {
            "cache": "fresh, empty" if cache_dir else "torch default (may be warm)",
            "first_step_s": rc["first_step_s"],
            "warm_step_median_s": rc["step_s"]["median"],
            "one_time_s": rc["first_step_s"] - rc["step_s"]["median"],
            "probe": _run_compile_probes(args),
        }

    base = results["plain"]
    tokens_per_mb = args.batch * args.seq
    print(f"machine: {_machine()}")
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, ffn {ffn}, heads {args.heads}/{args.kv_heads}, "
        f"vocab {args.vocab}, {args.dtype}; step = fwd+bwd of {args.micro_batches} x [{args.batch} x {args.seq}] "
        f"tokens; {args.repeats} interleaved rounds (order rotated each round), after one warm-up step each"
    )
    print(
        "x plain: per-round ratio to the same round's plain step, min / median over rounds; "
        "noise ops: the perturbation alone x layers x micro-batches / the same round's plain step"
    )
    print(
        f"{'variant':<13} {'min ms':>8} {'median ms':>10} {'x plain min':>12} {'x plain med':>12} "
        f"{'ops min':>8} {'ops med':>8} {'saved MiB':>10} {'x plain':>8} {'peak MiB':>9} {'x plain':>8}"
    )
    for v in variants:
        r = results[v]
        share = r.get("noise_ops_share")
        ops = f"{share['min'] * 100:7.2f}% {share['median'] * 100:7.2f}%" if share else f"{'-':>8} {'-':>8}"
        print(
            f"{v:<13} {r['step_s']['min'] * 1e3:8.1f} {r['step_s']['median'] * 1e3:10.1f} "
            f"{r['step_vs_plain']['min']:12.3f} {r['step_vs_plain']['median']:12.3f} {ops} "
            f"{r['saved_bytes'] / 2**20:10.2f} {r['saved_bytes'] / base['saved_bytes']:8.3f} "
            f"{r['peak_bytes'] / 2**20:9.2f} {r['peak_bytes'] / base['peak_bytes']:8.3f}"
        )
    print("noise op, fwd + bwd of one layer's perturbation (min / median over rounds):")
    for v in variants:
        if "noise_op_s" in results[v]:
            o = results[v]["noise_op_s"]
            print(f"  {v:<13} {o['min'] * 1e3:8.2f} / {o['median'] * 1e3:8.2f} ms per layer and micro-batch")
    print("first (warm-up) step, one-time costs included: " + ", ".join(
        f"{v} {results[v]['first_step_s']:.2f} s" for v in variants
    ))
    if compile_cost:
        pr = compile_cost["probe"]

        def probe_txt(name: str) -> str:
            p = pr.get(name, {})
            if "first_call_s" not in p:
                return f"{name} failed: {p.get('error')}"
            return f"{name} {p['first_call_s']:.2f} s (then {p['second_call_s'] * 1e3:.1f} ms)"

        print(
            f"torch.compile one-time cost (alp-compile, inductor cache {compile_cost['cache']}): "
            f"first step {compile_cost['first_step_s']:.2f} s - warm median {compile_cost['warm_step_median_s']:.2f} s "
            f"= {compile_cost['one_time_s']:.2f} s; compiled add + dot alone, first call in a fresh process: "
            f"{probe_txt('cold_cache')}, {probe_txt('warm_cache')}"
        )
    act = tokens_per_mb * args.hidden * torch.tensor([], dtype=dtype).element_size()
    print(f"(one layer's hidden states [s, b, h] = {act / 2**20:.2f} MiB)")
    keys = (
        "step_s", "step_vs_plain", "times", "first_step_s", "saved_bytes", "peak_bytes",
        "op_times", "noise_op_s", "noise_ops_share",
    )
    out: dict[str, Any] = {
        "machine": _machine(),
        "config": vars(args) | {"ffn": ffn},
        "results": {v: {k: r[k] for k in keys if k in r} for v, r in results.items()},
        "compile_one_time": compile_cost,
    }
    if args.kernel_bandwidth:
        if device.type != "cuda":
            print("--kernel-bandwidth needs CUDA; skipped")
        else:
            bw = _kernel_bandwidth(device, torch.bfloat16)
            out["kernel_bandwidth"] = bw
            print(f"\nfused kernel on {bw['shape']} {bw['dtype']}, {bw['rounds']} interleaved rounds:")
            print("| kernel | min ms | median ms | GB/s (min) | time / copy_ min | median |")
            print("|---|---|---|---|---|---|")
            for name, r in bw.items():
                if isinstance(r, dict):
                    print(f"| {name} | {r['min_ms']:.3f} | {r['median_ms']:.3f} | {r['GBps']:.0f} "
                          f"| {r['time_vs_copy']['min']:.2f} | {r['time_vs_copy']['median']:.2f} |")
    if args.json:  # written aside, then renamed: never a half-written file
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    parallel.teardown()


if __name__ == "__main__":
    main()
