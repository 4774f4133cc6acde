"""megatron_alp.io_safety: the output-path rule shared by every tool that writes.
No torch here: the module must stay importable (and these tests fast) without it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_alp import io_safety
from megatron_alp.io_safety import MARKER, OutputError, atomic_output_dir, check_output

REPO = Path(__file__).resolve().parents[2]
TOOL = "tool_a"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def write_output(out: Path, files: dict[str, str], *, tool: str = TOOL, force: bool = False, inputs=()) -> None:
    with atomic_output_dir(check_output(out, tool=tool, force=force, inputs=inputs), say=lambda m: None) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_io_safety_imports_nothing_heavy():
    code = "import sys, megatron_alp.io_safety, megatron_alp.convert.checks, megatron_alp.convert.cli; " \
           "print(sorted(m for m in ('torch', 'transformers', 'megatron.core', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("relation", ["same", "same_via_dotdot", "same_via_symlink", "parent", "inside"])
def test_output_related_to_an_input_is_refused_even_with_force(tmp_path, relation):
    data = tmp_path / "models" / "q"
    data.mkdir(parents=True)
    (data / "weights.bin").write_text("precious")
    (tmp_path / "link").symlink_to(data)
    out = {
        "same": data,
        "same_via_dotdot": tmp_path / "models" / ".." / "models" / "q",
        "same_via_symlink": tmp_path / "link",
        "parent": tmp_path / "models",
        "inside": data / "sub",
    }[relation]
    before = tree(tmp_path / "models")
    with pytest.raises(OutputError, match=r"--out .*(is the input|contains the input|lies inside the input)"):
        check_output(out, tool=TOOL, inputs=[data], force=True)
    assert tree(tmp_path / "models") == before


def test_force_replaces_only_own_complete_output_or_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_output(out, {"a.txt": "1"})  # an empty folder is used without --force
    assert json.loads((out / MARKER).read_text())["state"] == "complete"
    with pytest.raises(OutputError, match="is not empty: it holds an earlier output of tool_a; pass --force"):
        check_output(out, tool=TOOL)
    write_output(out, {"b.txt": "2"}, force=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    # Another tool's output, or a folder without a marker, is never replaced.
    with pytest.raises(OutputError, match="it was written by tool_a: tool_b replaces only a folder it wrote"):
        check_output(out, tool="tool_b", force=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("keep")
    with pytest.raises(OutputError, match=r"has no \.megatron_alp_output\.json of tool_a.*even with --force"):
        check_output(other, tool=TOOL, force=True)
    # A marker that says the folder was never completed does not count either.
    (other / MARKER).write_text(json.dumps({"tool": TOOL, "state": "incomplete"}))
    with pytest.raises(OutputError, match="even with --force"):
        check_output(other, tool=TOOL, force=True)
    assert (other / "x").read_text() == "keep"
    # A file in the way.
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output(tmp_path / "f", tool=TOOL, force=True)


def test_error_in_block_removes_temporary_and_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"a.txt": "old"})
    before = tree(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(check_output(out, tool=TOOL, force=True)) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert tree(out) == before and leftovers(tmp_path, "out") == []


def test_output_that_appears_during_the_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    target = check_output(out, tool=TOOL)
    with pytest.raises(OutputError, match="appeared or changed while this run was writing"):
        with atomic_output_dir(target, say=lambda m: None) as tmp:
            (tmp / "mine.txt").write_text("second run")
            write_output(out, {"theirs.txt": "first run"})  # another run finishes first
    assert tree(out)["theirs.txt"] == b"first run" and "mine.txt" not in tree(out)
    assert leftovers(tmp_path, "out") == []
    # With --force: an output replaced by another run meanwhile is not replaced again.
    target = check_output(out, tool=TOOL, force=True)
    with pytest.raises(OutputError, match="appeared or changed"):
        with atomic_output_dir(target, say=lambda m: None) as tmp:
            (tmp / "mine.txt").write_text("late")
            write_output(out, {"theirs.txt": "newer"}, force=True)
    assert tree(out)["theirs.txt"] == b"newer" and leftovers(tmp_path, "out") == []


def test_stale_temporary_folders_are_removed_and_reported(tmp_path):
    out = tmp_path / "out"
    host = io_safety._host_tag()
    pid = dead_pid()
    stale = tmp_path / f".out.tmp-{host}-{pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 5000)
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-cafecafe"  # a live process's: kept
    live.mkdir()
    foreign = tmp_path / ".out.tmp-otherhst-1-00000000"  # another host's: kept
    foreign.mkdir()
    unrelated = tmp_path / ".out.tmp-notours"
    unrelated.mkdir()
    said = []
    with atomic_output_dir(check_output(out, tool=TOOL), say=said.append) as tmp:
        (tmp / "a").write_text("1")
    assert len(said) == 1 and f"removed stale temporary folder {stale} (5.0 KB)" in said[0]
    assert f"(pid {pid})" in said[0]
    assert not stale.exists() and live.exists() and foreign.exists() and unrelated.exists()


def test_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"a.txt": "trained"})
    aside = tmp_path / f".out.old-{io_safety._host_tag()}-{dead_pid()}-12345678"
    out.rename(aside)  # killed between "move the old output aside" and "publish the new one"
    said = io_safety.remove_stale(out)
    assert (out / "a.txt").read_text() == "trained" and not aside.exists()
    assert said and said[0].startswith(f"restored {out}")


def test_read_only_location_is_refused_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -rm is not available (needed for a read-only mount)")
    code = (
        "from megatron_alp.io_safety import check_output, OutputError\n"
        f"try:\n    check_output({str(ro / 'sub' / 'out')!r}, tool='t')\n"
        "except OutputError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
                                       f"{sys.executable} -c \"$0\"", code],
        cwd=REPO, capture_output=True, text=True,
    )
    assert f"cannot write --out {ro / 'sub' / 'out'}: {ro} is on a read-only file system" in r.stdout, r.stderr


def test_not_enough_space_is_refused_before_writing(tmp_path):
    with pytest.raises(OutputError, match=r"not enough space for .*out: the output needs about 1000.0 TB"):
        with atomic_output_dir(check_output(tmp_path / "out", tool=TOOL), expected_bytes=10**15):
            pass
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out").exists()


def test_disk_full_error_is_reported_as_such(tmp_path):
    import errno

    with pytest.raises(OutputError, match="no space left on device while writing .*; nothing was written"):
        with atomic_output_dir(check_output(tmp_path / "out", tool=TOOL)) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "x"))
    assert leftovers(tmp_path, "out") == []


def test_sigterm_cleans_up_and_exits_with_one_line(tmp_path):
    code = f"""
import sys, time
from megatron_alp.convert.cli import run_cli
from megatron_alp.io_safety import atomic_output_dir, check_output
def main():
    with atomic_output_dir(check_output({str(tmp_path / 'out')!r}, tool='t')) as tmp:
        (tmp / 'partial').write_bytes(b'x' * 1000)
        print('writing', flush=True)
        time.sleep(60)
    return 0
sys.exit(run_cli('t', main))
"""
    for sig, rc, word in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == rc, (word, out, err)
        assert err.strip() == f"t: interrupted by {word}; partial output removed"
        assert list(tmp_path.iterdir()) == []
