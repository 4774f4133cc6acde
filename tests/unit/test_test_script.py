"""scripts/test.sh keeps the default ``-m "not slow"`` unless the arguments give a marker."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,expect", [
    ([], ["-m", "not slow"]),
    (["-x"], ["-m", "not slow", "-x"]),
    (["tests/unit", "-k", "convert"], ["-m", "not slow", "tests/unit", "-k", "convert"]),
    (["-m", "slow"], ["-m", "slow"]),
    (["-x", "-mslow"], ["-x", "-mslow"]),
])
def test_default_marker_kept_unless_given(tmp_path, args, expect):
    # A copy of the script beside a stub bootstrap and a stub python that prints its args.
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    (tmp_path / "scripts" / "bootstrap.sh").write_text("#!/usr/bin/env bash\n")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    for f in ("scripts/bootstrap.sh", "venv/bin/python"):
        (tmp_path / f).chmod(0o755)
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh"), *args], capture_output=True, text=True,
                         env={"MEGATRON_ALP_VENV": str(tmp_path / "venv"), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.splitlines() == ["-m", "pytest", *expect]
