"""Per-layer mismatch attribution (``--rl-mismatch-by-layer-interval N``).

Every N RL steps, on the step's own tokens (prompt + response, up to ``MAX_ROWS``
samples), the relative divergence of each decoder layer's output hidden states between

* the **engine's numerics**: the HF model built exactly as :class:`LocalEngine` builds its
  model for ``--rl-rollout-dtype`` (BF16; FP8 = BF16 with the W8A8 emulation of
  ``megatron_alp/rollout/fp8.py``; FP32), and
* the **trainer's FP32 forward**: the same HF architecture in FP32,

both loaded with the trainer's current FP32 weights (an FP32 export of the policy, so the
weights the engine would receive and the trainer's own are the same tensor before
rounding; the generation lag plays no part). With the local engine this is the engine's
forward exactly. With vLLM (or a fleet) it is a stand-in: the trainer-side HF forward in
the engine's dtype, not vLLM's kernels. The Megatron forward's own kernel differences
from HF FP32 are not part of it (``rollout_corr/*`` with FP32 rollouts measures those).

Metric: ``mismatch/layer_NN = ||h_engine - h_fp32||_F / ||h_fp32||_F`` over the real
(non-padding) tokens of layer NN's output (NN from 00, the first decoder layer), logged
beside ``alp/sigma/layer_NN``. ``mismatch/logits`` is the same for the final logits.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["MAX_ROWS", "LayerMismatchProbe", "layer_divergence"]

MAX_ROWS = 8
_ENGINE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp8": "fp8"}


def _decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers (a decoder-only HF model is expected)")
    return layers


@torch.no_grad()
def _hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each decoder layer's output (FP32, by forward hooks) and the logits."""
    outs: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        outs.append(h.detach().float())

    handles = [layer.register_forward_hook(hook) for layer in _decoder_layers(model)]
    try:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def layer_divergence(engine_model: Any, ref_model: Any, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``mismatch/layer_NN`` and ``mismatch/logits`` of ``engine_model`` against
    ``ref_model`` on the right-padded batch ``ids`` (``mask`` 1 on real tokens)."""
    he, le = _hidden(engine_model, ids, mask)
    hr, lr = _hidden(ref_model, ids, mask)
    m = mask.bool()
    out = {}
    for k, (a, b) in enumerate(zip(he, hr, strict=True)):
        a, b = a[m], b[m]
        out[f"mismatch/layer_{k:02d}"] = float((a - b).norm() / b.norm().clamp(min=1e-30))
    a, b = le[m], lr[m]
    out["mismatch/logits"] = float((a - b).norm() / b.norm().clamp(min=1e-30))
    return out


class LayerMismatchProbe:
    """The two HF models of the module docstring, kept between measurements (rank 0)."""

    def __init__(self, hf_config: Any, rollout_dtype: str) -> None:
        from megatron_alp.rollout import LocalEngine

        self.rollout_dtype = rollout_dtype
        self.ref = LocalEngine(hf_config, dtype="float32")
        self.eng = LocalEngine(hf_config, dtype=_ENGINE_DTYPE[rollout_dtype])

    def load(self, buckets: list[list[tuple[str, torch.Tensor]]]) -> None:
        """The trainer's FP32 weights (HF names) into both models (each rounds to its dtype)."""
        self.ref.update_weights(iter(buckets))
        self.eng.update_weights(iter(buckets))

    def measure(self, rows: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, float]:
        """Divergences on up to ``MAX_ROWS`` token rows (right-padded together)."""
        rows = [list(r) for r in rows[:MAX_ROWS] if len(r)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1
        return layer_divergence(self.eng.model, self.ref.model, ids, mask)


def measure_in_trainer(trainer: Any, samples: Sequence[Any]) -> dict[str, float]:
    """One measurement inside the RL loop (collective: every rank exports the FP32 weights;
    rank 0 measures and returns the metrics, the other ranks return ``{}``)."""
    from megatron_alp.convert.live_export import export_hf_buckets

    rank0 = trainer.rank == 0
    buckets = []
    for bucket in export_hf_buckets(trainer.policy.model, trainer.hf_config, dtype=torch.float32):
        if rank0:  # a real copy: the stream's buffer is overwritten by the next bucket
            buckets.append([(n, t.detach().to("cpu", copy=True)) for n, t in bucket])
    if not rank0:
        return {}
    if getattr(trainer, "layer_probe", None) is None:
        trainer.layer_probe = LayerMismatchProbe(trainer.hf_config, trainer.cfg.run.rollout_dtype)
    trainer.layer_probe.load(buckets)
    # one completion per prompt group first, so a few rows cover several prompts
    order = sorted(range(len(samples)), key=lambda k: (k % max(trainer.cfg.run.group_size, 1), k))
    rows = [list(samples[k].prompt_ids) + list(samples[k].response_ids) for k in order[:MAX_ROWS]]
    return trainer.layer_probe.measure(rows)
