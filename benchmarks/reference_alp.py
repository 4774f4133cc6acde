"""The paper's reference ALP injection, rebuilt as a Megatron ``perturbation`` slot for benchmarks.

``benchmarks/alp_overhead.py`` compares this repo's ALP with what the reference
implementation (amazon-science/adaptive-layerwise-perturbation, verl + FSDP; facts as
recorded in the project's REFERENCE.md, "ALP in the reference implementation", checked
against the reference's ``{single,multi}-turn/verl/trainer/perturb_transformer/patch_qwen2.py``
and ``multi-turn/verl/workers/actor/dp_actor.py``) does per decoder layer. Written from
those facts, not copied. What the reference does:

* **Where and what**: on the decoder layer's input hidden states, before
  ``input_layernorm``, ``h <- h + exp(log_coef_l) * eps``, one scalar ``log_coef`` per
  layer (a Parameter when learnable, else a buffer), ``eps ~ N(0, I)`` over the whole
  activation.
* **Generator and seeding**: before every micro-batch forward of the update the actor sets
  ``seed = counter * 100003 + global_rank`` on every layer (``counter`` counts those
  forwards: REFERENCE.md's "step"); the layer then builds a *fresh* ``torch.Generator`` on
  the activation's device, seeds it with ``seed + layer_idx`` (0-based) and draws
  ``torch.randn(h.shape, dtype=h.dtype, generator=g)`` — the noise is drawn directly in
  the activation dtype.
* **Learnable sigma, multi-turn patch** (variant ``reference``, the one REFERENCE.md calls
  the injection "wrapped in activation checkpointing so the noise is not stored"): the
  injection runs inside ``torch.utils.checkpoint.checkpoint(inject, h, log_coef, seed_t,
  use_reentrant=False)``, ``seed_t`` an int64 tensor of the seed; ``inject`` reads the
  seed back with ``.item()`` (a device-to-host sync on GPU), casts
  ``exp(log_coef)`` to ``h.dtype``, draws the noise and returns ``h + coef * noise``. It
  also copies the first 4 noise values to the host on every call (a fingerprint to check
  that the recompute re-drew the same noise; unconditional in the reference, so it is
  kept here). **Recompute**: the backward re-runs ``inject``, which builds a new
  generator and seeds it again from the saved ``seed_t``: the noise is re-drawn
  identically. Nothing resets generator state — there is no state to reset: the generator
  is local and re-seeded on every call; checkpoint's ``preserve_rng_state`` (which only
  covers the global CPU/CUDA generators) plays no part. The non-reentrant checkpoint keeps
  its inputs alive for the recompute, so ``h`` (the unperturbed layer input) stays saved
  instead of the noise.
* **Learnable sigma, single-turn patch** (variant ``reference-st``, the patch that
  "forgot" the checkpoint): the noise is drawn under ``no_grad`` the same way and
  ``h + exp(log_coef) * noise`` runs under autograd, so the multiply saves the noise for
  ``d loss / d log_coef``. That patch does not cast ``exp(log_coef)``, but keeps
  ``log_coef`` in the model's dtype, so the product is in ``h``'s dtype anyway; here
  sigma is fp32 (as this repo's), so it is cast to ``h.dtype`` to keep the layer's dtype.
* **Fixed sigma** (both patches): no checkpoint; ``coef * noise`` needs no grad, so
  nothing is saved.

Not reproduced, because REFERENCE.md and this benchmark do not cover them: the
reference's whole-layer gradient checkpointing (its scripts turn on
``enable_gradient_checkpointing``, which recomputes every layer, plain or not; this
benchmark runs every variant without layer recompute), FSDP mixed precision and the dtype
``log_coef`` is stored in (here fp32, as this repo's sigma).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from megatron_alp.perturbation.context import current_coords
from megatron_alp.perturbation.layer import LayerPerturbation

__all__ = [
    "REFERENCE_SEED_STRIDE",
    "ReferencePerturbation",
    "ReferenceSTPerturbation",
    "reference_inject",
    "reference_micro_batch_seed",
    "reference_noise",
    "set_reference_seed",
]

REFERENCE_SEED_STRIDE = 100003
"""``seed = counter * 100003 + global_rank`` (the reference's per-micro-batch seed)."""


def reference_micro_batch_seed(counter: int, global_rank: int = 0) -> int:
    """The seed the reference sets on every layer before micro-batch forward number ``counter``."""
    return counter * REFERENCE_SEED_STRIDE + global_rank


def reference_noise(h: torch.Tensor, seed: int) -> torch.Tensor:
    """``N(0, I)`` like ``h`` (its dtype and device) from a fresh generator seeded ``seed``."""
    gen = torch.Generator(device=h.device)
    gen.manual_seed(int(seed))
    return torch.randn(h.shape, dtype=h.dtype, device=h.device, generator=gen)


def reference_inject(h: torch.Tensor, log_sigma: torch.Tensor, seed_t: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """The multi-turn patch's checkpointed ``inject``: ``h + exp(log_sigma).to(h.dtype) * eps``.

    ``seed_t`` is the per-micro-batch seed as an int64 tensor; the generator gets
    ``seed + layer_idx``. Runs again, identically, in the checkpoint's recompute.
    """
    coef = log_sigma.exp().to(h.dtype)
    noise = reference_noise(h, int(seed_t.item()) + layer_idx)
    # The reference's per-call fingerprint: 4 values copied to the host (a sync on GPU).
    noise.flatten()[:4].detach().float().cpu().tolist()
    return h + coef * noise


class ReferencePerturbation(LayerPerturbation):
    """The reference's injection (multi-turn patch): per-layer seeded generator, checkpointed when learnable.

    Gated like :class:`LayerPerturbation` (only inside ``perturbed()``) so that every
    variant of the benchmark is switched on the same way; the noise itself ignores the
    context's coordinates and follows the reference's seed (:func:`set_reference_seed`).
    """

    noise_seed: int = 0
    """Set before each micro-batch forward (:func:`set_reference_seed`), as the reference's actor does."""

    @property
    def layer_idx(self) -> int:
        """0-based layer index (the reference's ``layer_idx``; Megatron numbers from 1)."""
        return self.layer_number - 1

    def _on(self) -> bool:
        return self.active and current_coords() is not None

    def forward(self, hidden_states: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
        if not self._on():
            return hidden_states
        log_sigma = self.log_sigma
        if log_sigma.requires_grad:
            seed_t = torch.tensor(self.noise_seed, dtype=torch.int64, device=hidden_states.device)
            return checkpoint(
                reference_inject, hidden_states, log_sigma, seed_t, self.layer_idx, use_reentrant=False
            )
        coef = log_sigma.exp().to(hidden_states.dtype)
        return hidden_states + coef * reference_noise(hidden_states, self.noise_seed + self.layer_idx)


class ReferenceSTPerturbation(ReferencePerturbation):
    """The single-turn patch: same generator and seeds, no checkpoint (the noise is saved for backward)."""

    def forward(self, hidden_states: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
        if not self._on():
            return hidden_states
        with torch.no_grad():
            noise = reference_noise(hidden_states, self.noise_seed + self.layer_idx)
        return hidden_states + self.log_sigma.exp().to(hidden_states.dtype) * noise


def set_reference_seed(model: torch.nn.Module, seed: int) -> int:
    """Set ``seed`` on every reference perturbation of ``model``; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, ReferencePerturbation):
            m.noise_seed = int(seed)
            n += 1
    return n
