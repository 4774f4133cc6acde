"""Single-process log-probs / entropy against plain torch autograd (TP=2 is in tests/distributed)."""

from __future__ import annotations

import pytest
import torch

from megatron_alp.rl.logprobs import vocab_parallel_logprobs


def torch_reference(logits, target, temperature, vocab_size):
    z = logits.double()[..., :vocab_size] / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("vocab_size", [13, 16])  # 16 = no padding
def test_values_and_gradients_match_autograd(temperature, vocab_size):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 4, 16, generator=g)).requires_grad_()
    logits.data[..., 13:] += 50.0  # padded rows with large logits must not matter
    target = torch.randint(0, vocab_size, (3, 4), generator=g)
    w1, w2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)

    logp, ent = vocab_parallel_logprobs(
        logits, target, temperature=temperature, vocab_size=vocab_size, with_entropy=True
    )
    assert logp.dtype == torch.float32 and logp.shape == target.shape
    (logp * w1 + ent * w2).sum().backward()
    got_grad = logits.grad.clone()

    ref_in = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = torch_reference(ref_in, target, temperature, vocab_size)
    (ref_logp * w1 + ref_ent * w2).sum().backward()

    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), ref_in.grad, rtol=0, atol=1e-5)
    if vocab_size < 16:
        assert torch.all(got_grad[..., vocab_size:] == 0)


def test_logp_only_gradient_and_no_entropy_output():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 9, generator=g, requires_grad=True)
    target = torch.randint(0, 9, (5,), generator=g)
    logp = vocab_parallel_logprobs(logits, target)
    assert isinstance(logp, torch.Tensor)
    logp.sum().backward()
    ref = logits.detach().clone().requires_grad_()
    torch.log_softmax(ref, -1).gather(-1, target[:, None]).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=0, atol=1e-6)


def test_bf16_logits_give_bf16_grad_and_fp32_logp():
    logits = torch.randn(2, 3, 8).bfloat16().requires_grad_()
    target = torch.randint(0, 8, (2, 3))
    logp = vocab_parallel_logprobs(logits, target)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, target[..., None])[..., 0]
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)


def test_input_logits_are_not_modified():
    logits = torch.randn(2, 6)
    before = logits.clone()
    vocab_parallel_logprobs(logits, torch.tensor([1, 2]), vocab_size=5, with_entropy=True)
    assert torch.equal(logits, before)


def test_user_errors():
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"target shape \(2, 4\) must equal .* \(2, 3\)"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"vocab_size=9 must be in \[1, 8\]"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=9)
    with pytest.raises(ValueError, match=r"outside \[0, 6\).*\[7\]"):
        t = torch.zeros(2, 3, dtype=torch.long)
        t[1, 2] = 7
        vocab_parallel_logprobs(logits, t, vocab_size=6)
