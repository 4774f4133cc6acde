#!/usr/bin/env python
"""Conversion throughput and peak memory on a generated checkpoint.

    python benchmarks/convert_throughput.py --preset 1b            # ~1.0B params, bf16
    python benchmarks/convert_throughput.py --preset 7b-shapes     # Qwen2.5-7B tensor shapes, 4 layers

Writes a random HF checkpoint (bf16 safetensors, 2 GB shards), then measures, each in a
fresh process (peak RSS from ``wait4``):

* ``read``: plain sequential reading of the same safetensors files (64 MiB buffer);
* ``copy``: ``shutil.copyfile`` of the same files + fsync (what any conversion must at
  least do: read every byte, write every byte);
* ``hf->megatron``: ``convert_hf_to_megatron`` (dtype kept);
* ``megatron->hf``: ``convert_megatron_to_hf`` (bf16, 5 GB shards);
* ``import``: a process that only imports ``megatron_alp.convert`` (the RSS floor).

All runs see a warm page cache (the files were just written; nothing here drops caches).
GB/s is checkpoint bytes / the step's own time (interpreter start and imports excluded;
the process wall time is listed too). Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The parent stays small (no torch): a child's peak RSS as reported by wait4 includes the
# high-water mark of the process it was forked from.

PRESETS = {
    # Seconds: checks that the script runs.
    "smoke": dict(
        model_type="qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
    ),
    # ~1.02B parameters: Llama-style, untied head.
    "1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=8, vocab_size=64000, tie_word_embeddings=False,
    ),
    # Qwen2.5-7B's tensor shapes (embedding 152064 x 3584, FFN 18944) with 4 of its 28
    # layers: peak memory depends on the largest tensors, not on the number of layers.
    "7b-shapes": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
}


def make_checkpoint(folder: Path, preset: dict, *, seed: int = 0) -> tuple[int, int]:
    """A random HF checkpoint of ``preset`` in bf16; returns (parameters, bytes)."""
    import torch
    import transformers

    from megatron_alp.convert import model_mapping
    from megatron_alp.convert.safetensors_io import ShardedSafetensorsWriter

    kw = dict(preset)
    model_type = kw.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    cfg = cls(**kw, max_position_embeddings=4096, rms_norm_eps=1e-6, dtype="bfloat16")
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    m = model_mapping(cfg)
    plan = [(n, m.hf_shape(n), torch.bfloat16) for n in m.hf_names()]
    g = torch.Generator().manual_seed(seed)
    params = 0
    with ShardedSafetensorsWriter(folder, plan, max_shard_bytes=2 * 10**9) as w:
        for name, shape, dtype in plan:
            t = torch.empty(shape, dtype=dtype)
            t.normal_(0, 0.02, generator=g)
            w.write(name, t)
            params += t.numel()
    return params, sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_measured(code: str) -> tuple[float, float, str]:
    """Run ``python -c code`` in a fresh process: (wall seconds, peak RSS GiB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"benchmark step failed ({p.returncode}): {code}")
    return wall, usage.ru_maxrss / 1024**2, out  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model size (default 1b)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder, removed after)")
    ap.add_argument("--threads", type=int, default=1, help="DCP writer threads for hf->megatron (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        measure(args, work)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    """Generate the checkpoint under ``work``, run every step, print the table."""
    hf, mg, back = work / "hf", work / "mg", work / "back"
    for p in (hf, mg, back):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    _, _, out = run_measured(
        "import json, sys; sys.path.insert(0, 'benchmarks'); import convert_throughput as b; "
        f"print(json.dumps(b.make_checkpoint(__import__('pathlib').Path({str(hf)!r}), "
        f"b.PRESETS[{args.preset!r}])))"
    )
    params, nbytes = json.loads(out.strip().splitlines()[-1])
    print(f"generated {params / 1e9:.3f}B params, {nbytes / 1e9:.2f} GB bf16 in "
          f"{time.perf_counter() - t0:.0f} s -> {hf}", flush=True)

    # Each step prints the seconds of its own work (after interpreter start and imports).
    read_code = f"""
import pathlib, time
t = time.perf_counter()
buf = bytearray(64 << 20); mv = memoryview(buf); n = 0
for f in sorted(pathlib.Path({str(hf)!r}).glob('*.safetensors')):
    with open(f, 'rb', buffering=0) as fh:
        while (k := fh.readinto(mv)):
            n += k
print(time.perf_counter() - t)
"""
    copy_code = f"""
import os, pathlib, shutil, time
src, dst = pathlib.Path({str(hf)!r}), pathlib.Path({str(work / "copy")!r})
shutil.rmtree(dst, ignore_errors=True); dst.mkdir()
t = time.perf_counter()
for f in sorted(src.glob('*.safetensors')):
    shutil.copyfile(f, dst / f.name)
    fd = os.open(dst / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(time.perf_counter() - t)
shutil.rmtree(dst)
"""
    h2m_code = (
        "from megatron_alp.convert import convert_hf_to_megatron as c; "
        f"print(c({str(hf)!r}, {str(mg)!r}, progress=False, thread_count={args.threads}).seconds)"
    )
    m2h_code = (
        "from megatron_alp.convert import convert_megatron_to_hf as c; "
        f"print(c({str(mg)!r}, {str(back)!r}, dtype='bf16', progress=False).seconds)"
    )
    steps = [
        ("import megatron_alp.convert (RSS floor)", "import megatron_alp.convert.hf_to_megatron; print(0.0)"),
        ("plain read of the safetensors files", read_code),
        ("plain copy of the files (read + write + fsync)", copy_code),
        (f"hf_to_megatron (threads={args.threads})", h2m_code),
        ("megatron_to_hf (bf16, 5GB shards)", m2h_code),
        ("plain read again", read_code),
    ]
    rows = []
    for name, code in steps:
        wall, rss, out = run_measured(code)
        rows.append((name, wall, float(out.strip().splitlines()[-1]), rss))

    cfg = json.loads((hf / "config.json").read_text())
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    largest = max(2 * f * h, v * h) * 2 / 1024**3
    print(f"\n{args.preset}: {params / 1e9:.3f}B params, {nbytes / 1e9:.2f} GB bf16; largest "
          f"canonical tensor {largest:.2f} GiB; {os.cpu_count()} CPUs\n")
    print("| step | work (s) | GB/s | process wall incl. imports (s) | peak RSS (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, secs, rss in rows:
        gbps = f"{nbytes / 1e9 / secs:.2f}" if secs > 0 else ""
        print(f"| {name} | {secs:.1f} | {gbps} | {wall:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
