"""HF -> Megatron dist checkpoint -> GPTModel under TP1 / TP2 / PP2 / TP2xPP2 / PP2xVPP2:
logits equal HF transformers' (fp32, 1e-4). And Megatron -> HF from a checkpoint that
megatron-core itself saved at TP2 x PP2 from an ALP model, with optimizer-like entries.

One group of 4 gloo ranks serves every test; one call per architecture sweeps all
layouts (TP=1 runs with DP=4, ...). The converted checkpoint is loaded with the plain
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` into a model whose
parameters were set to NaN first, so a tensor the load missed cannot go unnoticed.
"""

import functools
import queue
import zlib
from pathlib import Path

import pytest
import torch

from megatron_alp import parallel
from megatron_alp.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_alp.convert.io_utils import load_hf_config
from megatron_alp.convert.load import load_megatron_checkpoint, sharded_state_dict_of
from megatron_alp.convert.verify import compare_logits, forward_logits, hf_reference_logits
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import iter_named_local_params
from megatron_alp.parallel import ParallelConfig
from megatron_alp.launch import RankGroup
from megatron_alp.models.tiny import tiny_hf_config

LAYOUTS = {
    "tp1": ParallelConfig(),
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "tp2_pp2": ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "pp2_vpp2": ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2
    ),
}
ARCHS = {
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "llama_tied": dict(model_type="llama", tie=True),
}


def random_hf_model(folder: Path, *, model_type: str, tie: bool = False, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny HF model with every weight random (norms around 1, biases non-zero)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(model_type, tie=tie, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(folder)
    return folder


def tokens_for(vocab: int = 250, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


# -- rank bodies (module-level: pickled by reference) ---------------------------------
def _build(args, layout, **kw):
    return build_model(args, transformer_config(args, layout), **kw)


def load_and_forward(ckpt: str, layout: ParallelConfig, tokens: torch.Tensor):
    """Plain megatron-core load into NaN-filled params, then the logits."""
    from megatron.core import dist_checkpointing

    args = gpt_args_from_hf(load_hf_config(Path(ckpt) / "hf"))
    with parallel.model_parallel(layout):
        chunks = _build(args, layout)
        with torch.no_grad():
            for c in chunks:
                for p in c.parameters():
                    p.fill_(float("nan"))
        loaded = dist_checkpointing.load(sharded_state_dict_of(chunks), ckpt)
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=True)
        for c in chunks:
            for n, p in c.named_parameters():
                assert not torch.isnan(p).any(), f"{n} was not loaded"
        return forward_logits(chunks, tokens)


def load_into_alp_model(ckpt: str, tokens: torch.Tensor):
    """An ALP model loads an HF-converted checkpoint (no sigma in it) via the helper."""
    from megatron_alp.perturbation import ALPConfig, with_alp

    args = gpt_args_from_hf(load_hf_config(Path(ckpt) / "hf"))
    layout = LAYOUTS["tp2_pp2"]
    with parallel.model_parallel(layout):
        chunks = _build(args, layout, layer_spec_transform=functools.partial(
            with_alp, cfg=ALPConfig(init_std=0.02)))
        skipped = load_megatron_checkpoint(chunks, ckpt)
        return skipped, forward_logits(chunks, tokens)


def sweep(ckpt: str, tokens: torch.Tensor, layouts: list[str]) -> dict:
    out = {name: load_and_forward(ckpt, LAYOUTS[name], tokens) for name in layouts}
    out["alp"] = load_into_alp_model(ckpt, tokens)
    return out


def save_trained_with_alp(hf_dir: str, ckpt: str, tokens: torch.Tensor):
    """An ALP model at TP2 x PP2 with random weights (replicas consistent), saved by
    megatron-core with an optimizer-like extra key; returns its logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_alp.perturbation import ALPConfig, with_alp

    args = gpt_args_from_hf(load_hf_config(hf_dir))
    layout = LAYOUTS["tp2_pp2"]
    with parallel.model_parallel(layout) as info:
        chunks = _build(args, layout, layer_spec_transform=functools.partial(
            with_alp, cfg=ALPConfig(init_std=0.02)))
        with torch.no_grad():
            for name, p in iter_named_local_params(chunks):
                split = getattr(p, "tensor_model_parallel", False)
                seed = zlib.crc32(name.encode()) + (7919 * info.tp_rank if split else 0)
                g = torch.Generator().manual_seed(seed)
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name else 0.0))
        sd = sharded_state_dict_of(chunks)
        # What a training checkpoint adds beside the model (ignored by the converter).
        sd["optimizer"] = {"step": ShardedTensor.from_rank_offsets(
            "optimizer.state.step", torch.ones(1), replica_id=(0, 0, torch.distributed.get_rank()))}
        if torch.distributed.get_rank() == 0:
            Path(ckpt).mkdir(parents=True)
        torch.distributed.barrier()
        # A synchronous save writes from threads of this process; megatron-core still
        # collects their results through a multiprocessing Manager queue, which would
        # start a process per rank (refused in RankGroup's daemonic ranks, and ~30 s on
        # this CPU). A thread-safe local queue does the same job for a synchronous save.
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()
        dist_checkpointing.save(sd, ckpt)
        return forward_logits(chunks, tokens)


# -- tests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group():
    with RankGroup(4, timeout_s=600) as g:
        yield g


@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_checkpoint_matches_hf_under_every_layout(group, tmp_path, arch):
    hf_dir = random_hf_model(tmp_path / "hf", **ARCHS[arch])
    ckpt = tmp_path / "mg"
    convert_hf_to_megatron(hf_dir, ckpt, progress=False)
    tokens = tokens_for()
    ref = hf_reference_logits(hf_dir, tokens)
    per_rank = group.run(sweep, str(ckpt), tokens, list(LAYOUTS))
    for layout in LAYOUTS:
        got = [r[layout] for r in per_rank if r[layout] is not None]
        assert len(got) == 1, layout  # exactly one rank holds the full logits
        assert got[0].shape[-1] == 256  # padded vocabulary (250 -> 256)
        report = compare_logits(ref, got[0])
        assert report.max_abs_diff < 1e-4, f"{arch} {layout}: {report}"
        assert report.top1_agreement == 1.0, f"{arch} {layout}: {report}"
    # ALP model: sigma is not in an HF-converted checkpoint; it keeps its init and is
    # reported; outside the perturbed() context the model is HF's.
    skipped = {n for r in per_rank for n in r["alp"][0]}
    assert skipped and all(n.endswith("alp_log_sigma") for n in skipped), skipped
    got = [r["alp"][1] for r in per_rank if r["alp"][1] is not None]
    assert compare_logits(ref, got[0]).max_abs_diff < 1e-4


def test_megatron_saved_tp2pp2_with_alp_to_hf(group, tmp_path):
    hf_dir = random_hf_model(tmp_path / "hf_cfg", model_type="qwen3")  # its config only
    ckpt = tmp_path / "trained"
    tokens = tokens_for()
    per_rank = group.run(save_trained_with_alp, str(hf_dir), str(ckpt), tokens)
    mg_logits = [r for r in per_rank if r is not None]
    assert len(mg_logits) == 1
    out = tmp_path / "hf_out"
    convert_megatron_to_hf(ckpt, out, dtype="fp32", hf_config=hf_dir, progress=False)
    ref = hf_reference_logits(out, tokens)
    report = compare_logits(ref, mg_logits[0])
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0, str(report)
