"""The RL loop: one step = rollouts -> rewards -> advantages -> log-prob pass -> updates -> sync.

    rollouts from the source          synchronous: prompts from the seeded sampler (every
                                      rank draws the same indices), generated on the
                                      engine now, rank 0 (``--grpo-group-size`` per
                                      prompt); asynchronous (``--rl-async-mode``): the
                                      next batch of rank 0's buffer, generated while
                                      earlier steps trained (``async_rollouts.py``)
    -> rewards, advantages            registry reward; GRPO (default) per prompt group
    -> log-prob pass                  forward only, never perturbed: old log-probs (the
                                      preset's denominator / IS weights) and the
                                      engine-vs-trainer mismatch metrics; reference pass
                                      for the KL penalty
    -> --grpo-iterations x mini-batches of --global-batch-size
                                      one Megatron optimizer step each; ALP noise on in the
                                      update forward only; globally normalised loss
    -> weight sync                    HF-named buckets -> engine (K steps old under
                                      --rl-generation-lag K; in flight, while the
                                      engines generate, under --rl-async-mode)
    -> metrics, eval, checkpoint, exit checks (agreed by every rank)

``Trainer.train_step`` runs these as phases (``rollouts``, ``_logprob_phase``,
``_update_phase``, ``_sync_phase``, ``_step_metrics``); the engine side (start-up,
generation, weight export and sync) is ``engine_link.py``. Everything here is collective:
every rank runs the same sequence of calls.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_alp import parallel, platform
from megatron_alp.data import PromptDataset, PromptSampler
from megatron_alp.perturbation import alp_metrics, perturbed, step_key
from megatron_alp.rl.losses import compute_policy_loss, effective_loss_mask, global_loss_counts
from megatron_alp.rl.metrics import MismatchMetrics
from megatron_alp.train import checkpoint as ckpt
from megatron_alp.train.engine_link import EngineLink
from megatron_alp.train.batches import (
    StepTensors,
    local_sample_ids,
    plan_minibatches,
    scatter_step_tensors,
    step_tensors,
)
from megatron_alp.train.logging import RunLogger, progress_line, say_layer_spec, summary_table
from megatron_alp.train.policy import Policy
from megatron_alp.train.signals import ExitSignal, StepInterrupted
from megatron_alp.train.sync_host import share_sync_host
from megatron_alp.train.rollouts import Sample, add_advantages

__all__ = ["run"]


_INTERRUPTED = "interrupted"  # rank 0's rollouts were cut short by a saving signal


def _agree(flag: bool) -> bool:
    """True on every rank if it is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast(obj: Any, src: int = 0) -> Any:
    # `src` may have worked alone until now (rollouts): the others wait off the NCCL watchdog
    parallel.wait_for_rank(src)
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _metrics_owner() -> int:
    """Global rank of (last pipeline stage, TP rank 0, DP rank 0): it holds the loss metrics."""
    from megatron.core import parallel_state as ps

    flags = torch.zeros(dist.get_world_size(), device=platform.device())
    me = (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
    flags[dist.get_rank()] = 1.0 if me else 0.0
    dist.all_reduce(flags)
    return int(torch.nonzero(flags)[0].item())


class Trainer(EngineLink):
    """State of one run on one rank; :func:`run` drives it."""

    def __init__(self, cfg: Any, stop: ExitSignal | None = None) -> None:
        from transformers import AutoConfig

        self.cfg = cfg
        self.stop = stop if stop is not None else ExitSignal(False)
        self.interrupted_in: str | None = None  # the phase a saving signal cut short
        self.rank = dist.get_rank()
        self.hf_config = AutoConfig.from_pretrained(str(cfg.run.hf_model))
        self.policy = Policy(cfg, self.hf_config, with_reference=cfg.loss.needs_ref_logp)
        self.dataset = PromptDataset.from_file(cfg.run.prompt_data)
        self.sampler = PromptSampler(len(self.dataset), cfg.seed)
        self.eval_set = PromptDataset.from_file(cfg.run.eval_data) if cfg.run.eval_data else None
        self.step = 0
        self.opt_step = 0
        self.lagged: collections.deque = collections.deque()
        self.export_buffers = None  # the weight export's buffers, kept between syncs on the CPU
        self.engine = None
        self.tokenizer = None
        self.sandbox = None  # multi-turn only (rank 0): SandboxPool or SandboxClient
        self.rollout_metrics: dict[str, float] = {}
        self.wandb_id = None
        self.source = None  # rank 0 under --rl-async-mode: the asynchronous rollout source
        self.async_state = None  # its checkpointed state, until the source exists
        self.async_started = False
        self.async_metrics: dict[str, float] = {}
        self.sync_wait_s = 0.0
        self.idle_meter = None  # the engines' idle fraction (a synchronous fleet run)
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dp_group = ps.get_data_parallel_group()
        # host tensors, host group: the loss counts are reduced without touching the GPU
        self.dp_group_host = ps.get_data_parallel_group_gloo() if parallel.has_gloo_groups() else self.dp_group
        self.is_last = ps.is_pipeline_last_stage()
        self.multiple = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
        self.metrics_owner = _metrics_owner()

    # ------------------------------------------------------------------ one step
    def rollouts(self, timing: dict[str, float]) -> tuple[list[Sample] | None, StepTensors | None, int, int]:
        """The step's samples from the rollout source — rank 0 generates them now
        (synchronous) or takes them from the asynchronous buffer (``--rl-async-mode``);
        every rank learns the step's ``(N, S)``. Returns the samples and their ``[N, S]``
        tensors on rank 0 (None elsewhere), N and S."""
        run = self.cfg.run
        self._sampler_before = self.sampler.state_dict()  # a dropped step draws its prompts again
        rows = self.sampler.next(run.prompts_per_step) if self.source is None and not run.async_cfg.enabled else None
        samples = st = None
        shape = None
        if self.rank == 0:
            t0 = time.perf_counter()
            try:
                with self.stop.interruptible():
                    samples = self._rollouts_now(rows) if self.source is None else self._rollouts_taken()
                    add_advantages(samples, run.advantage_estimator)
            except StepInterrupted:
                samples = _INTERRUPTED
            timing["gen"] = time.perf_counter() - t0
            if not (isinstance(samples, str) and samples == _INTERRUPTED):
                st = step_tensors(samples, multiple=self.multiple)
                shape = tuple(st.tokens.shape)
            else:
                shape = _INTERRUPTED
        shape = _broadcast(shape)
        if isinstance(shape, str) and shape == _INTERRUPTED:
            self._drop_step("rollouts")
        N, S = shape
        return samples, st, N, S

    def _rollouts_now(self, rows: list[int]) -> list[Sample]:
        """The synchronous source: generate the step's groups on the engine now."""
        from megatron_alp.rewards import get_reward

        run = self.cfg.run
        seed = (self.cfg.seed * 1_000_003 + self.step) % (2**31)
        return self._generate(self.prompt_ids, rows, self.dataset.answers,
                              self._sampling(run.group_size, seed), get_reward(run.reward))

    def _rollouts_taken(self) -> list[Sample]:
        """The asynchronous source: the next batch from the buffer (waits until it is full);
        its ``async/*`` metrics join the step's."""
        samples, self.async_metrics = self.source.take(self.step)
        return samples

    def _local_step_tensors(self, st: StepTensors | None, N: int, S: int) -> StepTensors:
        """``[N, S]`` step tensors holding this DP rank's rows (the others stay 0): rank 0
        sends each replica its own rows as tensors (``scatter_step_tensors``), not a
        pickled copy of every sample to every rank."""
        cfg = self.cfg
        rows_by_dp = [
            local_sample_ids(plan_minibatches(
                N, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
                dp_size=cfg.data_parallel_size, dp_rank=d, seed=cfg.seed, step=self.step,
            ))
            for d in range(cfg.data_parallel_size)
        ]
        mine = scatter_step_tensors(st, (N, S), rows_by_dp, device=platform.device())
        if st is not None:
            return st  # rank 0 has every row already
        idx = torch.tensor(rows_by_dp[self.ps.get_data_parallel_rank()], dtype=torch.long)
        full = StepTensors(
            tokens=torch.zeros((N, S), dtype=torch.long), labels=torch.zeros((N, S), dtype=torch.long),
            loss_mask=torch.zeros((N, S)), rollout_logp=torch.zeros((N, S)),
            advantages=torch.zeros(N), position_ids=torch.zeros((N, S), dtype=torch.long),
        )
        for f in dataclasses.fields(StepTensors):
            getattr(full, f.name)[idx] = getattr(mine, f.name)
        return full

    def _drop_step(self, phase: str) -> None:
        """A saving signal arrived before the update: forget this step (its prompts are
        drawn again after resume) and let :func:`run` save the last completed one."""
        if not self.cfg.run.async_cfg.enabled:  # (asynchronous: the buffer keeps its groups)
            self.sampler.load_state_dict(self._sampler_before)
        self.interrupted_in = (f"{phase} of step {self.step + 1}: that step is dropped (its prompts "
                               "are drawn again on resume)")
        raise StepInterrupted(phase)

    def _signalled(self) -> bool:
        """True on every rank once any rank got a saving signal (a collective; only with
        ``--exit-signal-handler``)."""
        return self.stop.enabled and _agree(self.stop.received)

    def _micro(self, st, ids: tuple[int, ...], extra: dict[str, torch.Tensor], offset: int) -> dict:
        """One micro-batch on the host: the schedule moves it to the device (asynchronous
        copies, ``schedule.batch_to_device``); ``sample_offset`` is a Python int, which
        ALP's ``perturbed()`` takes without reading a device tensor (no host sync)."""
        idx = torch.tensor(ids, dtype=torch.long)
        b: dict[str, Any] = {
            "tokens": st.tokens[idx], "labels": st.labels[idx], "loss_mask": st.loss_mask[idx],
            "position_ids": st.position_ids[idx], "rollout_logp": st.rollout_logp[idx],
            "advantages": st.advantages[idx], "sample_offset": int(offset),
        }
        for k, v in extra.items():
            b[k] = v[idx]
        return b


    def train_step(self) -> dict[str, float]:
        """One RL step in phases: rollouts from the source -> log-prob pass -> updates ->
        weight sync -> metrics (collective; the metrics are complete on rank 0)."""
        cfg = self.cfg
        timing: dict[str, float] = {}
        t_step = time.perf_counter()
        self.async_metrics, self.sync_wait_s = {}, 0.0
        samples, st, N, S = self.rollouts(timing)
        self._engine_sleep(timing)
        st = self._local_step_tensors(st, N, S)
        plan = plan_minibatches(
            N, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
            dp_size=cfg.data_parallel_size, dp_rank=self.ps.get_data_parallel_rank(), seed=cfg.seed,
            step=self.step,
        )
        extra, metrics = self._logprob_phase(st, local_sample_ids(plan), N, S, timing)
        self._update_phase(st, plan, extra, metrics, timing)
        layer_mm = self._sync_phase(samples, timing)
        return self._step_metrics(samples, metrics, layer_mm, timing, t_step)

    def _logprob_phase(self, st: StepTensors, local: list[int], N: int, S: int,
                       timing: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Unperturbed forward: old log-probs (and the reference's), entropy, and the
        engine-vs-trainer mismatch. Returns the update's extra inputs and the metrics."""
        loss_cfg, mbs = self.cfg.loss, self.cfg.micro_batch_size
        t0 = time.perf_counter()
        chunks = [tuple(local[k : k + mbs]) for k in range(0, len(local), mbs)]
        passes = self.policy.logprob_pass([self._micro(st, c, {}, 0) for c in chunks], with_entropy=True)
        old = torch.zeros((N, S))
        ent = torch.zeros((N, S))
        mismatch = MismatchMetrics(None)
        for c, out in zip(chunks, passes):
            idx = torch.tensor(c)
            old[idx] = out["logp"].float().cpu()
            ent[idx] = out["entropy"].float().cpu()
            mismatch.update(logp=old[idx], rollout_logp=st.rollout_logp[idx], mask=st.loss_mask[idx])
        extra = {"old_logp": old}
        if loss_cfg.needs_ref_logp:
            ref_out = self.policy.logprob_pass([self._micro(st, c, {}, 0) for c in chunks], reference=True)
            ref = torch.zeros((N, S))
            for c, out in zip(chunks, ref_out):
                ref[torch.tensor(c)] = out["logp"].float().cpu()
            extra["ref_logp"] = ref
        timing["old_log_prob"] = time.perf_counter() - t0
        if self._signalled():
            self._drop_step("the log-prob pass")
        metrics: dict[str, float] = {}
        if self.is_last:
            metrics.update(mismatch.compute(dp_group=self.dp_group, device=platform.device()))
            m = st.loss_mask[torch.tensor(local)] if local else st.loss_mask[:0]
            e = (ent[torch.tensor(local)] * m).sum() if local else torch.zeros(())
            tot = torch.stack([e.double(), m.sum().double()]).to(platform.device())
            dist.all_reduce(tot, group=self.dp_group)
            metrics["actor/entropy"] = float(tot[0] / tot[1].clamp(min=1))

        return extra, metrics

    def _update_phase(self, st: StepTensors, plan: list, extra: dict[str, torch.Tensor],
                      metrics: dict[str, float], timing: dict[str, float]) -> None:
        """``--grpo-iterations`` x mini-batches: one optimizer step each (ALP noise in the
        update forward only); the loss metrics go into ``metrics`` on the last stage."""
        cfg, run, loss_cfg = self.cfg, self.cfg.run, self.cfg.loss
        t0 = time.perf_counter()
        # the ratio as the loss sees it (the KL / entropy terms do not change it)
        ratio_metrics = MismatchMetrics(dataclasses.replace(loss_cfg, kl_coef=0.0, entropy_coef=0.0))
        # Summed on the device; read on the host once, after the last update (a read per
        # mini-batch would wait for each optimizer step).
        sums_t: dict[str, torch.Tensor] = {}
        grad_norms, lrs = [], []
        first_kl = None
        # every optimizer step's ALP key drawn now, while the device is idle (the same
        # sequence as drawing each before its step; a draw reads a device tensor)
        alp_keys = iter([step_key(cfg.alp) for _ in range(run.iterations * len(plan))] if cfg.alp.enabled else [])
        n_planned = run.iterations * len(plan)
        for it in range(run.iterations):
            if self.interrupted_in is not None:
                break
            for mb in plan:
                if grad_norms and self._signalled():  # the step ends after this mini-batch
                    self.interrupted_in = (f"the update of step {self.step + 1}: it ends after "
                                           f"{len(grad_norms)} of its {n_planned} mini-batches")
                    break
                batches = [self._micro(st, ids, extra, off) for ids, off in zip(mb.micro, mb.offsets)]
                loss_fn, mb_sums = self._minibatch_loss(batches, ratio_metrics)
                ctx = None
                if cfg.alp.enabled:
                    key = next(alp_keys)
                    ctx = lambda b, _k=key, _s=self.opt_step: perturbed(  # noqa: E731
                        key=_k, step=_s, sample_offset=b["sample_offset"]
                    )
                _, upd = self.policy.update(batches, loss_fn, forward_context=ctx)
                self.opt_step += 1
                grad_norms.append(upd["grad_norm"])
                lrs.append(upd["lr"])
                if self.is_last:
                    keys = sorted(mb_sums)
                    vec = torch.stack([torch.as_tensor(mb_sums[k], dtype=torch.float64) for k in keys]).to(platform.device()) if keys else None
                    if vec is not None:
                        dist.all_reduce(vec, group=self.dp_group)
                        for k, v in zip(keys, vec):
                            sums_t[k] = sums_t[k] + v if k in sums_t else v
                        if first_kl is None:
                            first_kl = vec[keys.index("actor/ppo_kl")]
        sums = dict(zip(sums_t, torch.stack(list(sums_t.values())).tolist())) if sums_t else {}
        first_kl = float(first_kl) if first_kl is not None else None
        n_updates = len(grad_norms)
        self.policy.sync_params()  # the last step's weights, before anything reads them
        timing["update_actor"] = time.perf_counter() - t0
        if self.is_last:
            rm = ratio_metrics.compute(dp_group=self.dp_group, device=platform.device())
            metrics.update({k: v for k, v in rm.items() if k.startswith(("is_ratio/", "policy/clip_frac"))})
            for k in ("rollout_corr/is_weight_mean", "rollout_corr/is_weight_std", "rollout_corr/is_weight_min",
                      "rollout_corr/is_weight_max", "rollout_corr/is_truncated_fraction",
                      "rollout_corr/is_masked_fraction", "rollout_corr/is_seq_masked_fraction",
                      "rollout_corr/is_veto_fraction"):
                if k in rm:
                    metrics[k] = rm[k]
            for k, v in sums.items():
                metrics[k] = v / n_updates
            metrics["actor/ppo_kl_first_minibatch"] = first_kl if first_kl is not None else float("nan")
        metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/lr"] = lrs[-1]
        metrics.update(alp_metrics(self.policy.model))

    def _minibatch_loss(self, batches: list[dict], ratio_metrics: MismatchMetrics) -> tuple[Any, dict]:
        """The loss of one mini-batch, normalised by its global token / sequence counts
        (all DP ranks), and the dict its micro-batches' pg-loss / KL / loss sums go into."""
        loss_cfg = self.cfg.loss
        counts = (0, 0)
        if self.is_last:
            masks = [
                effective_loss_mask(
                    loss_cfg, b["loss_mask"], rollout_logp=b["rollout_logp"],
                    old_logp=b["old_logp"], advantages=b["advantages"], ref_logp=b.get("ref_logp"),
                )
                for b in batches
            ]
            counts = global_loss_counts(masks, dp_group=self.dp_group_host)
        mb_sums: dict[str, torch.Tensor] = {}

        def loss_fn(lp, entropy, b, _counts=counts, _sums=mb_sums):
            loss, stats = compute_policy_loss(
                loss_cfg, lp, b["old_logp"], b["rollout_logp"], b["advantages"], b["loss_mask"],
                ref_logp=b.get("ref_logp"), entropy=entropy,
                global_token_count=_counts[0], global_seq_count=_counts[1],
            )
            mask = b["loss_mask"]
            den = b["rollout_logp"] if loss_cfg.denominator == "rollout" else b["old_logp"]
            kl = ((den - lp.detach()) * mask).sum() / max(_counts[0], 1)
            ratio_metrics.update(
                logp=lp.detach(), rollout_logp=b["rollout_logp"], mask=mask,
                old_logp=b["old_logp"], advantages=b["advantages"],
            )
            for k, v in (("actor/pg_loss", stats["policy/pg_loss"]), ("actor/ppo_kl", kl),
                         ("actor/loss", loss.detach())):
                _sums[k] = _sums.get(k, 0.0) + v.double()
            if "policy/kl_ref" in stats:
                _sums["actor/kl_loss"] = _sums.get("actor/kl_loss", 0.0) + stats["policy/kl_ref"].double()
            return loss, {}

        return loss_fn, mb_sums

    def _sync_phase(self, samples: list[Sample] | None, timing: dict[str, float]) -> dict[str, float]:
        """The step is done: push the weights (in flight under ``--rl-async-mode``) and, every
        ``--rl-mismatch-by-layer-interval`` steps, measure the layers' mismatch."""
        run = self.cfg.run
        t0 = time.perf_counter()
        self.step += 1
        if self.interrupted_in is None or run.generation_lag:  # lag: keep the saved chain whole
            self.sync_weights()
        timing["update_weights"] = time.perf_counter() - t0
        layer_mm = {}
        if run.mismatch_by_layer_interval and self.step % run.mismatch_by_layer_interval == 0:
            from megatron_alp.train.layer_mismatch import measure_in_trainer

            t0 = time.perf_counter()
            layer_mm = measure_in_trainer(self, samples)  # collective; rank 0 gets the metrics
            timing["mismatch_by_layer"] = time.perf_counter() - t0
        return layer_mm

    def _step_metrics(self, samples: list[Sample] | None, metrics: dict[str, float],
                      layer_mm: dict[str, float], timing: dict[str, float], t_step: float) -> dict[str, float]:
        """The step's metrics, complete on rank 0: the loss metrics from their owner, then
        rewards, lengths, rollout and asynchronous-rollout metrics, timings."""
        # the loss metrics live on the last stage; everything else is the same on every rank
        metrics = _broadcast(metrics if self.rank == self.metrics_owner else None, src=self.metrics_owner)
        if self.rank == 0:
            rewards = [s.reward for s in samples]
            lens = [len(s.response_ids) for s in samples]
            metrics["critic/score/mean"] = sum(rewards) / len(rewards)
            metrics["critic/score/max"] = max(rewards)
            metrics["critic/score/min"] = min(rewards)
            metrics["critic/advantages/mean"] = sum(s.advantage for s in samples) / len(samples)
            metrics["response_length/mean"] = sum(lens) / len(lens)
            metrics["response_length/max"] = float(max(lens))
            metrics["response_length/clip_ratio"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
            metrics["data/epoch"] = float(self.sampler.epoch)
            metrics.update(self.rollout_metrics)  # multiturn/* (empty when single-turn)
            metrics.update(layer_mm)  # mismatch/layer_NN (--rl-mismatch-by-layer-interval)
            # identifies the sampled tokens (layout-invariance and resume checks)
            metrics["rollout/checksum"] = float(sum(
                (k + 1) * sum((j + 1) * (t + 1) for j, t in enumerate(s.response_ids))
                for k, s in enumerate(samples)
            ) % 1_000_000_007)
        timing["step"] = time.perf_counter() - t_step
        if self.rank == 0 and self.cfg.run.rollout_engine == "fleet":
            metrics.update(self.async_metrics)  # async/*: staleness, buffer (async modes)
            # waiting for rollouts (synchronous: all of generation) and for the sync's gate
            metrics["async/trainer_idle_frac"] = (timing.get("gen", 0.0) + self.sync_wait_s) / timing["step"]
            if self.source is None:
                if self.idle_meter is None:
                    from megatron_alp.train.async_rollouts import IdleMeter

                    self.idle_meter = IdleMeter(self.engine)
                else:
                    metrics["async/engine_idle_frac"] = self.idle_meter.idle_fraction()
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        return metrics

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        from megatron_alp.train.arguments import config_json

        return {
            "step": self.step,
            "opt_step": self.opt_step,
            "sampler": self.sampler.state_dict(),
            "engine_weights_saved": bool(self.cfg.run.generation_lag),
            # the buffer's groups and the requests in flight (rank 0, --rl-async-mode)
            "async": self.source.state_dict() if self.source is not None else None,
            "wandb_id": self.wandb_id,
            "config": config_json(self.cfg),
        }

    def engine_weights(self) -> list | None:
        """What the checkpoint keeps for the engine: the lagged weights (rank 0, lag > 0)."""
        return list(self.lagged) if self.rank == 0 and self.cfg.run.generation_lag else None

    def restore(self, state: dict[str, Any], folder: Path) -> bool:
        """Resume from a checkpoint's trainer state; True if the engine's lagged weights
        were saved (rank 0 reads them; the other ranks never hold them)."""
        self.step = int(state["step"])
        self.opt_step = int(state["opt_step"])
        self.sampler.load_state_dict(state["sampler"])
        self.wandb_id = state.get("wandb_id")
        self.async_state = state.get("async") if self.cfg.run.async_cfg.enabled else None
        saved = bool(state.get("engine_weights_saved"))
        if saved and self.rank == 0:
            self.lagged = collections.deque(torch.load(folder / ckpt.ENGINE_WEIGHTS, weights_only=False))
        return saved


def run(cfg: Any) -> dict[str, Any]:
    """Run the RL loop for ``cfg`` (torch.distributed must be up); collective over all ranks."""
    from megatron_alp.train.arguments import config_json

    t_start = time.time()
    stop = ExitSignal(cfg.exit_signal_handler)
    with parallel.model_parallel(cfg.parallel):
        rank = dist.get_rank()
        say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
        say(f"[train] building the policy ({cfg.loss_preset}, ALP {'on' if cfg.alp.enabled else 'off'}) ...")
        say_layer_spec(rank)
        tr = Trainer(cfg, stop)
        resumed = None
        engine_weights_restored = False
        if cfg.save is not None and rank == 0:
            removed = ckpt.clean_stale(cfg.save)
            for p in removed:
                say(f"[train] removed the temporary folder of an interrupted checkpoint: {p}")
        if cfg.load is not None:
            found = ckpt.find_checkpoint(cfg.load, required=False)
            if found is not None:
                folder, _ = found
                state = ckpt.load_checkpoint(
                    folder, tr.policy, finetune=cfg.finetune, load_optim=not cfg.no_load_optim,
                    load_rng=not cfg.no_load_rng,
                )
                if state is not None:
                    engine_weights_restored = tr.restore(state, folder)
                    resumed = tr.step
                say(f"[train] loaded {folder}" + (f" (resuming after step {tr.step})" if state else " (weights only)"))
        if share_sync_host(cfg.run.engine_kwargs) is not None:  # the fleet's weight-sync host
            say(f"[train] weight-sync host (rank 0's): {cfg.run.engine_kwargs['sync_host']}")
        tr.start_engine()
        if rank == 0:
            from megatron_alp.rundir import claim_run_dir

            claim_run_dir(Path(cfg.run.run_dir))
        logger = RunLogger(cfg, active=rank == 0, resume_step=tr.step, wandb_id=tr.wandb_id)
        tr.wandb_id = logger.wandb_id
        if rank == 0:
            Path(cfg.run.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run.run_dir) / "config.json").write_text(config_json(cfg) + "\n")
        parallel.wait_for_rank(0)  # engine start-up (up to 15 min) ran on rank 0 alone
        # The engine starts from the policy's weights (before the first rollout too); on
        # resume under lag it gets the checkpoint's lagged copy.
        if engine_weights_restored:
            if rank == 0:
                tr._load_engine(tr.lagged[0])
        else:
            tr.sync_weights()
        tr.start_async()  # --rl-async-mode: generation starts under the weights just pushed
        last_saved = tr.step if resumed is not None else None
        exit_reason = "done"
        while tr.step < cfg.train_iters:
            try:
                metrics = tr.train_step()
            except StepInterrupted:  # every rank: a saving signal before this step's update
                exit_reason = "signal"
                break
            if (cfg.run.eval_interval and tr.step % cfg.run.eval_interval == 0) or tr.step == cfg.train_iters:
                metrics.update(tr.evaluate())
            logger.log(tr.step, metrics)
            logger.say(progress_line(tr.step, cfg.train_iters, metrics))
            if cfg.save is not None and cfg.save_interval and tr.step % cfg.save_interval == 0:
                ckpt.save_checkpoint(cfg.save, tr.step, tr.policy, tr.trainer_state(), tr.engine_weights())
                last_saved = tr.step
                logger.say(f"[train] saved {ckpt.iter_dir(cfg.save, tr.step)}")
            if _agree(stop.received):
                exit_reason = "signal"
                break
            if cfg.exit_interval and tr.step % cfg.exit_interval == 0:
                exit_reason = "exit-interval"
                break
            if cfg.exit_duration_in_mins and _agree((time.time() - t_start) / 60 > cfg.exit_duration_in_mins):
                exit_reason = "exit-duration"
                break
        signame = stop.name or "a saving signal (to another rank)"
        if tr.interrupted_in is not None:
            logger.say(f"[train] {signame} during {tr.interrupted_in}")
        if cfg.save is not None and last_saved != tr.step:
            ckpt.save_checkpoint(cfg.save, tr.step, tr.policy, tr.trainer_state(), tr.engine_weights())
            logger.say(f"[train] saved {ckpt.iter_dir(cfg.save, tr.step)}")
        if exit_reason == "signal" and cfg.save is not None:
            logger.say(f"[train] {signame} to saved checkpoint: {stop.since():.1f} s (under torchrun "
                       "this must fit its --shutdown-timeout, default 30 s; docs/train.md, Signals)")
        if exit_reason != "done":
            logger.say(f"[train] stopped after step {tr.step} ({exit_reason}); resume with --load {cfg.save}")
        logger.say(summary_table(logger.history, time.time() - t_start))
        history = list(logger.history)
        logger.close()
        if tr.source is not None:
            tr.source.close()
        if rank == 0 and tr.engine is not None:
            tr.engine.close()
        if tr.sandbox is not None:
            tr.sandbox.close()
        return {"history": history, "exit_reason": exit_reason, "step": tr.step}
