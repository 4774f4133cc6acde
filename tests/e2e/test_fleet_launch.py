"""``fleet_launch`` as a user runs it, with real CPU-twin engine processes (issue 17,
defects 10 and 12): the launcher creates its log folder, reports a failed start in one
line, and keeps the other engines serving when one exits (that one is restarted).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_alp.launch import free_port
from megatron_alp.models.tiny import tiny_hf_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "tiny-qwen2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("qwen2")).save_pretrained(path)
    return str(path)


def _launcher(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_alp.rollout.fleet_launch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)


def _health(url, timeout=2.0):
    with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
        return json.loads(r.read())


def _wait(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_engines_exit_leaves_the_others_serving(model_dir, tmp_path):
    """Defect 12: the launcher stopped every engine of the node when one exited (and
    the sbatch killed the node's step): the client's retry elsewhere and the restarted
    engine's re-join were defeated. Defect 10: --log-dir did not exist -> FileNotFoundError."""
    log_dir = tmp_path / "run" / "fleet-logs"  # as run.sh passes: $SAVE/fleet-logs, not created
    port = free_port()
    proc = _launcher("--backend", "twin", "--model", model_dir, "--engines", "2",
                     "--base-port", str(port), "--log-dir", str(log_dir), "--dtype", "float32")
    try:
        urls = [proc.stdout.readline().strip() for _ in range(2)]
        assert urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"], (
            urls, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        assert sorted(os.listdir(log_dir)) == ["engine0.log", "engine1.log"]
        h0, h1 = _health(urls[0]), _health(urls[1])
        os.kill(h0["pid"], signal.SIGKILL)  # engine 0 crashes
        line = proc.stderr.readline()
        assert "fleet engine 0" in line and "killed by signal 9" in line and "restarting" in line, line
        assert str(log_dir / "engine0.log") in line
        # The launcher and engine 1 (the same process, untouched) keep running ...
        assert proc.poll() is None
        assert _health(urls[1])["instance"] == h1["instance"]
        # ... and engine 0 comes back on its port as a new instance (checkpoint weights:
        # the fleet client sees it as stale until the next weight sync).
        _wait(lambda: _health(urls[0])["instance"] != h0["instance"], 120, "engine 0's restart")
        assert _health(urls[1])["instance"] == h1["instance"] and proc.poll() is None
        line = proc.stderr.readline()
        assert "fleet engine 0" in line and "up again (restart 1)" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    for url in urls:  # the launcher stopped both engines on its way out
        with pytest.raises(OSError):
            _health(url, timeout=1)


def test_a_failed_start_is_one_line(model_dir, tmp_path):
    """An engine that dies during start-up: one line naming the engine, its exit code,
    its log and the log's last line; exit 1, no traceback."""
    log_dir = tmp_path / "new" / "logs"
    proc = _launcher("--backend", "twin", "--model", model_dir, "--base-port", str(free_port()),
                     "--log-dir", str(log_dir), "--max-batch-size", "zero")  # engine_server refuses
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("fleet_launch")]
    assert proc.returncode == 1 and out == "", (proc.returncode, out, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "fleet engine 0" in lines[0] and "failed to start" in lines[0]
    assert "exited with code 2" in lines[0] and str(log_dir / "engine0.log") in lines[0]
    assert "--max-batch-size: invalid int value: 'zero'" in lines[0]


@pytest.mark.slow
def test_restarts_are_bounded_and_the_last_engine_ends_the_launcher(model_dir, tmp_path):
    """--max-restarts 0: an engine that exits is reported and left down; with no engine
    left the launcher exits 1 (the job goes on with other nodes' engines)."""
    port = free_port()
    proc = _launcher("--backend", "twin", "--model", model_dir, "--base-port", str(port),
                     "--max-restarts", "0")
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}", (url, proc.poll())
        os.kill(_health(url)["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err[-2000:]
    assert "fleet engine 0" in lines[-2] and "killed by signal 9" in lines[-2], lines
    assert "(no --log-dir: its output was discarded)" in lines[-2] and "left down" in lines[-2]
    assert lines[-1] == "fleet_launch: no engine left on this node; exiting"
