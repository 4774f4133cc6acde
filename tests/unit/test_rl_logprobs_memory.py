"""Log-probs and entropy from bf16 logits without fp32 copies of the vocabulary (issue 18.5).

The log-prob pass used to hold ~4 fp32 copies of ``[b, s, V / TP]`` (Float16Module's
upcast, the shifted copy, ``exp_z``, ``exp_z * z``; the update's backward more): for
the 1.5B recipe 11-20 GB each. Now the model's bf16 logits go in as they are, the fp32
arithmetic runs over row chunks, and the backward recomputes the probabilities.

Oracles: the same arithmetic on the fp32-upcast logits in one chunk (what the trainer
computed before: bit-identical values and gradients), plain double-precision autograd
(tolerance), and the CPU allocator's events recorded by ``torch.profiler`` (peak bytes
against the size of the bf16 logits).
"""

from __future__ import annotations

import pytest
import torch

from megatron_alp.rl.logprobs import vocab_parallel_logprobs


def _peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations minus frees while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def _case(seed=0, b=2, s=24, V=96, vocab_size=90):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(b, s, V, generator=g)).bfloat16()
    logits[..., vocab_size:] += 30  # padding rows with large logits must not matter
    target = torch.randint(0, vocab_size, (b, s), generator=g)
    w1, w2 = torch.randn(b, s, generator=g), torch.randn(b, s, generator=g)
    return logits, target, w1, w2


def _run(logits, target, w1, w2, *, temperature, vocab_size, chunk_bytes):
    x = logits.detach().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, target, temperature=temperature, vocab_size=vocab_size,
                                      with_entropy=True, chunk_bytes=chunk_bytes)
    (lp * w1 + ent * w2).sum().backward()
    return lp, ent, x.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_chunked_equals_the_fp32_upcast_in_one_pass(temperature):
    """Bit for bit: chunks of 3 rows over bf16 logits give the values and the bf16 gradient
    that the whole fp32-upcast tensor in one chunk gives (the trainer's previous path:
    Float16Module's fp32 output, one pass)."""
    logits, target, w1, w2 = _case()
    one_row = 96 * 4 * 3  # 3 rows per chunk: 16 chunks, the last one short
    lp, ent, grad = _run(logits, target, w1, w2, temperature=temperature, vocab_size=90,
                         chunk_bytes=one_row)
    up = logits.float().requires_grad_()
    lp_ref, ent_ref = vocab_parallel_logprobs(up, target, temperature=temperature, vocab_size=90,
                                              with_entropy=True, chunk_bytes=1 << 30)
    (lp_ref * w1 + ent_ref * w2).sum().backward()
    assert grad.dtype == torch.bfloat16 and lp.dtype == ent.dtype == torch.float32
    assert torch.equal(lp, lp_ref) and torch.equal(ent, ent_ref)
    assert torch.equal(grad, up.grad.bfloat16())  # the cast Float16Module's backward made
    assert torch.all(grad[..., 90:] == 0)
    # and against double-precision autograd on the same (bf16-valued) logits
    ref_in = logits.double().requires_grad_()
    z = torch.log_softmax(ref_in[..., :90] / temperature, -1)
    ref_lp = z.gather(-1, target[..., None])[..., 0]
    ref_ent = -(z.exp() * z).sum(-1)
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_in.grad, rtol=1e-2, atol=1e-3)  # bf16 grad


def test_peak_memory_of_forward_and_backward_is_about_one_bf16_logits():
    """[4, 256, 4096] bf16 logits (8 MiB): forward with entropy plus backward allocate the
    bf16 gradient (1 x) and a few fp32 chunks of 256 KiB: measured 1.20 x the bf16 logits.
    The previous code (fp32 upcast, then whole-tensor fp32 temporaries) peaked at 14.5 x."""
    b, s, V = 4, 256, 4096
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(b, s, V, generator=g)).bfloat16()
    target = torch.randint(0, V - 10, (b, s), generator=g)
    x = logits.requires_grad_()
    size = logits.numel() * logits.element_size()
    chunk = 256 << 10

    def step():
        lp, ent = vocab_parallel_logprobs(x, target, temperature=0.9, vocab_size=V - 10,
                                          with_entropy=True, chunk_bytes=chunk)
        (lp.sum() + 0.1 * ent.sum()).backward()

    peak = _peak_bytes(step)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert size <= peak <= size + 8 * chunk, (peak / size, peak)


def test_forward_only_log_prob_pass_allocates_a_few_chunks():
    """The log-prob pass (no grad): only fp32 row chunks and [b, s] vectors, whatever V
    (measured 0.07 x the bf16 logits; the previous code 10.0 x)."""
    b, s, V = 4, 256, 4096
    logits = torch.randn(b, s, V).bfloat16()
    target = torch.randint(0, V, (b, s))
    chunk = 256 << 10
    with torch.no_grad():
        peak = _peak_bytes(lambda: vocab_parallel_logprobs(
            logits, target, with_entropy=True, chunk_bytes=chunk))
    size = logits.numel() * logits.element_size()
    assert peak <= 4 * chunk + 64 * b * s, (peak / size, peak)


def test_the_schedule_hands_the_loss_bf16_logits_of_a_float16_module():
    """Float16Module's fp32_output upcast of the whole [b, s, V] is off in our schedule: the
    loss sees the model's bf16 logits (the log-probs upcast chunk by chunk)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_alp import parallel
    from megatron_alp.launch import free_port
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.tiny import tiny_hf_config
    from megatron_alp.schedule import forward_backward, wrap_ddp

    layout = parallel.ParallelConfig()
    parallel.initialize(layout, rank=0, world_size=1, master_port=free_port())
    try:
        args = gpt_args_from_hf(tiny_hf_config("qwen2"))
        chunks = build_model(args, transformer_config(args, layout))
        config = transformer_config(args, layout, params_dtype=torch.bfloat16)
        model = wrap_ddp([Float16Module(config, c) for c in chunks], config)
        seen = []

        def loss_fn(logits, batch):
            seen.append(logits.dtype)
            lp = vocab_parallel_logprobs(logits, batch["labels"], vocab_size=args.vocab_size)
            return lp.sum() * 0.0, {}

        tokens = torch.randint(0, args.vocab_size, (2, 8))
        batch = dict(tokens=tokens, labels=tokens, position_ids=torch.arange(8).expand(2, 8))
        forward_backward(model, [batch, batch], loss_fn, seq_length=8, forward_only=True)
        forward_backward(model, [batch], loss_fn, seq_length=8)
        assert seen == [torch.bfloat16] * 3
    finally:
        parallel.teardown()
