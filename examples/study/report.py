"""The study's report, computed from the cells' ``metrics.jsonl`` (nothing typed in):

    python examples/study/report.py --out runs/study     (also run by study.py)

Writes ``OUT/report/report.md``, ``OUT/report/summary.json`` (one record per cell) and
``OUT/report/*.png``. Definitions (also printed in the report):

* final reward: the mean of ``critic/score/mean`` over the last ``FINAL_WINDOW`` steps;
  mean +- sample std over seeds and the 95 % t interval of the mean;
* eval: the last evaluation's ``val/*/mean@n`` and ``pass@k`` (mean over seeds);
* ratio tail: the largest ``is_ratio/q999`` and ``is_ratio/max`` of the run (mean over
  seeds of each run's maximum; the max column also gives the largest over seeds);
* KL steps: steps whose ``actor/ppo_kl`` exceeds ``--kl-threshold`` (mean over seeds);
* sigma range: min / max over seeds of the last step's ``alp/sigma_min`` / ``_max``;
* ALP cost: each ALP cell's median step time and median update (``timing_s/update_actor``,
  the phase that carries the noise) over those of the grpo cell of the same condition and
  seed (same batch and rollouts; cells that ran side by side share the CPU, so the ratio
  carries that noise);
* every cell: one row per cell (final reward, ratio tail, KL steps, sigma, step time, wall);
* vs GRPO: the paired t-test of the final reward against grpo's on the same seeds in the
  same condition (the same seed gives the same first rollouts), difference, t and p;
* async conditions (``async-s1``, ``async-s4``: ``study.py --grid async``) only: a second
  table per condition from the ``async/*`` metrics (docs/async.md): token staleness (the
  mean over steps of ``async/staleness_mean``, mean over seeds; the largest
  ``async/staleness_max`` of any step and seed), the most versions one sample spans,
  regenerated and dropped groups (the cumulative counts at the last step, mean over
  seeds), and the trainer and engine idle fractions (mean over steps, then seeds); and
  ``async_staleness.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import mean_ci, paired_t  # noqa: E402

FINAL_WINDOW = 5
CONDITION_ORDER = ("bf16-k0", "bf16-k4", "fp8-k4", "async-s1", "async-s4")
__all__ = ["FINAL_WINDOW", "cell_summary", "write_report"]


STUDY_MARKER = ".megatron-alp-study"
"""Marks a folder examples/study/study.py made: cells/ and report/ are written only there."""


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(r, dict) and "step" in r:
            rows.append(r)
    by_step = {r["step"]: r for r in rows}  # a resumed run re-logs nothing twice, but be safe
    return [by_step[s] for s in sorted(by_step)]


def _finite(xs: Iterable[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _find(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = _find(v, key)
            if r is not None:
                return r
    return None


def cell_summary(cell_dir: Path, kl_threshold: float) -> dict | None:
    """One cell's numbers (None when it logged no step)."""
    mpath = cell_dir / "metrics.jsonl"
    if not mpath.is_file():
        return None
    rows = _rows(mpath)
    if not rows:
        return None
    score = _finite(r.get("critic/score/mean") for r in rows)
    final = score[-FINAL_WINDOW:]
    evals = [r for r in rows if any(k.startswith("val/") for k in r)]
    last_eval = {k: v for k, v in evals[-1].items() if k.startswith("val/")} if evals else {}
    q999 = _finite(r.get("is_ratio/q999") for r in rows)
    rmax = _finite(r.get("is_ratio/max") for r in rows)
    kl = _finite(r.get("actor/ppo_kl") for r in rows)
    last = rows[-1]
    cfg = json.loads((cell_dir / "config.json").read_text()) if (cell_dir / "config.json").is_file() else {}
    rec = json.loads((cell_dir / "cell.json").read_text()) if (cell_dir / "cell.json").is_file() else {}
    mm = {k: v for k, v in next((r for r in reversed(rows) if any(k.startswith("mismatch/") for k in r)), {}).items()
          if k.startswith("mismatch/")}
    sig = {k: v for k, v in last.items() if k.startswith("alp/sigma/layer_")}
    extra = {"async": _async_summary(rows)} if any("async/staleness_mean" in r for r in rows) else {}
    return dict(
        steps=len(rows), last_step=last["step"],
        final_reward=sum(final) / len(final) if final else math.nan,
        eval=last_eval,
        ratio_q999_max=max(q999) if q999 else math.nan,
        ratio_max=max(rmax) if rmax else math.nan,
        kl_steps=sum(k > kl_threshold for k in kl),
        sigma_min=last.get("alp/sigma_min"), sigma_max=last.get("alp/sigma_max"),
        rollout_corr_kl=_finite(r.get("rollout_corr/kl") for r in rows),
        step_s_median=_median(_finite(r.get("timing_s/step") for r in rows)),
        update_s_median=_median(_finite(r.get("timing_s/update_actor") for r in rows)),
        wall_s=rec.get("wall_s"),
        rejected_tokens=_find(cfg, "is_rejected_tokens"),
        is_correction=_find(cfg, "is_correction"),
        mismatch=mm, sigma=sig,
        curves={k: [r.get(k) for r in rows] for k in ("critic/score/mean", "is_ratio/q999", "actor/ppo_kl")
                + (("async/staleness_mean",) if extra else ())},
        **extra,
    )


def _async_summary(rows: list[dict]) -> dict:
    """A fully-async cell's ``async/*`` numbers (docs/async.md): staleness over the run,
    the cumulative regenerated / dropped counts at the last step, mean idle fractions."""
    def last(key: str) -> float:
        xs = _finite(r.get(key) for r in rows)
        return xs[-1] if xs else math.nan

    def mean(key: str) -> float:
        xs = _finite(r.get(key) for r in rows)
        return sum(xs) / len(xs) if xs else math.nan

    smax = _finite(r.get("async/staleness_max") for r in rows)
    vmax = _finite(r.get("async/versions_per_sample_max") for r in rows)
    return dict(staleness_mean=mean("async/staleness_mean"), staleness_max=max(smax) if smax else math.nan,
                versions_per_sample_max=max(vmax) if vmax else math.nan,
                regenerated_groups=last("async/regenerated_groups"), dropped_groups=last("async/dropped_groups"),
                trainer_idle_frac=mean("async/trainer_idle_frac"), engine_idle_frac=mean("async/engine_idle_frac"))


def _median(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _group_table(groups: dict, keys: list, base: dict | None, title_key: str) -> list[str]:
    lines = [f"| {title_key} | seeds | final reward mean +- std | 95 % CI | eval (last) | ratio q99.9 max | "
             "ratio max (mean / largest) | KL steps | sigma range (final) | s/step | vs GRPO: diff, t, p (n) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        cells = groups[key]
        fr = [c["final_reward"] for c in cells]
        m, sd, lo, hi = mean_ci(fr)
        ev = defaultdict(list)
        for c in cells:
            for k, v in c["eval"].items():
                ev[k.rsplit("/", 1)[-1]].append(v)
        evs = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(ev.items()))
        q = [c["ratio_q999_max"] for c in cells]
        rm = [c["ratio_max"] for c in cells]
        kls = [c["kl_steps"] for c in cells]
        smin = _finite(c["sigma_min"] for c in cells)
        smax = _finite(c["sigma_max"] for c in cells)
        sig = f"{min(smin):.2e} .. {max(smax):.2e}" if smin and smax else "-"
        step_s = _median(_finite(c["step_s_median"] for c in cells))
        vs = "-"
        if base is not None and key[1] != "grpo" and (key[0], "grpo", "all") in base:
            ref = {c["seed"]: c["final_reward"] for c in base[(key[0], "grpo", "all")]}
            pairs = [(c["final_reward"], ref[c["seed"]]) for c in cells if c["seed"] in ref]
            if pairs:
                d, t, p, n = paired_t([a for a, _ in pairs], [b for _, b in pairs])
                vs = f"{_f(d, '+.3f')}, {_f(t, '.2f')}, {_f(p, '.3f')} ({n})"
        name = key[1] if title_key == "preset" else f"{key[1]} / {key[2]}"
        conv = {c["rejected_tokens"] for c in cells if c.get("is_correction") == "mis"}
        if conv:
            name += f" (MIS rejected tokens: {'/'.join(sorted(map(str, conv)))})"
        lines.append(
            f"| {name} | {len(cells)} | {_f(m)} +- {_f(sd)} | [{_f(lo)}, {_f(hi)}] | {evs or '-'} | "
            f"{_f(sum(q) / len(q), '.3g')} | {_f(sum(rm) / len(rm), '.3g')} / {_f(max(rm), '.3g')} | "
            f"{_f(sum(kls) / len(kls), '.1f')} | {sig} | {_f(step_s, '.2f')} | {vs} |")
    return lines


def _async_table(groups: dict, keys: list) -> list[str]:
    """The asynchrony each preset of an async condition saw (cells with ``async/*`` only)."""
    lines = ["| preset | seeds | staleness mean | staleness max | versions per sample max | "
             "regenerated groups | dropped groups | trainer idle | engine idle |",
             "|---|---|---|---|---|---|---|---|---|"]

    def avg(xs: list) -> float:
        xs = _finite(xs)
        return sum(xs) / len(xs) if xs else math.nan

    for key in keys:
        a = [c["async"] for c in groups[key] if "async" in c]
        if not a:
            continue
        top = _finite(x["staleness_max"] for x in a)
        vps = _finite(x["versions_per_sample_max"] for x in a)
        lines.append(
            f"| {key[1]} | {len(a)} | {_f(avg(x['staleness_mean'] for x in a), '.2f')} | "
            f"{_f(max(top) if top else math.nan, '.0f')} | {_f(max(vps) if vps else math.nan, '.0f')} | "
            f"{_f(avg(x['regenerated_groups'] for x in a), '.1f')} | {_f(avg(x['dropped_groups'] for x in a), '.1f')} | "
            f"{_f(avg(x['trainer_idle_frac'] for x in a), '.2f')} | {_f(avg(x['engine_idle_frac'] for x in a), '.2f')} |")
    return lines if len(lines) > 2 else []


def _rank(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks, ties at their mean rank)."""
    if len(a) != len(b) or len(a) < 2:
        return math.nan
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def _profile_table(groups: dict, conditions: list[str]) -> list[str]:
    """Per layer: the engine-vs-FP32 divergence (mean over the condition's cells, last measured
    step) beside each ALP preset's final sigma (mean over seeds), and their rank correlation."""
    out = []
    for cond in conditions:
        mm = [c["mismatch"] for k, v in groups.items() if k[0] == cond for c in v if c["mismatch"]]
        layers = sorted({k.rsplit("_", 1)[-1] for m in mm for k in m if k.startswith("mismatch/layer_")})
        alps = sorted(k for k in groups if k[0] == cond and k[2] == "all" and "alp" in k[1])
        if not layers or not alps:
            continue
        mis = [sum(m[f"mismatch/layer_{n}"] for m in mm if f"mismatch/layer_{n}" in m)
               / max(1, sum(f"mismatch/layer_{n}" in m for m in mm)) for n in layers]
        sig = {}
        for key in alps:
            sg = [c["sigma"] for c in groups[key] if c["sigma"]]
            vals = [[s[f"alp/sigma/layer_{n}"] for s in sg if f"alp/sigma/layer_{n}" in s] for n in layers]
            if all(vals):
                sig[key[1]] = [sum(v) / len(v) for v in vals]
        if not sig:
            continue
        out += [f"## Per-layer mismatch beside the learned sigma ({cond})", "",
                "| layer | mismatch | " + " | ".join(f"sigma {p}" for p in sig) + " |",
                "|---" * (2 + len(sig)) + "|"]
        for i, n in enumerate(layers):
            out.append(f"| {n} | {mis[i]:.3g} | " + " | ".join(f"{v[i]:.4g}" for v in sig.values()) + " |")
        out.append("| Spearman rho vs mismatch | | " + " | ".join(_f(spearman(mis, v), '+.2f') for v in sig.values()) + " |")
        out.append("")
    return out


def _cost_table(summaries: dict) -> list[str]:
    """ALP vs plain (the grpo cell of the same condition and seed), per ALP cell."""
    lines = ["## ALP cost per cell (vs the grpo cell of the same condition and seed)", "",
             "| cell | s/step | grpo s/step | step ratio | update s | grpo update s | update ratio |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for name, s in sorted(summaries.items()):
        if "alp" not in s["preset"]:
            continue
        ref = summaries.get(f"{s['condition']}/grpo/all/s{s['seed']}")
        if ref is None:
            continue
        r_step = s["step_s_median"] / ref["step_s_median"] if ref["step_s_median"] else math.nan
        r_upd = s["update_s_median"] / ref["update_s_median"] if ref["update_s_median"] else math.nan
        ratios.append(r_step)
        lines.append(f"| {name} | {_f(s['step_s_median'], '.2f')} | {_f(ref['step_s_median'], '.2f')} | "
                     f"{_f(r_step, '.2f')} | {_f(s['update_s_median'], '.2f')} | "
                     f"{_f(ref['update_s_median'], '.2f')} | {_f(r_upd, '.2f')} |")
    if not ratios:
        return []
    return lines + ["", f"Median step ratio over {len(ratios)} ALP cell(s): {_median(_finite(ratios)):.2f}.", ""]


def _cells_table(summaries: dict) -> list[str]:
    """One row per cell: nothing averaged away."""
    lines = ["## Every cell", "",
             "| cell | steps | final reward | ratio q99.9 max | ratio max | KL steps | sigma (final) | "
             "s/step | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in sorted(summaries.items()):
        sig = (f"{s['sigma_min']:.2e} .. {s['sigma_max']:.2e}"
               if isinstance(s.get("sigma_min"), float) and isinstance(s.get("sigma_max"), float) else "-")
        lines.append(f"| {name} | {s['last_step']} | {_f(s['final_reward'])} | {_f(s['ratio_q999_max'], '.3g')} | "
                     f"{_f(s['ratio_max'], '.3g')} | {s['kl_steps']} | {sig} | {_f(s['step_s_median'], '.2f')} | "
                     f"{_f(s['wall_s'], '.0f')} |")
    return lines + [""]


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def _plots(groups: dict, conditions: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []

    def panels(metric: str, fname: str, conds: list[str], *, log: bool = False, band: bool = True) -> None:
        """One panel per condition: ``metric`` over steps per preset, mean over seeds
        (with a +- std band when ``band``)."""
        fig, axes = plt.subplots(1, len(conds), figsize=(5 * len(conds), 3.6), squeeze=False)
        for ax, cond in zip(axes[0], conds):
            for key in sorted(k for k in groups if k[0] == cond and k[2] == "all"):
                curves = [c["curves"].get(metric, []) for c in groups[key]]
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                a = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)
                m, x = np.nanmean(a, 0), np.arange(1, n + 1)
                ax.plot(x, m, label=key[1])
                if band:
                    sd = np.nanstd(a, 0)
                    ax.fill_between(x, m - sd, m + sd, alpha=0.2)
            ax.set_title(f"{metric} ({cond}; mean {'+- std ' if band else ''}over seeds)", fontsize=9)
            ax.set_xlabel("RL step")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        _save(fig, out / fname)
        plt.close(fig)
        written.append(out / fname)

    panels("critic/score/mean", "reward.png", conditions)
    panels("is_ratio/q999", "ratio_q999.png", conditions, log=True)
    panels("actor/ppo_kl", "ppo_kl.png", conditions)
    abl = sorted(k for k in groups if k[2] != "all")
    if abl:
        keys = sorted({(k[0], k[1], "all") for k in abl if (k[0], k[1], "all") in groups} | set(abl))
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(keys), 3.6))
        ms, errs = [], []
        for k in keys:
            m, _, lo, hi = mean_ci([c["final_reward"] for c in groups[k]])
            ms.append(m)
            errs.append(0.0 if math.isnan(lo) else hi - m)
        ax.bar(range(len(keys)), ms, yerr=errs, capsize=3)
        ax.set_xticks(range(len(keys)), [f"{k[1]}\n{k[2]}" for k in keys], fontsize=7)
        ax.set_title("layer ablation: final reward, 95 % CI over seeds")
        ax.grid(alpha=0.3, axis="y")
        _save(fig, out / "ablation.png")
        plt.close(fig)
        written.append(out / "ablation.png")
    prof = {k: v for k, v in groups.items() if any(c["mismatch"] for c in v)}
    if prof:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
        for cond in conditions:
            mm = [c["mismatch"] for k, v in prof.items() if k[0] == cond for c in v]
            lk = sorted({k for m in mm for k in m if k.startswith("mismatch/layer_")})
            if lk:
                a1.plot(range(len(lk)), [np.mean([m[k] for m in mm if k in m]) for k in lk], marker="o", label=cond)
        for key in sorted(k for k in groups if k[2] == "all" and "alp" in k[1]):
            sg = [c["sigma"] for c in groups[key] if c["sigma"]]
            lk = sorted({k for s in sg for k in s})
            if lk:
                a2.plot(range(len(lk)), [np.mean([s[k] for s in sg if k in s]) for k in lk], marker="o",
                        label=f"{key[0]} {key[1]}")
        a1.set_title("engine vs FP32 divergence per layer (last measured step, mean)", fontsize=9)
        a1.set_yscale("log")
        a2.set_title("learned ALP sigma per layer (final, mean over seeds)", fontsize=9)
        for a in (a1, a2):
            a.set_xlabel("decoder layer")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=6)
        _save(fig, out / "layer_mismatch.png")
        plt.close(fig)
        written.append(out / "layer_mismatch.png")
    asy = [c for c in conditions if any(k[0] == c and any("async" in x for x in v) for k, v in groups.items())]
    if asy:
        panels("async/staleness_mean", "async_staleness.png", asy, band=False)
    return written


def write_report(study_dir: str | Path, cells: list | None = None, *, kl_threshold: float = 0.02) -> list[Path]:
    """Summaries, tables and plots of every cell under ``study_dir/cells`` (or of ``cells``)."""
    study_dir = Path(study_dir)
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if cells is None:
        names = sorted(str(p.parent.relative_to(study_dir / "cells")) for p in (study_dir / "cells").glob("*/*/*/*/metrics.jsonl"))
    else:
        names = [c.name for c in cells]
    summaries = {}
    for name in names:
        s = cell_summary(study_dir / "cells" / name, kl_threshold)
        if s is None:
            continue
        cond, preset, layers, seed = name.split("/")
        s.update(condition=cond, preset=preset, layers=layers, seed=int(seed.lstrip("s")))
        summaries[name] = s
    groups: dict = defaultdict(list)
    for s in summaries.values():
        groups[(s["condition"], s["preset"], s["layers"])].append(s)
    conditions = sorted({k[0] for k in groups}, key=lambda c: CONDITION_ORDER.index(c)
                        if c in CONDITION_ORDER else len(CONDITION_ORDER))
    md = ["# ALP study report", "",
          f"Generated by `examples/study/report.py` from {len(summaries)} cell(s)' metrics.jsonl. "
          f"Final reward = mean `critic/score/mean` over the last {FINAL_WINDOW} steps; CI = 95 % t "
          f"interval of the mean over seeds; KL steps = steps with `actor/ppo_kl` > {kl_threshold:g} "
          "(the k1 KL of the update's log-probs to each preset's ratio denominator: the rollout's "
          "for the ALP presets and seq-bypass, the recomputed old policy's for the others, so under "
          "a generation lag the ALP presets' KL includes the staleness); "
          "vs GRPO = paired t-test over the seeds both ran (two-sided p).", ""]
    for cond in conditions:
        keys = sorted(k for k in groups if k[0] == cond and k[2] == "all")
        if keys:
            md += [f"## {cond}", ""] + _group_table(groups, keys, groups, "preset") + [""]
            asy = _async_table(groups, keys)
            if asy:
                md += [f"Asynchrony ({cond}; `async/*`, docs/async.md):", ""] + asy + [""]
    abl = sorted(k for k in groups if k[2] != "all")
    if abl:
        keys = sorted(set(abl) | {(k[0], k[1], "all") for k in abl if (k[0], k[1], "all") in groups})
        md += ["## Layer ablation", ""] + _group_table(groups, keys, groups, "preset / layers") + [""]
    md += _profile_table(groups, conditions) + _cost_table(summaries) + _cells_table(summaries)
    plots = _plots(groups, conditions, out) if groups else []
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    total = sum(s["wall_s"] or 0.0 for s in summaries.values())
    md += [f"Compute: {len(summaries)} cell(s), {total:.0f} s of wall time in all (per cell: `cells/*/cell.json`)."]
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "curves"} for k, v in summaries.items()}
    for name, text in (("summary.json", json.dumps(slim, indent=1, sort_keys=True) + "\n"),
                       ("report.md", "\n".join(md) + "\n")):
        tmp = out / (name + ".part")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return [out / "report.md", out / "summary.json", *plots]


BEGIN = "<!-- study-report: begin (written by examples/study/report.py --publish; do not edit) -->"
END = "<!-- study-report: end -->"
FIGURES_MARKER = ".megatron-alp-study-figures"


def publish(report_dir: Path, doc: Path) -> Path:
    """Put ``report_dir/report.md`` between the :data:`BEGIN` / :data:`END` lines of ``doc``
    (headings one level down, its plots copied into ``doc``'s folder ``study/``), so the
    document's tables are the generator's, never typed. Only the marked block and the
    figures folder (new, or one holding :data:`FIGURES_MARKER`) are written, each atomically;
    a document without exactly one pair of markers, or a ``study/`` folder of someone else's,
    is refused (ValueError) with nothing written."""
    text = doc.read_text()
    lines = text.split("\n")
    if lines.count(BEGIN) != 1 or lines.count(END) != 1 or lines.index(BEGIN) > lines.index(END):
        raise ValueError(f"{doc}: needs exactly one line {BEGIN!r} followed by one line {END!r}")
    figs = doc.parent / "study"
    if figs.exists() and not (figs / FIGURES_MARKER).is_file():
        raise ValueError(f"{figs} exists and holds no {FIGURES_MARKER}: not written by this tool")
    body = []
    for line in (report_dir / "report.md").read_text().rstrip("\n").split("\n"):
        if line.startswith("# "):
            continue  # the document has its own title
        if line.startswith("#"):
            line = "#" + line
        if line.startswith("![") and line.endswith(".png)"):
            line = line.replace("](", "](study/", 1)
        body.append(line)
    figs.mkdir(exist_ok=True)
    (figs / FIGURES_MARKER).touch()
    for png in sorted(report_dir.glob("*.png")):
        if png.name.endswith(".part.png"):
            continue
        tmp = figs / (png.name + ".part")
        tmp.write_bytes(png.read_bytes())
        os.replace(tmp, figs / png.name)
    i, j = lines.index(BEGIN), lines.index(END)
    new = "\n".join(lines[: i + 1] + body + lines[j:])
    tmp = doc.with_name(doc.name + ".part")
    tmp.write_text(new)
    os.replace(tmp, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python examples/study/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the study folder (holds cells/)")
    p.add_argument("--kl-threshold", type=float, default=0.02,
                   help="count steps whose actor/ppo_kl exceeds this (default 0.02)")
    p.add_argument("--publish", default=None, metavar="DOC",
                   help="also put the report between DOC's study-report markers, plots in DOC's "
                        "folder study/ (docs/results.md is written this way)")
    ns = p.parse_args(argv)
    if not (Path(ns.out) / "cells").is_dir():
        print(f"error: --out {ns.out}: no cells/ folder there (run examples/study/study.py first)", file=sys.stderr)
        return 2
    if not (Path(ns.out) / STUDY_MARKER).is_file():  # it writes report/: only in a study's folder
        print(f"error: --out {ns.out}: no {STUDY_MARKER} there: examples/study/study.py did not make "
              "this folder", file=sys.stderr)
        return 2
    if ns.publish and not Path(ns.publish).is_file():
        print(f"error: --publish {ns.publish}: no such file", file=sys.stderr)
        return 2
    for f in write_report(ns.out, kl_threshold=ns.kl_threshold):
        print(f)
    if ns.publish:
        try:
            print(publish(Path(ns.out) / "report", Path(ns.publish)))
        except ValueError as e:
            print(f"error: --publish {ns.publish}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
