"""Rank bodies for the asynchronous-rollout tests (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any


def versions_body(argv: list[str], world_size: int) -> Any:
    """Run the trainer and keep, on every rank, the policy's weights of every version it
    pushed (its own shard), and on rank 0 the samples each step took with the version
    of every token. Then recompute every step's tokens under each recorded version with
    the trainer's own log-prob pass and return, on rank 0: the history, the samples by
    step, and per token (step, sample, position, version, engine log-prob, trainer
    log-prob under that version)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.loop import Trainer, run

    cfg = parse_args(argv, world_size=world_size)
    weights: dict[int, list[torch.Tensor]] = {}
    taken: list[tuple[int, list]] = []
    trainers: list[Trainer] = []
    orig_init, orig_sync, orig_take = Trainer.__init__, Trainer.sync_weights, Trainer._rollouts_taken
    orig_step = Trainer.train_step
    result: dict = {}

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        trainers.append(self)

    def sync(self):
        weights[self.step] = [p.detach().clone() for c in self.policy.model for p in c.parameters()]
        return orig_sync(self)

    def take(self):
        samples = orig_take(self)
        taken.append((self.step, [dataclasses.replace(s) for s in samples]))
        return samples

    def step(self):
        metrics = orig_step(self)
        if self.step == cfg.train_iters:  # the last sync is done; the groups are still up
            result.update(_recompute(self, cfg, weights, taken))
        return metrics

    Trainer.__init__, Trainer.sync_weights, Trainer._rollouts_taken = init, sync, take
    Trainer.train_step = step
    try:
        out = run(cfg)
    finally:
        Trainer.__init__, Trainer.sync_weights, Trainer._rollouts_taken = orig_init, orig_sync, orig_take
        Trainer.train_step = orig_step
    if dist.get_rank() != 0:
        return None
    return dict(history=out["history"], **result)


def _recompute(tr, cfg, weights, taken) -> dict:
    """Every taken token's engine log-prob and the trainer's under its recorded version
    (collective: the log-prob pass under each version's weights)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from megatron_alp.train.batches import step_tensors

    box = [taken if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    taken = box[0]
    flat = [s for _, ss in taken for s in ss]
    st = step_tensors(flat, multiple=tr.multiple)
    # the versions laid out as the log-probs are (step_tensors places rollout_logp per token)
    vt = step_tensors([dataclasses.replace(s, rollout_logp=[float(v) for v in s.versions]) for s in flat],
                      multiple=tr.multiple).rollout_logp
    mbs = cfg.micro_batch_size
    chunks = [tuple(range(k, min(k + mbs, len(flat)))) for k in range(0, len(flat), mbs)]
    if len(chunks[-1]) < mbs:  # whole micro-batches: pad with the first rows
        chunks[-1] = chunks[-1] + tuple(range(mbs - len(chunks[-1])))
    params = [p for c in tr.policy.model for p in c.parameters()]
    recomputed: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for v in sorted(weights):
            for p, w in zip(params, weights[v]):
                p.data.copy_(w)
            lp = torch.zeros_like(st.rollout_logp)
            for c, o in zip(chunks, tr.policy.logprob_pass([tr._micro(st, c, {}, 0) for c in chunks])):
                lp[torch.tensor(c)] = o["logp"].float().cpu()
            recomputed[v] = lp
    if dist.get_rank() != 0:
        return {}
    rows = []
    owner = {}
    k = 0
    for step, ss in taken:
        for s in ss:
            owner[k] = step
            k += 1
    mask = st.loss_mask > 0
    for n, pos in mask.nonzero().tolist():
        v = int(vt[n, pos])
        rows.append((owner[n], n, pos, v, float(st.rollout_logp[n, pos]), float(recomputed[v][n, pos])))
    return dict(taken=taken, tokens=rows, versions=sorted(weights))
