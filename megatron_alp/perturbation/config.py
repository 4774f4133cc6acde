"""``ALPConfig``: what Adaptive Layerwise Perturbation does to the model, validated at construction."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["ALPConfig", "NOISE_KERNELS", "PLACEMENTS"]

PLACEMENTS = ("hidden", "logits")
NOISE_KERNELS = ("auto", "torch", "compile", "triton")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ALPConfig:
    """Adaptive Layerwise Perturbation: ``h_l <- h_l + sigma_l * eps`` in the policy-update forward.

    The noise is applied only inside :func:`megatron_alp.perturbation.perturbed`; this
    config says *where* and *how much*. Layer numbers are Megatron's global, 0-based
    layer indices (``layer_number - 1``), whatever the pipeline layout.
    """

    enabled: bool = True
    """False: :func:`with_alp` returns the layer spec unchanged (no sigma, no hook)."""
    init_std: float = 1e-2
    """sigma_0: the initial noise scale of every perturbed layer (``log_sigma = log(init_std)``).
    Must be > 0 when ``learnable`` (sigma lives in log space); 0 is allowed for a fixed
    sigma and switches the perturbation off exactly."""
    learnable: bool = True
    """sigma is a Parameter (own optimizer group); else a fixed buffer (still checkpointed)."""
    lr: float = 1e-2
    """Peak learning rate of the sigma group (Megatron's scheduler shape, constant by default)."""
    min_lr: float | None = None
    """Floor of the sigma group's LR under a decaying schedule; None: equal to ``lr``."""
    weight_decay: float = 0.0
    """Weight decay of the sigma group, explicit (the reference silently inherited 0.01)."""
    layer_start: int = 0
    """First perturbed layer (global, 0-based, inclusive)."""
    layer_end: int | None = None
    """One past the last perturbed layer (exclusive); None: the number of layers."""
    placement: str = "hidden"
    """``"hidden"``: input hidden states of every layer in range, before ``input_layernorm``
    (the residual stream carries the noise). ``"logits"``: the paper's logits-only
    ablation: only the final hidden states (the last layer's output, which the final
    norm and LM head turn into logits) are perturbed; the layer range must be the default."""
    seed: int = 0
    """Seed of the ``"alp-noise"`` RNG-tracker state the per-step run key is drawn from."""
    kernel: str = "auto"
    """Noise implementation: ``"torch"`` (eager reference), ``"compile"`` (the same function
    under ``torch.compile``), ``"triton"`` (fused CUDA kernel), ``"auto"`` (triton on CUDA
    when importable, else torch). All compute the same counters."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"ALPConfig.enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.learnable, bool):
            raise ValueError(f"ALPConfig.learnable must be a bool, got {self.learnable!r}")
        std = self.init_std
        if not _is_real(std) or not math.isfinite(std) or std < 0:
            raise ValueError(
                f"ALPConfig.init_std={std!r} is invalid; allowed: a finite float > 0 "
                "(or 0 with learnable=False)"
            )
        if std == 0 and self.learnable:
            raise ValueError(
                "ALPConfig.init_std=0 is invalid with learnable=True: sigma is learned in log "
                "space; allowed: init_std > 0, or learnable=False to switch the noise off"
            )
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ALPConfig.{name}={value!r} is invalid; allowed: a finite float >= 0")
        if self.min_lr is not None:
            if not _is_real(self.min_lr) or not 0 <= self.min_lr <= self.lr:
                raise ValueError(
                    f"ALPConfig.min_lr={self.min_lr!r} is invalid; allowed: None or a float in "
                    f"[0, lr={self.lr}]"
                )
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"ALPConfig.placement={self.placement!r} is unknown; allowed: {', '.join(PLACEMENTS)}"
            )
        if self.kernel not in NOISE_KERNELS:
            raise ValueError(
                f"ALPConfig.kernel={self.kernel!r} is unknown; allowed: {', '.join(NOISE_KERNELS)}"
            )
        if not isinstance(self.layer_start, int) or isinstance(self.layer_start, bool) or self.layer_start < 0:
            raise ValueError(
                f"ALPConfig.layer_start={self.layer_start!r} is invalid; allowed: an integer >= 0"
            )
        if self.layer_end is not None and (
            not isinstance(self.layer_end, int)
            or isinstance(self.layer_end, bool)
            or self.layer_end < self.layer_start
        ):
            raise ValueError(
                f"ALPConfig.layer_end={self.layer_end!r} is invalid; allowed: None or an integer "
                f">= layer_start={self.layer_start}"
            )
        if self.placement == "logits" and (self.layer_start != 0 or self.layer_end is not None):
            raise ValueError(
                f"ALPConfig.placement='logits' perturbs the final hidden states only; the layer "
                f"range [{self.layer_start}, {self.layer_end}) must be left at its default "
                "(layer_start=0, layer_end=None)"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            raise ValueError(f"ALPConfig.seed={self.seed!r} is invalid; allowed: an integer in [0, 2**31)")

    def validate_for_model(self, num_layers: int) -> None:
        """Check the layer range against a model of ``num_layers`` layers (ValueError otherwise)."""
        if not self.enabled:
            return
        if self.layer_start >= num_layers:
            raise ValueError(
                f"ALPConfig.layer_start={self.layer_start} is outside [0, num_layers={num_layers})"
            )
        if self.layer_end is not None and self.layer_end > num_layers:
            raise ValueError(
                f"ALPConfig.layer_end={self.layer_end} is outside [0, num_layers={num_layers}] "
                "(exclusive end)"
            )

    def perturbs_layer(self, layer: int, num_layers: int) -> bool:
        """Whether global 0-based ``layer`` of an ``num_layers``-layer model carries noise."""
        if not self.enabled or (self.init_std == 0 and not self.learnable):
            return False
        if self.placement == "logits":
            return layer == num_layers - 1
        end = num_layers if self.layer_end is None else self.layer_end
        return self.layer_start <= layer < end
