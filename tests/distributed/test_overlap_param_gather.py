"""The distributed optimizer's overlapped weight all-gather (issue 18.11).

With ``overlap_param_gather`` (on by default with the distributed optimizer on CUDA) the
optimizer step leaves each data-parallel rank with only its own shard of the new weights;
the all-gather runs from the next forward's pre-hooks, overlapping it. On 2 gloo ranks
(DP=2): three optimizer steps with it on give the same losses as with it off (the
forwards see gathered weights), the weights right after the last step are stale on
some rank (what the weight export would have sent), and after ``Policy.sync_params`` /
``schedule.sync_params`` they equal the synchronous run's bit for bit.
"""

from __future__ import annotations

import torch

from megatron_alp.launch import RankGroup


def body() -> dict:
    import torch.distributed as dist
    from megatron.core.optimizer import OptimizerConfig

    from megatron_alp import parallel
    from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
    from megatron_alp.models.sharding import load_full_state
    from megatron_alp.models.tiny import tiny_batches, tiny_hf_config
    from megatron_alp.schedule import sync_params, wrap_ddp
    from tests.layouts import canonical_state, cross_entropy_loss
    from megatron_alp.train.policy import make_optimizer, optimizer_step

    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = canonical_state(hf, seed=1)
    out = {}
    for overlap in (False, True):
        with parallel.model_parallel(parallel.ParallelConfig()) as info:
            tc = transformer_config(args, parallel.ParallelConfig())
            chunks = build_model(args, tc)
            load_full_state(chunks, full)
            model = wrap_ddp(chunks, tc, use_distributed_optimizer=True, overlap_grad_reduce=False,
                             overlap_param_gather=overlap)
            opt = make_optimizer(model, OptimizerConfig(
                optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0,
                use_distributed_optimizer=True, overlap_param_gather=overlap))
            losses = []
            for step in range(3):
                batches = tiny_batches(2, seed=10 * step + info.dp_rank)
                stats, _, _ = optimizer_step(model, opt, batches, cross_entropy_loss([]))
                losses.append([float(s["loss"]) for s in stats])
            before = torch.cat([p.detach().flatten().clone() for p in model[0].module.parameters()])
            sync_params(model)
            after = torch.cat([p.detach().flatten().clone() for p in model[0].module.parameters()])
            out["overlap" if overlap else "sync"] = dict(losses=losses, before=before, after=after)
        dist.barrier()
    return out


def test_overlapped_param_gather_same_numbers_after_sync_params():
    with RankGroup(2, timeout_s=600, start_timeout_s=300) as group:
        per_rank = group.run(body)
    stale = False
    for r in per_rank:
        ref, got = r["sync"], r["overlap"]
        assert got["losses"] == ref["losses"]  # the forwards saw the gathered weights
        assert torch.equal(ref["before"], ref["after"])  # synchronous: gathered in the step
        assert torch.equal(got["after"], ref["after"])  # bit for bit after sync_params
        stale |= not torch.equal(got["before"], ref["after"])
    assert stale  # without sync_params the export would have read the old weights
