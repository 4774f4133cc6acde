"""One GPU, the Transformer Engine layer spec: where the noise lands, exactness, gradients.

A tiny Qwen2-shaped model (4 layers, hidden 64) built by ``megatron_alp.models`` with
``use_te=True`` and ``with_alp``; single rank, NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch

from megatron_alp import parallel
from megatron_alp.launch import free_port
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.tiny import tiny_batches, tiny_hf_config
from megatron_alp.perturbation import ALPConfig, perturbed, step_key, with_alp
from megatron_alp.perturbation.function import NoiseSite
from tests.gpu.gpu_env import bf16_ulps, needs_cuda, needs_te

pytestmark = needs_cuda
SIGMA0 = 0.05
ALP = ALPConfig(init_std=SIGMA0, seed=3)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    parallel.initialize(parallel.ParallelConfig(), rank=0, world_size=1, master_port=free_port())
    yield
    parallel.teardown()


def _build(alp, *, dtype=torch.bfloat16, recompute=None, like=None):
    args = gpt_args_from_hf(tiny_hf_config())
    tc = transformer_config(args, parallel.ParallelConfig(), params_dtype=dtype,
                            recompute_granularity=recompute)
    transform = None if alp is None else functools.partial(with_alp, cfg=alp)
    model = build_model(args, tc, use_te=True, layer_spec_transform=transform)[0]
    if like is not None:  # same weights as `like` (sigma keeps its init)
        model.load_state_dict(like.state_dict(), strict=False)
    return model, tc, args


def _batch():
    b = tiny_batches(1, batch=2, seq=16, seed=5)[0]
    return {k: v.cuda() for k, v in b.items()}


def _loss(model, batch, ctx=None):
    with ctx if ctx is not None else contextlib.nullcontext():
        logits = model(batch["tokens"], batch["position_ids"], None)
    per_token = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none"
    ).view_as(batch["loss_mask"])
    return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def test_linear_qkv_sees_the_perturbed_input_bf16():
    """TE fuses the input norm into linear_qkv: its input must carry h + sigma * eps."""
    needs_te()
    plain, _, args = _build(None)
    model, _, _ = _build(ALP, like=plain)
    batch = _batch()
    key = step_key(ALP)
    seen = {}

    def hook(mod, a, kw):
        seen.setdefault("x", (a[0] if a else next(iter(kw.values()))).detach().clone())

    qkv = model.decoder.layers[0].self_attention.linear_qkv
    hd = qkv.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None)
        plain_in = seen.pop("x")
        with perturbed(key=key, step=2, sample_offset=4):
            model(batch["tokens"], batch["position_ids"], None)
    hd.remove()
    pert_in = seen["x"]
    from megatron_alp.perturbation import triton_noise

    site = NoiseSite(key=key, step=2, layer=1, sample_offset=4, batch=2, s_local=16)
    eps = triton_noise.triton_add_at(
        torch.zeros(16, 2, args.hidden_size, device="cuda"), torch.tensor(1.0, device="cuda"), site)
    want = (plain_in.float() + torch.tensor(SIGMA0, device="cuda") * eps).to(plain_in.dtype)
    assert pert_in.dtype == torch.bfloat16
    assert int(bf16_ulps(pert_in, want).max()) <= 1
    delta = (pert_in.float() - plain_in.float())
    torch.testing.assert_close(delta, SIGMA0 * eps, rtol=0, atol=plain_in.float().abs().max().item() / 128)


def test_alp_off_or_sigma_zero_is_bit_identical_to_no_alp_bf16():
    needs_te()
    plain, _, _ = _build(None)
    batch = _batch()
    key = step_key(ALP)
    with torch.no_grad():
        ref = plain(batch["tokens"], batch["position_ids"], None)
        disabled, _, _ = _build(ALPConfig(enabled=False), like=plain)
        assert torch.equal(disabled(batch["tokens"], batch["position_ids"], None), ref)
        alp, _, _ = _build(ALP, like=plain)
        assert torch.equal(alp(batch["tokens"], batch["position_ids"], None), ref)  # outside perturbed
        zero, _, _ = _build(ALPConfig(init_std=0.0, learnable=False), like=plain)
        with perturbed(key=key, step=0, sample_offset=0):
            assert torch.equal(zero(batch["tokens"], batch["position_ids"], None), ref)


def test_sigma_grad_matches_finite_differences_fp32():
    needs_te()
    model, _, _ = _build(ALP, dtype=torch.float32)
    batch = _batch()
    key = step_key(ALP)
    ctx = lambda: perturbed(key=key, step=0, sample_offset=0)  # noqa: E731
    _loss(model, batch, ctx()).backward()
    for layer in (0, 3):
        p = model.decoder.layers[layer].perturbation.alp_log_sigma
        autograd = float(p.grad)
        x0, h = float(p), 5e-2
        vals = []
        with torch.no_grad():
            for x in (x0 + h, x0 - h):
                p.fill_(x)
                vals.append(float(_loss(model, batch, ctx())))
            p.fill_(x0)
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(autograd - fd) <= 0.05 * abs(fd) + 2e-5, (layer, autograd, fd)


def _sigma_grads(model, batch, key) -> list[float]:
    model.zero_grad(set_to_none=True)
    _loss(model, batch, perturbed(key=key, step=1, sample_offset=2)).backward()
    return [float(layer.perturbation.alp_log_sigma.grad) for layer in model.decoder.layers]


def _te_checkpoint_layers(model) -> None:
    """Run every decoder layer under Transformer Engine's checkpoint (as Megatron does for fp8)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.extensions.transformer_engine import te_checkpoint

    for layer in model.decoder.layers:
        orig = layer.forward

        def forward(*args, _orig=orig, **kwargs):
            if "hidden_states" in kwargs:
                h, rest = kwargs.pop("hidden_states"), args
            else:
                h, rest = args[0], args[1:]

            def f(x):
                out, _ = _orig(x, *rest, **kwargs)
                return out

            out = te_checkpoint(f, False, tensor_parallel.random.get_cuda_rng_tracker,
                                ps.get_tensor_model_parallel_group(), h)
            return out, None

        layer.forward = forward


def test_recompute_megatron_and_te_checkpoint_give_the_same_sigma_grads():
    needs_te()
    base, _, _ = _build(ALP, dtype=torch.float32)
    batch = _batch()
    key = step_key(ALP)
    ref = _sigma_grads(base, batch, key)
    full, _, _ = _build(ALP, dtype=torch.float32, recompute="full", like=base)
    torch.testing.assert_close(torch.tensor(_sigma_grads(full, batch, key)), torch.tensor(ref),
                               rtol=1e-5, atol=1e-7)
    te_ckpt, _, _ = _build(ALP, dtype=torch.float32, like=base)
    _te_checkpoint_layers(te_ckpt)
    torch.testing.assert_close(torch.tensor(_sigma_grads(te_ckpt, batch, key)), torch.tensor(ref),
                               rtol=1e-5, atol=1e-7)
    assert all(g != 0 for g in ref)


def test_float16_module_keeps_log_sigma_exactly():
    from megatron.core.transformer.module import Float16Module

    model, tc, _ = _build(ALP, dtype=torch.bfloat16)
    wrapped = Float16Module(tc, model)
    want = torch.tensor(math.log(SIGMA0), dtype=torch.float32, device="cuda")
    for layer in wrapped.module.decoder.layers:
        p = layer.perturbation.alp_log_sigma
        assert p.dtype == torch.float32 and p.device.type == "cuda" and torch.equal(p.detach(), want)


def test_forward_backward_takes_host_batches_and_step_key_draws_on_the_current_device():
    from megatron_alp.schedule import forward_backward, wrap_ddp
    from tests.layouts import cross_entropy_loss

    model, tc, _ = _build(ALP, dtype=torch.float32)
    ddp = wrap_ddp([model], tc)
    assert ddp[0].ddp_config.overlap_grad_reduce  # on by default with CUDA
    batches = tiny_batches(2, batch=2, seq=16, seed=1)  # built on the host
    for i, b in enumerate(batches):
        b["sample_offset"] = torch.tensor(2 * i)
    key = step_key(ALP)
    stats = forward_backward(
        ddp, batches, cross_entropy_loss([]), seq_length=16,
        forward_context=lambda b: perturbed(key=key, step=0, sample_offset=b["sample_offset"]),
    )
    assert len(stats) == 2 and all(math.isfinite(float(s["loss"])) for s in stats)
    grad = model.decoder.layers[0].perturbation.alp_log_sigma.main_grad
    assert grad.device.type == "cuda" and float(grad) != 0.0
    assert torch.cuda.current_device() == 0


def test_update_makes_no_host_sync_in_our_code():
    """Issue 18.6 on the device: the trainer's micro-batch work (host micro-batches with an
    int sample_offset, bf16 logits straight from Float16Module, log-probs without the target
    check, the policy loss, the mismatch metrics) under CUDA's own sync detector: no
    synchronising call from a megatron_alp file inside forward_backward. (Megatron's own,
    if any, are printed, not asserted.) The CPU twin: tests/e2e/test_update_host_syncs.py."""
    import warnings

    from megatron.core.transformer.module import Float16Module

    from megatron_alp.rl import MismatchMetrics, compute_policy_loss, policy_loss_config
    from megatron_alp.rl.logprobs import vocab_parallel_logprobs
    from megatron_alp.schedule import forward_backward, wrap_ddp

    model, tc, args = _build(ALP, dtype=torch.float32)
    tc16 = transformer_config(args, parallel.ParallelConfig(), params_dtype=torch.bfloat16)
    ddp = wrap_ddp([Float16Module(tc16, model)], tc16, overlap_grad_reduce=False)
    loss_cfg = policy_loss_config("token-alp")
    metrics = MismatchMetrics(loss_cfg)
    batches = tiny_batches(4, batch=2, seq=16, seed=2)  # on the host, like the trainer's
    for i, b in enumerate(batches):
        b["sample_offset"] = 2 * i
        b["rollout_logp"] = -torch.rand(2, 16)
        b["old_logp"] = b["rollout_logp"] + 0.01
        b["advantages"] = torch.randn(2)[:, None].expand(2, 16).contiguous()
    key = step_key(ALP)
    dtypes = []

    def loss_fn(logits, b):
        dtypes.append(logits.dtype)
        lp = vocab_parallel_logprobs(logits, b["labels"], vocab_size=args.vocab_size, check_target=False)
        loss, _ = compute_policy_loss(loss_cfg, lp, b["old_logp"], b["rollout_logp"], b["advantages"],
                                      b["loss_mask"], global_token_count=96, global_seq_count=8)
        metrics.update(logp=lp.detach(), rollout_logp=b["rollout_logp"], mask=b["loss_mask"],
                       old_logp=b["old_logp"], advantages=b["advantages"])
        return loss, {}

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_backward(ddp, batches, loss_fn, seq_length=16,
                             forward_context=lambda b: perturbed(key=key, step=0, sample_offset=b["sample_offset"]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [(w.filename, w.lineno) for w in seen if "synchroniz" in str(w.message)]
    ours = [s for s in syncs if "megatron_alp" in s[0]]
    print("synchronising calls (file, line):", syncs)
    assert ours == [], ours
    assert dtypes == [torch.bfloat16] * 4
    out = metrics.compute()
    assert out["rollout_corr/n_tokens"] == 4 * 2 * 12
