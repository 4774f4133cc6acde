"""A scripted multi-turn trajectory's loss mask and rollout log-probs, end to end through
the trainer's ``generate_multiturn`` and ``step_tensors`` (exact, against token counts
computed independently from the scripted text)."""

from __future__ import annotations

import dataclasses

import torch

from megatron_alp.rollout import MultiTurnConfig
from megatron_alp.rollout.base import SamplingParams
from megatron_alp.train.batches import step_tensors
from megatron_alp.train.rollouts import Sample, generate_multiturn
from tests.unit.test_rollout_multiturn import (  # noqa: F401  (tok is a fixture)
    ANSWER_TURN,
    CODE_TURN,
    FakeSandbox,
    Res,
    ScriptedEngine,
    _cut_oracle,
    tok,
)


def test_scripted_trajectory_mask_through_step_tensors(tok):
    prompts = [[1, 5, 6, 7], [1, 9]]
    eng = ScriptedEngine(tok, [CODE_TURN, ANSWER_TURN])
    sb = FakeSandbox(Res(stdout="42\n"))
    sp = SamplingParams(max_new_tokens=64, n=2, seed=0)
    reward = lambda text, ans: float(f"\\boxed{{{ans}}}" in text)  # noqa: E731
    samples, metrics = generate_multiturn(
        eng, tok, prompts, [1, 0], ["x", "42"], sp, reward, sb, MultiTurnConfig(max_turns=3),
    )
    # independent expectation from the script's text
    t0 = tok.encode(CODE_TURN, add_special_tokens=False)
    k = _cut_oracle(tok, t0)
    obs = tok.encode(
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nCode execution result: 42\n\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    t1 = tok.encode(ANSWER_TURN, add_special_tokens=False) + [tok.eos_token_id]
    want_mask = [1] * k + [0] * len(obs) + [1] * len(t1)
    want_lp = [-(i + 1) / 100 for i in range(k)] + [0.0] * len(obs) + [-(i + 1) / 100 for i in range(len(t1))]
    assert [(s.prompt_index, s.group) for s in samples] == [(1, 0), (1, 0), (0, 1), (0, 1)]
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0, 0.0]  # row 1 answers 42
    assert metrics["multiturn/tool_calls"] == 4 and metrics["multiturn/tool_errors"] == 0
    assert metrics["multiturn/turns_mean"] == 2.0

    # one single-turn sample in the same batch: its mask stays all ones (loss_mask None)
    single = Sample(prompt_index=3, group=2, prompt_ids=[1, 2, 3], response_ids=[4, 5],
                    rollout_logp=[-0.5, -0.25], finish_reason="stop", reward=1.0)
    st = step_tensors(samples + [single], multiple=4)
    N, S = st.tokens.shape
    assert S % 4 == 0 and N == 5
    for i, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        assert s.response_ids == t0[:k] + obs + t1 and s.loss_mask == want_mask
        assert st.tokens[i, : P + R].tolist() == s.prompt_ids + s.response_ids
        expect = torch.zeros(S)
        expect[P - 1 : P + R - 1] = torch.tensor(want_mask, dtype=torch.float32)
        assert torch.equal(st.loss_mask[i], expect)
        lp = torch.zeros(S)
        lp[P - 1 : P + R - 1] = torch.tensor(want_lp, dtype=torch.float32)
        assert torch.equal(st.rollout_logp[i], lp)
        # a label under mask 1 is always a model token; under 0 an observation token
        on = st.labels[i][st.loss_mask[i] > 0].tolist()
        assert on == t0[:k] + t1
    P = 3
    assert st.loss_mask[4].tolist() == [0.0, 0.0, 1.0, 1.0] + [0.0] * (S - 4)
    assert st.rollout_logp[4, P - 1 : P + 1].tolist() == [-0.5, -0.25]


def test_void_trajectory_has_no_loss_tokens(tok):
    eng = ScriptedEngine(tok, ["I am not sure."])
    samples, metrics = generate_multiturn(
        eng, tok, [[1, 5]], [0], ["1"], dataclasses.replace(SamplingParams(max_new_tokens=32), n=2),
        lambda t, a: 0.0, FakeSandbox(Res()), MultiTurnConfig(max_turns=3),
    )
    st = step_tensors(samples)
    assert st.loss_mask.sum() == 0 and st.rollout_logp.abs().sum() == 0
    assert metrics["multiturn/finish_void"] == 1.0 and metrics["multiturn/tool_calls"] == 0
