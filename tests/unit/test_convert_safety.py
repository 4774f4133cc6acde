"""The converters as a new user meets them (issue 11): no flag combination destroys data,
every bad input is one line naming the thing with exit 2 and nothing left behind."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.test_convert_roundtrip import REPO, hf_tensors, random_hf_model

TOOLS = REPO / "tools" / "convert"
PY = sys.executable


def _tool(name):
    sys.path.insert(0, str(TOOLS))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


h2m, m2h, verify = _tool("hf_to_megatron"), _tool("megatron_to_hf"), _tool("verify")


def digest(folder: Path) -> str:
    """Hash of every file (name and bytes) under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def nothing_left(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def run_cli(tool, argv, capsys) -> tuple[int, str]:
    try:
        code = tool.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny untied Llama and its converted checkpoint (read-only for the tests)."""
    root = tmp_path_factory.mktemp("m")
    src = random_hf_model(root / "hf", model_type="llama", tie=False)
    ckpt = root / "mg"
    assert h2m.main(["--hf", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    return src, ckpt


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------
# Data loss: each of these exited 0 and destroyed an input before issue 11.


def test_out_equal_to_input_through_dotdot_does_not_delete_input(tmp_path, model, capsys):
    src = copy(model[0], tmp_path / "models" / "q")
    before = digest(src)
    code, err = run_cli(h2m, ["--hf", str(src), "--out", str(tmp_path / "models" / ".." / "models" / "q"),
                              "--force", "--no-progress"], capsys)
    assert code == 2 and f"is the input {src}" in err and err.count("\n") == 0
    assert digest(src) == before


def test_out_parent_of_input_does_not_delete_input(tmp_path, model, capsys):
    src = copy(model[0], tmp_path / "models" / "q")
    before = digest(tmp_path / "models")
    code, err = run_cli(h2m, ["--hf", str(src), "--out", str(tmp_path / "models"), "--force"], capsys)
    assert code == 2 and f"contains the input {src}" in err
    assert digest(tmp_path / "models") == before


def test_megatron_to_hf_over_its_checkpoint_keeps_the_checkpoint(tmp_path, model, capsys):
    ckpt = copy(model[1], tmp_path / "mg")
    before = digest(ckpt)
    code, err = run_cli(m2h, ["--megatron", str(ckpt), "--out", str(ckpt), "--force"], capsys)
    assert code == 2 and f"is the input {ckpt}" in err
    code, err = run_cli(m2h, ["--megatron", str(ckpt), "--out", str(ckpt / "hf"), "--force"], capsys)
    assert code == 2 and f"lies inside the input {ckpt}" in err
    cfg = copy(ckpt / "hf", tmp_path / "cfg")  # --hf-config is an input too
    before_cfg = digest(cfg)
    code, err = run_cli(m2h, ["--megatron", str(ckpt), "--hf-config", str(cfg), "--out", str(cfg), "--force"], capsys)
    assert code == 2 and f"is the input {cfg}" in err
    assert digest(ckpt) == before and digest(cfg) == before_cfg


def test_force_never_replaces_another_tools_output(tmp_path, model, capsys):
    back = tmp_path / "back"
    assert m2h.main(["--megatron", str(model[1]), "--out", str(back), "--no-progress"]) == 0
    before = digest(back)
    code, err = run_cli(h2m, ["--hf", str(model[0]), "--out", str(back), "--force"], capsys)
    assert code == 2 and "it was written by megatron_to_hf: hf_to_megatron replaces only" in err
    assert digest(back) == before


@pytest.mark.parametrize("field,value", [("vocab_size", 200), ("num_hidden_layers", 3), ("model_type", "qwen2")])
def test_hf_config_disagreeing_with_checkpoint_record_is_refused(tmp_path, model, capsys, field, value):
    other = copy(model[0], tmp_path / "cfg")
    cfg = json.loads((other / "config.json").read_text())
    want = cfg[field]
    cfg[field] = value  # vocab 200 and 250 both pad to 256: shapes alone would not notice
    (other / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(m2h, ["--megatron", str(model[1]), "--out", str(tmp_path / "o"),
                              "--hf-config", str(other)], capsys)
    assert code == 2, err
    assert f"{field} = {value!r} in {other / 'config.json'} disagrees with the checkpoint's own record" in err
    assert f"{field} = {want!r}" in err
    assert nothing_left(tmp_path, "o")


def test_two_concurrent_conversions_to_one_out(tmp_path, model):
    out = tmp_path / "out"
    cmd = [PY, str(TOOLS / "hf_to_megatron.py"), "--hf", str(model[0]), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "appeared or changed while this run was writing" in loser[2] or "holds an earlier output" in loser[2]
    assert len(loser[2].strip().splitlines()) == 1
    # The winner's checkpoint is complete and nothing else is left.
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert m2h.main(["--megatron", str(out), "--out", str(tmp_path / "back"), "--no-progress"]) == 0
    src = hf_tensors(model[0])
    assert all(torch.equal(t, src[k]) for k, t in hf_tensors(tmp_path / "back").items())


# ---------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the thing, nothing left behind.


def test_threads_must_be_positive(tmp_path, model, capsys):
    for value in ("0", "-1"):
        code, err = run_cli(h2m, ["--hf", str(model[0]), "--out", str(tmp_path / "o"), "--threads", value], capsys)
        assert code == 2 and f"argument --threads: {value} is not a positive integer" in err
    assert nothing_left(tmp_path, "o")


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("damage,message", [
    ("no_offsets", r"tensor model.norm.weight: header entry lacks \['data_offsets'\]"),
    ("offsets_vs_shape", r"tensor model.norm.weight: data_offsets \[0, 128\] give 128 bytes, but shape \(64,\) of F32 needs 256 bytes"),
    ("bad_dtype", r"tensor model.norm.weight: safetensors dtype 'Q4' is not supported"),
    ("int8", r"tensor model.norm.weight in .*model.safetensors is int8, expected a floating-point weight.*--allow-non-float"),
    ("nan", r"tensor model.norm.weight in .*model.safetensors holds 2 NaN and 1 inf values.*--allow-non-finite"),
])
def test_bad_hf_weights(tmp_path, model, capsys, damage, message):
    src = copy(model[0], tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    norm = tensors.pop("model.norm.weight")
    if damage in ("int8", "nan"):
        tensors["model.norm.weight"] = norm.to(torch.int8) if damage == "int8" else norm.clone()
        if damage == "nan":
            tensors["model.norm.weight"][:3] = torch.tensor([float("nan"), float("nan"), float("inf")])
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    else:
        save_file(tensors, src / "rest.safetensors")
        (src / "model.safetensors").rename(src / "x.safetensors.orig")
        (src / "x.safetensors.orig").unlink()
        entry = {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}
        if damage == "no_offsets":
            del entry["data_offsets"]
        elif damage == "offsets_vs_shape":
            entry["data_offsets"] = [0, 128]
        else:
            entry["dtype"] = "Q4"
        write_raw_safetensors(src / "norm.safetensors", {"model.norm.weight": entry}, norm.numpy().tobytes())
    code, err = run_cli(h2m, ["--hf", str(src), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert nothing_left(tmp_path, "o")
    if damage in ("int8", "nan"):  # the flags convert them anyway
        flag = "--allow-non-float" if damage == "int8" else "--allow-non-finite"
        assert h2m.main(["--hf", str(src), "--out", str(tmp_path / "o"), "--no-progress", flag]) == 0


@pytest.mark.parametrize("damage,message", [
    ("missing_metadata", r"dist checkpoint .*: .metadata is missing"),
    ("empty_metadata", r"dist checkpoint .*: .metadata is empty"),
    ("corrupt_metadata", r"dist checkpoint .*: .metadata cannot be read"),
    ("missing_data", r"dist checkpoint .*: data file __0_0.distcp is missing \(listed in .metadata\)"),
    ("truncated_data", r"dist checkpoint .*: data file __0_0.distcp has 1000 bytes, .metadata expects at least \d+: the file is truncated"),
    ("corrupt_data", r"dist checkpoint .*: tensor \S+ cannot be read from \['__0_0.distcp'\]"),
    ("bad_backend", r"metadata.json: sharded_backend 'zarr' is not supported"),
    ("bad_json", r"Megatron checkpoint metadata .*metadata.json is not valid JSON"),
])
def test_bad_megatron_checkpoint(tmp_path, model, capsys, damage, message):
    ckpt = copy(model[1], tmp_path / "mg")
    data = ckpt / "__0_0.distcp"
    if damage == "missing_metadata":
        (ckpt / ".metadata").unlink()
    elif damage == "empty_metadata":
        (ckpt / ".metadata").write_bytes(b"")
    elif damage == "corrupt_metadata":
        (ckpt / ".metadata").write_bytes(b"\x80\x04garbage" * 10)
    elif damage == "missing_data":
        data.unlink()
    elif damage == "truncated_data":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "corrupt_data":
        data.write_bytes(b"\x13" * data.stat().st_size)
    elif damage == "bad_backend":
        (ckpt / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    else:
        (ckpt / "metadata.json").write_text("{not json")
    code, err = run_cli(m2h, ["--megatron", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert nothing_left(tmp_path, "o")


def test_nan_in_megatron_checkpoint_is_refused(tmp_path, capsys):
    src = random_hf_model(tmp_path / "hf", model_type="qwen2")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert h2m.main(["--hf", str(src), "--out", str(tmp_path / "mg"), "--allow-non-finite"]) == 0
    code, err = run_cli(m2h, ["--megatron", str(tmp_path / "mg"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "tensor decoder.layers.mlp.linear_fc2.weight (layer 2) in" in err and "0 NaN and 1 inf" in err
    assert nothing_left(tmp_path, "o")


@pytest.mark.parametrize("damage,message", [
    ("invalid_json", r"config .*hf/config.json is not valid JSON: Expecting"),
    ("rejected", r"transformers rejects .*hf/config.json: .*num_hidden_layers.* expected int"),
    ("no_model_type", r"config .*hf/config.json has no \"model_type\""),
    ("missing_folder", r"--hf .*nowhere does not exist or is not a folder"),
])
def test_bad_hf_config(tmp_path, model, capsys, damage, message):
    src = copy(model[0], tmp_path / "hf")
    if damage == "invalid_json":
        (src / "config.json").write_text('{"model_type": "llama",')
    elif damage == "rejected":
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_hidden_layers"] = "four"
        (src / "config.json").write_text(json.dumps(cfg))
    elif damage == "no_model_type":
        (src / "config.json").write_text("{}")
    else:
        src = tmp_path / "nowhere"
    code, err = run_cli(h2m, ["--hf", str(src), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert nothing_left(tmp_path, "o")


def test_megatron_to_hf_dtype_auto_keeps_checkpoint_dtype(tmp_path, model, capsys):
    assert m2h.main(["--megatron", str(model[1]), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert all(t.dtype == torch.float32 for t in hf_tensors(tmp_path / "a").values())
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float32"
    code, err = run_cli(m2h, ["--megatron", str(model[1]), "--out", str(tmp_path / "b"), "--dtype", "int8"], capsys)
    assert code == 2 and "argument --dtype: 'int8' is not one of auto, fp32, bf16, fp16" in err


def test_verify_bad_input_exits_2_before_any_rank(tmp_path, model, capsys):
    src, ckpt = model
    code, err = run_cli(verify, ["--hf", str(src), "--megatron", str(ckpt), "--seq-len", "0"], capsys)
    assert code == 2 and "argument --seq-len: 0 is not a positive integer" in err
    code, err = run_cli(verify, ["--hf", str(src), "--megatron", str(tmp_path / "missing")], capsys)
    assert code == 2 and f"--megatron {tmp_path / 'missing'}: Megatron checkpoint does not exist" in err
    other = random_hf_model(tmp_path / "qwen", model_type="qwen2")
    code, err = run_cli(verify, ["--hf", str(other), "--megatron", str(ckpt)], capsys)
    assert code == 2 and "model_type = 'qwen2' in --hf" in err and "'llama' in the checkpoint's" in err
    assert "they describe different models" in err


def test_disk_full_and_read_only_are_reported_as_such(tmp_path, model):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm is not available (needed for a small / read-only mount)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    total = sum(t.numel() * t.element_size() for t in hf_tensors(model[0]).values())
    cases = [
        # Smaller than the weights: refused before writing.
        ("size=64k", "not enough space for"),
        # Room for the weights but not for the checkpoint's own overhead: fails mid-write.
        (f"size={(total + 8192) // 1024}k", "no space left on device while writing"),
    ]
    for opts, message in cases:
        script = (f"mount -t tmpfs -o {opts} tmpfs {mnt} && {PY} {TOOLS / 'hf_to_megatron.py'} "
                  f"--hf {model[0]} --out {mnt / 'out'} --no-progress; rc=$?; ls -A {mnt}; exit $rc")
        r = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, (opts, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout.strip() == "", (opts, r.stdout, r.stderr)
    script = (f"mount --bind {mnt} {mnt} && mount -o remount,bind,ro {mnt} && {PY} "
              f"{TOOLS / 'megatron_to_hf.py'} --megatron {model[1]} --out {mnt / 'out'}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and f"{mnt} is on a read-only file system" in r.stderr, r.stderr


def test_unfinished_safetensors_file_is_not_loadable(tmp_path):
    """A killed megatron_to_hf leaves (inside its hidden temporary folder) a file of full
    size; its header length stays 0 until the writer completes, so nothing loads it."""
    from safetensors import SafetensorError

    from megatron_alp.convert.safetensors_io import ShardedSafetensorsWriter

    plan = [("a", (4, 4), torch.float32), ("b", (8,), torch.float32)]
    w = ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=10**9)
    w.write("a", torch.ones(4, 4))  # "b" never written: the process is killed here
    w._handles[0].flush()
    f = tmp_path / "model.safetensors"
    assert f.stat().st_size > 96
    with pytest.raises(SafetensorError):
        load_file(f)
    w.write("b", torch.arange(8.0))
    w.close()
    got = load_file(f)
    assert torch.equal(got["a"], torch.ones(4, 4)) and torch.equal(got["b"], torch.arange(8.0))
