"""Gating and noise coordinates: ``with perturbed(key=..., step=..., sample_offset=...)``.

ALP layers perturb only inside :func:`perturbed`; outside it (rollout, old/ref log-probs,
evaluation) they are the identity, whatever ``module.training`` says. The trainer opens
the context around the *model call* of each micro-batch of the policy update, in its
``forward_step``::

    key = step_key(alp_cfg)                       # once per optimizer step, all ranks
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with perturbed(key=key, step=step, sample_offset=batch["sample_offset"]):
            logits = model(batch["tokens"], batch["position_ids"], None)
        ...

**Why the coordinates live in Megatron's RNG tracker.** The backward of a perturbed
layer regenerates its noise from coordinates saved in the autograd context, which is
exact under 1F1B (the backward of micro-batch i runs after the forwards of later
micro-batches). Under full activation recompute, however, Megatron's
``CheckpointFunction`` re-runs the layer's *forward* during the backward, when the
Python-side context may be another micro-batch's, or none. What Megatron does restore
around a recompute is the RNG tracker's named states (``_get_all_rng_states`` /
``_set_all_rng_states``, the mechanism that keeps dropout exact). So :func:`perturbed`
stores its coordinates as one more named entry of the tracker (``"alp-noise-coords"``, a
small int64 CPU tensor, set and removed through the tracker's public
``get_states``/``set_states``, never mutated in place). The checkpoint's snapshot then
carries them and the recompute sees exactly the coordinates of its own forward; TE's
checkpoint snapshots the same tracker. The entry exists only inside the context, so it
never reaches a saved checkpoint.

The per-step run key comes from a genuine generator state of the same tracker,
``"alp-noise"``, seeded identically on every rank from ``ALPConfig.seed`` (and saved and
restored with Megatron's RNG state in checkpoints), so all ranks draw the same key.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

__all__ = [
    "COORDS_STATE",
    "NOISE_STATE",
    "NoiseCoords",
    "current_coords",
    "perturbed",
    "step_key",
]

NOISE_STATE = "alp-noise"
COORDS_STATE = "alp-noise-coords"
# Keeps the "alp-noise" seed away from the seeds megatron-core adds for its own states
# (seed, seed + 2718 + tp_rank, seed + 1024 + ...): the tracker refuses duplicate seeds.
_SEED_OFFSET = 0x5A17_0000


@dataclasses.dataclass(frozen=True, slots=True)
class NoiseCoords:
    """The per-micro-batch coordinates of the noise (the layer adds layer and token ones)."""

    key: int
    """Run key of this optimizer step (64 bits), from :func:`step_key`."""
    step: int
    """Optimizer step (< 2**32)."""
    sample_offset: int
    """Global index of the micro-batch's first sample within the step (row b is sample
    ``sample_offset + b``); the trainer counts it across micro-batches and DP ranks."""

    def __post_init__(self) -> None:
        for name, bound in (("key", 2**64), ("step", 2**32), ("sample_offset", 2**32)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
                raise ValueError(
                    f"perturbed(): {name}={value!r} is invalid; allowed: an integer in [0, 2**"
                    f"{bound.bit_length() - 1})"
                )

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.key & 0xFFFFFFFF, self.key >> 32, self.step, self.sample_offset],
            dtype=torch.int64,
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "NoiseCoords":
        lo, hi, step, offset = (int(v) for v in t.tolist())
        return cls(key=lo | (hi << 32), step=step, sample_offset=offset)


def _tracker():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    if getattr(tracker, "is_inference_rng_tracker", False):
        raise _inference_tracker_error(tracker)
    return tracker


def _inference_tracker_error(tracker: object) -> RuntimeError:
    # Megatron's inference tracker makes add / fork / set_states no-ops: the noise
    # coordinates would never be stored (ALP silently off) and the step key would come
    # from the default generator (possibly different per rank). Refuse instead.
    return RuntimeError(
        f"ALP needs a training RNG tracker, but Megatron's RNG tracker is "
        f"{type(tracker).__name__} (inference_rng_tracker=True), whose add / fork / "
        "set_states do nothing: ALP would be silently off. Initialise the tracker with "
        "inference_rng_tracker=False for the policy update (model_parallel_cuda_manual_seed)"
    )


def _to_int(value: object, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"perturbed(): {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return int(value.item())
    return value  # type: ignore[return-value]  # validated by NoiseCoords


@contextlib.contextmanager
def perturbed(*, key: int, step: int, sample_offset: int | torch.Tensor) -> Iterator[NoiseCoords]:
    """Turn ALP on for the model calls inside the block, with these noise coordinates.

    Nested use restores the outer coordinates on exit. See the module docstring for why
    the coordinates are kept in Megatron's RNG tracker.
    """
    coords = NoiseCoords(key=key, step=_to_int(step, "step"), sample_offset=_to_int(sample_offset, "sample_offset"))
    tracker = _tracker()
    states = tracker.get_states()
    previous = states.get(COORDS_STATE)
    states[COORDS_STATE] = coords.to_tensor()
    tracker.set_states(states)
    if COORDS_STATE not in tracker.get_states():  # a tracker that ignores set_states
        raise _inference_tracker_error(tracker)
    try:
        yield coords
    finally:
        states = tracker.get_states()
        if previous is None:
            states.pop(COORDS_STATE, None)
        else:
            states[COORDS_STATE] = previous
        tracker.set_states(states)


def current_coords() -> NoiseCoords | None:
    """The coordinates of the innermost :func:`perturbed` (or of the recomputed forward's)."""
    entry = _tracker().get_states().get(COORDS_STATE)
    return None if entry is None else NoiseCoords.from_tensor(entry)


def step_key(seed: int | object) -> int:
    """Draw the run key of one optimizer step from the tracker's ``"alp-noise"`` state.

    ``seed`` is ``ALPConfig.seed`` (or an ``ALPConfig``). The state is added on first use
    (after ``model_parallel_cuda_manual_seed``, which resets the tracker) with the same
    seed on every rank, so every rank draws the same sequence of keys; it is saved with
    Megatron's RNG tracker states in checkpoints. Call it exactly once per step on every
    rank.
    """
    seed = getattr(seed, "seed", seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"step_key: seed={seed!r} is invalid; allowed: an integer >= 0")
    tracker = _tracker()
    if NOISE_STATE not in tracker.get_states():
        tracker.add(NOISE_STATE, _SEED_OFFSET + seed)
        if NOISE_STATE not in tracker.get_states():  # a tracker that ignores add
            raise _inference_tracker_error(tracker)
    from megatron_alp import platform

    # fork() swaps the state into the *current* device's generator: draw there (a draw
    # on another device would come from a generator the tracker never touched).
    with tracker.fork(NOISE_STATE):
        words = torch.randint(0, 2**32, (2,), dtype=torch.int64, device=platform.current_device())
    lo, hi = (int(w) for w in words.tolist())
    return lo | (hi << 32)
