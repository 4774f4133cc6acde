#!/usr/bin/env python
"""Conversion throughput and peak memory on a generated checkpoint.

    python benchmarks/convert_throughput.py --preset 1b            # ~1.0B params, bf16
    python benchmarks/convert_throughput.py --preset 7b-shapes     # Qwen2.5-7B tensor shapes, 4 layers

Writes a random HF checkpoint (bf16 safetensors, 2 GB shards), then measures, each in a
fresh process (peak RSS from ``wait4``'s ``ru_maxrss``):

* ``import``: a process that only imports ``megatron_alp.convert.hf_to_megatron`` (the
  RSS floor, measured the same way);
* rounds of, in this order: **cold read** (plain sequential read of the safetensors
  files, 64 MiB buffer), **cold user-space copy** (read them into a 64 MiB buffer and
  write them out, fsync: what any converter must at least do through user space),
  **cold hf->megatron** (``convert_hf_to_megatron``, dtype kept, with its own timings),
  **warm read**, **warm hf->megatron**;
* once at the end (warm): a plain copy of the files (``shutil.copyfile`` + fsync) and
  ``megatron->hf`` (bf16, 5 GB shards), unless ``--no-extras``.

**Cold** means the checkpoint's own files were evicted from the page cache just before
the step: fsync, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file (the global
cache is never dropped: the machine is shared). The share of their bytes still resident
afterwards (util-linux ``fincore``) is printed to show the eviction worked. The output
folder of a conversion is removed before each conversion. GB/s is checkpoint bytes / the
step's own time (interpreter start and imports excluded; the process wall time and CPU
seconds, imports included, are listed too). Ratios are per round (the read and the conversion of the same round), min and
median over rounds. Prints markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
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


def evict(paths: list[Path]) -> float:
    """Drop the page cache of these files only (fsync first: dirty pages cannot be
    dropped), then return the fraction of their bytes still resident (``fincore``; -1
    when it is not installed). The global cache is never dropped: this VM is shared."""
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(files)


def resident_fraction(files: list[Path]) -> float:
    """Fraction of the files' bytes in the page cache, from util-linux ``fincore``."""
    exe = shutil.which("fincore")
    if exe is None or not files:
        return -1.0
    out = subprocess.run([exe, "-b", "-n", "-r", "-o", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    res = size = 0
    for line in out.splitlines():
        r, s = line.split()
        res, size = res + int(r), size + int(s)
    return res / max(size, 1)


def largest_tensor_bytes(folder: Path) -> int:
    """Bytes of the largest tensor in the folder's safetensors files (from the headers)."""
    best = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                b, e = meta["data_offsets"]
                best = max(best, e - b)
    return best


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
    CPU_SECONDS.append(usage.ru_utime + usage.ru_stime)
    return wall, usage.ru_maxrss / 1024**2, out  # ru_maxrss is KiB on Linux


CPU_SECONDS: list[float] = []
"""user + system CPU seconds of each measured process (imports included), in order."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model size (default 1b)")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds (default 3)")
    ap.add_argument("--workdir", default=None, help="scratch folder, new or empty or made by an earlier run (default: a new temp folder, removed after); an hf/ checkpoint already in it is reused")
    ap.add_argument("--threads", type=int, default=1, help="producer threads for hf->megatron (default 1)")
    ap.add_argument("--no-extras", action="store_true", help="skip the copy and megatron->hf steps")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds}: expected a positive integer")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    if args.workdir is not None:
        # The benchmark removes and re-creates hf/, mg/, back/, copy/ and ucopy/ in its
        # folder: only in a folder it made (marked) or an empty / new one.
        marker = work / WORKDIR_MARKER
        if work.exists() and (not work.is_dir() or (any(work.iterdir()) and not marker.exists())):
            ap.error(f"--workdir {work}: exists and is not an earlier scratch folder of this "
                     f"benchmark (no {WORKDIR_MARKER}); give a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
        marker.touch()
    try:
        measure(args, work)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


WORKDIR_MARKER = ".convert-throughput-workdir"
"""Marks a --workdir this benchmark created: the only kind it removes sub-folders from."""


def measure(args: argparse.Namespace, work: Path) -> None:
    """Generate the checkpoint under ``work`` (unless it is there), run the rounds, print."""
    hf, mg, back = work / "hf", work / "mg", work / "back"
    for p in (mg, back):
        shutil.rmtree(p, ignore_errors=True)
    if not (hf / "config.json").exists():
        shutil.rmtree(hf, ignore_errors=True)
        t0 = time.perf_counter()
        _, _, out = run_measured(
            "import json, sys; sys.path.insert(0, 'benchmarks'); import convert_throughput as b; "
            f"print(json.dumps(b.make_checkpoint(__import__('pathlib').Path({str(hf)!r}), "
            f"b.PRESETS[{args.preset!r}])))"
        )
        print(f"generated {hf} in {time.perf_counter() - t0:.0f} s", flush=True)
    files = sorted(hf.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    largest = largest_tensor_bytes(hf)

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
    # What any converter must at least do through user space: read every byte into memory
    # and write it out again (not sendfile / copy_file_range, which stay in the kernel).
    ucopy_code = f"""
import os, pathlib, shutil, time
src, dst = pathlib.Path({str(hf)!r}), pathlib.Path({str(work / "ucopy")!r})
shutil.rmtree(dst, ignore_errors=True); dst.mkdir()
t = time.perf_counter()
buf = bytearray(64 << 20); mv = memoryview(buf)
for f in sorted(src.glob('*.safetensors')):
    with open(f, 'rb', buffering=0) as fi, open(dst / f.name, 'wb', buffering=0) as fo:
        while (k := fi.readinto(mv)):
            w = 0
            while w < k:
                w += fo.write(mv[w:k])
        os.fsync(fo.fileno())
print(time.perf_counter() - t)
shutil.rmtree(dst)
"""
    h2m_code = (
        "import json; from megatron_alp.convert import convert_hf_to_megatron as c; "
        f"r = c({str(hf)!r}, {str(mg)!r}, progress=False, thread_count={args.threads}); "
        "print(json.dumps(r.timings)); print(r.seconds)"
    )
    m2h_code = (
        "from megatron_alp.convert import convert_megatron_to_hf as c; "
        f"print(c({str(mg)!r}, {str(back)!r}, dtype='bf16', progress=False).seconds)"
    )

    timings: list[dict[str, float]] = []

    def step(code: str) -> tuple[float, float, float, float]:
        """(work seconds, process wall seconds, peak RSS GiB, CPU seconds); a line of JSON before the
        last one (the converter's own timings) is kept in ``timings``."""
        wall, rss, out = run_measured(code)
        lines = out.strip().splitlines()
        if len(lines) > 1 and lines[-2].startswith("{"):
            timings.append(json.loads(lines[-2]))
        return float(lines[-1]), wall, rss, CPU_SECONDS[-1]

    floors = [step("import megatron_alp.convert.hf_to_megatron; print(0.0)") for _ in range(2)]
    floor, floor_cpu = min(f[2] for f in floors), min(f[3] for f in floors)
    rounds, resident = [], []
    for r in range(args.rounds):
        row = {}
        resident.append(evict([hf]))
        row["cold read"] = step(read_code)
        resident.append(evict([hf]))
        row["cold user-space copy (read + write + fsync)"] = step(ucopy_code)
        shutil.rmtree(mg, ignore_errors=True)
        resident.append(evict([hf]))
        row["cold hf->megatron"] = step(h2m_code)
        row["warm read"] = step(read_code)
        shutil.rmtree(mg, ignore_errors=True)
        row["warm hf->megatron"] = step(h2m_code)
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(
            f"{k} {nbytes / 1e9 / v[0]:.2f} GB/s ({v[2]:.2f} GiB)" for k, v in row.items()), flush=True)
    extras = {}
    if not args.no_extras:
        extras["plain copy (read + write + fsync), warm"] = step(copy_code)
        extras["megatron_to_hf (bf16, 5 GB shards), warm"] = step(m2h_code)

    def gbps(secs: float) -> float:
        return nbytes / 1e9 / secs

    print(f"\n{args.preset}: {nbytes / 1e9:.2f} GB in {len(files)} files; largest tensor "
          f"{largest / 1024**3:.3f} GiB; {os.cpu_count()} CPUs; {args.rounds} rounds; "
          f"resident after eviction: max {max(resident) * 100:.1f}% of the files' bytes\n")
    print("| step | GB/s per round | work (s), median | process wall (s), median | process CPU (s), median | peak RSS (GiB), max |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| import megatron_alp.convert.hf_to_megatron (RSS floor) | | | | {floor_cpu:.1f} | {floor:.2f} |")
    for name in rounds[0]:
        vals = [rd[name] for rd in rounds]
        print(f"| {name} | {' / '.join(f'{gbps(v[0]):.2f}' for v in vals)} | "
              f"{statistics.median(v[0] for v in vals):.2f} | {statistics.median(v[1] for v in vals):.1f} | "
              f"{statistics.median(v[3] for v in vals):.1f} | {max(v[2] for v in vals):.2f} |")
    for name, v in extras.items():
        print(f"| {name} | {gbps(v[0]):.2f} | {v[0]:.2f} | {v[1]:.1f} | {v[3]:.1f} | {v[2]:.2f} |")

    def ratio(conv: str, read: str) -> str:
        rs = [gbps(rd[conv][0]) / gbps(rd[read][0]) for rd in rounds]
        return f"min {min(rs):.2f}, median {statistics.median(rs):.2f}"

    if timings:
        keys = list(timings[0])
        print("\nhf->megatron, where the time goes (median over its runs, s): " + ", ".join(
            f"{k} {statistics.median(t.get(k, 0.0) for t in timings):.2f}" for k in keys)
            + " (fill: reading + checking in the filling thread, beside the writes; wait: the "
            "writing thread waiting for a filled chunk; write: torch.save + write(2))")
    peak = max(max(rd["cold hf->megatron"][2], rd["warm hf->megatron"][2]) for rd in rounds)
    bound = floor + 2 * largest / 1024**3
    print(f"\nratio cold hf->megatron / cold read (per round): {ratio('cold hf->megatron', 'cold read')} (goal >= 0.5)")
    print(f"ratio cold user-space copy / cold read (per round): {ratio('cold user-space copy (read + write + fsync)', 'cold read')}")
    print(f"ratio cold hf->megatron / cold user-space copy (per round): {ratio('cold hf->megatron', 'cold user-space copy (read + write + fsync)')}")
    print(f"ratio warm hf->megatron / cold read (per round): {ratio('warm hf->megatron', 'cold read')}")
    print(f"ratio warm hf->megatron / warm read (per round): {ratio('warm hf->megatron', 'warm read')}")
    print(f"peak RSS hf->megatron {peak:.2f} GiB = floor {floor:.2f} + {peak - floor:.2f} GiB; "
          f"goal <= floor + 2 x largest tensor = {bound:.2f} GiB: {'met' if peak <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
