"""Multi-turn rollouts over the fleet (a CPU-twin engine process behind the fleet client):
each continuation request carries the whole trajectory's token ids, and every model
token's log-prob equals an fp32 recomputation over prompt + response, observations
included. Heavy (an engine process importing torch): run under ``flock /tmp/alp-heavy.lock``.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from megatron_alp.models.tiny import tiny_hf_config
from megatron_alp.rollout import MultiTurnConfig, SamplingParams, create_engine, run_multiturn
from megatron_alp.rollout.fleet_launch import LocalFleet
from tests.e2e.test_fleet_twin import _buckets
from tests.e2e.train_bodies import prepare_module


class _NoCode:
    """A sandbox that must never be called (a random model writes no code block)."""

    def run_batch(self, codes):
        raise AssertionError(f"unexpected programs: {codes}")


def test_multiturn_continues_over_the_fleet_by_token_ids(tmp_path):
    prep = prepare_module()
    train, _ = prep.task_rows()
    tok = prep.build_tokenizer([f"<|im_start|>user\n{r['prompt']}<|im_end|>\n" for r in train])
    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_hf_config("qwen2", vocab_size=len(tok), max_position_embeddings=256)).float().eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fleet = LocalFleet(1, model=str(folder), backend="twin", dtype="float32", startup_timeout_s=180)
    engine = create_engine("fleet", endpoints=fleet.endpoints, request_timeout_s=120, sync_timeout_s=60)
    try:
        engine.update_weights(_buckets(model))
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True) for p in ("1+2=?", "4+4=?")]
        prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
        # Random weights write neither code nor answers: every turn is void; unmasked, a
        # newline observation follows and the next turn continues from the token ids.
        cfg = MultiTurnConfig(max_turns=3, mask_void_turns=False, observation_format="inline")
        sp = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3)
        trajs = run_multiturn(engine, prompts, sp, tok, _NoCode(), cfg)
    finally:
        engine.close()
        fleet.close()
    assert len(trajs) == 4 and max(t.turns for t in trajs) == 3
    worst = 0.0
    for t in trajs:
        assert 0 in t.loss_mask  # observation tokens between the turns
        full = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].double(), -1)
        P = len(t.prompt_ids)
        for k, (tokid, m) in enumerate(zip(t.response_ids, t.loss_mask)):
            if m:
                worst = max(worst, abs(t.rollout_logprobs[k] - logp[P + k - 1, tokid].item()))
            else:
                assert t.rollout_logprobs[k] == 0.0
    assert worst < 1e-4, worst
