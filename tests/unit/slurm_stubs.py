"""Stand-ins for SLURM's commands (and the launchers they start) that record what a launch
script would run, so its geometry can be checked without a cluster.

``stub_bin(folder)`` writes ``scontrol``, ``srun``, ``sbatch``, ``torchrun`` and
``python`` into ``folder``; put it first on ``PATH`` and point ``STUB_LOG`` at a file.
Each call appends one JSON line there:

* ``srun``: the step: its nodes and every task (node, SLURM_PROCID, SLURM_LOCALID), then
  it runs the command once per task with SLURM's per-task variables (unless
  ``STUB_SRUN_EXEC=0``). Its task count follows srun's documented precedence: ``-n``
  from the command line, else ``SLURM_NTASKS`` from the environment ("Same as -n,
  --ntasks", srun(1), INPUT ENVIRONMENT VARIABLES; an sbatch job exports it), else nodes x
  ``--ntasks-per-node``; a count that disagrees with ``--ntasks-per-node`` wins over it
  (srun's "can't honor --ntasks-per-node ... Ignoring --ntasks-per-node", as reported in
  NVIDIA/cloudai#729). Tasks are laid out in blocks over the step's nodes.
* ``torchrun`` / ``python -m ...``: argv, the node and the launch variables (RANK, ...);
  ``python -c`` runs the real interpreter (scripts compute values with it); a
  ``--log-dir`` is created, as ``fleet_launch`` does.
* ``sbatch``: argv; ``sandbox.sbatch`` "starts" at once (writes ``$OUT/<job>.url``),
  other scripts run in place with a fake allocation of ``--nodes`` nodes named
  ``node9, node10, ...`` (their FQDNs do not sort in list order, like torchrun's c10d
  rendezvous would see them).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

__all__ = ["fake_allocation", "read_log", "stub_bin", "stub_env"]

_COMMON = r'''
import json, os, sys
def record(kind, **kw):
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(dict(kind=kind, node=os.environ.get("SLURMD_NODENAME"), **kw)) + "\n")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
'''

_SCONTROL = r'''
args = sys.argv[1:]
assert args[:2] == ["show", "hostnames"], args
for name in args[2].split(","):
    print(name)
'''

_SRUN = r'''
import subprocess
VALUED = {"-n": "ntasks", "--ntasks": "ntasks", "-N": "nodes", "--nodes": "nodes",
          "--ntasks-per-node": "ntasks_per_node", "-w": "nodelist", "--nodelist": "nodelist"}
args, opts, i = sys.argv[1:], {}, 0
while i < len(args) and args[i].startswith("-"):
    a = args[i]
    key, _, val = a.partition("=")
    if key in VALUED:
        if not _:
            val, i = args[i + 1], i + 1
        opts[VALUED[key]] = val
    i += 1
cmd = args[i:]
alloc = os.environ["SLURM_JOB_NODELIST"].split(",")
nodes = opts["nodelist"].split(",") if "nodelist" in opts else alloc
if "nodes" in opts:
    nodes = nodes[: int(opts["nodes"])]
per_node = int(opts["ntasks_per_node"]) if "ntasks_per_node" in opts else None
if "ntasks" in opts:
    ntasks = int(opts["ntasks"])
elif "SLURM_NTASKS" in os.environ:  # srun(1): SLURM_NTASKS is the same as -n
    ntasks = int(os.environ["SLURM_NTASKS"])
else:
    ntasks = len(nodes) * (per_node or 1)
if per_node is not None and ntasks != len(nodes) * per_node:
    print(f"srun: warning: can't honor --ntasks-per-node set to {per_node} which doesn't match "
          f"the requested tasks {ntasks} with the number of requested nodes {len(nodes)}. "
          "Ignoring --ntasks-per-node.", file=sys.stderr)
block = -(-ntasks // len(nodes))
tasks = [dict(procid=t, node=nodes[t // block], localid=t % block) for t in range(ntasks)]
record("srun", argv=sys.argv[1:], nodes=nodes, tasks=tasks, cmd=cmd)
if os.environ.get("STUB_SRUN_EXEC", "1") == "1":
    for t in tasks:
        env = dict(os.environ, SLURM_PROCID=str(t["procid"]), SLURM_LOCALID=str(t["localid"]),
                   SLURMD_NODENAME=t["node"], SLURM_NTASKS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks),
                   SLURM_NNODES=str(len(nodes)))
        code = subprocess.call(cmd, env=env)
        if code:
            sys.exit(code)
'''

_TORCHRUN = r'''
record("torchrun", argv=sys.argv[1:])
'''

_PYTHON = r'''
if sys.argv[1:2] == ["-c"]:
    os.execv(REAL_PYTHON, [REAL_PYTHON, *sys.argv[1:]])
record("python", argv=sys.argv[1:], env={k: os.environ[k] for k in LAUNCH_ENV if k in os.environ})
if "--log-dir" in sys.argv:  # as fleet_launch does
    os.makedirs(sys.argv[sys.argv.index("--log-dir") + 1], exist_ok=True)
'''

_SBATCH = r'''
import subprocess
from tests.unit.slurm_stubs import fake_allocation
args = sys.argv[1:]
record("sbatch", argv=args)
nodes, i = 1, 0
while i < len(args) and args[i].startswith("-"):
    key, _, val = args[i].partition("=")
    if key in ("--nodes", "-N"):
        nodes = int(val)
    i += 1
script, rest = args[i], args[i + 1:]
job = str(1000 + sum(1 for _ in open(os.environ["STUB_LOG"])))
if script.endswith("sandbox.sbatch"):
    out = os.environ.get("OUT", "runs/sandbox")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, job + ".url"), "w") as f:
        f.writelines(f"http://node{900 + k}:8090\n" for k in range(nodes))
    print(job)
    sys.exit(0)
env = dict(os.environ, **fake_allocation(nodes, job=job, name=os.path.basename(script).split(".")[0]))
sys.exit(subprocess.call(["bash", script, *rest], env=env))
'''


def fake_allocation(nodes: int, *, job: str = "4242", name: str = "alp-train") -> dict[str, str]:
    """The variables an sbatch job with ``--nodes=nodes --ntasks-per-node=1`` sees: nodes
    ``node9, node10, ...`` (a comma list: the stub scontrol expands it), SLURM_NTASKS = nodes."""
    names = [f"node{9 + k}" for k in range(nodes)]
    return {
        "SLURM_JOB_NODELIST": ",".join(names), "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes), "SLURM_NPROCS": str(nodes),
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": job, "SLURM_JOB_NAME": name,
    }


def stub_bin(folder: Path) -> Path:
    """Write the stubs into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[2])
    head = (f"#!{sys.executable}\nREAL_PYTHON = {sys.executable!r}\nimport sys\n"
            f"sys.path.insert(0, {repo!r})\n" + _COMMON)
    for name, body in (("scontrol", _SCONTROL), ("srun", _SRUN), ("torchrun", _TORCHRUN),
                       ("python", _PYTHON), ("sbatch", _SBATCH)):
        (folder / f"{name}.py").write_text(head + body)
        path = folder / name
        # SIGTERM ignored: a script that starts a launcher in the background and kills it
        # on exit must not kill the stub before it has recorded; the marker file lets
        # read_log wait for stubs still running after the script ended
        path.write_text(
            "#!/bin/bash\ntrap '' TERM\n"
            'marker="$STUB_LOG.running.$$"; : > "$marker"\n'
            f'{sys.executable} {folder / name}.py "$@"; rc=$?\n'
            'rm -f "$marker"; exit $rc\n'
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def read_log(path: Path, *, timeout_s: float = 60.0) -> list[dict]:
    """The recorded calls, in order, once every stub has finished."""
    import time

    deadline = time.monotonic() + timeout_s
    while list(path.parent.glob(path.name + ".running.*")):
        assert time.monotonic() < deadline, "a stub is still running"
        time.sleep(0.05)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stub_env(bin_dir: Path, log: Path, **extra: str) -> dict[str, str]:
    """The environment for a script run under the stubs (no real SLURM variables leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", STUB_LOG=str(log), **extra)
    return env


def render(tmp_path: Path, script: Path, *args: str, nodes: int | None = 3, **env: str) -> list[dict]:
    """Run ``script`` under the stubs (with an sbatch allocation of ``nodes`` nodes unless
    None) and return the recorded calls."""
    import subprocess

    log = tmp_path / "calls.jsonl"
    full = stub_env(stub_bin(tmp_path / "bin"), log, **env)
    if nodes is not None:
        full.update(fake_allocation(nodes))
    r = subprocess.run(["bash", str(script), *args], env=full, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_log(log)


def flag_value(argv: list[str], name: str) -> str:
    """The value of ``name`` in ``argv`` (``--name V`` or ``--name=V``)."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")
