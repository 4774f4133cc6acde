"""``--rl-rollout-dtype fp8`` on vLLM (``quantization="fp8"``): written against vLLM 0.32's
source, NOT RUN in the session that wrote it (no GPU). One command on a GPU with vllm:

    python -m pytest tests/e2e/test_vllm_fp8_gpu.py -v -rs

The colocated engine starts with FP8 online quantisation of a tiny BF16 model, receives
new weights by IPC (vLLM re-quantises after loading, or fails here), and its processed
log-probs of its own samples are compared with the local engine's W8A8 emulation of the
new weights (teacher-forced): close (the granularity differs: vLLM per-tensor, the
emulation per-channel / per-token) and unlike the old weights'.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vllm and a CUDA GPU (the PyPI vllm package is CUDA-only)",
)
T = 0.7


def _teacher_forced(engine, prompt, tokens):
    ids = torch.tensor([list(prompt) + list(tokens)], device=engine.device)
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / T
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(tokens)), torch.tensor(tokens, device=lp.device)].cpu()


def test_fp8_engine_takes_new_weights_and_matches_the_emulation(tmp_path):
    from megatron_alp.rollout import LocalEngine, SamplingParams, create_engine
    from tests.e2e.test_vllm_gpu import _save_model

    old_dir = str(tmp_path / "old")
    _save_model(old_dir, seed=0)
    new = _save_model(str(tmp_path / "new"), seed=1)
    sent = {n: p.detach().clone() for n, p in new.named_parameters()}
    engine = create_engine("vllm", model=old_dir, dtype="fp8", gpu_memory_utilization=0.3,
                           max_model_len=512, llm_kwargs=dict(enforce_eager=True))
    sp = SamplingParams(temperature=T, max_new_tokens=16, ignore_eos=True, seed=3, n=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    try:
        engine.update_weights([[(n, t.cuda()) for n, t in sent.items()]])
        outs = engine.generate(prompts, sp)
    finally:
        engine.close()
    emu_new = LocalEngine(new, dtype="fp8", device="cuda")
    emu_old = LocalEngine(str(old_dir), dtype="fp8", device="cuda")
    d_new, d_old = [], []
    for c in outs:
        got = torch.tensor(c.logprobs)
        d_new.append((got - _teacher_forced(emu_new, prompts[c.prompt_index], c.token_ids)).abs())
        d_old.append((got - _teacher_forced(emu_old, prompts[c.prompt_index], c.token_ids)).abs())
    d_new, d_old = torch.cat(d_new), torch.cat(d_old)
    assert d_new.mean() < 0.05 and d_new.max() < 0.5, (d_new.mean(), d_new.max())
    assert d_old.mean() > 5 * d_new.mean(), (d_old.mean(), d_new.mean())  # the update took
