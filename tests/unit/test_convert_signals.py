"""Conversions interrupted by SIGTERM (what schedulers send), Ctrl-C and kill -9: the
first two leave nothing and print one line; after kill -9 the next run removes the stale
temporary folder, says so, and succeeds."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "convert"


def sized_hf_model(folder: Path, *, layers: int, vocab: int, hidden: int = 1024, ffn: int = 2816) -> int:
    """A random tied Llama written straight to safetensors (no transformers model in
    memory); returns its size in bytes. One layer of these shapes is 45 MB in fp32."""
    from transformers import LlamaConfig

    from megatron_alp.convert import model_mapping

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=vocab,
                      tie_word_embeddings=True, max_position_embeddings=256)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    m = model_mapping(cfg)
    g = torch.Generator().manual_seed(0)
    total, shard, shards = 0, {}, []
    for name in m.hf_names():
        shard[name] = torch.randn(m.hf_shape(name), generator=g) * 0.02
        total += shard[name].numel() * 4
        if sum(t.numel() * 4 for t in shard.values()) > 200e6:
            shards.append(shard)
            shard = {}
    shards.append(shard)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def start(tool: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOOLS / tool), *args, "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_writing(p: subprocess.Popen, parent: Path, name: str, min_bytes: int) -> Path:
    """The temporary folder of a running conversion, once it holds ``min_bytes``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        for tmp in parent.glob(f".{name}.tmp-*"):
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            if size >= min_bytes:
                return tmp
        time.sleep(0.005)
    raise AssertionError("the conversion never started writing")


def interrupt(tool, args, parent, name, sig, min_bytes):
    p = start(tool, *args)
    wait_for_writing(p, parent, name, min_bytes)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~60 MB and its checkpoint: large enough that a conversion is still writing when
    the signal comes."""
    from megatron_alp.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("medium")
    sized_hf_model(root / "hf", layers=1, vocab=4096)
    convert_hf_to_megatron(root / "hf", root / "mg", progress=False)
    return root / "hf", root / "mg"


def test_sigterm_and_ctrl_c_leave_nothing(tmp_path, medium):
    code, out, err = interrupt("hf_to_megatron.py", ["--hf", str(medium[0]), "--out", str(tmp_path / "mg")],
                               tmp_path, "mg", signal.SIGTERM, 1)
    assert code == 143 and err.strip() == "hf_to_megatron: interrupted by SIGTERM; partial output removed"
    assert list(tmp_path.iterdir()) == []
    code, out, err = interrupt("megatron_to_hf.py", ["--megatron", str(medium[1]), "--out", str(tmp_path / "back")],
                               tmp_path, "back", signal.SIGINT, 1)
    assert code == 130 and err.strip() == "megatron_to_hf: interrupted by SIGINT; partial output removed"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_half_gigabyte_model_sigterm_and_kill_9(tmp_path):
    src = tmp_path / "hf"
    size = sized_hf_model(src, layers=9, vocab=32000)
    assert size >= 0.5e9
    out = tmp_path / "mg"
    # SIGTERM in the middle of writing: exit 143, one line, nothing left.
    code, _, err = interrupt("hf_to_megatron.py", ["--hf", str(src), "--out", str(out)], tmp_path, "mg",
                             signal.SIGTERM, 100_000_000)
    assert code == 143 and err.strip() == "hf_to_megatron: interrupted by SIGTERM; partial output removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # kill -9: the hidden temporary folder stays (nothing that looks like output)...
    p = start("hf_to_megatron.py", "--hf", str(src), "--out", str(out))
    tmp = wait_for_writing(p, tmp_path, "mg", 100_000_000)
    p.kill()
    p.wait()
    assert tmp.exists() and not out.exists()
    # ...and the next run removes it, says so, and succeeds.
    r = subprocess.run([sys.executable, str(TOOLS / "hf_to_megatron.py"), "--hf", str(src), "--out", str(out),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"hf_to_megatron: removed stale temporary folder {re.escape(str(tmp))} \(\d+\.\d MB\) "
                        rf"left by an interrupted run \(pid {p.pid}\)", r.stderr.strip()), r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hf", "mg"]
    print(f"0.5 GB model ({size / 1e9:.2f} GB): {r.stderr.strip()} / {r.stdout.strip()}")
