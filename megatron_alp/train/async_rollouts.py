"""Asynchronous rollouts: the fleet generates into a bounded buffer while the trainer trains.

A rollout *source* for ``train/loop.py`` (``--rl-async-mode one-step-off | fully-async``;
``off`` keeps the synchronous path there). It lives on global rank 0, the rank that
holds the engine, and talks to the fleet (``FleetEngine.generate_rows``) from worker
threads, one per prompt group in flight, while the main thread trains and pushes weights.

Versions. The policy version is the number of completed RL steps: the engines start at
version ``step`` and every sync after step t serves version t. Every token records the
version that produced it (``Sample.versions``); its log-prob is the engine's under that
version, so each importance ratio stays exact. The *staleness* of a token consumed by
step t + 1 (the trainer then holds version t) is ``t - version``.

Work unit: a prompt group (``--grpo-group-size`` samples; GRPO needs the whole group).
With ``--rl-partial-rollouts`` a group is generated in segments of
``--rl-partial-rollout-tokens`` tokens; a segment that ends before the response does is
continued by the next request (prompt + tokens so far), under whatever weights the
engine serves by then: a sequence interrupted by an update continues under the new
weights. Without it a sequence is one request, decoded under one version.

Schedules:

* **one-step-off**: the groups of batch b (consumed by step b + 1) are generated under
  version ``max(0, b - 1)``, during step b; the sync after step b waits until they are
  done. Staleness is exactly 1 (0 for the first step).
* **fully-async** (free-running): up to ``--rl-async-buffer-groups`` groups are in flight
  or finished at once; the trainer takes the first ``--grpo-prompts-per-step`` groups to
  finish; weights are pushed after every step while generation goes on (the twin engine
  finishes the batch it decodes, loads the whole bucket set, resumes). A group whose
  oldest token is more than ``--rl-max-staleness`` S versions behind is **regenerated**
  (its tokens dropped, the same prompt issued again under the current weights; counted
  in ``async/regenerated_groups``), as soon as a worker sees it and again when the
  trainer takes it: no update ever sees a token older than S.
* **fully-async, deterministic** (``--rl-async-deterministic``): segment k of batch b is
  generated under version ``clamp(b - S + k, 0, b)`` (without partial rollouts:
  ``max(0, b - S)``): the schedule is a function of the seed alone, a segment waits for
  its version and the sync waits for the segments of the version it replaces. Together
  with per-(group, attempt, segment) seeds, a rerun — or a resume — draws the same tokens.

Exact resume: :meth:`AsyncRollouts.state_dict` holds every admitted group (finished ones
with their rewards, the others with their completed segments: prompt row, group id,
attempt, the tokens, log-probs and versions so far) and the prompt sampler's position;
a resumed run re-issues each unfinished group's next segment with the same seed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

from megatron_alp.rollout.sampling import completion_seed
from megatron_alp.train.rollouts import Sample

__all__ = ["ASYNC_MODES", "AsyncConfig", "AsyncRollouts", "IdleMeter", "staleness_metrics"]

ASYNC_MODES = ("off", "one-step-off", "fully-async")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AsyncConfig:
    """How rollouts overlap training (``--rl-async-*``, ``--rl-partial-rollouts``)."""

    mode: str = "off"
    """``off`` (synchronous), ``one-step-off`` or ``fully-async``."""
    max_staleness: int = 1
    """S: no update sees a token produced more than S policy versions ago."""
    partial_rollouts: bool = False
    """Generate in segments that continue across weight updates."""
    segment_tokens: int = 8
    """Tokens per segment with ``partial_rollouts``."""
    buffer_groups: int = 0
    """Prompt groups in flight or finished at once (fully-async); 0: prompts per step."""
    deterministic: bool = False
    """Fully-async on a fixed schedule (a function of the seed alone)."""

    def __post_init__(self) -> None:
        if self.mode not in ASYNC_MODES:
            raise ValueError(f"--rl-async-mode {self.mode!r} is not one of {ASYNC_MODES}")
        if self.max_staleness < 0:
            raise ValueError(f"--rl-max-staleness={self.max_staleness} is invalid; expected >= 0")
        if self.mode == "one-step-off" and self.max_staleness < 1:
            raise ValueError(f"--rl-max-staleness={self.max_staleness} with --rl-async-mode "
                             "one-step-off: its rollouts are one version old; use >= 1")
        if self.segment_tokens < 1:
            raise ValueError(f"--rl-partial-rollout-tokens={self.segment_tokens} is invalid; expected >= 1")
        if self.buffer_groups < 0:
            raise ValueError(f"--rl-async-buffer-groups={self.buffer_groups} is invalid; expected >= 0")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def scheduled(self) -> bool:
        """The version of every segment is fixed in advance (one-step-off, deterministic)."""
        return self.mode == "one-step-off" or (self.mode == "fully-async" and self.deterministic)

    def version_of(self, batch: int, segment: int) -> int:
        """The scheduled version of segment ``segment`` of the groups of ``batch``."""
        if self.mode == "one-step-off":
            return max(0, batch - 1)
        if not self.partial_rollouts:
            return max(0, batch - self.max_staleness)
        return min(batch, max(0, batch - self.max_staleness + segment))


@dataclasses.dataclass(slots=True)
class _Group:
    """One prompt group on its way through the buffer (all fields plain: checkpointed)."""

    uid: int  # sequence number of the group in the run (its rows' prompt index at the engine)
    row: int  # dataset row
    batch: int  # the batch the schedule assigns it to (-1: free-running)
    n: int
    attempt: int = 0
    segment: int = 0
    tokens: list = dataclasses.field(default_factory=list)
    logps: list = dataclasses.field(default_factory=list)
    versions: list = dataclasses.field(default_factory=list)
    reasons: list = dataclasses.field(default_factory=list)  # None while the sample runs
    rewards: list | None = None
    finished_at: float = 0.0
    masks: list | None = None  # multi-turn: each trajectory's loss mask

    def __post_init__(self) -> None:
        if not self.tokens:
            self.reset()

    def reset(self) -> None:
        self.segment = 0
        self.tokens = [[] for _ in range(self.n)]
        self.logps = [[] for _ in range(self.n)]
        self.versions = [[] for _ in range(self.n)]
        self.reasons = [None] * self.n
        self.rewards = None
        self.masks = None

    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def oldest(self) -> int | None:
        vs = [min(v) for v in self.versions if v]
        return min(vs) if vs else None


def staleness_metrics(samples: list[Sample], trainer_version: int, bound: int) -> dict[str, float]:
    """``async/staleness_*``: the fraction of response tokens k = 0 .. S versions old, the
    mean and max over tokens, and the most versions one sample spans."""
    ages = [trainer_version - v for s in samples for v in (s.versions or [])]
    out: dict[str, float] = {}
    n = max(len(ages), 1)
    for k in range(bound + 1):
        out[f"async/staleness_frac_{k}"] = sum(a == k for a in ages) / n
    out["async/staleness_mean"] = sum(ages) / n
    out["async/staleness_max"] = float(max(ages, default=0))
    out["async/versions_per_sample_max"] = float(max((len(set(s.versions or [])) for s in samples), default=0))
    return out


class IdleMeter:
    """The engines' idle fraction between two calls, from their reported busy seconds
    (``FleetEngine.busy_seconds``); NaN for engines that do not report it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.last = self._read()

    def _read(self) -> tuple[float, float, int] | None:
        busy = getattr(self.engine, "busy_seconds", None)
        got = busy() if busy is not None else None
        return None if got is None else (time.perf_counter(), got[0], got[1])

    def idle_fraction(self) -> float:
        now, before = self._read(), self.last
        self.last = now
        if now is None or before is None or now[2] != before[2] or now[0] <= before[0]:
            return float("nan")
        return max(0.0, 1.0 - (now[1] - before[1]) / ((now[0] - before[0]) * now[2]))


class _Labelled:
    """The fleet as ``run_multiturn`` calls it (``generate``), each completion labelled
    with the policy version that produced it."""

    def __init__(self, source: "AsyncRollouts") -> None:
        self.source = source

    def generate(self, prompts: list, sampling: Any) -> list:
        rows = [(i, j, list(p)) for i, p in enumerate(prompts) for j in range(sampling.n)]
        out = self.source.engine.generate_rows(rows, sampling)
        with self.source.cv:
            return [dataclasses.replace(c, version=self.source.fleet_to_policy[int(v)]) for c, v in out]


class AsyncRollouts:
    """The asynchronous rollout source of rank 0 (see the module docstring).

    ``make_sampling(max_new_tokens, seed)`` gives the run's ``SamplingParams`` (n = 1);
    ``reward_fn(text, answer)``; ``sampler`` is the run's prompt sampler, which this
    source draws from (ahead of the trainer) and checkpoints.
    """

    def __init__(self, cfg: AsyncConfig, *, engine: Any, tokenizer: Any, prompt_ids: list,
                 answers: list, reward_fn: Callable[[str, str], float], sampler: Any,
                 make_sampling: Callable[[int, int], Any], group_size: int, prompts_per_step: int,
                 max_new_tokens: int, seed: int, sandbox: Any = None, multiturn: Any = None) -> None:
        self.cfg = cfg
        self.sandbox, self.multiturn = sandbox, multiturn  # multi-turn: trajectories, turn by turn
        if multiturn is not None and (cfg.scheduled or cfg.partial_rollouts):
            raise ValueError("--rl-max-turns > 1 takes --rl-async-mode fully-async without "
                             "--rl-async-deterministic / --rl-partial-rollouts (a trajectory's "
                             "turns are its segments)")
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt_ids, self.answers, self.reward_fn = prompt_ids, answers, reward_fn
        self.sampler, self.make_sampling = sampler, make_sampling
        self.n, self.per_step, self.max_new = group_size, prompts_per_step, max_new_tokens
        self.seed = seed
        self.segment = cfg.segment_tokens if cfg.partial_rollouts else max_new_tokens
        self.capacity = cfg.buffer_groups or prompts_per_step
        if not cfg.scheduled and self.capacity < prompts_per_step:
            raise ValueError(f"--rl-async-buffer-groups={cfg.buffer_groups} is below "
                             f"--grpo-prompts-per-step={prompts_per_step}: a step's batch never fits")
        self.cv = threading.Condition()
        self.version = -1  # the policy version the engines serve (set by start)
        self.fleet_to_policy: dict[int, int] = {}
        self.groups: dict[int, _Group] = {}  # admitted, not yet taken (by uid)
        self.next_uid = 0
        self.next_batch = 0  # scheduled: the next batch to admit
        self.counts = dict(regenerated_groups=0, segments=0, taken_groups=0)
        self.error: BaseException | None = None
        self.closed = False
        self.running: set[int] = set()  # uids with a worker thread
        self.idle = IdleMeter(engine)

    # ------------------------------------------------------------------ versions
    def start(self, version: int) -> None:
        """The engines now serve policy ``version`` (after the run's first sync): admit
        and start generating."""
        with self.cv:
            self.fleet_to_policy[int(self.engine.version)] = version
            self.version = version
            self._admit()
            for uid in sorted(self.groups):
                self._launch(self.groups[uid])
            self.cv.notify_all()

    def before_sync(self) -> float:
        """Before pushing the next version: scheduled modes wait until every segment
        scheduled under the current version is done. Returns the seconds waited."""
        t0 = time.perf_counter()
        with self.cv:
            if self.cfg.scheduled:
                self._wait(lambda: not any(
                    not g.done() and self.cfg.version_of(g.batch, g.segment) <= self.version
                    for g in self.groups.values()))
            # a completion labelled with the next fleet version was made by these weights
            self.fleet_to_policy[int(self.engine.version) + 1] = self.version + 1
        return time.perf_counter() - t0

    def after_sync(self, version: int) -> None:
        """The engines serve ``version`` now."""
        with self.cv:
            self.version = version
            self._admit()
            self.cv.notify_all()

    # ------------------------------------------------------------------ the buffer
    def _admit(self) -> None:
        """Draw prompts for new groups while there is room (under ``cv``)."""
        if self.closed:
            return
        if self.cfg.scheduled:
            while self.cfg.version_of(self.next_batch, 0) <= self.version:
                for row in self.sampler.next(self.per_step):
                    self._new_group(row, self.next_batch)
                self.next_batch += 1
            return
        while len(self.groups) < self.capacity:
            self._new_group(self.sampler.next(1)[0], -1)

    def _new_group(self, row: int, batch: int) -> None:
        g = _Group(uid=self.next_uid, row=int(row), batch=batch, n=self.n)
        self.next_uid += 1
        self.groups[g.uid] = g
        if self.version >= 0:
            self._launch(g)

    def _launch(self, g: _Group) -> None:
        if g.uid not in self.running and not g.done() and not self.closed:
            self.running.add(g.uid)
            # daemon: a worker blocked on an engine never holds the process at exit
            threading.Thread(target=self._run_group, args=(g,), daemon=True,
                             name=f"async-rollout-{g.uid}").start()

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self.error is not None:
                raise RuntimeError(f"asynchronous rollouts failed: {type(self.error).__name__}: "
                                   f"{self.error}") from self.error
            if self.closed:
                raise RuntimeError("asynchronous rollouts were closed")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.cv.wait(0.5 if left is None else min(0.5, left))
        return True

    # ------------------------------------------------------------------ workers
    def _run_group(self, g: _Group) -> None:
        """A worker: ``g``'s segments until it is finished (or closed, or failed). It leaves
        ``running`` under the lock in which it stops, so a group regenerated afterwards
        gets a new worker."""
        try:
            self._generate_group(g)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
            with self.cv:
                if not self.closed:
                    self.error = e
                self.running.discard(g.uid)
                self.cv.notify_all()

    def _generate_group(self, g: _Group) -> None:
        if self.multiturn is not None:
            return self._generate_trajectories(g)
        while True:
            with self.cv:
                if self.closed or g.uid not in self.groups:
                    self.running.discard(g.uid)
                    return
                if g.done():
                    break
                if self.cfg.scheduled:
                    want = self.cfg.version_of(g.batch, g.segment)
                    self._wait(lambda: self.version >= want)
                    if self.version != want:
                        raise RuntimeError(f"asynchronous schedule broken: group {g.uid} segment "
                                           f"{g.segment} is due under version {want}, the engines "
                                           f"serve {self.version}")
                todo = [j for j in range(g.n) if g.reasons[j] is None]
                rows = [(g.uid, j, self.prompt_ids[g.row] + g.tokens[j]) for j in todo]
                left = self.max_new - len(g.tokens[todo[0]])
                seed = completion_seed(self.seed, g.attempt, g.segment) % (2**31)
                sampling = self.make_sampling(min(self.segment, left), seed)
                attempt, segment = g.attempt, g.segment
            out = self.engine.generate_rows(rows, sampling)
            with self.cv:
                if self.closed:
                    self.running.discard(g.uid)
                    return
                assert (g.attempt, g.segment) == (attempt, segment)  # only this worker moves g on
                for j, (c, fleet_version) in zip(todo, out):
                    v = self.fleet_to_policy[int(fleet_version)]
                    g.tokens[j].extend(c.token_ids)
                    g.logps[j].extend(c.logprobs)
                    g.versions[j].extend([v] * len(c.token_ids))
                    if c.finish_reason == "stop" or len(g.tokens[j]) >= self.max_new:
                        g.reasons[j] = c.finish_reason
                g.segment += 1
                self.counts["segments"] += 1
                if not self.cfg.scheduled and self._too_stale(g, self.version):
                    self._regenerate(g)  # already too old to be used: start again now
                self.cv.notify_all()
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in g.tokens]
        rewards = [float(self.reward_fn(t, self.answers[g.row])) for t in texts]
        with self.cv:
            g.rewards = rewards
            g.finished_at = time.monotonic()
            self.running.discard(g.uid)
            self.cv.notify_all()

    def _generate_trajectories(self, g: _Group) -> None:
        """Multi-turn: the group's trajectories (``run_multiturn``), each turn one request
        under whatever weights the engines serve by then, so a trajectory's turns may span
        versions; regenerated whole while too stale."""
        import dataclasses as dc

        from megatron_alp.rollout import run_multiturn

        while True:
            with self.cv:
                if self.closed or g.uid not in self.groups:
                    self.running.discard(g.uid)
                    return
                seed = completion_seed(self.seed, g.uid, g.attempt) % (2**31)
            sampling = dc.replace(self.make_sampling(self.max_new, seed), n=self.n)
            trajs = run_multiturn(_Labelled(self), [self.prompt_ids[g.row]], sampling, self.tokenizer,
                                  self.sandbox, self.multiturn)
            rewards = [float(self.reward_fn(t.response_text, self.answers[g.row])) for t in trajs]
            with self.cv:
                if self.closed:
                    self.running.discard(g.uid)
                    return
                g.tokens = [list(t.response_ids) for t in trajs]
                g.logps = [list(t.rollout_logprobs) for t in trajs]
                g.versions = [list(t.versions) for t in trajs]
                g.masks = [list(t.loss_mask) for t in trajs]
                g.reasons = [t.finish_reason for t in trajs]
                g.segment += 1
                if self._too_stale(g, self.version):
                    self._regenerate(g)
                    continue
                g.rewards = rewards
                g.finished_at = time.monotonic()
                self.running.discard(g.uid)
                self.cv.notify_all()
                return

    def _too_stale(self, g: _Group, trainer_version: int) -> bool:
        oldest = g.oldest()
        return oldest is not None and trainer_version - oldest > self.cfg.max_staleness

    def _regenerate(self, g: _Group) -> None:
        """Drop ``g``'s tokens and issue its prompt again (under ``cv``)."""
        g.attempt += 1
        g.reset()
        self.counts["regenerated_groups"] += 1

    # ------------------------------------------------------------------ the trainer's side
    def take(self, trainer_version: int) -> tuple[list[Sample], dict[str, float]]:
        """The next step's ``--grpo-prompts-per-step`` groups as samples (``group`` = slot
        in the step, advantages not yet computed) and the buffer's metrics."""
        t0 = time.perf_counter()
        with self.cv:
            depth = sum(g.rewards is not None for g in self.groups.values())
            if self.cfg.scheduled:
                batch = trainer_version
                ready = lambda: (sum(g.batch == batch for g in self.groups.values()) == self.per_step  # noqa: E731
                                 and all(g.rewards is not None for g in self.groups.values() if g.batch == batch))
                self._wait(ready)
                chosen = sorted((g for g in self.groups.values() if g.batch == batch), key=lambda g: g.uid)
            else:
                while True:
                    self._wait(lambda: sum(g.rewards is not None for g in self.groups.values()) >= self.per_step)
                    done = sorted((g for g in self.groups.values() if g.rewards is not None),
                                  key=lambda g: (g.finished_at, g.uid))
                    stale = [g for g in done if self._too_stale(g, trainer_version)]
                    for g in stale:  # too old for this update: the same prompt again
                        self._regenerate(g)
                        self._launch(g)
                    if not stale:
                        chosen = done[: self.per_step]
                        break
            for g in chosen:
                assert not self._too_stale(g, trainer_version), (g.uid, g.versions, trainer_version)
                del self.groups[g.uid]
            self.counts["taken_groups"] += len(chosen)
            in_flight = len(self.groups)
            self._admit()
            self.cv.notify_all()
        waited = time.perf_counter() - t0
        samples = [
            Sample(prompt_index=g.row, group=slot, prompt_ids=list(self.prompt_ids[g.row]),
                   response_ids=list(g.tokens[j]), rollout_logp=list(g.logps[j]),
                   finish_reason=g.reasons[j], reward=g.rewards[j], versions=list(g.versions[j]),
                   loss_mask=list(g.masks[j]) if g.masks is not None else None)
            for slot, g in enumerate(chosen) for j in range(g.n)
        ]
        metrics = staleness_metrics(samples, trainer_version, self.cfg.max_staleness)
        metrics.update({
            "async/buffer_depth": float(depth),
            "async/groups_in_flight": float(in_flight),
            "async/regenerated_groups": float(self.counts["regenerated_groups"]),
            "async/dropped_groups": 0.0,  # too-stale groups are regenerated, never dropped
            "async/trainer_wait_s": waited,
            "async/engine_idle_frac": self.idle.idle_fraction(),
        })
        return samples, metrics

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to re-issue exactly the same work: every admitted
        group with its completed segments (an in-flight segment is issued again), the
        sampler's position and the counters."""
        with self.cv:
            return dict(
                groups=[dataclasses.asdict(self.groups[u]) for u in sorted(self.groups)],
                next_uid=self.next_uid, next_batch=self.next_batch,
                sampler=self.sampler.state_dict(), counts=dict(self.counts),
                mode=self.cfg.mode, deterministic=self.cfg.deterministic,
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before :meth:`start`)."""
        if state.get("mode") != self.cfg.mode or bool(state.get("deterministic")) != self.cfg.deterministic:
            raise ValueError(
                f"the checkpoint's asynchronous rollouts ran --rl-async-mode {state.get('mode')}"
                f"{' --rl-async-deterministic' if state.get('deterministic') else ''}; resume with "
                "the same flags")
        with self.cv:
            self.groups = {}
            for d in state["groups"]:
                g = _Group(**d)
                self.groups[g.uid] = g
            self.next_uid, self.next_batch = int(state["next_uid"]), int(state["next_batch"])
            self.sampler.load_state_dict(state["sampler"])
            self.counts.update(state["counts"])

    def close(self) -> None:
        """Stop the workers (requests on the wire finish or fail with the engines)."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
