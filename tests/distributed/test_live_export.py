"""Live export from a TP=2 x PP=2 model: HF names exactly, logits equal, buckets bounded."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_alp import parallel
from megatron_alp.convert.live_export import export_hf_buckets
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import load_full_state
from megatron_alp.parallel import ParallelConfig
from megatron_alp.schedule import forward_backward
from megatron_alp.launch import RankGroup
from megatron_alp.testing.layouts import canonical_state, cross_entropy_loss
from megatron_alp.models.tiny import tiny_batches, tiny_hf_config

BUCKET = 70_000  # bytes: forces many buckets on the tiny model (embedding is 65,536)
ARCHS = {"qwen2": dict(model_type="qwen2"), "qwen3": dict(model_type="qwen3"),
         "llama_tied": dict(model_type="llama", tie=True)}


def export_body(arch: dict, layout: ParallelConfig, alp: bool = False) -> dict:
    hf = tiny_hf_config(**arch)
    full = canonical_state(hf, seed=3)
    batch = tiny_batches(1, seed=4)
    args = gpt_args_from_hf(hf)
    with parallel.model_parallel(layout) as info:
        transform = None
        if alp:  # a model trained with ALP: its sigmas must not reach the engine
            from functools import partial

            from megatron_alp.perturbation import ALPConfig, with_alp

            transform = partial(with_alp, cfg=ALPConfig(init_std=0.02))
        chunks = build_model(args, transformer_config(args, layout), layer_spec_transform=transform)
        n_alp = sum("alp_log_sigma" in n for c in chunks for n, _ in c.named_parameters())
        loaded = load_full_state(chunks, full, strict=False)
        assert len(loaded) == sum(1 for c in chunks for _ in c.parameters()) - n_alp
        record: list = []
        forward_backward(chunks, batch, cross_entropy_loss(record), seq_length=16, forward_only=True)
        buckets = []
        n_yields = 0
        for b in export_hf_buckets(chunks, hf, dtype=torch.float32, bucket_bytes=BUCKET):
            n_yields += 1
            if b:
                buckets.append(b)
        return dict(
            rank=info.rank, n_yields=n_yields, n_alp=n_alp,
            buckets=buckets if info.rank == 0 else None,
            logits=record[0] if (record and info.tp_rank == 0 and info.dp_rank == 0) else None,
            tokens=batch[0]["tokens"],
        )


@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=600) as g:
        yield g


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_tp2_pp2_matches_hf(group, arch):
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    alp = arch == "qwen2"
    res = group.run(export_body, ARCHS[arch], layout, alp)
    if alp:
        assert all(r["n_alp"] > 0 for r in res)  # every stage holds sigmas, none exported
    # every rank iterated in lockstep
    assert len({r["n_yields"] for r in res}) == 1 and res[0]["n_yields"] > 5
    buckets = res[0]["buckets"]
    assert all(r["buckets"] is None for r in res[1:])
    for b in buckets:
        assert sum(t.numel() * t.element_size() for _, t in b) <= BUCKET
    exported = [(n, t) for b in buckets for n, t in b]
    names = [n for n, _ in exported]
    assert len(names) == len(set(names))
    hf_cfg = tiny_hf_config(**ARCHS[arch])
    model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    assert set(names) == {n for n, _ in model.named_parameters()}
    missing, unexpected = model.load_state_dict(dict(exported), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if hf_cfg.tie_word_embeddings else set())
    logits = next(r["logits"] for r in res if r["logits"] is not None)
    with torch.no_grad():
        ref = model(res[0]["tokens"]).logits
    torch.testing.assert_close(logits[..., : hf_cfg.vocab_size], ref, atol=1e-4, rtol=0)


def export_default_device_body(layout: ParallelConfig) -> dict:
    """Export with torch's default device set to ``meta``: every buffer the export
    allocates must follow the model's device (on GPU: cuda, which NCCL needs), so a
    buffer created on the default device would be a meta tensor and the gather/recv
    into it would fail or yield no data. The plain export is the oracle."""
    hf = tiny_hf_config(model_type="qwen2")
    full = canonical_state(hf, seed=3)
    args = gpt_args_from_hf(hf)
    with parallel.model_parallel(layout) as info:
        chunks = build_model(args, transformer_config(args, layout))
        load_full_state(chunks, full, strict=False)
        kw = dict(dtype=torch.float32, bucket_bytes=BUCKET)
        plain = [b for b in export_hf_buckets(chunks, hf, **kw) if b]
        with torch.device("meta"):
            meta_default = [b for b in export_hf_buckets(chunks, hf, **kw) if b]
        return dict(rank=info.rank, plain=plain, meta_default=meta_default)


def test_export_buffers_on_model_device(group):
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    res = group.run(export_default_device_body, layout)
    plain = [(n, t) for b in res[0]["plain"] for n, t in b]
    got = [(n, t) for b in res[0]["meta_default"] for n, t in b]
    assert len(plain) > 10 and [n for n, _ in got] == [n for n, _ in plain]
    for (n, t), (_, ref) in zip(got, plain):
        assert t.device.type == "cpu", n
        assert torch.equal(t, ref), n
