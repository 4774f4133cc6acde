"""Multi-turn rollouts with a scripted policy: exact masks, token-id continuation, void
turns, budgets, metadata; and the policy loss is blind to observation text."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from megatron_alp.rl.losses import compute_policy_loss, policy_loss_config
from megatron_alp.rollout.base import Completion, SamplingParams
from megatron_alp.rollout.multiturn import (
    MultiTurnConfig,
    multiturn_metrics,
    observation_token_ids,
    run_multiturn,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CODE_TURN = "Let me compute.\n```python\nprint(6 * 7)\n```\nThis tail is never shown."
ANSWER_TURN = "So the answer is \\boxed{42}."


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer with a Qwen-style chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator([CODE_TURN, ANSWER_TURN, "Code execution result: 42"] * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


class ScriptedEngine:
    """Emits ``script[turn]`` for every request of call ``turn`` (EOS appended when the
    text is an answer), with log-probs ``-(position + 1) / 100``; records its inputs."""

    def __init__(self, tok, script: list[str]):
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append(([list(p) for p in prompt_token_ids], sampling))
        text = self.script[min(len(self.calls) - 1, len(self.script) - 1)]
        ids = self.tok.encode(text, add_special_tokens=False)
        if "boxed" in text or "sure" in text:
            ids = ids + [self.tok.eos_token_id]
        ids = ids[: sampling.max_new_tokens]
        lp = [-(k + 1) / 100 for k in range(len(ids))]
        return [Completion(i, j, list(ids), list(lp), "stop")
                for i in range(len(prompt_token_ids)) for j in range(sampling.n)]

    def update_weights(self, stream):
        pass

    def close(self):
        pass


@dataclasses.dataclass
class Res:
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = 0
    timed_out: bool = False


class FakeSandbox:
    def __init__(self, result):
        self.result, self.codes = result, []

    def run_batch(self, codes):
        self.codes.extend(codes)
        return [self.result(c) if callable(self.result) else self.result for c in codes]


def _cut_oracle(tok, ids: list[int]) -> int:
    """Shortest prefix whose text holds the whole code block (linear scan)."""
    for k in range(1, len(ids) + 1):
        if "```python\nprint(6 * 7)\n```" in tok.decode(ids[:k]):
            return k
    raise AssertionError("no code block")


PROMPT = [1, 5, 6, 7]
SP = SamplingParams(max_new_tokens=64, n=2, seed=0)


def test_chat_trajectory_mask_is_exact(tok):
    eng = ScriptedEngine(tok, [CODE_TURN, ANSWER_TURN])
    sb = FakeSandbox(Res(stdout="42\n"))
    trajs = run_multiturn(eng, [PROMPT], SP, tok, sb, MultiTurnConfig())
    t0 = tok.encode(CODE_TURN, add_special_tokens=False)
    k = _cut_oracle(tok, t0)
    assert k < len(t0)  # the tail after the block was generated and is dropped
    obs = tok.encode(
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nCode execution result: 42\n\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    t1 = tok.encode(ANSWER_TURN, add_special_tokens=False) + [tok.eos_token_id]
    assert len(trajs) == 2 and [(t.prompt_index, t.sample_index) for t in trajs] == [(0, 0), (0, 1)]
    for t in trajs:
        assert t.prompt_ids == PROMPT
        assert t.response_ids == t0[:k] + obs + t1
        assert t.loss_mask == [1] * k + [0] * len(obs) + [1] * len(t1)
        assert t.rollout_logprobs == ([-(i + 1) / 100 for i in range(k)] + [0.0] * len(obs)
                                      + [-(i + 1) / 100 for i in range(len(t1))])
        assert (t.turns, t.tool_calls, t.tool_errors, t.tool_timeouts, t.void_turns) == (2, 1, 0, 0, 0)
        assert t.finish_reason == "answer" and "\\boxed{42}" in t.response_text
    assert sb.codes == ["print(6 * 7)", "print(6 * 7)"]
    # turn 0: one call with n samples per prompt; turn 1 continues from token ids
    (p0, s0), (p1, s1) = eng.calls
    assert p0 == [PROMPT] and s0.n == 2
    assert p1 == [PROMPT + t0[:k] + obs] * 2 and s1.n == 1


def test_inline_observation_like_the_reference(tok):
    eng = ScriptedEngine(tok, [CODE_TURN, ANSWER_TURN])
    cfg = MultiTurnConfig(observation_format="inline")
    (t, _) = run_multiturn(eng, [PROMPT], SP, tok, FakeSandbox(Res(stdout="42\n")), cfg)
    obs = tok.encode("\nCode execution result: 42\n\n", add_special_tokens=False)
    k = _cut_oracle(tok, tok.encode(CODE_TURN, add_special_tokens=False))
    assert t.loss_mask[k:k + len(obs)] == [0] * len(obs)
    assert t.response_ids[k:k + len(obs)] == obs


def test_void_turn_ends_and_masks_the_trajectory(tok):
    eng = ScriptedEngine(tok, ["I am not sure.", ANSWER_TURN])
    t = run_multiturn(eng, [PROMPT], SP, tok, FakeSandbox(Res()), MultiTurnConfig())[0]
    assert t.finish_reason == "void" and t.void_turns == 1 and t.turns == 1
    assert len(t.response_ids) > 0 and t.loss_mask == [0] * len(t.response_ids)
    # without masking: a newline observation, then the model goes on
    eng = ScriptedEngine(tok, ["I am not sure.", ANSWER_TURN])
    t = run_multiturn(eng, [PROMPT], SP, tok, FakeSandbox(Res()),
                      MultiTurnConfig(mask_void_turns=False))[0]
    nl = tok.encode("\n", add_special_tokens=False)
    void = tok.encode("I am not sure.", add_special_tokens=False) + [tok.eos_token_id]
    assert t.finish_reason == "answer" and t.turns == 2 and t.void_turns == 1
    assert t.loss_mask[: len(void) + len(nl)] == [1] * len(void) + [0] * len(nl)


def test_a_failed_sandbox_is_a_tool_error_not_silence():
    from megatron_alp.rollout.multiturn import _observation_text
    from megatron_alp.sandbox import SandboxResult

    res = SandboxResult(stdout="", stderr="", exit_code=None, timed_out=False,
                        killed_by="sandbox", wall_s=0.1, sandbox_error="bwrap was killed")
    body, failed = _observation_text(res, MultiTurnConfig())
    assert failed and body.endswith("sandbox error"), body


def test_max_turns_errors_timeouts_and_metrics(tok):
    results = iter([Res(stderr="Traceback (most recent call last):\n  x\nZeroDivisionError: "
                               "division by zero\n", exit_code=1),
                    Res(exit_code=None, timed_out=True),
                    Res(stdout="7\n")])
    eng = ScriptedEngine(tok, [CODE_TURN])
    sb = FakeSandbox(lambda code: next(results))
    sp = dataclasses.replace(SP, n=1)
    t = run_multiturn(eng, [PROMPT], sp, tok, sb, MultiTurnConfig(max_turns=3))[0]
    assert (t.turns, t.tool_calls, t.tool_errors, t.tool_timeouts) == (3, 3, 2, 1)
    assert t.finish_reason == "max_turns"
    assert "Code execution result: ZeroDivisionError: division by zero" in t.response_text
    assert "Traceback" not in t.response_text  # only the last stderr line is shown
    assert "Code execution result: interpreter timeout" in t.response_text
    m = multiturn_metrics([t])
    assert m["multiturn/tool_calls_mean"] == 3 and m["multiturn/tool_error_rate"] == 2 / 3
    assert m["multiturn/tool_timeout_rate"] == 1 / 3 and m["multiturn/finish_max_turns"] == 1


def test_answer_in_program_output_ends_the_trajectory(tok):
    eng = ScriptedEngine(tok, [CODE_TURN, CODE_TURN])
    cfg = MultiTurnConfig(final_answer_function=True)
    sb = FakeSandbox(Res(stdout="\\boxed{42}\n"))
    t = run_multiturn(eng, [PROMPT], dataclasses.replace(SP, n=1), tok, sb, cfg)[0]
    assert t.finish_reason == "answer" and t.turns == 1
    assert sb.codes[0].startswith("def final_answer(result):")


def test_response_budget(tok):
    eng = ScriptedEngine(tok, [CODE_TURN])
    cfg = MultiTurnConfig(max_response_tokens=40)
    t = run_multiturn(eng, [PROMPT], dataclasses.replace(SP, n=1), tok,
                      FakeSandbox(Res(stdout="1\n" * 200)), cfg)[0]
    assert t.finish_reason == "length" and len(t.response_ids) == 40
    assert len(t.loss_mask) == len(t.rollout_logprobs) == 40
    assert all(c.max_new_tokens <= 40 for _, c in eng.calls)


def _batch(trajs, vocab):
    T = max(len(t.response_ids) for t in trajs)
    ids = torch.zeros(len(trajs), T, dtype=torch.long)
    mask = torch.zeros(len(trajs), T)
    rlp = torch.zeros(len(trajs), T)
    for b, t in enumerate(trajs):
        n = len(t.response_ids)
        ids[b, :n] = torch.tensor(t.response_ids)
        mask[b, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        rlp[b, :n] = torch.tensor(t.rollout_logprobs)
    return ids, mask.bool(), rlp


@pytest.mark.parametrize("loss", ["seq-alp", "token-alp"])
def test_loss_and_grad_ignore_observation_text(tok, loss):
    """Same model turns, different tool outputs: the loss and d loss / d theta agree."""
    sp = dataclasses.replace(SP, n=2)
    outs = {"a": Res(stdout="42\n"),
            "b": Res(stdout="a much longer and entirely different tool output 1234567\n" * 3)}
    batches = {}
    for key, res in outs.items():
        trajs = run_multiturn(ScriptedEngine(tok, [CODE_TURN, ANSWER_TURN]), [PROMPT], sp, tok,
                              FakeSandbox(res), MultiTurnConfig())
        batches[key] = _batch(trajs, len(tok))
    assert batches["a"][0].shape != batches["b"][0].shape  # the observations really differ

    cfg = policy_loss_config(loss)
    torch.manual_seed(0)
    # The "trainer": the rollout log-prob plus a learnable offset per token id, small
    # enough that the ratios stay inside the clip range (so gradients flow).
    # The two batches have different lengths, so reductions run in a different order; the
    # loss computes its weights in fp32, hence a tolerance at fp32 rounding level.
    table = torch.randn(len(tok), dtype=torch.float64) * 1e-3

    def loss_and_grad(ids, mask, rlp, include_obs=False):
        theta = table.clone().requires_grad_(True)
        logp = theta[ids]
        m = torch.ones_like(mask) if include_obs else mask
        adv = torch.tensor([1.0, -0.5])
        out, _ = compute_policy_loss(cfg, logp, None, rlp, adv, m)
        out.backward()
        return out.detach(), theta.grad

    la, ga = loss_and_grad(*batches["a"])
    lb, gb = loss_and_grad(*batches["b"])
    torch.testing.assert_close(la, lb, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=2e-6, atol=1e-9)
    assert ga.abs().sum() > 0
    # The check has teeth: a mask that let observation tokens in would see the difference.
    wa, _ = loss_and_grad(*batches["a"], include_obs=True)
    wb, _ = loss_and_grad(*batches["b"], include_obs=True)
    assert (wa - wb).abs() > 1e-3 * wa.abs(), (wa, wb)


def test_chat_observation_needs_a_template(tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="observation_format='inline'"):
        observation_token_ids(NoTemplate(), "x", MultiTurnConfig())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="MultiTurnConfig.max_turns must be >= 1, got 0"):
        MultiTurnConfig(max_turns=0)
    with pytest.raises(ValueError, match="code_pattern needs a capture group"):
        MultiTurnConfig(code_pattern="```")
    with pytest.raises(ValueError, match="answer_pattern is not a valid regex"):
        MultiTurnConfig(answer_pattern="(")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_with_the_real_sandbox(tok):
    from megatron_alp.sandbox import SandboxLimits, SandboxPool

    with SandboxPool(max_concurrency=2, limits=SandboxLimits(timeout_s=5)) as pool:
        eng = ScriptedEngine(tok, [CODE_TURN, ANSWER_TURN])
        trajs = run_multiturn(eng, [PROMPT, PROMPT[:2]], SP, tok, pool, MultiTurnConfig())
    assert len(trajs) == 4
    for t in trajs:
        assert "Code execution result: 42" in t.response_text
        assert t.finish_reason == "answer" and t.tool_calls == 1 and t.tool_errors == 0


def test_local_engine_continuation_logprobs_align(tok):
    """With the real LocalEngine: each rollout log-prob is the model's log-prob of that
    response token given the whole trajectory before it (observations included)."""
    from megatron_alp.models.tiny import tiny_hf_config
    from megatron_alp.rollout import LocalEngine

    torch.manual_seed(0)
    cfg_hf = tiny_hf_config("qwen2", vocab_size=len(tok), max_position_embeddings=512)
    engine = LocalEngine(cfg_hf, dtype="float32", eos_token_id=tok.eos_token_id)
    # Random weights never write code or answers: every turn is void; unmasked, the
    # trajectory goes on after a newline observation, so continuation is exercised.
    cfg = MultiTurnConfig(max_turns=3, mask_void_turns=False, observation_format="inline")
    sp = SamplingParams(max_new_tokens=6, n=2, seed=3)
    trajs = run_multiturn(engine, [PROMPT, [1, 9]], sp, tok, FakeSandbox(Res()), cfg)
    nl = tok.encode("\n", add_special_tokens=False)
    for t in trajs:
        assert t.turns == 3 and t.void_turns == 3 and t.finish_reason == "max_turns"
        assert sum(1 for m in t.loss_mask if m == 0) == 3 * len(nl)
        full = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(full).logits[0].float(), -1)
        P = len(t.prompt_ids)
        for k, (tokid, m) in enumerate(zip(t.response_ids, t.loss_mask)):
            if m:
                want = logp[P + k - 1, tokid].item()
                assert abs(t.rollout_logprobs[k] - want) < 1e-4, (k, t.rollout_logprobs[k], want)
            else:
                assert t.rollout_logprobs[k] == 0.0
