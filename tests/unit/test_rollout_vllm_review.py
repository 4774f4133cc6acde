"""Defects found by reading the vLLM path against the vllm 0.10.2 and 0.33.0 wheels
(docs/rollout.md "Verified against"). vLLM is CUDA-only and not installed here: where
a vLLM object is needed, a small recording stand-in plays it."""

from types import SimpleNamespace

import pytest

import megatron_alp.rollout.vllm_engine as vllm_engine
from megatron_alp.rollout import create_engine
from megatron_alp.rollout.vllm_support import engine_kwargs


class _Reached(Exception):
    pass


def test_trainer_can_create_the_colocated_engine(monkeypatch):
    """The trainer calls create_engine(name, model=..., dtype=...) for every engine
    (train/loop.py start_engine); VLLMEngine had no dtype and raised TypeError."""
    def stop(*a, **k):
        raise _Reached

    monkeypatch.setattr(vllm_engine, "check_vllm_version", stop)
    with pytest.raises(_Reached):
        create_engine("vllm", model="/m", dtype="bfloat16")
    assert engine_kwargs("/m", dtype="bf16")["dtype"] == "bfloat16"
    assert engine_kwargs("/m", dtype="float32")["dtype"] == "float32"
    assert engine_kwargs("/m")["dtype"] == "bfloat16"


def test_vllm_commit_retries_a_busy_reset_then_reports_the_engine_down(monkeypatch):
    """vllm 0.33 /reset_prefix_cache answers {"success": false} while blocks are held and
    says callers may retry; a RuntimeError used to escape the fleet's collective (which
    only handles EngineDown / EngineError) and fail the whole update."""
    import megatron_alp.rollout.fleet_backends as fb

    answers = iter([{"success": False}, {"success": False}, {"success": True}])
    calls = []

    def fake_http(url, body=None, *, timeout):
        calls.append(url)
        return next(answers)

    monkeypatch.setattr(fb, "http_json", fake_http)
    monkeypatch.setattr(fb.time, "sleep", lambda s: None)
    ep = fb.VLLMEndpoint("http://e:1")
    ep.commit(1, epoch=0, timeout=5)
    assert calls == ["http://e:1/reset_prefix_cache"] * 3
    monkeypatch.setattr(fb, "http_json", lambda url, body=None, *, timeout: {"success": False})
    with pytest.raises(fb.EngineDown, match="returned False"):
        ep.commit(1, epoch=0, timeout=5, retry_s=0)
    monkeypatch.setattr(fb, "http_json", lambda url, body=None, *, timeout: None)  # 0.10.2
    ep.commit(1, epoch=0, timeout=5)


class _FakeNccl:
    """vllm 0.33's NCCLLibrary has ncclCommAbort; 0.10.2's only exposes the ctypes lib."""

    def __init__(self, wrapped: bool):
        self.aborted = []
        if wrapped:
            self.ncclCommAbort = self.aborted.append
        else:
            self.lib = SimpleNamespace(ncclCommAbort=self.aborted.append)


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_stuck_broadcast_times_out_and_aborts_the_communicator(wrapped):
    """A member that dies mid-bucket leaves the NCCL kernel spinning: stream.synchronize()
    on the sender and on every surviving worker never returned (the trainer hung)."""
    from megatron_alp.rollout.vllm_support import wait_or_abort

    comm = SimpleNamespace(nccl=_FakeNccl(wrapped), comm="handle-7", disabled=False)
    with pytest.raises(TimeoutError, match="sender: .*within 0 s.*aborted"):
        wait_or_abort(lambda: False, 0.05, comm, "sender")
    assert comm.nccl.aborted == ["handle-7"] and comm.disabled
    polls = iter([False, False, True])
    wait_or_abort(lambda: next(polls), 5, SimpleNamespace(), "sender", poll_s=0)  # finishes


def test_worker_receive_bucket_takes_the_timeout_over_rpc():
    """The fleet passes sync_timeout_s to each worker (a plain float: msgpack-safe)."""
    import inspect

    import msgspec

    from megatron_alp.rollout.vllm_worker import WeightSyncExtension

    params = inspect.signature(WeightSyncExtension.receive_bucket).parameters
    assert list(params)[1:] == ["names", "dtypes", "shapes", "timeout_s"]
    args = [["a"], ["bfloat16"], [[2, 3]], 300.0]
    assert msgspec.msgpack.decode(msgspec.msgpack.Encoder().encode(args)) == args
    import megatron_alp.rollout.fleet_backends as fb
    from megatron_alp.rollout.vllm_support import bucket_meta

    sent = []
    saved = fb.http_json
    fb.http_json = lambda url, body=None, *, timeout: sent.append(body) or {"results": [1]}
    try:
        import torch

        fb.VLLMEndpoint("http://e:1").receive_bucket(
            bucket_meta([("a", torch.zeros(2, 3, dtype=torch.bfloat16))]), epoch=0, timeout=42)
    finally:
        fb.http_json = saved
    assert sent[0]["method"] == "receive_bucket" and sent[0]["args"] == args[:3] + [42.0]


def test_fleet_client_waits_for_engines_still_starting():
    """run.sh / fleet.sbatch start the engines and the trainer side by side; the first
    update_weights used to find no engine up ("no engine is up to receive weights")."""
    import time

    from megatron_alp.rollout.fleet_backends import EngineDown

    class Starting:
        url = "fake://starting"

        def __init__(self, ready_at):
            self.ready_at = ready_at

        def health(self, *, timeout):
            if time.monotonic() < self.ready_at:
                raise EngineDown(f"{self.url}: connection refused")
            return dict(instance="x", weight_version=0)

    t0 = time.monotonic()
    engine = create_engine("fleet", endpoints=[Starting(t0 + 1.0)], startup_wait_s=30)
    try:
        assert engine.engines[0].up and time.monotonic() - t0 < 10
    finally:
        engine.close()
    engine = create_engine("fleet", endpoints=[Starting(t0 + 1e9)], startup_wait_s=0.2)
    try:
        assert not engine.engines[0].up  # gave up waiting: down, handled later
    finally:
        engine.close()


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None,
                    reason="vllm is installed here")
def test_sender_without_vllm_fails_before_the_engines_wait():
    """The sender used to import vLLM inside connect(), after every engine had been told
    to join: a trainer without vLLM then failed only after the rendezvous timeout."""
    from megatron_alp.rollout.fleet_backends import NcclSender

    with pytest.raises(ImportError, match="weight sender runs in the trainer and needs vLLM"):
        NcclSender("127.0.0.1", 1, 2, timeout_s=5)


def test_twin_client_against_vllm_serve_names_the_backend(monkeypatch):
    """vllm serve's /health is an empty 200; the twin client used to crash with
    AttributeError ('NoneType' object has no attribute 'get')."""
    import megatron_alp.rollout.fleet_backends as fb

    monkeypatch.setattr(fb, "http_json", lambda url, body=None, *, timeout: None)
    with pytest.raises(fb.EngineError, match="use backend='vllm'"):
        fb.TwinEndpoint("http://e:1").health(timeout=1)


def test_engine_processes_import_this_megatron_alp(monkeypatch):
    """vLLM's workers import the worker extension by name; `vllm serve` found through
    PATH runs with the script's folder first on sys.path, so an uninstalled checkout
    (or another environment's `vllm`) failed at worker start-up."""
    import os
    import sys

    import megatron_alp
    from megatron_alp.rollout.fleet_launch import LocalFleet, engine_command

    fleet = LocalFleet.__new__(LocalFleet)
    fleet.backend, fleet.devices = "vllm", [[1]]
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    env = fleet.engine_env(0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(megatron_alp.__file__)))
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == "7" and env["VLLM_SERVER_DEV_MODE"] == "1"
    # this interpreter when it has vLLM, else the vLLM environment (issue 17)
    from megatron_alp.rollout.vllm_env import vllm_python

    assert engine_command("vllm", "/m", 1)[0] == vllm_python()
    assert engine_command("vllm", "/m", 1, python=sys.executable)[0] == sys.executable


def test_a_restarted_vllm_engine_is_a_new_instance(monkeypatch):
    """vLLM's /health carries no identity: an engine restarted between two probes kept
    serving (checkpoint weights) as if it held the current version, and its next sync
    broadcast into a group it had left."""
    import megatron_alp.rollout.fleet_backends as fb
    from megatron_alp.rollout.fleet import FleetEngine

    workers = {"ids": ["h:1:a", "h:2:b"]}

    def fake_http(url, body=None, *, timeout):
        if url.endswith("/health"):
            return None
        if body["method"] == "scheduler_limits":  # asked once per instance
            workers["asked"] = workers.get("asked", 0) + 1
            return {"results": [dict(max_num_seqs="512", max_num_active_seqs=None)] * 2}
        assert body["method"] == "weight_sync_info"
        return {"results": [dict(rank=k, gpu_uuid="g", instance=i) for k, i in enumerate(workers["ids"])]}

    monkeypatch.setattr(fb, "http_json", fake_http)
    ep = fb.VLLMEndpoint("http://e:1")
    assert ep.health(timeout=1)["instance"] == "h:1:a,h:2:b"
    engine = FleetEngine([ep], backend="vllm", startup_wait_s=0)
    try:
        st = engine.engines[0]
        assert st.up and not st.stale and st.capacity == 512 and workers["asked"] == 1
        engine.refresh()
        assert workers["asked"] == 1
        workers["ids"] = ["h:7:c", "h:8:d"]  # killed and started again
        engine.refresh()
        assert st.stale and not engine._serving(st)
        assert workers["asked"] == 2  # a new instance may run with other settings
    finally:
        engine.close()


def test_missing_dev_mode_is_explained(monkeypatch):
    import megatron_alp.rollout.fleet_backends as fb

    def not_found(url, body=None, *, timeout):
        raise fb.EngineError(f"{url}: HTTP 404: Not Found")

    monkeypatch.setattr(fb, "http_json", not_found)
    with pytest.raises(fb.EngineError, match="VLLM_SERVER_DEV_MODE=1"):
        fb.VLLMEndpoint("http://e:1").members(timeout=1)


def test_data_parallel_inside_a_fleet_engine_is_refused():
    from megatron_alp.rollout.fleet_launch import engine_command

    for extra in (["--data-parallel-size", "2"], ["-dp=4"]):
        with pytest.raises(ValueError, match="one data-parallel replica"):
            engine_command("vllm", "/m", 1, extra=extra)
    assert "--pipeline-parallel-size" in engine_command("vllm", "/m", 1, extra=["--pipeline-parallel-size", "2"])


def test_loopback_sync_host_with_remote_engines_is_refused():
    """The trainer's default --rl-fleet-sync-host is 127.0.0.1; engines on fleet nodes
    would wait for a rendezvous on their own loopback until the timeout."""
    from megatron_alp.rollout.fleet import check_sync_host

    with pytest.raises(ValueError, match="10.255.255.1.*--rl-fleet-sync-host"):
        check_sync_host("127.0.0.1", ["http://127.0.0.1:8100", "http://10.255.255.1:8100"])
    check_sync_host("127.0.0.1", ["http://127.0.0.1:8100", "http://localhost:8101"])
    check_sync_host("10.0.0.5", ["http://10.255.255.1:8100"])
    with pytest.raises(ValueError, match="loopback"):
        create_engine("fleet", endpoints=["http://10.255.255.1:8100"], backend="vllm",
                      startup_wait_s=0)


def test_an_old_epochs_communicator_is_released():
    """Each epoch built a new PyNcclCommunicator and dropped the old one without
    destroying it (vLLM 0.10.2 has no destructor): its NCCL buffers stayed on the GPU."""
    import torch

    from megatron_alp.rollout.fleet import FleetEngine
    from megatron_alp.rollout.fleet_backends import NcclSender

    closed = []

    class Sender:
        def __init__(self, host, port, world_size, *, timeout_s):
            self.n = len(closed)

        def connect(self):
            pass

        def send(self, bucket):
            pass

        def close(self):
            closed.append(self)

    class Member:
        url = "fake://m"

        def __init__(self):
            self.instance = "i0"

        def health(self, *, timeout):
            return dict(instance=self.instance, weight_version=None)

        def members(self, *, timeout):
            return 1

        def join(self, **kw):
            pass

        def receive_bucket(self, meta, *, epoch, timeout):
            pass

        def commit(self, version, *, epoch, timeout):
            pass

    m = Member()
    fleet = FleetEngine([m], startup_wait_s=0)
    fleet._sender_cls = Sender
    fleet.update_weights([[("w", torch.zeros(2))]])
    first = fleet._sender
    m.instance = "i1"  # restarted: a new epoch
    fleet.update_weights([[("w", torch.zeros(2))]])
    assert closed == [first] and fleet._sender is not first
    fleet.close()
    assert len(closed) == 2

    comm = SimpleNamespace(nccl=SimpleNamespace(ncclCommAbort=lambda h: aborted.append(h)), comm="h1")
    aborted = []
    sender = NcclSender.__new__(NcclSender)
    sender.comm = comm
    sender.close()
    assert aborted == ["h1"] and sender.comm is None


def test_sigterm_to_the_launcher_stops_its_engines(tmp_path):
    """run.sh's trap sends SIGTERM to fleet_launch; its default action ended the launcher
    without `finally`, and the engines (own sessions) kept their GPUs for good. Run in a
    child process: without the fix SIGTERM ends it (and would end pytest)."""
    import subprocess
    import sys

    code = f"""
import os, signal, types
import megatron_alp.rollout.fleet_launch as fl
class Fleet:
    def __init__(self, n, **kw):
        self.procs = [types.SimpleNamespace(poll=lambda: None)]
        self.endpoints = ["http://127.0.0.1:1"]
    def supervise(self):
        return []
    def alive(self):
        return 1
    def close(self):
        print("engines stopped", flush=True)
fl.LocalFleet = Fleet
fl.time.sleep = lambda s: os.kill(os.getpid(), signal.SIGTERM)
print("rc", fl.main(["--model", {str(tmp_path)!r}, "--backend", "twin"]), flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "engines stopped" in r.stdout and "rc 0" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])
