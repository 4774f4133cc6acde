"""RMSNorm for the local (non-Transformer-Engine) layer spec, with sequence parallelism.

megatron-core's local spec falls back to ``WrappedTorchNorm`` without apex, and that
refuses ``sequence_parallel=True``. This norm accepts it: under sequence parallelism each
TP rank normalises its own slice of the sequence with a replicated weight, so the
weight's gradient is a partial sum; tagging the weight ``sequence_parallel=True`` makes
megatron-core's ``finalize_model_grads`` all-reduce it over the TP group, exactly as it
does for Transformer Engine's norms.

The arithmetic is Hugging Face's (Qwen2/Qwen3/Llama ``RMSNorm``): normalise in fp32,
cast back to the input dtype, then scale by the weight, so a converted model gives HF's
numbers.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.Module):
    """``y = weight * (x / sqrt(mean(x^2) + eps))``, SP-aware (see the module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        **unused: object,
    ) -> None:
        super().__init__()
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "TransformerConfig.layernorm_zero_centered_gamma=True is not supported by "
                "megatron_alp.models.norms.RMSNorm (expected False)"
            )
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device="cpu")
            if config.use_cpu_initialization
            else torch.ones(hidden_size, dtype=config.params_dtype, device=torch.cuda.current_device())
        )
        # Read by finalize_model_grads: all-reduce this weight's grad over TP under SP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
