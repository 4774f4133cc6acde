"""The ALP study (issue 21): every preset x seeds x mismatch condition, plus the layer
ablation, each cell one run of the trainer's public CLI, then the report.

    python examples/study/study.py --out runs/study                 # everything (138 cells)
    python examples/study/study.py --out runs/study --list          # the cells, nothing run
    python examples/study/study.py --out runs/study --cells 'bf16-k0/grpo/*' --train-iters 5
    python examples/study/study.py --out runs/study --report-only   # tables + plots only
    python examples/study/study.py --out runs/study-async --grid async   # issue 22's async grid

Cells (``CONDITION/PRESET/LAYERS/sSEED``):

* model and task: the tiny CPU example's (``examples/tiny_cpu/prepare.py``), built with
  ``--asset-layers`` (6) decoder layers on ``--asset-task`` (``sums``, the main job's; or
  ``sum3-mod10``, the last digit of a sum of three digits) when ``--assets`` has none;
* conditions: ``bf16-k0`` (BF16 rollouts, ``--rl-generation-lag 0``), ``bf16-k4`` (lag 4),
  ``fp8-k4`` (``--rl-rollout-dtype fp8``, lag 4);
* presets: the ten shipped ones; seeds 1..5 for grpo, token-mis, token-alp, seq-alp, 1..3
  for the others (``--max-seeds`` caps them);
* layers ``all`` everywhere; the ablation adds, for token-alp and seq-alp under fp8-k4,
  ``first`` / ``middle`` / ``last`` (ALP on decoder layers ``[round(i L/3),
  round((i+1) L/3))``, via ``--alp-layer-start`` / ``--alp-layer-end``) and ``logits``
  (``--alp-placement logits``: the final hidden states only).

``--grid async`` (issue 22's stability grid) has instead the conditions ``async-s1`` and
``async-s4``: fully-async rollouts over a twin fleet of one bf16 engine in its own process,
partial rollouts, ``--rl-max-staleness`` 1 / 4 and a buffer of S steps' groups
(:func:`condition_flags`); presets grpo, token-mis, token-alp, seq-alp; seeds 1..3.

Each cell runs ``python -m megatron_alp.train`` with the base config
(``examples/study/base.yaml``), ``--rl-loss PRESET --seed SEED``, the condition's flags,
``--save CELL/checkpoints --rl-run-dir CELL`` and ``--rl-mismatch-by-layer-interval``.
A finished cell (``CELL/cell.json`` with ``finished: true``) is skipped; a cell that was
killed is run again with ``--load CELL/checkpoints`` and resumes from its last
checkpoint (``--save-interval``; the trainer keeps ``metrics.jsonl`` up to it). Cells run
one after another (``--jobs N``: N at once). The MIS cells' rejected-token convention is
read from their ``config.json`` and stated in the report. Extra trainer flags go after
``--``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from report import STUDY_MARKER  # examples/study/report.py (this script's folder)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

PRESETS = ("grpo", "gspo", "seq-bypass", "token-tis", "seq-tis", "token-mis", "seq-mis",
           "token-alp", "seq-alp", "cum-token-alp")
FIVE_SEEDS = ("grpo", "token-mis", "token-alp", "seq-alp")
CONDITIONS = {"bf16-k0": ("bf16", 0), "bf16-k4": ("bf16", 4), "fp8-k4": ("fp8", 4)}
ABLATION_PRESETS = ("token-alp", "seq-alp")
ABLATION_CONDITION = "fp8-k4"
ABLATION_LAYERS = ("first", "middle", "last", "logits")
# ALP settings for the tiny model (as examples/tiny_cpu/config.yaml): its hidden states are
# ~0.02 per element, so sigma_0 is scaled down from the paper's 0.02
ALP_FLAGS = ("--alp-init-std", "1e-3", "--alp-lr", "1e-2", "--alp-weight-decay", "0")

# The async stability grid (issue 22, ``--grid async``): fully-async rollouts over a twin
# fleet of one engine in its own process, partial rollouts, the staleness bound S.
GRIDS = ("main", "async")
ASYNC_CONDITIONS = {"async-s1": 1, "async-s4": 4}  # condition -> --rl-max-staleness S
ASYNC_PRESETS = ("grpo", "token-mis", "token-alp", "seq-alp")
ASYNC_SEEDS = 3
# bf16 engines, as bf16-k0 / bf16-k4: the async cells differ from those only in where the
# staleness comes from (real asynchrony, not --rl-generation-lag); fp32 engines would
# remove the precision mismatch ALP and MIS also correct.
ASYNC_ENGINE_DTYPE = "bf16"
# 2 segments of 4 tokens per response (--rl-max-new-tokens 8): a sequence can span an update
ASYNC_SEGMENT_TOKENS = 4
ASYNC_FLAGS = ("--rl-rollout-engine", "fleet", "--rl-fleet-engines", "1", "--rl-async-mode", "fully-async",
               "--rl-partial-rollouts", "--rl-partial-rollout-tokens", str(ASYNC_SEGMENT_TOKENS))


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    condition: str
    preset: str
    layers: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.preset}/{self.layers}/s{self.seed}"


def all_cells(max_seeds: int | None = None, grid: str = "main") -> list[Cell]:
    """Every cell of the study's ``grid`` (``main``: issue 21's; ``async``: the stability
    grid of issue 22), in run order (grouped by seed first, so a partial study has
    complete pairs early)."""
    if grid not in GRIDS:
        raise ValueError(f"grid {grid!r} is not one of {GRIDS}")
    cells = []
    if grid == "async":
        for cond in ASYNC_CONDITIONS:
            for preset in ASYNC_PRESETS:
                for seed in range(1, 1 + min(ASYNC_SEEDS, max_seeds or ASYNC_SEEDS)):
                    cells.append(Cell(cond, preset, "all", seed))
        return sorted(cells, key=lambda c: (c.seed, c.condition, c.preset, c.layers))
    for cond in CONDITIONS:
        for preset in PRESETS:
            n = 5 if preset in FIVE_SEEDS else 3
            for seed in range(1, 1 + min(n, max_seeds or n)):
                cells.append(Cell(cond, preset, "all", seed))
    for preset in ABLATION_PRESETS:
        for layers in ABLATION_LAYERS:
            for seed in range(1, 1 + min(3, max_seeds or 3)):
                cells.append(Cell(ABLATION_CONDITION, preset, layers, seed))
    return sorted(cells, key=lambda c: (c.seed, c.condition, c.preset, c.layers))


def select(cells: list[Cell], patterns: str | None) -> list[Cell]:
    """Cells whose name matches any comma-separated glob of ``patterns`` (all when None)."""
    if not patterns:
        return cells
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


def layer_flags(layers: str, num_layers: int) -> list[str]:
    """ALP's layer selection for an ablation variant (decoder layers 0..num_layers-1)."""
    if layers == "all":
        return []
    if layers == "logits":
        return ["--alp-placement", "logits"]
    i = ("first", "middle", "last").index(layers)
    start, end = round(i * num_layers / 3), round((i + 1) * num_layers / 3)
    if end <= start:
        raise ValueError(f"layers {layers!r}: a third of {num_layers} decoder layer(s) is empty")
    return ["--alp-layer-start", str(start), "--alp-layer-end", str(end)]


def condition_flags(condition: str, prompts_per_step: int) -> list[str]:
    """The trainer flags of a condition. Sync: the rollout dtype and ``--rl-generation-lag``.
    Async: fully-async over the fleet with ``--rl-max-staleness S`` and a buffer of S
    steps' groups (``--rl-async-buffer-groups S x prompts``): the engine, faster than the
    trainer here, fills it and the trainer takes its oldest groups, so the tokens really
    get up to S versions old (with the default buffer of one step's groups they stay
    <= 1 whatever S is)."""
    if condition in ASYNC_CONDITIONS:
        s = ASYNC_CONDITIONS[condition]
        return ["--rl-rollout-dtype", ASYNC_ENGINE_DTYPE, *ASYNC_FLAGS, "--rl-max-staleness", str(s),
                "--rl-async-buffer-groups", str(s * prompts_per_step)]
    dtype, lag = CONDITIONS[condition]
    return ["--rl-rollout-dtype", dtype, "--rl-generation-lag", str(lag)]


def prompts_per_step(config: str | Path, extra: list[str]) -> int:
    """``--grpo-prompts-per-step`` as a cell's trainer sees it: the last one among the extra
    flags, else the ``--config``'s ``train:`` section, else the trainer's default; a
    ``--config`` that cannot be read raises ``ValueError``."""
    for i in range(len(extra) - 1, -1, -1):
        a = extra[i]
        if a.startswith("--grpo-prompts-per-step="):
            return int(a.split("=", 1)[1])
        if a == "--grpo-prompts-per-step" and i + 1 < len(extra):
            return int(extra[i + 1])
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):  # a preset name, as the trainer's --config takes it
        path = REPO / "configs" / f"{config}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {config}: cannot read it ({e})") from None
    v = ((data.get("train") if isinstance(data, dict) else None) or {}).get("grpo_prompts_per_step")
    if v is None:  # the trainer's default (importing the parser takes seconds: only here)
        from megatron_alp.train.arguments import build_parser

        v = build_parser().get_default("grpo_prompts_per_step")
    return int(v)


def cell_command(cell: Cell, ns: argparse.Namespace, cell_dir: Path, num_layers: int) -> list[str]:
    a = Path(ns.assets)
    async_cell = cell.condition in ASYNC_CONDITIONS
    cond = condition_flags(cell.condition, prompts_per_step(ns.config, ns.trainer_args) if async_cell else 0)
    cmd = [sys.executable, "-m", "megatron_alp.train", "--config", str(ns.config),
           "--hf-model", str(a / "model"), "--rl-prompt-data", str(a / "train.jsonl"),
           "--rl-eval-data", str(a / "eval.jsonl"),
           "--rl-loss", cell.preset, "--seed", str(cell.seed), *cond,
           "--rl-mismatch-by-layer-interval", str(ns.mismatch_interval),
           "--save", str(cell_dir / "checkpoints"), "--rl-run-dir", str(cell_dir),
           "--save-interval", str(ns.save_interval)]
    if ns.train_iters is not None:
        cmd += ["--train-iters", str(ns.train_iters)]
    if "alp" in cell.preset:
        cmd += [*ALP_FLAGS, *layer_flags(cell.layers, num_layers)]
    if any((cell_dir / "checkpoints").glob("iter_*")):
        cmd += ["--load", str(cell_dir / "checkpoints")]
    return cmd + list(ns.trainer_args)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _progress(cell_dir: Path) -> tuple[int, int | None]:
    """The last step in the cell's ``metrics.jsonl`` and the run's ``train_iters`` (its
    ``config.json``): a run stopped early (a signal, ``--exit-interval``) exits 0 too."""
    last = 0
    m = cell_dir / "metrics.jsonl"
    if m.is_file():
        for line in m.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass
    want = None
    c = cell_dir / "config.json"
    if c.is_file():
        want = json.loads(c.read_text()).get("train_iters")
    return last, want


def claim_study_dir(out: Path) -> str | None:
    """Make ``out`` ours (new or empty: create it and its marker) or accept it if it holds
    :data:`STUDY_MARKER`; otherwise return why not, and write nothing."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    if out.is_dir() and not (out / STUDY_MARKER).is_file():
        if any(out.iterdir()):
            return (f"holds files but no {STUDY_MARKER}: this runner did not make it (it would "
                    "write cells/ and report/ there); choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_MARKER).touch()
    return None


def run_cell(cell: Cell, ns: argparse.Namespace, num_layers: int) -> dict:
    """Run (or resume, or skip) one cell; returns its ``cell.json`` record."""
    cell_dir = Path(ns.out) / "cells" / cell.name
    rec_path = cell_dir / "cell.json"
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("finished"):
            return dict(rec, skipped=True)
    cell_dir.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(cell, ns, cell_dir, num_layers)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(ns.threads)  # part of a cell's numerics: CPU reductions follow it
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    with open(cell_dir / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    wall = time.time() - t0
    prev = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    last, want = _progress(cell_dir)
    rec = dict(cell=cell.name, **dataclasses.asdict(cell), command=cmd, rc=rc, last_step=last,
               train_iters=want, finished=rc == 0 and want is not None and last >= want,
               wall_s=round(wall + prev.get("wall_s", 0.0), 3), threads=ns.threads,
               attempts=prev.get("attempts", 0) + 1)
    _write_json(rec_path, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(prog="python examples/study/study.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the study folder (cells/, report/)")
    p.add_argument("--assets", default=None,
                   help="tiny CPU assets (examples/tiny_cpu/prepare.py --out DIR; built there "
                        "when missing; default OUT-assets)")
    p.add_argument("--asset-layers", type=int, default=6,
                   help="decoder layers of the tiny model built when --assets is missing (default 6: "
                        "the ablation's thirds are 2 layers each)")
    p.add_argument("--asset-task", default="sums", choices=("sums", "sum3-mod10"),
                   help="the task of the assets built when --assets is missing (default sums, the "
                        "main job's; sum3-mod10 did not rise in a first try: docs/results.md)")
    p.add_argument("--warmup-max-steps", type=int, default=3000,
                   help="warm-up cap of the assets built when --assets is missing (default 3000, "
                        "prepare.py's)")
    p.add_argument("--config", default=str(HERE / "base.yaml"), help="the trainer's base --config")
    p.add_argument("--cells", default=None, help="comma-separated globs on cell names, e.g. "
                   "'bf16-k0/grpo/*,fp8-k4/*/logits/s1' (default: all)")
    p.add_argument("--grid", default="main", choices=GRIDS,
                   help="main: issue 21's grid (default); async: the stability grid of issue 22 "
                        "(async-s1 / async-s4: fully-async over a 1-engine twin fleet with partial "
                        "rollouts and --rl-max-staleness 1 / 4; grpo, token-mis, token-alp, seq-alp; "
                        "seeds 1..3)")
    p.add_argument("--max-seeds", type=int, default=None, help="cap the seeds per preset")
    p.add_argument("--train-iters", type=int, default=None, help="override the config's --train-iters")
    p.add_argument("--save-interval", type=int, default=10, help="checkpoint every N steps (resume point)")
    p.add_argument("--mismatch-interval", type=int, default=10,
                   help="--rl-mismatch-by-layer-interval of every cell (default 10)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per cell (OMP_NUM_THREADS; default 1). The committed tables "
                        "used 1: the thread count changes CPU reduction order, hence the numbers; "
                        "more threads than cores / --jobs oversubscribe the CPU and run far slower")
    p.add_argument("--list", action="store_true", help="print the selected cells and exit")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("--kl-threshold", type=float, default=0.02,
                   help="the report counts steps whose actor/ppo_kl exceeds this (default 0.02: above the 90th percentile of GRPO's steps in the committed study)")
    ns = p.parse_args(argv)
    ns.trainer_args = extra
    ns.assets = Path(ns.assets or f"{str(ns.out).rstrip('/')}-assets")
    for flag, v in (("--asset-layers", ns.asset_layers), ("--warmup-max-steps", ns.warmup_max_steps), ("--max-seeds", ns.max_seeds), ("--train-iters", ns.train_iters),
                    ("--save-interval", ns.save_interval), ("--jobs", ns.jobs), ("--threads", ns.threads)):
        if v is not None and v < 1:
            print(f"error: {flag}={v} is invalid; expected >= 1", file=sys.stderr)
            return 2
    if ns.mismatch_interval < 0:
        print(f"error: --mismatch-interval={ns.mismatch_interval} is invalid; expected >= 0", file=sys.stderr)
        return 2
    cells = select(all_cells(ns.max_seeds, ns.grid), ns.cells)
    if not cells:
        print(f"error: --cells {ns.cells!r} matches no cell of --grid {ns.grid} (see --list; the "
              f"grids: {', '.join(GRIDS)})", file=sys.stderr)
        return 2
    if ns.list:
        for c in cells:
            print(c.name)
        print(f"{len(cells)} cell(s)")
        return 0
    if any(c.condition in ASYNC_CONDITIONS for c in cells):
        try:  # sizes the async cells' buffer (--rl-async-buffer-groups S x prompts per step)
            prompts_per_step(ns.config, ns.trainer_args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    out = Path(ns.out)
    problem = claim_study_dir(out)
    if problem:
        print(f"error: --out {out}: {problem}", file=sys.stderr)
        return 2
    if not ns.report_only:
        if not (ns.assets / "model" / "config.json").is_file():
            print(f"[study] building the tiny assets in {ns.assets} ...", flush=True)
            subprocess.check_call([sys.executable, str(REPO / "examples/tiny_cpu/prepare.py"),
                                   "--out", str(ns.assets), "--layers", str(ns.asset_layers),
                                   "--task", ns.asset_task, "--warmup-max-steps", str(ns.warmup_max_steps)])
        num_layers = json.loads((ns.assets / "model" / "config.json").read_text())["num_hidden_layers"]
        thirds = sorted({c.layers for c in cells} & {"first", "middle", "last"})
        if thirds and num_layers < 3:
            print(f"error: --assets {ns.assets}: the model has {num_layers} decoder layer(s); the "
                  f"ablation's thirds ({', '.join(thirds)}) need >= 3 (build assets with "
                  "--asset-layers 6, or leave those cells out with --cells)", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        done = 0

        def one(c: Cell) -> dict:
            return run_cell(c, ns, num_layers)

        with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
            for rec in pool.map(one, cells):
                done += 1
                state = "skipped (finished)" if rec.get("skipped") else (
                    f"done in {rec['wall_s']:.1f} s" if rec["finished"] else
                    f"not finished: rc={rec['rc']}, step {rec['last_step']}/{rec['train_iters']} "
                    f"(see {out / 'cells' / rec['cell'] / 'train.log'}; run again to resume)")
                print(f"[study] {done}/{len(cells)} {rec['cell']}: {state}", flush=True)
        print(f"[study] {len(cells)} cell(s) in {time.time() - t0:.1f} s", flush=True)
    from report import write_report  # examples/study/report.py

    files = write_report(out, kl_threshold=ns.kl_threshold)  # every cell of the study folder
    print(f"[study] report: {', '.join(str(f) for f in files)}", flush=True)
    failed = [c.name for c in cells
              if not json.loads(((out / "cells" / c.name / "cell.json").read_text())
                                if (out / "cells" / c.name / "cell.json").is_file() else "{}").get("finished")]
    if failed:
        print(f"[study] {len(failed)} cell(s) not finished: {', '.join(failed[:5])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
