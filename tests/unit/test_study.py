"""The study runner (examples/study/): its statistics against published t-table values, the
cell grid, and (slow) a tiny cell run twice and a 2-cell study through the report."""

from __future__ import annotations

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
