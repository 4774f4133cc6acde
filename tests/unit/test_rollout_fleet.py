"""The fleet client's scheduling on in-process engines: balance, retries, exactly once.

The engines here are small Python objects implementing ``fleet_backends.Endpoint`` whose
completions are a pure function of (prompt, sample), so any engine (and any retry) gives
the same answer; they fail on command. The real processes, HTTP and gloo broadcast run in
tests/e2e/test_fleet_twin.py.
"""

import threading
import time

import pytest

from megatron_alp.rollout import Completion, SamplingParams, create_engine
from megatron_alp.rollout.fleet import FleetError
from megatron_alp.rollout.fleet_backends import EngineDown, EngineError


class FakeEngine:
    def __init__(self, name, *, fail_after=None, abort_after=None, version=0, refuse=False,
                 delay=0.0):
        self.url = f"fake://{name}"
        self.fail_after, self.abort_after, self.refuse = fail_after, abort_after, refuse
        self.version, self.delay = version, delay
        self.calls = 0
        self.rows = []
        self.dead = False
        self.lock = threading.Lock()

    def health(self, *, timeout):
        if self.dead:
            raise EngineDown(f"{self.url}: connection refused")
        return dict(instance=self.url, weight_version=self.version)

    def generate(self, rows, sp, *, timeout):
        with self.lock:
            self.calls += 1
            k = self.calls
        time.sleep(self.delay)
        if self.refuse:
            raise EngineError(f"{self.url}: HTTP 400: bad prompt")
        if self.dead or (self.fail_after is not None and k > self.fail_after):
            self.dead = True
            raise EngineDown(f"{self.url}: connection reset")
        reason = "abort" if self.abort_after is not None and k > self.abort_after else "length"
        with self.lock:
            self.rows.extend((i, j) for i, j, _ in rows)
        return [Completion(i, j, [len(p), i, j], [-0.5, -0.25, -float(j)], reason)
                for i, j, p in rows], self.version


PROMPTS = [[1] * (1 + i % 3) for i in range(10)]
SP = SamplingParams(n=3, max_new_tokens=3, seed=0)
KEYS = [(i, j) for i in range(10) for j in range(3)]


def _fleet(*engines, **kw):
    kw.setdefault("rows_per_request", 2)
    return create_engine("fleet", endpoints=list(engines), **kw)


def _check(comps):
    assert [(c.prompt_index, c.sample_index) for c in comps] == KEYS
    for c in comps:
        assert c.token_ids == [len(PROMPTS[c.prompt_index]), c.prompt_index, c.sample_index]


def test_balanced_over_engines():
    a, b, c = FakeEngine("a", delay=0.01), FakeEngine("b", delay=0.01), FakeEngine("c", delay=0.01)
    fleet = _fleet(a, b, c, max_in_flight=2)
    _check(fleet.generate(PROMPTS, SP))
    counts = sorted(len(e.rows) for e in (a, b, c))
    assert sum(counts) == 30 and counts[0] >= 6  # every engine did a fair share (ideal: 10)
    fleet.close()


def test_engine_dies_nothing_lost_or_duplicated():
    a, b = FakeEngine("a", delay=0.005), FakeEngine("b", fail_after=2, delay=0.005)
    fleet = _fleet(a, b, max_in_flight=3)
    comps = fleet.generate(PROMPTS, SP)
    _check(comps)
    assert fleet.stats["retries"] >= 1 and fleet.stats["engine_failures"] == 1
    assert len(set(a.rows)) == len(a.rows)  # nothing generated twice by the survivor
    assert set(a.rows) | set(b.rows) == set(KEYS)
    # the dead engine gets no more requests; the survivor serves everything
    before = len(a.rows)
    _check(fleet.generate(PROMPTS, SP))
    assert len(a.rows) == before + 30
    fleet.close()


def test_abort_is_retried_not_reported_as_stop():
    a, b = FakeEngine("a"), FakeEngine("b", abort_after=1)
    fleet = _fleet(a, b)
    comps = fleet.generate(PROMPTS, SP)
    _check(comps)
    assert all(c.finish_reason == "length" for c in comps)
    assert fleet.stats["retries"] >= 1
    fleet.close()


def test_stale_weight_version_is_not_used():
    a, b = FakeEngine("a"), FakeEngine("b", version=7)
    fleet = _fleet(a, b)
    _check(fleet.generate(PROMPTS, SP))
    assert b.calls == 0  # holds version 7, the client is at 0
    fleet.close()


def test_refusal_is_not_retried_and_all_dead_is_explained():
    fleet = _fleet(FakeEngine("a", refuse=True))
    with pytest.raises(FleetError, match="fake://a refused a request: fake://a: HTTP 400"):
        fleet.generate(PROMPTS, SP)
    fleet.close()
    a = FakeEngine("a", fail_after=0)
    fleet = _fleet(a, max_attempts=2)
    with pytest.raises(FleetError, match="no engine can serve the current weights:\n  fake://a: down"):
        fleet.generate(PROMPTS, SP)
    fleet.close()


def test_truncated_sampling_refused_by_the_fleet():
    fleet = _fleet(FakeEngine("a"))
    with pytest.raises(ValueError, match="top_p=0.9"):
        fleet.generate(PROMPTS, SamplingParams(top_p=0.9))
    _fleet(FakeEngine("b"), allow_truncation=True).generate(PROMPTS, SamplingParams(top_p=0.9, seed=1))
    with pytest.raises(ValueError, match="fleet backend 'sglang'"):
        create_engine("fleet", endpoints=["http://x"], backend="sglang")
    fleet.close()


class FakeMember(FakeEngine):
    """An engine whose weight-group join fails (dead before joining) or never happens."""

    def __init__(self, name, *, join_error=None):
        super().__init__(name)
        self.join_error = join_error

    def members(self, *, timeout):
        return 1

    def join(self, **kw):
        if self.join_error:
            raise EngineDown(self.join_error)


def test_sync_with_a_dead_member_times_out_naming_it():
    """A worker that dies before joining must not leave the trainer waiting forever."""
    import torch

    b = FakeMember("b", join_error="fake://b: connection refused")
    fleet = _fleet(b, sync_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(FleetError, match=r"\(join epoch 0\) failed; engines that did not answer: "
                                         r"fake://b: fake://b: connection refused; sender: "):
        fleet.update_weights([[("w", torch.zeros(2))]])
    assert time.monotonic() - t0 < 30
    assert not fleet.engines[0].up and fleet.version == 0
    fleet.close()


class FakeSender:
    sent: list = []

    def __init__(self, host, port, world_size, *, timeout_s):
        self.world_size = world_size

    def connect(self):
        pass

    def send(self, bucket):
        FakeSender.sent.append([n for n, _ in bucket])

    def close(self):
        pass


class FakeReceiver(FakeMember):
    def __init__(self, name, *, fail_bucket=None, **kw):
        super().__init__(name, **kw)
        self.fail_bucket, self.buckets, self.committed = fail_bucket, 0, None

    def receive_bucket(self, meta, *, epoch, timeout):
        if self.buckets == self.fail_bucket:
            raise EngineDown(f"{self.url}: connection reset")
        self.buckets += 1

    def commit(self, version, *, epoch, timeout):
        self.committed = version
        self.version = version


def _stream(consumed, n=4):
    import torch

    for k in range(n):
        consumed.append(k)
        yield [(f"w{k}", torch.zeros(2))]


def test_member_dead_at_join_is_dropped_and_the_rest_synced():
    a, b = FakeReceiver("a"), FakeReceiver("b", join_error="fake://b: connection refused")
    fleet = _fleet(a, b)
    fleet._sender_cls = FakeSender
    consumed = []
    info = fleet.update_weights(_stream(consumed))
    assert info["engines"] == 1 and info["buckets"] == 4 and a.committed == 1
    assert fleet.stats["epochs"] == 2 and not fleet.engines[1].up
    _check(fleet.generate(PROMPTS, SP))  # a serves version 1 alone
    fleet.close()


def test_failed_sync_drains_the_collective_stream():
    """The export is collective: other trainer ranks iterate it in lockstep, so a failed
    sync still consumes every bucket before raising (nobody hangs)."""
    a = FakeReceiver("a", fail_bucket=1)
    fleet = _fleet(a)
    fleet._sender_cls = FakeSender
    consumed = []
    with pytest.raises(FleetError, match=r"\(bucket 1\) failed; engines that did not answer: fake://a"):
        fleet.update_weights(_stream(consumed))
    assert consumed == [0, 1, 2, 3] and fleet.version == 0
    a.dead = True
    consumed.clear()
    with pytest.raises(FleetError, match="no engine is up to receive weights"):
        fleet.update_weights(_stream(consumed))
    assert consumed == [0, 1, 2, 3]
    fleet.close()


class CountingEngine(FakeEngine):
    """Records the most completions it held at once; says its capacity (as vLLM's
    ``scheduler_limits`` / the twin's ``/health`` do) when given one."""

    def __init__(self, name, *, says=None, in_health=False, **kw):
        super().__init__(name, delay=0.02, **kw)
        self.says, self.in_health = says, in_health
        self.now = self.peak = 0

    def health(self, *, timeout):
        h = super().health(timeout=timeout)
        if self.in_health:
            h["max_num_seqs"] = self.says
        return h

    def capacity(self, *, timeout):
        return None if self.in_health else self.says

    def generate(self, rows, sp, *, timeout):
        with self.lock:
            self.now += len(rows)
            self.peak = max(self.peak, self.now)
        try:
            return super().generate(rows, sp, timeout=timeout)
        finally:
            with self.lock:
                self.now -= len(rows)


@pytest.mark.parametrize("backend,rows_per_request", [("vllm", None), ("twin", None), ("twin", 2),
                                                      ("vllm", 7)])
def test_a_prompts_group_lands_on_one_engine(backend, rows_per_request):
    """Issue 17, defect 14: vLLM's one completion per request spread a prompt's samples
    over every engine, each prefilling the prompt again (its prefix cache missed); a
    request now carries whole groups, also when retried after an engine died."""
    a, b, c = FakeEngine("a", delay=0.005), FakeEngine("b", delay=0.005), FakeEngine("c", fail_after=1)
    fleet = create_engine("fleet", endpoints=[a, b, c], backend=backend,
                          rows_per_request=rows_per_request, max_in_flight=3)
    _check(fleet.generate(PROMPTS, SP))
    assert fleet.stats["retries"] == (1 if c.calls else 0)  # c died with a group in flight
    assert c.calls or backend == "twin"  # the twin's 2 requests of 15 rows went to a and b
    for i in range(len(PROMPTS)):
        holders = [e.url for e in (a, b, c) if any(r[0] == i for r in e.rows)]
        assert len(holders) == 1, (i, holders)
    assert min(len(a.rows), len(b.rows)) >= 6  # still balanced
    fleet.close()


@pytest.mark.parametrize("says,in_health,configured,want", [
    (6, False, None, 6),     # vLLM: max_num_seqs, asked of the engine's workers
    (9, True, None, 9),      # the twin: /health's max_num_seqs (its --max-batch-size)
    (6, False, 3, 3),        # --rl-fleet-max-in-flight overrides what the engine says
    (None, False, None, 30),  # says nothing: DEFAULT_CAPACITY (256 for vLLM) > the 30 asked
])
def test_in_flight_cap_follows_the_engines_max_num_seqs(says, in_health, configured, want):
    """Issue 17, defect 14: the fleet capped every engine at 64 requests while vLLM 0.33
    schedules up to max_num_seqs (1024 on an H100) sequences at once."""
    e = CountingEngine("a", says=says, in_health=in_health)
    fleet = create_engine("fleet", endpoints=[e], backend="vllm", max_in_flight=configured)
    _check(fleet.generate(PROMPTS, SP))  # 10 prompts x 3 samples
    assert e.peak == want and fleet.engines[0].capacity == (configured or says or 256)
    fleet.close()
