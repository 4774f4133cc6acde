"""The trainer's command line as a user meets it: ``--help``, one-line errors, the run folder.

Bad invocations are parsed in-process (``parse_args`` raises the ``ValueError`` that
``python -m megatron_alp.train`` prints as ``error: ...`` with exit 2); a few go through
the real command to check the exit code, the single line on stderr and that no rank started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_examples import qwen2_config_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """An HF folder with only a small Qwen2 config.json (parsing needs no weights) and prompts."""
    d = tmp_path_factory.mktemp("cli")
    qwen2_config_folder(d / "model", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512)
    (d / "p.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    return d


def base(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--hf-model", str(assets / "model"), "--rl-prompt-data", str(assets / "p.jsonl"),
            "--rl-run-dir", str(run_dir), "--train-iters", "1", "--micro-batch-size", "1",
            "--grpo-prompts-per-step", "2", "--grpo-group-size", "2", "--rl-max-new-tokens", "8",
            "--rl-max-prompt-length", "32", *extra]


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


# (id, extra argv or a function (tmp) -> extra argv, needle: the part of the one line that must appear)
BAD = [
    # the issue's five
    ("yaml-train-unknown-key", lambda t: ["--config", _yaml(t, "train:\n  micro_batch_sise: 8\n")],
     "cfg.yaml: train.micro_batch_sise is not a trainer flag (--micro-batch-sise); did you mean --micro-batch-size?"),
    ("invalid-choice", ["--rl-rollout-dtype", "fp16"],
     "argument --rl-rollout-dtype: invalid choice: 'fp16' (choose from 'bf16', 'fp32', 'fp8')"),
    ("yaml-alp-unknown-key", lambda t: ["--config", _yaml(t, "alp:\n  init_stdd: 0.001\n")],
     "cfg.yaml: alp.init_stdd is not a field of ALPConfig (did you mean init_std?)"),
    ("negative-lr-and-min-lr", ["--lr", "-1", "--min-lr", "-2"], "--lr=-1.0 is invalid; expected a learning rate >= 0"),
    ("unknown-flag", ["--micro-batch-sise", "8"], "unknown flag --micro-batch-sise; did you mean --micro-batch-size?"),
    # already refused before (tests/e2e/test_train.py's table), now also one line
    ("unknown-loss", ["--rl-loss", "nope"], "valid names"),
    ("negative-mismatch-interval", ["--rl-mismatch-by-layer-interval", "-1"],
     "--rl-mismatch-by-layer-interval=-1 is invalid; expected >= 0 (0: off)"),
    ("no-alp-with-alp-loss", ["--rl-loss", "token-alp", "--no-alp"], "contradicts --rl-loss token-alp"),
    ("gbs-not-multiple", ["--global-batch-size", "3"], "must be a multiple of --global-batch-size=3"),
    ("tp-not-dividing-heads", ["--tensor-model-parallel-size", "3", "--nproc", "3"],
     "not divisible by tensor_model_parallel_size=3"),
    ("missing-prompts", ["--rl-prompt-data", "/nonexistent/p.jsonl"], "--rl-prompt-data /nonexistent/p.jsonl: no such file"),
    ("missing-load", ["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: no checkpoint"),
    ("top-p", ["--rl-default-top-p", "0.9"], "truncated sampling is refused"),
    ("temperature-high", ["--rl-default-temperature", "2.5"], "above 2.0, which vLLM (0.33) rejects"),
    ("fleet-flag-without-fleet", ["--rl-fleet-max-in-flight", "16"], "--rl-fleet-max-in-flight applies to --rl-rollout-engine fleet"),
    ("alp-negative-std", ["--alp-init-std", "-1"], "ALPConfig.init_std=-1.0"),
    ("missing-hf-model", lambda t: ["--hf-model", str(t / "missing")], "no config.json"),
    # new: argparse's own refusals, one line each
    ("stray-value", ["foo"], "unexpected value 'foo'"),
    ("not-a-float", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("dataclass-flag-type", ["--alp-init-std", "abc"], "--alp-init-std expects float, got 'abc'"),
    ("missing-value", ["--rl-max-turns"], "argument --rl-max-turns: expected one argument"),
    ("megatron-yaml", ["--yaml-cfg", "x.yaml"], "--yaml-cfg x.yaml: Megatron's experimental YAML is not read"),
    # new: range checks of numeric flags the trainer reads
    ("min-lr-above-lr", ["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr=0.001 is above --lr=0.0001"),
    ("nan-lr", ["--lr", "nan"], "--lr=nan is invalid"),
    ("adam-beta", ["--adam-beta1", "1.5"], "--adam-beta1=1.5 is invalid; expected 0 <= beta < 1"),
    ("weight-decay", ["--weight-decay", "-0.1"], "--weight-decay=-0.1 is invalid"),
    ("clip-grad", ["--clip-grad", "-1"], "--clip-grad=-1.0 is invalid"),
    ("adam-eps", ["--adam-eps=-1e-8"], "--adam-eps=-1e-08 is invalid"),
    ("warmup", ["--lr-warmup-iters", "-1"], "--lr-warmup-iters=-1 is invalid"),
    ("seed", ["--seed", "-1"], "--seed=-1 is invalid"),
    ("nproc", ["--nproc", "0"], "--nproc=0 is invalid; expected an integer >= 1"),
    ("gbs-zero", ["--global-batch-size", "0"], "--global-batch-size=0 is invalid"),
    ("tp-zero", ["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size=0 is invalid"),
    ("max-new-tokens", ["--rl-max-new-tokens", "0"], "--rl-max-new-tokens=0 is invalid"),
    ("prompt-length", ["--rl-max-prompt-length", "0"], "--rl-max-prompt-length=0 is invalid"),
    ("generation-lag", ["--rl-generation-lag", "-1"], "--rl-generation-lag=-1 is invalid"),
    ("eval-samples", ["--rl-eval-samples", "0"], "--rl-eval-samples=0 is invalid"),
    ("exit-duration", ["--exit-duration-in-mins", "0"], "--exit-duration-in-mins=0 is invalid"),
    ("save-interval", lambda t: ["--save", str(t / "ckpt"), "--save-interval", "0"], "--save-interval=0 is invalid"),
    ("sync-port", ["--rl-rollout-engine", "fleet", "--rl-fleet-sync-port", "70000"], "--rl-fleet-sync-port=70000 is invalid"),
    ("fleet-engines", ["--rl-fleet-engines", "0"], "--rl-fleet-engines=0 is invalid"),
    # asynchronous RL (issue 22): the in-process engine stays synchronous, and says so
    ("async-local-engine", ["--rl-async-mode", "fully-async"],
     "--rl-async-mode fully-async: the 'local' engine runs in the trainer's process and stays synchronous"),
    ("async-vllm-fleet", ["--rl-async-mode", "one-step-off", "--rl-rollout-engine", "fleet",
                          "--rl-fleet-backend", "vllm"], "with --rl-fleet-backend vllm: not supported yet"),
    ("partial-without-async", ["--rl-partial-rollouts"], "--rl-partial-rollouts applies to --rl-async-mode"),
    ("staleness-without-async", ["--rl-max-staleness", "2"], "--rl-max-staleness applies to --rl-async-mode"),
    ("async-with-lag", ["--rl-async-mode", "fully-async", "--rl-rollout-engine", "fleet",
                        "--rl-generation-lag", "1"], "--rl-generation-lag 1 emulates staleness"),
    ("one-step-off-stale-0", ["--rl-async-mode", "one-step-off", "--rl-rollout-engine", "fleet",
                              "--rl-max-staleness", "0"], "--rl-max-staleness=0 with --rl-async-mode one-step-off"),
    ("one-step-off-partial", ["--rl-async-mode", "one-step-off", "--rl-rollout-engine", "fleet",
                              "--rl-partial-rollouts"], "--rl-partial-rollouts applies to --rl-async-mode fully-async"),
    ("async-buffer-small", ["--rl-async-mode", "fully-async", "--rl-rollout-engine", "fleet",
                            "--rl-async-buffer-groups", "-1"], "--rl-async-buffer-groups=-1 is invalid"),
    ("segment-zero", ["--rl-async-mode", "fully-async", "--rl-rollout-engine", "fleet", "--rl-partial-rollouts",
                      "--rl-partial-rollout-tokens", "0"], "--rl-partial-rollout-tokens=0 is invalid"),
    ("async-multiturn-one-step-off", ["--rl-async-mode", "one-step-off", "--rl-rollout-engine", "fleet",
                                     "--rl-max-turns", "3"], "multi-turn rollouts run under --rl-async-mode fully-async only"),
    ("simulate-bad", ["--rl-rollout-engine", "fleet", "--rl-fleet-simulate-tokens-per-s", "1,2,3"],
     "--rl-fleet-simulate-tokens-per-s '1,2,3' is invalid"),
    ("simulate-endpoints", ["--rl-rollout-engine", "fleet", "--rl-fleet-endpoints", "http://127.0.0.1:1",
                            "--rl-fleet-simulate-tokens-per-s", "100"], "applies to a twin fleet the trainer starts"),
    ("sandbox-timeout", ["--rl-sandbox-timeout-s", "0"], "--rl-sandbox-timeout-s=0.0 is invalid"),
    ("sandbox-memory", ["--rl-sandbox-memory-mb", "0"], "--rl-sandbox-memory-mb=0 is invalid"),
    ("max-turns", ["--rl-max-turns", "0"], "--rl-max-turns=0 is invalid"),
    ("kl-beta", ["--grpo-kl-beta", "-1"], "--rl-loss token-alp: PolicyLossConfig.kl_coef=-1.0"),
    # new: YAML files
    ("unknown-preset", ["--config", "nope"], "--config nope: unknown preset 'nope'; available:"),
    ("bad-yaml", lambda t: ["--config", _yaml(t, "alp: [1,\n")], "cfg.yaml: not valid YAML at line"),
    ("unknown-section", lambda t: ["--config", _yaml(t, "trian:\n  lr: 1\n")], "cfg.yaml: unknown section(s) ['trian']"),
    ("section-not-mapping", lambda t: ["--config", _yaml(t, "alp: 3\n")], "cfg.yaml: section `alp` must be a mapping"),
    ("yaml-train-bad-value", lambda t: ["--config", _yaml(t, "train:\n  micro_batch_size: eight\n")],
     "cfg.yaml: train.micro_batch_size: 'eight': argument --micro-batch-size: invalid int value: 'eight'"),
    ("yaml-train-range", lambda t: ["--config", _yaml(t, "train:\n  lr: -1\n  min_lr: -2\n")], "--lr=-1.0 is invalid"),
    ("yaml-policy-loss-unknown-key", lambda t: ["--config", _yaml(t, "policy_loss:\n  clip_lo: 0.2\n")],
     "cfg.yaml: policy_loss.clip_lo is not a field of PolicyLossConfig (did you mean clip_low?)"),
    ("yaml-alp-bad-type", lambda t: ["--config", _yaml(t, "alp:\n  init_std: abc\n")], "ALPConfig.init_std='abc' is invalid"),
    ("yaml-advantages-key", lambda t: ["--config", _yaml(t, "advantages:\n  estimater: rloo\n")],
     "cfg.yaml: advantages.estimater is not a known key; valid: estimator"),
]


@pytest.mark.parametrize("name,extra,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_invocation_is_one_line(assets, tmp_path, name, extra, needle):
    from megatron_alp.train.arguments import parse_args

    extra = extra(tmp_path) if callable(extra) else extra
    with pytest.raises(ValueError) as e:
        parse_args(base(assets, tmp_path / "run", *extra), world_size=None)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_invocations_table_is_large_enough():
    assert len(BAD) >= 20


def _cli(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="80")  # argparse wraps to the terminal; docs/train.md quotes 80 columns
    return subprocess.run([sys.executable, "-m", "megatron_alp.train", *argv], capture_output=True,
                          text=True, timeout=300, env=env, cwd=kw.get("cwd"))


@pytest.mark.parametrize("name", ["yaml-train-unknown-key", "invalid-choice", "yaml-alp-unknown-key",
                                  "negative-lr-and-min-lr", "unknown-flag", "stray-value", "async-local-engine"])
def test_the_command_exits_2_with_one_line(assets, tmp_path, capsys, monkeypatch, name):
    """``megatron_alp.train``'s main (the command's body, in-process: a subprocess per case
    would cost seconds of imports; one real subprocess is below): exit 2, one line on stderr."""
    from megatron_alp.train.__main__ import main

    for key in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # main() sets them; restored after the test
    _, extra, needle = next(b for b in BAD if b[0] == name)
    extra = extra(tmp_path) if callable(extra) else extra
    assert main(base(assets, tmp_path / "run", *extra)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run").exists()  # no rank started (ranks log to RUN_DIR/logs)


# ------------------------------------------------------------------------------ --help
def _doc_flags() -> set[str]:
    text = re.sub(r"`error: [^`]*`", "", (REPO / "docs/train.md").read_text())  # quoted mistakes
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", text))
    flags |= {"--adam-beta2"}  # written `--adam-beta1/2`
    # torchrun's and sbatch's own flags, named where the docs explain a launch
    return flags - {"--nproc-per-node", "--shutdown-timeout", "--signal"}


def test_help_exits_0_and_its_first_screen_is_the_trainers_flags(tmp_path):
    p = _cli(["--help"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    first = out.splitlines()[:40]
    assert first[0].startswith("usage: python -m megatron_alp.train --hf-model DIR --rl-prompt-data FILE")
    assert "megatron-alp run:" in first
    for flag in ("--config", "--hf-model", "--rl-prompt-data", "--rl-reward", "--rl-rollout-engine"):
        assert any(line.lstrip().startswith(flag) for line in first), flag
    missing = sorted(f for f in _doc_flags() if f not in out)
    assert not missing, missing
    # the trainer's groups first, then the Megatron flags it reads, then --help-all
    order = [out.index(t) for t in ("megatron-alp run:", "megatron-alp objective:", "megatron-alp ALP",
                                    "megatron-alp fleet", "megatron-alp multi-turn", "Megatron flags: layout")]
    assert order == sorted(order)
    assert "--moe-paged-stash-buffer-size-factor-cuda" not in out  # Megatron's others: --help-all
    assert out.rstrip().endswith("--help-all")
    assert len(out.splitlines()) < 400
    quoted = docs_help_block()
    assert len(quoted.splitlines()) >= 20 and out.startswith(quoted)  # docs/train.md shows it as printed


def docs_help_block() -> str:
    """The first lines of ``--help`` quoted in docs/train.md (between its markers)."""
    text = (REPO / "docs/train.md").read_text()
    m = re.search(r"<!-- help:start -->\n```text\n(.*?)```\n<!-- help:end -->", text, re.S)
    assert m, "docs/train.md must quote the first lines of --help between help markers"
    return m.group(1)


def test_help_all_lists_megatrons_whole_parser(capsys, monkeypatch):
    from megatron_alp.train.arguments import parse_args

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help-all"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--moe-paged-stash-buffer-size-factor-cuda" in out and "10%)" in out  # the bare % prints as written
    missing = sorted(f for f in _doc_flags() if f not in out)
    assert not missing, missing
    assert out.index("megatron-alp run:") < out.index("Megatron's parser")
    assert len(out.splitlines()) > 2000


# ------------------------------------------------------------------------------ the run folder
def test_foreign_files_in_the_run_folder_are_refused_and_unchanged(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.rundir import claim_run_dir

    for name in ("config.json", "metrics.jsonl", "logs", "plots"):
        run = tmp_path / name.replace(".", "_")
        run.mkdir()
        target = run / name
        if "." in name:
            target.write_text("the user's own\n")
        else:
            target.mkdir()
            (target / "mine.txt").write_text("the user's own\n")
        # --rl-run-dir, and --save as the run folder (the issue's case)
        for argv in (base(assets, run), base(assets, run, "--save", str(run))[:]):
            if "--save" in argv:
                argv = [a for a in argv]
                i = argv.index("--rl-run-dir")
                del argv[i:i + 2]
            with pytest.raises(ValueError) as e:
                parse_args(argv, world_size=None)
            msg = str(e.value)
            assert f"{run} holds {name} but no .megatron-alp-run" in msg and "\n" not in msg, msg
        with pytest.raises(ValueError, match="did not write it"):
            claim_run_dir(run)  # the ranks' own check, should the folder change after parsing
        assert sorted(p.name for p in run.iterdir()) == [name]
        if "." in name:
            assert target.read_text() == "the user's own\n"


def test_the_issues_save_folder_through_the_command(assets, tmp_path):
    """`--save DIR` without --rl-run-dir, DIR holding the user's config.json and metrics.jsonl."""
    save = tmp_path / "save"
    save.mkdir()
    (save / "config.json").write_text('{"mine": 1}\n')
    (save / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    argv = [a for a in base(assets, save, "--save", str(save))]
    i = argv.index("--rl-run-dir")
    del argv[i:i + 2]
    p = _cli(argv)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "holds config.json but no .megatron-alp-run" in p.stderr
    assert (save / "config.json").read_text() == '{"mine": 1}\n'
    assert (save / "metrics.jsonl").read_text() == '{"step": 1, "mine": true}\n'
    assert sorted(p.name for p in save.iterdir()) == ["config.json", "metrics.jsonl"]


def test_a_run_of_its_own_resumes_and_appends(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.logging import RunLogger
    from megatron_alp.rundir import MARKER, claim_run_dir

    run = tmp_path / "run"
    cfg = parse_args(base(assets, run), world_size=None)  # a new folder: fine
    claim_run_dir(run)
    assert (run / MARKER).is_file()
    rows = [{"step": s, "x": float(s)} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text("{}\n")
    (run / "logs").mkdir()
    cfg = parse_args(base(assets, run), world_size=None)  # ours: accepted
    claim_run_dir(run)
    logger = RunLogger(cfg, active=True, resume_step=2, wandb_id=None)  # resumed after step 2 (step 3 was lost)
    logger.log(3, {"x": 30.0})
    logger.close()
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in got] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_save_folder_of_an_earlier_version_is_still_ours(assets, tmp_path):
    """--save = run folder of a run from before the marker: its checkpoint carries the trainer's
    checkpoint marker, so the resumed run may append to its metrics.jsonl."""
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.checkpoint import LATEST, MARKER as CKPT_MARKER, iter_dir

    save = tmp_path / "save"
    (iter_dir(save, 2)).mkdir(parents=True)
    (iter_dir(save, 2) / ".metadata").write_text("")
    (iter_dir(save, 2) / CKPT_MARKER).write_text("")
    (save / LATEST).write_text("2\n")
    (save / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = [a for a in base(assets, save, "--save", str(save), "--load", str(save))]
    i = argv.index("--rl-run-dir")
    del argv[i:i + 2]
    assert parse_args(argv, world_size=None).run.run_dir == save
    (iter_dir(save, 2) / CKPT_MARKER).unlink()  # somebody else's checkpoint: both refused
    with pytest.raises(ValueError, match="did not write"):
        parse_args(argv, world_size=None)


def test_an_empty_or_unrelated_folder_is_claimed(assets, tmp_path):
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.rundir import MARKER, claim_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept\n")  # nothing the trainer writes: the folder may be used
    parse_args(base(assets, run), world_size=None)
    claim_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "notes.txt"]


def test_plot_command_replaces_only_the_plots_of_a_trainer_run(tmp_path, capsys):
    from megatron_alp.plot import main as plot_main
    from megatron_alp.rundir import claim_run_dir

    run = tmp_path / "theirs"
    (run / "plots").mkdir(parents=True)
    (run / "plots" / "reward.png").write_bytes(b"the user's own")
    (run / "metrics.jsonl").write_text('{"step": 1, "critic/score/mean": 0.5}\n')
    assert plot_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no .megatron-alp-run" in err, err
    assert (run / "plots" / "reward.png").read_bytes() == b"the user's own"
    ours = tmp_path / "ours"
    claim_run_dir(ours)
    (ours / "plots").mkdir()
    (ours / "metrics.jsonl").write_text('{"step": 1, "critic/score/mean": 0.5}\n{"step": 2, "critic/score/mean": 0.7}\n')
    assert plot_main([str(ours)]) == 0
    assert (ours / "plots" / "reward.png").stat().st_size > 1000
