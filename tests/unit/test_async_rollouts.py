"""The asynchronous rollout source's bookkeeping, single process and fast: schedules
(one-step-off, deterministic fully-async with partial rollouts), per-token versions, the
staleness bound, and an exact resume from ``state_dict``.

The engine is a scripted stand-in for the fleet client's ``generate_rows`` (pure Python,
no model): each token is a function of (seed, group, sample, position, weight version), so
a token made under another version, or a resumed request issued with another seed,
shows. The real engines and trainer run in ``tests/e2e/test_async_rollouts.py``.
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_alp.data import PromptSampler
from megatron_alp.rollout import Completion, SamplingParams
from megatron_alp.train.async_rollouts import AsyncConfig, AsyncRollouts, staleness_metrics

PROMPTS = [[3 + r, 4, 5 + r % 3] for r in range(10)]


class ScriptedFleet:
    """``generate_rows`` answering with the current fleet ``version`` label; the tokens
    depend on the policy ``weights`` it holds."""

    def __init__(self) -> None:
        self.version = 1  # the fleet's counter after the run's first sync
        self.weights = 0  # which policy's weights it holds (what the tokens depend on)
        self.lock = threading.Lock()
        self.requests = 0

    def generate_rows(self, rows, sp):
        with self.lock:
            version, weights = self.version, self.weights
            self.requests += 1
        out = []
        for i, j, prompt in rows:
            toks = [(sp.seed * 31 + i * 7 + j * 5 + (len(prompt) + k) * 3 + weights * 11) % 50 + 3
                    for k in range(sp.max_new_tokens)]
            out.append((Completion(i, j, toks, [-0.01 * t for t in toks], "length"), version))
        return out


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _source(cfg: AsyncConfig, engine=None, *, per_step=2, n=2, max_new=6):
    engine = engine or ScriptedFleet()
    src = AsyncRollouts(
        cfg, engine=engine, tokenizer=Tok(), prompt_ids=PROMPTS, answers=["1"] * len(PROMPTS),
        reward_fn=lambda text, answer: float(len(text) % 2), sampler=PromptSampler(len(PROMPTS), 3),
        make_sampling=lambda m, seed: SamplingParams(max_new_tokens=m, seed=seed, n=1),
        group_size=n, prompts_per_step=per_step, max_new_tokens=max_new, seed=7,
    )
    return src, engine


def _steps(src, engine, first: int, last: int) -> list:
    """Steps first..last-1 of a run: take the batch, then the sync of the next version."""
    taken = []
    for t in range(first, last):
        samples, metrics = src.take(t)
        taken.append((t, samples, metrics))
        src.before_sync()
        with engine.lock:
            engine.version += 1
            engine.weights = t + 1
        src.after_sync(t + 1)
    return taken


def test_one_step_off_generates_each_batch_one_version_behind():
    src, engine = _source(AsyncConfig(mode="one-step-off"))
    src.start(0)
    try:
        taken = _steps(src, engine, 0, 4)
    finally:
        src.close()
    for t, samples, metrics in taken:
        assert len(samples) == 4 and [s.group for s in samples] == [0, 0, 1, 1]
        assert {v for s in samples for v in s.versions} == {max(0, t - 1)}
        assert metrics["async/staleness_max"] == (0.0 if t == 0 else 1.0)
    # the prompts come in the sampler's order, each exactly once
    order = PromptSampler(len(PROMPTS), 3).next(8)
    assert [s.prompt_index for _, ss, _ in taken for s in ss[::2]] == order


def test_deterministic_fully_async_follows_its_schedule_and_resumes_exactly():
    cfg = AsyncConfig(mode="fully-async", deterministic=True, partial_rollouts=True, segment_tokens=2,
                      max_staleness=1)
    src, engine = _source(cfg)
    src.start(0)
    try:
        full = _steps(src, engine, 0, 5)
    finally:
        src.close()
    for t, samples, metrics in full:
        for s in samples:  # segment k (2 tokens) of batch t under clamp(t - 1 + k, 0, t)
            assert s.versions == [min(t, max(0, t - 1 + k // 2)) for k in range(6)]
        assert metrics["async/staleness_max"] <= 1

    # stop after step 2 (its sync done), checkpoint, resume in a new source
    src, engine = _source(cfg)
    src.start(0)
    try:
        head = _steps(src, engine, 0, 2)
        state = src.state_dict()
    finally:
        src.close()
    assert state["groups"] and any(any(g["tokens"]) for g in state["groups"])  # work in flight saved
    src2, engine2 = _source(cfg)
    engine2.version, engine2.weights = 1, 2  # a fresh fleet: its first sync pushed the checkpoint's weights
    src2.load_state_dict(state)
    src2.start(2)
    try:
        tail = _steps(src2, engine2, 2, 5)
    finally:
        src2.close()
    key = lambda run: [(t, [(s.prompt_index, s.response_ids, s.versions, s.reward) for s in ss]) for t, ss, _ in run]  # noqa: E731
    assert key(head + tail) == key(full)


def _settle(src) -> None:
    """Until every admitted group has finished (its rewards are in)."""
    deadline = time.monotonic() + 30
    while True:
        with src.cv:
            if all(g.rewards is not None for g in src.groups.values()):
                return
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_fully_async_regenerates_what_an_update_made_too_stale():
    """S = 0: groups finished under the previous version (the buffer holds 4 for steps of
    2) are regenerated when taken, so no batch holds a stale token; the count says how
    many. Each sync waits for the buffer to settle, so the schedule does not depend on
    thread timing."""
    src, engine = _source(AsyncConfig(mode="fully-async", max_staleness=0, buffer_groups=4))
    src.start(0)
    taken = []
    try:
        for t in range(4):
            _settle(src)
            samples, metrics = src.take(t)
            taken.append((t, samples, metrics))
            _settle(src)  # the 2 groups admitted in place of the batch finish under version t
            src.before_sync()
            with engine.lock:
                engine.version += 1
                engine.weights = t + 1
            src.after_sync(t + 1)
    finally:
        src.close()
    for t, samples, metrics in taken:
        assert {v for s in samples for v in s.versions} == {t}
    # from step 2 on, all 4 buffered groups are one version old when taken: regenerated
    assert [m["async/regenerated_groups"] for _, _, m in taken] == [0, 4, 8, 12]


def test_staleness_metrics_histogram():
    from megatron_alp.train.rollouts import Sample

    s = Sample(prompt_index=0, group=0, prompt_ids=[1], response_ids=[1, 2, 3, 4], rollout_logp=[0.0] * 4,
               finish_reason="length", reward=0.0, versions=[3, 3, 4, 5])
    m = staleness_metrics([s], 5, 2)
    assert m["async/staleness_frac_0"] == 0.25 and m["async/staleness_frac_1"] == 0.25
    assert m["async/staleness_frac_2"] == 0.5 and m["async/staleness_max"] == 2.0
    assert m["async/versions_per_sample_max"] == 3.0


def test_bad_configuration_names_the_flag():
    with pytest.raises(ValueError, match="--rl-async-mode 'sometimes'"):
        AsyncConfig(mode="sometimes")
    with pytest.raises(ValueError, match="--rl-max-staleness=0 with --rl-async-mode one-step-off"):
        AsyncConfig(mode="one-step-off", max_staleness=0)
    with pytest.raises(ValueError, match="--rl-async-buffer-groups=1 is below --grpo-prompts-per-step=2"):
        _source(AsyncConfig(mode="fully-async", buffer_groups=1))


# ------------------------------------------------------------------------ multi-turn
class MTTok:
    """Token 1000 decodes to a code block, 1001 to a final answer, the rest to words."""

    def decode(self, ids, skip_special_tokens=True):
        words = {1000: "```python\nprint(1)\n```", 1001: "\\boxed{1}"}
        return " ".join(words.get(t, "w") for t in ids)

    def encode(self, text, add_special_tokens=False):
        return [7] * max(1, len(text.split()))


class MTFleet(ScriptedFleet):
    """Turn 0 writes code; the turn after the observation answers, but only once the
    test opens ``gate`` (so an update lands between the two turns)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = 0  # second-turn requests held at the gate

    def generate_rows(self, rows, sp):
        second = any(1000 in p for _, _, p in rows)
        if second:
            with self.lock:
                self.waiting += 1
            assert self.gate.wait(30)
        with self.lock:
            version = self.version
        tok = 1001 if second else 1000
        return [(Completion(i, j, [tok], [-0.5], "stop"), version) for i, j, _ in rows]


class OkSandbox:
    def run_batch(self, codes):
        from types import SimpleNamespace

        return [SimpleNamespace(stdout="1\n", stderr="", exit_code=0, timed_out=False) for _ in codes]


def test_multiturn_trajectories_span_an_update_with_versions_per_turn():
    from megatron_alp.rollout import MultiTurnConfig

    engine = MTFleet()
    src = AsyncRollouts(
        AsyncConfig(mode="fully-async", max_staleness=1), engine=engine, tokenizer=MTTok(),
        prompt_ids=PROMPTS, answers=["1"] * len(PROMPTS), reward_fn=lambda text, a: float("boxed" in text),
        sampler=PromptSampler(len(PROMPTS), 3),
        make_sampling=lambda m, seed: SamplingParams(max_new_tokens=m, seed=seed, n=1),
        group_size=2, prompts_per_step=2, max_new_tokens=32, seed=7,
        sandbox=OkSandbox(), multiturn=MultiTurnConfig(max_turns=3, observation_format="inline"),
    )
    src.start(0)
    try:
        deadline = time.monotonic() + 30
        while engine.waiting < 2:  # both groups' first turns are done (under version 0)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        src.before_sync()  # step 1's update lands while every trajectory waits for turn 2
        with engine.lock:
            engine.version += 1
        src.after_sync(1)
        engine.gate.set()
        samples, metrics = src.take(1)
    finally:
        src.close()
    assert len(samples) == 4
    for s in samples:
        n_obs = len(s.response_ids) - 2
        assert s.response_ids[0] == 1000 and s.response_ids[-1] == 1001 and n_obs >= 1
        assert s.loss_mask == [1] + [0] * n_obs + [1]
        assert s.versions == [0] * (1 + n_obs) + [1]  # the observation carries its turn's version
        assert s.reward == 1.0
    assert metrics["async/staleness_max"] == 1.0 and metrics["async/versions_per_sample_max"] == 2.0
