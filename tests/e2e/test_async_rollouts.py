"""Asynchronous RL over a fleet of CPU-twin engines, for real: 2 gloo ranks (TP=2) and
2 engine processes per run, no mocks.

Oracles: the trainer's own log-prob pass re-run under every policy version it pushed
(each token's engine log-prob must equal the recomputation under the version recorded
for it, tokens continued across an update included), and the step index at which each
sample was consumed (no update sees a token more than S versions old).
"""

from __future__ import annotations

import collections

import pytest

from megatron_alp.launch import RankGroup
from tests.e2e.async_bodies import versions_body
from tests.e2e.train_bodies import base_argv, prepare_module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The trainer tests' tiny Qwen2 and task, not warmed up (rewards do not matter here)."""
    out = tmp_path_factory.mktemp("async_assets")
    prepare_module().build(out, seed=0, target=0.3, layers=2, hidden=32, warmup_max_steps=0)
    return out


@pytest.fixture(scope="module")
def group():
    with RankGroup(2, timeout_s=600) as g:
        yield g


def _fleet(*extra: str) -> tuple[str, ...]:
    return ("--rl-loss", "token-tis", "--rl-rollout-dtype", "fp32", "--tensor-model-parallel-size", "2",
            "--rl-rollout-engine", "fleet", "--rl-fleet-engines", "2", *extra)


def _check_staleness(out: dict, bound: int) -> collections.Counter:
    """Every sample consumed by step t + 1 (the trainer then holds version t) has no
    token older than ``bound`` versions; returns the staleness counts over tokens."""
    ages = collections.Counter()
    for step, samples in out["taken"]:
        for s in samples:
            assert len(s.versions) == len(s.response_ids) == len(s.rollout_logp)
            assert max(s.versions) <= step, (step, s.versions)  # nothing from the future
            assert step - min(s.versions) <= bound, (step, s.versions)
            ages.update(step - v for v in s.versions)
    return ages


@pytest.mark.slow  # ~40 s after rank start-up (engine processes, 4 steps); unit twin: tests/unit/test_async_rollouts.py
def test_fully_async_partial_rollouts_every_token_exact_under_its_version(group, assets, tmp_path):
    """fully-async + partial rollouts, slow and fast engines (simulated devices), S = 1:
    every token's engine log-prob equals the trainer's under the version that made it."""
    out = group.run(versions_body, base_argv(
        assets, tmp_path / "run", "--train-iters", "4", *_fleet(
            "--rl-async-mode", "fully-async", "--rl-partial-rollouts", "--rl-partial-rollout-tokens", "2",
            "--rl-max-staleness", "1", "--rl-async-buffer-groups", "12",
            "--rl-fleet-simulate-tokens-per-s", "60,400")), 2)[0]
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    tokens = out["tokens"]
    worst = max(abs(e - t) for *_, e, t in tokens)
    assert worst <= 1e-4, worst
    # the check covers what it claims: tokens of several versions, samples that span an
    # update (continued under the new weights), stale tokens
    spanning = [s for _, ss in out["taken"] for s in ss if len(set(s.versions)) > 1]
    assert spanning, "no sample was continued across a weight update: the test would prove nothing"
    assert len({v for _, _, _, v, _, _ in tokens}) >= 3
    ages = _check_staleness(out, 1)
    assert ages[1] > 0, ages
    for h in out["history"]:
        assert h["async/staleness_max"] <= 1
        assert abs(sum(h[f"async/staleness_frac_{k}"] for k in (0, 1)) - 1) < 1e-9
        assert 0 <= h["async/trainer_idle_frac"] <= 1 and 0 <= h["async/engine_idle_frac"] <= 1


@pytest.mark.slow  # two more runs (~40 s each on 2 cores)
def test_staleness_bound_zero_regenerates_and_one_step_off_is_exactly_one_behind(group, assets, tmp_path):
    """S = 0 under fully-async with a slow and a fast engine: groups caught by an update
    are regenerated (counted), and no update sees a stale token; one-step-off: every
    step after the first trains on rollouts exactly one version old."""
    out = group.run(versions_body, base_argv(
        assets, tmp_path / "s0", "--train-iters", "4", *_fleet(
            "--rl-async-mode", "fully-async", "--rl-partial-rollouts", "--rl-partial-rollout-tokens", "2",
            "--rl-max-staleness", "0", "--rl-async-buffer-groups", "12",
            "--rl-fleet-simulate-tokens-per-s", "60,400")), 2)[0]
    ages = _check_staleness(out, 0)
    assert set(ages) == {0}
    assert out["history"][-1]["async/regenerated_groups"] > 0  # the bound did bite
    assert max(abs(e - t) for *_, e, t in out["tokens"]) <= 1e-4

    out = group.run(versions_body, base_argv(
        assets, tmp_path / "osf", "--train-iters", "3", *_fleet("--rl-async-mode", "one-step-off")), 2)[0]
    for step, samples in out["taken"]:
        assert {v for s in samples for v in s.versions} == {max(0, step - 1)}
    assert [h["async/staleness_mean"] for h in out["history"]] == [0.0, 1.0, 1.0]
    assert max(abs(e - t) for *_, e, t in out["tokens"]) <= 1e-4


@pytest.mark.slow  # two more runs
def test_deterministic_fully_async_is_a_function_of_the_seed(group, assets, tmp_path):
    """--rl-async-deterministic: two runs with differently fast engines take the same
    tokens under the same versions at every step (the schedule clamp(b - S + k, 0, b))."""
    runs = []
    for name, rates in (("a", "60,400"), ("b", "400,60")):
        runs.append(group.run(versions_body, base_argv(
            assets, tmp_path / name, "--train-iters", "3", *_fleet(
                "--rl-async-mode", "fully-async", "--rl-async-deterministic", "--rl-partial-rollouts",
                "--rl-partial-rollout-tokens", "2", "--rl-max-staleness", "1",
                "--rl-fleet-simulate-tokens-per-s", rates)), 2)[0])
    a, b = runs
    for (sa, xa), (sb, xb) in zip(a["taken"], b["taken"], strict=True):
        assert sa == sb
        assert [(s.prompt_index, s.response_ids, s.versions) for s in xa] == \
               [(s.prompt_index, s.response_ids, s.versions) for s in xb]
        for s in xa:  # segment k of batch b under clamp(b - 1 + k, 0, b), 2 tokens a segment
            assert s.versions == [min(sa, max(0, sa - 1 + k // 2)) for k in range(len(s.versions))]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["rollout/checksum"] == hb["rollout/checksum"]
        assert abs(ha["actor/pg_loss"] - hb["actor/pg_loss"]) <= 1e-6
    assert max(abs(e - t) for *_, e, t in a["tokens"]) <= 1e-4
