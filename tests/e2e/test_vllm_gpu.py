"""vLLM integration on a GPU: generate, push new weights over NCCL, outputs follow them.

Runs only where vllm and CUDA are present (a GPU machine); skipped elsewhere with the
reason. Uses a tiny random Qwen2 model saved to a temporary folder (no downloads).
"""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vllm and a CUDA GPU (the PyPI vllm package is CUDA-only)",
)


def test_vllm_engine_weight_update(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_alp.rollout import LocalEngine, SamplingParams, create_engine
    from megatron_alp.models.tiny import tiny_hf_config

    cfg = tiny_hf_config("qwen2", vocab_size=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    torch.manual_seed(1)
    new = AutoModelForCausalLM.from_config(cfg)
    engine = create_engine("vllm", model=str(tmp_path / "m"), gpu_memory_utilization=0.2,
                           llm_kwargs=dict(enforce_eager=True, skip_tokenizer_init=True))
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5]]
    before = engine.generate(prompts, sp)
    engine.update_weights([list(new.state_dict().items())])
    after = engine.generate(prompts, sp)
    ref = LocalEngine(new, dtype="bfloat16", device="cuda").generate(prompts, sp)
    assert [c.token_ids for c in after] == [c.token_ids for c in ref]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    engine.close()
