"""ALP overhead: plain vs ALP vs reference-style ALP, side by side on one model, one run.

    python benchmarks/alp_overhead.py [--hidden 512 --layers 4 --seq 512 --batch 2 ...]

Variants (same weights, same batch, one Megatron GPTModel per variant, TP=PP=1):

* ``plain``       — the plain layer spec;
* ``alp``         — ``with_alp`` (counter-based noise regenerated in backward), noise
                    kernel ``torch`` (eager reference) — the CPU path;
* ``alp-compile`` — the same, noise kernel ``compile`` (``torch.compile`` of the same
                    function: inductor C++ on CPU, Triton on GPU); ``--no-compile`` skips;
* ``alp-triton``  — on CUDA only, the hand-written fused Triton kernel;
* ``reference``   — the reference implementation's style: ``h + exp(log_sigma) *
                    torch.randn_like(h)`` under autograd, so the noise is stored for
                    backward (the multiply saves it).

Measured per variant:

* **step time**: one forward + backward of ``--micro-batches`` micro-batches (the part ALP
  touches; the optimizer step is identical for all variants and left out) over
  ``--repeats`` rounds, rounds interleaved across variants so that load drifts on a
  shared machine hit all of them alike; reported as the minimum (the least disturbed
  round: on a shared machine other processes only ever add time) and the median;
* **noise op time**: the perturbation alone on one layer's ``[s, b, h]`` hidden states,
  forward (``h + sigma * eps``) plus backward (ALP: regenerate ``eps`` and reduce
  ``sum(grad * eps)``; reference: ``randn_like`` + multiply-add forward, and the
  backward's ``sum(grad * eps)`` on the stored noise), per layer and times the number of
  layers as a share of the plain step;
* **activation memory**: bytes autograd keeps for backward (unique storages packed by
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) — exact on any
  device, and the quantity ALP promises not to grow;
* **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` over the step, above the
  memory held before it; on CPU the same quantity reconstructed from the allocation
  events of ``torch.profiler(profile_memory=True)`` (the peak of the running sum of
  allocations minus frees during the step), since the CPU allocator keeps no counter and
  RSS mixes in allocator caching and the other processes' pages.

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
from typing import Any, Callable

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
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args()


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


def _reference_perturbation_cls():
    from megatron_alp.perturbation.layer import LayerPerturbation

    class ReferencePerturbation(LayerPerturbation):
        """The reference's injection: randn_like noise under autograd (stored for backward)."""

        def forward(self, hidden_states, packed_seq_params=None):
            from megatron_alp.perturbation.context import current_coords

            if not self.active or current_coords() is None:
                return hidden_states
            scale = self.log_sigma.exp().to(hidden_states.dtype)
            return hidden_states + scale * torch.randn_like(hidden_states)

    return ReferencePerturbation


def _spec_transform(variant: str, sigma: float) -> Callable | None:
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_alp.perturbation import ALPConfig, with_alp

    if variant == "plain":
        return None
    kernel = {"alp": "torch", "alp-compile": "compile", "alp-triton": "triton", "reference": "torch"}[variant]
    cfg = ALPConfig(init_std=sigma, kernel=kernel)
    if variant != "reference":
        return functools.partial(with_alp, cfg=cfg)

    def transform(spec):
        wrapped = with_alp(spec, cfg)
        sub = dataclasses.replace(
            wrapped.submodules,
            perturbation=ModuleSpec(module=_reference_perturbation_cls(), params={"alp_config": cfg}),
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


def _noise_op_times(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, variants: list[str], repeats: int
) -> dict[str, float]:
    """Min time of one layer's perturbation, forward + backward (see the module docstring)."""
    from megatron_alp.perturbation.function import NoiseSite
    from megatron_alp.perturbation.kernels import get_kernel

    h = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype)
    g = torch.randn_like(h)
    sigma = torch.tensor(args.sigma, device=device)
    site = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=args.batch, s_local=args.seq)
    fns: dict[str, Callable[[], Any]] = {}
    for v, name in (("alp", "torch"), ("alp-compile", "compile"), ("alp-triton", "triton")):
        if v in variants:
            k = get_kernel(name, device)

            def alp_op(k=k):  # the calls add_noise makes (row keys in-kernel where possible)
                if k.add_at is not None:
                    k.add_at(h, sigma, site)
                    k.dot_at(g, site)
                    return
                a, b = site.lanes(device)
                k.add(h, sigma, a, b)
                a, b = site.lanes(device)
                k.dot(g, a, b)

            fns[v] = alp_op

    def reference_op():
        eps = torch.randn_like(h)
        _ = h + sigma.to(dtype) * eps
        (g.float() * eps.float()).sum()

    fns["reference"] = reference_op
    out = {}
    for v, fn in fns.items():
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[v] = min(times)
    return out


def _kernel_bandwidth(device: torch.device, dtype: torch.dtype, rounds: int = 7) -> dict[str, Any]:
    """GB/s of the fused kernels vs ``copy_`` of the same tensor, in interleaved rounds.

    ``add`` / ``dot`` take row keys computed on the host (``site.lanes``, included in the
    time, as ``add_noise`` used to call them); ``add_at`` / ``dot_at`` compute them inside
    the kernel. Each round times every variant once (A B C ... A B C ...); min and median
    over rounds, and each variant's min-time ratio to ``copy_``.
    """
    from megatron_alp.perturbation.function import NoiseSite
    from megatron_alp.perturbation.triton_noise import triton_add, triton_add_at, triton_dot, triton_dot_at

    s, b, h = 4096, 8, 4096
    x = torch.randn(s, b, h, device=device, dtype=dtype)
    site = NoiseSite(key=1, step=0, layer=1, sample_offset=0, batch=b, s_local=s)
    sigma = torch.tensor(0.01, device=device)
    out = torch.empty_like(x)
    variants: dict[str, tuple[Callable[[], Any], int]] = {
        "copy_": (lambda: out.copy_(x), 2),
        "add (host row keys)": (lambda: triton_add(x, sigma, *site.lanes(device)), 2),
        "add_at (in-kernel keys)": (lambda: triton_add_at(x, sigma, site), 2),
        "dot (host row keys)": (lambda: triton_dot(x, *site.lanes(device)), 1),
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
    for _ in range(rounds):
        for name, (fn, _) in variants.items():
            times[name].append(timed(fn))
    result: dict[str, Any] = {"shape": [s, b, h], "dtype": str(dtype), "rounds": rounds}
    t_copy = min(times["copy_"])
    for name, (_, passes) in variants.items():
        nbytes = passes * x.numel() * x.element_size()  # reads + writes of x
        result[name] = {
            "min_ms": 1e3 * min(times[name]),
            "median_ms": 1e3 * statistics.median(times[name]),
            "GBps": nbytes / min(times[name]) / 1e9,
            "time_vs_copy": min(times[name]) / t_copy,
        }
    return result


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)
    from megatron_alp import parallel
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.sharding import load_full_state
    from megatron_alp.perturbation import perturbed
    from megatron_alp.launch import free_port
    from megatron_alp.models.tiny import random_full_state, tiny_hf_config

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

    variants = ["plain", "alp", "reference"]
    if not args.no_compile:
        variants.insert(2, "alp-compile")
    if device.type == "cuda":
        variants.insert(2, "alp-triton")
    models = {}
    for v in variants:
        m = build_model(gargs, tc, layer_spec_transform=_spec_transform(v, args.sigma))[0]
        load_full_state([m], full, strict=False)
        models[v] = m

    def loss_of(model, mb: int) -> torch.Tensor:
        t = tokens[mb].to(device)
        ctx = perturbed(key=1234, step=0, sample_offset=mb * args.batch)
        with ctx:
            logits = model(t[:, :-1], pos, None)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten())

    def step(model) -> None:
        model.zero_grad(set_to_none=True)
        for mb in range(args.micro_batches):
            (loss_of(model, mb) / args.micro_batches).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, dict[str, Any]] = {v: {"times": []} for v in variants}
    for v in variants:  # warm-up (and torch.compile) outside the timings
        t = time.perf_counter()
        step(models[v])
        results[v]["first_step_s"] = time.perf_counter() - t
    for _ in range(args.repeats):
        for v in variants:
            t = time.perf_counter()
            step(models[v])
            results[v]["times"].append(time.perf_counter() - t)
    for v in variants:
        m = models[v]
        params = {id(p) for p in m.parameters()}
        m.zero_grad(set_to_none=True)
        results[v]["saved_bytes"] = _saved_bytes(lambda: loss_of(m, 0), params)
        m.zero_grad(set_to_none=True)
        results[v]["peak_bytes"] = _peak_bytes(lambda: step(m), device)
        results[v]["step_s"] = min(results[v]["times"])
        results[v]["step_median_s"] = statistics.median(results[v]["times"])
    op_times = _noise_op_times(args, device, dtype, variants, repeats=max(5, 2 * args.repeats))

    base = results["plain"]
    tokens_per_mb = args.batch * args.seq
    print(f"machine: {_machine()}")
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, ffn {ffn}, heads {args.heads}/{args.kv_heads}, "
        f"vocab {args.vocab}, {args.dtype}; step = fwd+bwd of {args.micro_batches} x [{args.batch} x {args.seq}] "
        f"tokens; {args.repeats} interleaved rounds"
    )
    header = (
        f"{'variant':<12} {'min ms':>8} {'x plain':>8} {'median ms':>10} {'x plain':>8} "
        f"{'noise ops':>10} {'saved MiB':>10} {'x plain':>8} {'peak MiB':>9} {'x plain':>8}"
    )
    print(header)
    for v in variants:
        r = results[v]
        share = op_times.get(v, 0.0) * args.layers * args.micro_batches / base["step_s"]
        r["noise_ops_share"] = share
        print(
            f"{v:<12} {r['step_s'] * 1e3:8.1f} {r['step_s'] / base['step_s']:8.3f} "
            f"{r['step_median_s'] * 1e3:10.1f} {r['step_median_s'] / base['step_median_s']:8.3f} "
            f"{share * 100:9.2f}% "
            f"{r['saved_bytes'] / 2**20:10.2f} {r['saved_bytes'] / base['saved_bytes']:8.3f} "
            f"{r['peak_bytes'] / 2**20:9.2f} {r['peak_bytes'] / base['peak_bytes']:8.3f}"
        )
    print("noise ops: fwd + bwd of the perturbation alone, x layers, as a share of the plain step (min)")
    for v, t in op_times.items():
        print(f"  {v:<12} {t * 1e3:8.2f} ms per layer and micro-batch")
    act = tokens_per_mb * args.hidden * torch.tensor([], dtype=dtype).element_size()
    print(f"(one layer's hidden states [s, b, h] = {act / 2**20:.2f} MiB)")
    out: dict[str, Any] = {
        "machine": _machine(),
        "config": vars(args) | {"ffn": ffn},
        "results": {
            v: {
                k: r[k]
                for k in ("step_s", "step_median_s", "times", "first_step_s", "saved_bytes", "peak_bytes", "noise_ops_share")
            }
            for v, r in results.items()
        },
        "noise_op_s_per_layer": op_times,
    }
    if args.kernel_bandwidth:
        if device.type != "cuda":
            print("--kernel-bandwidth needs CUDA; skipped")
        else:
            bw = _kernel_bandwidth(device, torch.bfloat16)
            out["kernel_bandwidth"] = bw
            print(f"\nfused kernel on {bw['shape']} {bw['dtype']}, {bw['rounds']} interleaved rounds:")
            print("| kernel | min ms | median ms | GB/s (min) | time / copy_ |\n|---|---|---|---|---|")
            for name, r in bw.items():
                if isinstance(r, dict):
                    print(f"| {name} | {r['min_ms']:.3f} | {r['median_ms']:.3f} | {r['GBps']:.0f} "
                          f"| {r['time_vs_copy']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    parallel.teardown()


if __name__ == "__main__":
    main()
