"""The study runner (examples/study/): its statistics against published t-table values, the
cell grid, and (slow) a tiny cell run twice and a 2-cell study through the report."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "study"))

import report  # noqa: E402
import stats  # noqa: E402
import study  # noqa: E402


@pytest.mark.parametrize("df,q975", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantiles_match_the_table(df, q975):
    assert stats.t_ppf(0.975, df) == pytest.approx(q975, abs=1e-4)


def test_t_cdf_and_paired_test_by_hand():
    assert stats.t_cdf(-1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy: 1/2 + atan(t)/pi
    assert stats.t_cdf(1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)), abs=1e-12)  # closed form, df 2
    # differences 0.5, 1.0, 0.8, 1.5: mean 0.95, sd 0.4203, t = 0.95 / (0.4203 / 2) = 4.5204 (df 3)
    d, t, p, n = stats.paired_t([1, 2, 3, 4.5], [0.5, 1, 2.2, 3])
    assert (d, n) == (pytest.approx(0.95), 4) and t == pytest.approx(4.5204, abs=1e-4)
    assert p == pytest.approx(2 * (1 - stats.t_cdf(4.5204, 3)), abs=1e-4) and 0.01 < p < 0.05
    m, sd, lo, hi = stats.mean_ci([1.0, 2.0, 3.0])
    assert (m, sd) == (2.0, 1.0) and hi - m == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)


def test_the_grid_and_the_layer_thirds():
    cells = study.all_cells()
    assert len(cells) == 3 * (4 * 5 + 6 * 3) + 2 * 4 * 3
    assert len({c.name for c in cells}) == len(cells)
    assert study.layer_flags("first", 6) == ["--alp-layer-start", "0", "--alp-layer-end", "2"]
    assert study.layer_flags("middle", 6) == ["--alp-layer-start", "2", "--alp-layer-end", "4"]
    assert study.layer_flags("last", 6) == ["--alp-layer-start", "4", "--alp-layer-end", "6"]
    assert study.layer_flags("logits", 6) == ["--alp-placement", "logits"]
    assert [c.name for c in study.select(cells, "bf16-k0/grpo/*/s1,fp8-k4/seq-alp/logits/*")] == [
        "bf16-k0/grpo/all/s1", "fp8-k4/seq-alp/logits/s1", "fp8-k4/seq-alp/logits/s2", "fp8-k4/seq-alp/logits/s3"]


def _flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_the_async_grid_and_the_flags_of_every_cell(tmp_path):
    """``--grid async``: conditions x presets x seeds 1..3; each cell's command, parsed by the
    trainer's own parser, asks for fully-async over a 1-engine twin fleet with partial
    rollouts and the S its condition's name says (a buffer of S steps' groups); the main
    grid is unchanged and its cells keep their flags in their place."""
    from megatron_alp.train.arguments import parse_args
    from tests.unit.test_examples import qwen2_config_folder

    cells = study.all_cells(grid="async")
    want = {f"{c}/{p}/all/s{s}" for c in ("async-s1", "async-s4")
            for p in ("grpo", "token-mis", "token-alp", "seq-alp") for s in (1, 2, 3)}
    assert [c.name for c in cells] == sorted(want, key=lambda n: (n[-1], n))  # seed-major run order
    assert len(study.all_cells(max_seeds=1, grid="async")) == 8
    assert len(study.all_cells()) == len(study.all_cells(grid="main")) == 138  # main grid untouched
    with pytest.raises(ValueError, match="grid 'nope'"):
        study.all_cells(grid="nope")

    a = tmp_path / "assets"
    a.mkdir()
    qwen2_config_folder(a / "model", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512)
    for f in ("train.jsonl", "eval.jsonl"):
        (a / f).write_text('{"prompt": "1+1?", "answer": "2"}\n')
    ns = argparse.Namespace(assets=a, config=study.HERE / "base.yaml", mismatch_interval=10, save_interval=10,
                            train_iters=None, trainer_args=[])
    ppstep = 8  # examples/study/base.yaml's grpo_prompts_per_step
    for cell in cells:
        cmd = study.cell_command(cell, ns, tmp_path / "cells" / cell.name, num_layers=6)
        s = int(cell.condition.removeprefix("async-s"))
        assert "--rl-generation-lag" not in cmd and "--load" not in cmd
        assert ("--alp-init-std" in cmd) == ("alp" in cell.preset)
        cfg = parse_args(cmd[3:], world_size=None)  # the trainer's parser and checks
        acfg = cfg.run.async_cfg
        assert (acfg.mode, acfg.max_staleness, acfg.partial_rollouts, acfg.buffer_groups, acfg.deterministic) == (
            "fully-async", s, True, s * ppstep, False), cell.name
        assert acfg.segment_tokens == study.ASYNC_SEGMENT_TOKENS < cfg.run.max_new_tokens  # >= 2 segments
        assert (cfg.run.rollout_engine, cfg.run.engine_kwargs["num_engines"], cfg.run.rollout_dtype) == (
            "fleet", 1, "bf16")
        assert (cfg.loss_preset, cfg.seed, cfg.run.generation_lag) == (cell.preset, cell.seed, 0)
        assert cfg.run.mismatch_by_layer_interval == 10
    # --grpo-prompts-per-step after `--` sizes the buffer
    ns.trainer_args = ["--grpo-prompts-per-step", "4"]
    cmd = study.cell_command(study.Cell("async-s4", "grpo", "all", 1), ns, tmp_path / "x", 6)
    assert _flag(cmd, "--rl-async-buffer-groups") == "16"
    ns.trainer_args = []
    assert study.prompts_per_step("grpo", []) == 32  # a preset without it: the trainer's default
    # an unreadable --config: one line, exit 2, nothing made
    assert study.main(["--out", str(tmp_path / "o"), "--grid", "async", "--config", str(tmp_path / "no.yaml")]) == 2
    assert not (tmp_path / "o").exists()
    # a sync cell: dtype and lag right after the seed, as before the async grid
    cmd = study.cell_command(study.Cell("fp8-k4", "grpo", "all", 2), ns, tmp_path / "y", 6)
    k = cmd.index("--seed")
    assert cmd[k:k + 6] == ["--seed", "2", "--rl-rollout-dtype", "fp8", "--rl-generation-lag", "4"]
    assert "--rl-async-mode" not in cmd


# ------------------------------------------------------------------------------ slow: real runs
TEST_CONFIG = """train:
  micro_batch_size: 4
  global_batch_size: 16
  grpo_prompts_per_step: 4
  grpo_group_size: 4
  lr: 1.0e-3
  lr_decay_style: constant
  rl_reward: exact-match
  rl_max_new_tokens: 6
  rl_max_prompt_length: 24
  rl_eval_samples: 2
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.e2e.train_bodies import build_assets

    return build_assets(tmp_path_factory.mktemp("study_assets"))


def _study(assets, out, cells, cfg, *extra):
    return subprocess.run(
        [sys.executable, str(REPO / "examples/study/study.py"), "--out", str(out), "--assets", str(assets),
         "--config", str(cfg), "--cells", cells, "--train-iters", "2", "--save-interval", "1",
         "--mismatch-interval", "1", *extra],
        capture_output=True, text=True, timeout=1200, cwd=REPO)


def _metrics(cell_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("timing_s/") and k != "time"} for r in rows]


@pytest.mark.slow
def test_a_killed_cell_resumes_to_the_same_metrics_and_a_two_cell_study_reports(assets, tmp_path):
    """One cell run twice from scratch-equivalent starts: in ``a`` it is stopped after step 1
    (``--exit-interval 1``) and resumed by the next call, in ``b`` it runs through; the
    metrics must be exactly equal (every metric but the timings)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TEST_CONFIG)
    a, b = tmp_path / "a", tmp_path / "b"
    cell = "fp8-k4/seq-alp/all/s1"
    first = _study(assets, a, cell, cfg, "--", "--exit-interval", "1")
    assert first.returncode == 1 and "not finished" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    rec = json.loads((a / "cells" / cell / "cell.json").read_text())
    assert rec["finished"] is False and rec["last_step"] == 1 and rec["train_iters"] == 2
    pa = _study(assets, a, f"{cell},fp8-k4/grpo/all/s1", cfg)
    assert pa.returncode == 0, pa.stdout[-3000:] + pa.stderr[-3000:]
    assert "--load" in json.loads((a / "cells" / cell / "cell.json").read_text())["command"]  # resumed
    pb = _study(assets, b, cell, cfg)
    assert pb.returncode == 0, pb.stdout[-3000:] + pb.stderr[-3000:]
    ma, mb = _metrics(a / "cells" / cell), _metrics(b / "cells" / cell)
    assert len(ma) == 2 and ma == mb
    assert "mismatch/layer_00" in ma[0] and ma[0]["mismatch/layer_00"] > 0  # fp8 rollouts measured
    # a finished cell is skipped; the report covers every cell of the folder
    again = _study(assets, a, cell, cfg)
    assert again.returncode == 0 and "skipped (finished)" in again.stdout
    rep = (a / "report" / "report.md").read_text()
    summ = json.loads((a / "report" / "summary.json").read_text())
    assert set(summ) == {cell, "fp8-k4/grpo/all/s1"}
    fr = summ[cell]["final_reward"]
    want = sum(r["critic/score/mean"] for r in ma[-report.FINAL_WINDOW:]) / len(ma[-report.FINAL_WINDOW:])
    assert fr == pytest.approx(want, abs=1e-12)
    assert "## fp8-k4" in rep and "| seq-alp | 1 |" in rep and "| grpo | 1 |" in rep
    for png in ("reward.png", "ratio_q999.png", "ppo_kl.png", "layer_mismatch.png"):
        assert (a / "report" / png).stat().st_size > 1000, png


def test_a_folder_it_did_not_make_is_refused_and_left_alone(tmp_path, capsys):
    """--out pointing at a user's folder (here with a report/ of its own) is refused in one
    line, exit 2, before anything is built or written; a new folder is claimed."""
    out = tmp_path / "mine"
    (out / "report").mkdir(parents=True)
    (out / "report" / "notes.md").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert study.main(["--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err and study.STUDY_MARKER in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "report" / "notes.md").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert study.main(["--out", str(tmp_path / "file"), "--report-only"]) == 2
    assert (tmp_path / "file").read_text() == "x"
    assert study.claim_study_dir(tmp_path / "new") is None
    assert (tmp_path / "new" / study.STUDY_MARKER).is_file()
    assert study.claim_study_dir(tmp_path / "new") is None  # its own: accepted again


def test_the_report_computes_alp_cost_and_lists_every_cell(tmp_path):
    """Two hand-made cells: the cost table's ratios and the per-cell rows come from the
    numbers in metrics.jsonl (medians computed by hand here)."""
    (tmp_path / report.STUDY_MARKER).touch()
    steps = {"grpo": [1.0, 3.0, 2.0], "token-alp": [1.5, 2.0, 2.5, 9.0]}
    upd = {"grpo": [0.5, 0.4, 0.6], "token-alp": [0.55, 0.66, 0.60, 0.70]}
    for preset in steps:
        d = tmp_path / "cells" / "fp8-k4" / preset / "all" / "s1"
        d.mkdir(parents=True)
        rows = [{"step": i + 1, "critic/score/mean": 0.1 * (i + 1), "timing_s/step": t,
                 "timing_s/update_actor": u, "is_ratio/q999": 1.0 + i, "is_ratio/max": 2.0 + i,
                 "actor/ppo_kl": 0.002 * i}
                for i, (t, u) in enumerate(zip(steps[preset], upd[preset]))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(tmp_path, kl_threshold=1e-3)
    md = (tmp_path / "report" / "report.md").read_text()
    # medians: grpo step 2.0, update 0.5; token-alp step 2.25, update 0.63
    assert "| fp8-k4/token-alp/all/s1 | 2.25 | 2.00 | 1.12 | 0.63 | 0.50 | 1.26 |" in md, md
    assert "Median step ratio over 1 ALP cell(s): 1.12." in md
    # every cell has its row: final reward = mean of the last 5 (here all) steps
    assert "| fp8-k4/grpo/all/s1 | 3 | 0.200 | 3 | 4 | 2 | - | 2.00 | - |" in md, md
    assert "| fp8-k4/token-alp/all/s1 | 4 | 0.250 | 4 | 5 | 3 | - | 2.25 | - |" in md, md


def test_spearman_against_scipy_free_hand_values():
    """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) without ties; ties at their mean rank."""
    assert report.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7.5]) == pytest.approx(0.9)
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks a = [0, 1.5, 1.5, 3], b = [0, 1, 2, 3] -> Pearson on ranks
    assert report.spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(report.spearman([1, 1, 1], [1, 2, 3]))


def _async_rows(stal_mean, stal_max, regen, t_idle, e_idle, score):
    return [{"step": i + 1, "critic/score/mean": score[i], "timing_s/step": 1.0, "is_ratio/q999": 1.5,
             "is_ratio/max": 2.0, "actor/ppo_kl": 0.0, "async/staleness_mean": stal_mean[i],
             "async/staleness_max": stal_max[i], "async/versions_per_sample_max": 1.0 + (i % 2),
             "async/regenerated_groups": regen[i], "async/dropped_groups": 0.0,
             "async/trainer_idle_frac": t_idle[i], "async/engine_idle_frac": e_idle[i]}
            for i in range(len(score))]


def test_the_report_shows_the_async_columns_for_async_conditions_only(tmp_path):
    """Hand-made async cells (two seeds of async-s4 grpo, one token-alp) beside a sync cell:
    the async table's numbers are computed by hand here; the sync condition's section is
    the same text with or without the async cells beside it, and has no async table."""
    def write(root, name, rows):
        d = root / "cells" / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    sync_rows = [{"step": i + 1, "critic/score/mean": 0.1 * i, "timing_s/step": 2.0, "is_ratio/q999": 1.1,
                  "is_ratio/max": 1.2, "actor/ppo_kl": 0.0} for i in range(3)]
    only_sync, mixed = tmp_path / "a", tmp_path / "b"
    for root in (only_sync, mixed):
        root.mkdir()
        (root / report.STUDY_MARKER).touch()
        write(root, "bf16-k4/grpo/all/s1", sync_rows)
    write(mixed, "async-s4/grpo/all/s1", _async_rows([1.0, 2.0, 3.0], [2, 3, 4], [0, 1, 1], [.1, .2, .3],
                                                      [.5, .5, .2], [.1, .2, .3]))
    write(mixed, "async-s4/grpo/all/s2", _async_rows([0.5, 0.5, 2.0], [1, 1, 3], [0, 0, 3], [.4, .4, .4],
                                                      [.3, .3, .3], [.2, .2, .2]))
    write(mixed, "async-s1/token-alp/all/s1", _async_rows([0.0, 1.0], [0, 1], [0, 2], [.0, .2], [.1, .1], [.5, .5]))
    report.write_report(only_sync)
    report.write_report(mixed)
    a = (only_sync / "report" / "report.md").read_text()
    b = (mixed / "report" / "report.md").read_text()
    assert "async" not in a and not (only_sync / "report" / "async_staleness.png").exists()

    def section(md, cond):
        return md.split(f"## {cond}\n", 1)[1].split("\n## ", 1)[0]

    assert section(a, "bf16-k4") == section(b, "bf16-k4")
    assert b.index("## bf16-k4") < b.index("## async-s1") < b.index("## async-s4")  # condition order
    # grpo: staleness mean = mean(2.0, 1.0) = 1.50; max 4; versions/sample max 2; regenerated
    # mean(1, 3) = 2.0; dropped 0; trainer idle mean(0.2, 0.4) = 0.30; engine idle mean(0.4, 0.3) = 0.35
    assert "| grpo | 2 | 1.50 | 4 | 2 | 2.0 | 0.0 | 0.30 | 0.35 |" in section(b, "async-s4"), b
    # token-alp (one seed): staleness mean 0.50, max 1, versions 2, regenerated 2, idle 0.10 / 0.10
    assert "| token-alp | 1 | 0.50 | 1 | 2 | 2.0 | 0.0 | 0.10 | 0.10 |" in section(b, "async-s1"), b
    assert "Asynchrony (async-s4" in b and "Asynchrony" not in section(b, "bf16-k4")
    summ = json.loads((mixed / "report" / "summary.json").read_text())
    assert "async" not in summ["bf16-k4/grpo/all/s1"]
    assert summ["async-s4/grpo/all/s2"]["async"]["regenerated_groups"] == 3.0
    assert (mixed / "report" / "async_staleness.png").stat().st_size > 1000


def test_publish_writes_only_between_its_markers_and_refuses_otherwise(tmp_path):
    """--publish: the generated report lands between the markers (headings one level down,
    plots under study/), the rest of the document is untouched; a document without markers
    or a study/ folder it did not make is refused with nothing written."""
    rep = tmp_path / "run" / "report"
    rep.mkdir(parents=True)
    (rep / "report.md").write_text("# ALP study report\n\n## fp8-k4\n\n| a | b |\n\n![reward](reward.png)\n")
    (rep / "reward.png").write_bytes(b"\x89PNG fake")
    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "results.md"
    doc.write_text(f"# Results\n\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.publish(rep, doc)
    assert doc.read_text() == (f"# Results\n\nbefore\n{report.BEGIN}\n\n### fp8-k4\n\n| a | b |\n\n"
                               f"![reward](study/reward.png)\n{report.END}\nafter\n")
    assert (docs / "study" / "reward.png").read_bytes() == b"\x89PNG fake"
    report.publish(rep, doc)  # again: same result, its own folder accepted
    assert doc.read_text().count("### fp8-k4") == 1
    bare = docs / "bare.md"
    bare.write_text("# no markers\n")
    with pytest.raises(ValueError, match="needs exactly one line"):
        report.publish(rep, bare)
    assert bare.read_text() == "# no markers\n"
    other = tmp_path / "other"
    (other / "study").mkdir(parents=True)
    (other / "study" / "mine.png").write_bytes(b"user's")
    (other / "r.md").write_text(f"{report.BEGIN}\n{report.END}\n")
    with pytest.raises(ValueError, match="not written by this tool"):
        report.publish(rep, other / "r.md")
    assert (other / "r.md").read_text() == f"{report.BEGIN}\n{report.END}\n"
    assert sorted(p.name for p in (other / "study").iterdir()) == ["mine.png"]
