"""The trainer's engine side: start the rollout engine, generate, and push weights to it.

A mixin of :class:`~megatron_alp.train.loop.Trainer` (one concern per file): rank 0 holds
the engine (in-process, or the client of a fleet), every rank takes part in the weight
export. With ``--rl-async-mode`` other than ``off`` rank 0 also holds the asynchronous
rollout source (``async_rollouts.py``), and a sync is an in-flight update: the source is
told before (scheduled modes wait for the work due under the old version) and after.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import torch

from megatron_alp import parallel, platform
from megatron_alp.rollout import SamplingParams, create_engine
from megatron_alp.train.rollouts import Sample, encode_prompts, generate, generate_multiturn, pass_at_k
from megatron_alp.train.signals import StepInterrupted

__all__ = ["EngineLink"]


class EngineLink:
    """Engine start-up, generation (training and evaluation) and weight sync of the
    :class:`Trainer` (a mixin)."""

    def start_engine(self) -> None:
        if self.rank != 0:
            return
        from transformers import AutoTokenizer

        run = self.cfg.run
        self.tokenizer = AutoTokenizer.from_pretrained(str(run.hf_model))
        self.prompt_ids = encode_prompts(
            self.tokenizer, self.dataset.prompts, max_length=run.max_prompt_length,
            source=f"--rl-prompt-data {run.prompt_data}",
        )
        self.eval_ids = (
            encode_prompts(self.tokenizer, self.eval_set.prompts, max_length=run.max_prompt_length,
                           source=f"--rl-eval-data {run.eval_data}")
            if self.eval_set is not None else None
        )
        dtype = {"fp32": "float32", "fp8": "fp8"}.get(run.rollout_dtype, "bfloat16")
        kwargs: dict[str, Any] = dict(model=str(run.hf_model), dtype=dtype, **run.engine_kwargs)
        if run.rollout_engine == "local":
            kwargs["device"] = str(platform.device())
        self.engine = create_engine(run.rollout_engine, **kwargs)
        if run.verify_weights_swap and not (
            hasattr(self.engine, "verify_weights") or hasattr(self.engine, "model")
        ):
            raise ValueError(
                f"--rl-verify-model-weights-swap: the {run.rollout_engine!r} engine cannot report "
                "its weights for the check; drop the flag or use --rl-rollout-engine local"
            )
        eos = self.tokenizer.eos_token_id
        self.stop_ids = (eos,) if eos is not None else ()
        if run.max_turns > 1:
            self._start_sandbox()
        if run.async_cfg.enabled:
            self._make_async_source()

    def _make_async_source(self) -> None:
        """Rank 0's asynchronous rollout source (``--rl-async-mode``); it starts
        generating at :meth:`start_async`, once the engines hold the policy."""
        from megatron_alp.rewards import get_reward
        from megatron_alp.train.async_rollouts import AsyncRollouts

        run = self.cfg.run

        def make_sampling(max_new_tokens: int, seed: int) -> SamplingParams:
            return SamplingParams(
                temperature=run.temperature, top_p=run.top_p, top_k=run.top_k,
                max_new_tokens=max_new_tokens, n=1, seed=seed, stop_token_ids=self.stop_ids,
            )

        self.source = AsyncRollouts(
            run.async_cfg, engine=self.engine, tokenizer=self.tokenizer, prompt_ids=self.prompt_ids,
            answers=self.dataset.answers, reward_fn=get_reward(run.reward), sampler=self.sampler,
            make_sampling=make_sampling, group_size=run.group_size, prompts_per_step=run.prompts_per_step,
            max_new_tokens=run.max_new_tokens, seed=self.cfg.seed,
            sandbox=self.sandbox, multiturn=getattr(self, "multiturn", None) if self.sandbox is not None else None,
        )
        if self.async_state is not None:
            self.source.load_state_dict(self.async_state)

    def start_async(self) -> None:
        """The engines hold policy version ``step``: asynchronous generation starts."""
        if self.source is not None:
            self.source.start(self.step)
        self.async_started = self.cfg.run.async_cfg.enabled

    def _start_sandbox(self) -> None:
        from megatron_alp.rollout import MultiTurnConfig
        from megatron_alp.sandbox import SandboxLimits, SandboxPool, sandbox_client

        run = self.cfg.run
        if run.sandbox == "local":
            limits = SandboxLimits(timeout_s=run.sandbox_timeout_s, memory_mb=run.sandbox_memory_mb)
            self.sandbox = SandboxPool(max_concurrency=run.sandbox_concurrency, limits=limits)
        else:
            self.sandbox = sandbox_client(run.sandbox, max_concurrency=run.sandbox_concurrency)
            self.sandbox.health()  # fail at start, not at the first tool call
        # --rl-max-new-tokens bounds the whole trajectory's response, so it fits --seq-length
        self.multiturn = MultiTurnConfig(max_turns=run.max_turns, max_response_tokens=run.max_new_tokens)

    def _generate(self, prompt_ids, rows, answers, sampling, reward_fn) -> list[Sample]:
        """Single-turn :func:`generate`, or multi-turn trajectories with ``--rl-max-turns > 1``."""
        if self.sandbox is None:
            return generate(self.engine, self.tokenizer, prompt_ids, rows, answers, sampling, reward_fn)
        samples, self.rollout_metrics = generate_multiturn(
            self.engine, self.tokenizer, prompt_ids, rows, answers, sampling, reward_fn,
            self.sandbox, self.multiturn,
        )
        return samples

    def _engine_sleep(self, timing: dict[str, float]) -> None:
        """A colocated engine gives its GPU memory back for the update (``--rl-engine-sleep-level``);
        the next weight sync wakes it (weights first, then its KV cache)."""
        level = self.cfg.run.engine_sleep_level
        if self.rank == 0 and level:
            t0 = time.perf_counter()
            self.engine.sleep(level)
            timing["engine_sleep"] = time.perf_counter() - t0

    def _export_stream(self):
        """The HF-named weight stream in the engine's dtype (collective: every rank drains it).

        One buffer serves every bucket (``ExportBuffers``): a bucket's tensors are
        overwritten by the next bucket, so every consumer here copies or sends a bucket
        before asking for the next one (the engines' ``update_weights``, ``_export``).
        """
        from megatron_alp.convert.live_export import ExportBuffers, export_hf_buckets

        dtype = torch.float32 if self.cfg.run.rollout_dtype == "fp32" else torch.bfloat16
        if platform.device().type == "cpu":
            # Kept from sync to sync: fresh pages cost a first touch on every export.
            if self.export_buffers is None:
                self.export_buffers = ExportBuffers()
            buffers = self.export_buffers
        else:
            # One sync only: the caching allocator makes the next allocation free, and a
            # held buffer would be memory the training step cannot use.
            buffers = ExportBuffers()
        return export_hf_buckets(self.policy.model, self.hf_config, dtype=dtype, buffers=buffers)

    def _export(self) -> list[list[tuple[str, torch.Tensor]]] | None:
        """Every rank runs the export; rank 0 gets the buckets (copied, engine dtype)."""
        buckets = []
        for bucket in self._export_stream():
            if self.rank == 0:
                # a real copy: the stream's buffer is overwritten by the next bucket
                buckets.append([(n, t.detach().to("cpu", copy=True)) for n, t in bucket])
        return buckets if self.rank == 0 else None

    def _load_engine(self, buckets) -> None:
        if self.rank != 0:
            return
        self.engine.update_weights(iter(buckets))
        if self.cfg.run.verify_weights_swap:
            verify = getattr(self.engine, "verify_weights", None)
            if verify is not None:  # engines that can compare on their side (the fleet)
                verify(iter(buckets))
                return
            params = dict(self.engine.model.named_parameters())
            for bucket in buckets:
                for name, t in bucket:
                    if not torch.equal(params[name].detach().cpu(), t.to(params[name].dtype)):
                        raise RuntimeError(
                            f"--rl-verify-model-weights-swap: the engine's {name} differs from the "
                            "weights sent"
                        )

    def sync_weights(self) -> None:
        """Push the current policy (or the one K updates old) to the engine.

        Without a lag the export streams straight into the engine (bucket by bucket, no
        copy kept); with ``--rl-generation-lag K`` rank 0 keeps the last K + 1 exports.
        """
        live = self.cfg.run.async_cfg.enabled and self.async_started
        if live:  # an in-flight update: generation goes on meanwhile
            t0 = time.perf_counter()
            if self.source is not None:
                self.source.before_sync()  # scheduled modes: the old version's work is done
            parallel.wait_for_rank(0)  # the others waited off the collective's watchdog
            self.sync_wait_s = time.perf_counter() - t0
        self._push_weights()
        if live and self.source is not None:
            self.source.after_sync(self.step)

    def _push_weights(self) -> None:
        run = self.cfg.run
        if run.generation_lag == 0 and not run.verify_weights_swap:
            stream = self._export_stream()
            if self.rank == 0:
                self.engine.update_weights(stream)
            for _ in stream:  # drain: every rank takes part in each bucket's collectives
                pass
            return
        buckets = self._export()
        if self.rank != 0:
            return
        self.lagged.append(buckets)
        while len(self.lagged) > run.generation_lag + 1:
            self.lagged.popleft()
        self._load_engine(self.lagged[0])

    def _sampling(self, n: int, seed: int) -> SamplingParams:
        run = self.cfg.run
        return SamplingParams(
            temperature=run.temperature, top_p=run.top_p, top_k=run.top_k,
            max_new_tokens=run.max_new_tokens, n=n, seed=seed, stop_token_ids=self.stop_ids,
        )

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        out: dict[str, float] = {}
        samples = None
        if self.rank == 0:
            from megatron_alp.rewards import get_reward

            run = self.cfg.run
            lagged = bool(self.cfg.run.generation_lag) and len(self.lagged) > 1
            if lagged:  # evaluate the current policy, not the engine's lagged copy
                self._load_engine(self.lagged[-1])
            t0 = time.perf_counter()
            n = run.eval_samples
            rows = list(range(len(self.eval_set)))
            try:
                with self.stop.interruptible():
                    samples = self._generate(
                        self.eval_ids, rows, self.eval_set.answers, self._sampling(n, 12345),
                        get_reward(run.reward),
                    )
            except StepInterrupted:
                # the step is complete: run() saves it; rank 0 still reaches wait_for_rank
                # below, where the other ranks wait for it
                self.interrupted_in = f"the evaluation after step {self.step}: skipped"
                samples = None
            if lagged:
                self._load_engine(self.lagged[0])
        if self.rank == 0 and samples is not None:
            name = Path(self.eval_set.path).stem
            correct = collections.Counter()
            for s in samples:
                correct[s.prompt_index] += s.reward >= 1.0
            out[f"val/{name}/mean@{n}"] = sum(s.reward for s in samples) / len(samples)
            k = 1
            while k <= n:
                out[f"val/{name}/pass@{k}"] = sum(pass_at_k(n, correct[r], k) for r in rows) / len(rows)
                k *= 2
            out["timing_s/eval"] = time.perf_counter() - t0
        parallel.wait_for_rank(0)  # rank 0 evaluated alone; the next collective waits for it here
        return out
