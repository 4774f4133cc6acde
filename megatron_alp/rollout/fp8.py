"""FP8 rollout numerics for the local engine (``--rl-rollout-dtype fp8``), emulated.

What is emulated, stated exactly:

* every ``nn.Linear`` of the decoder (attention q/k/v/o, MLP gate/up/down) runs "W8A8"
  FP8: its weight is quantised to ``float8_e4m3fn`` with one scale per output channel
  (``amax / 448`` over the input dimension), its input activations are quantised to
  e4m3 with one scale per token (``amax / 448`` over the hidden dimension, computed on
  the fly), both are dequantised (``q * scale``) and the product runs in the engine's
  BF16 compute (bias added in BF16);
* the rounding is torch's real ``float8_e4m3fn`` cast (round to nearest even, saturating
  here at +-448 because the scale maps the amax onto 448);
* embeddings, norms, rotary, attention softmax and the LM head stay BF16 (vLLM's FP8
  linear method does not quantise the embedding or the LM head either).

What is not emulated: the FP8 GEMM's own accumulation order (an H100 kernel accumulates
the FP8 x FP8 products in FP32 and scales once; here the dequantised BF16 operands go
through torch's BF16 matmul), and vLLM's scale granularity: its online
``quantization="fp8"`` uses one weight scale per tensor (vLLM 0.32 maps it to
``fp8_per_tensor``: ``vllm/model_executor/model_loader/weight_utils.py``,
``get_quant_config``) where this uses per-channel / per-token ones. The emulation therefore shows FP8-sized rounding of
weights and activations, not bit-exact vLLM FP8 output.

The model keeps its BF16 weights as the parameters (weight updates copy into them as
before); the quantised copy of each weight is cached and rebuilt after
:func:`drop_fp8_cache` (``LocalEngine.weights_loaded``, called at the end of every weight
update: a receive into ``p.data`` does not bump the parameter's version counter) or when
the parameter is replaced.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["E4M3_MAX", "FP8EmulatedLinear", "drop_fp8_cache", "fp8_quantize", "quantize_linears"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def fp8_quantize(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 values and scales, one scale per slice along every axis but ``dim``.

    Returns ``(q, scale)`` with ``q`` in ``torch.float8_e4m3fn`` and ``scale`` in FP32
    (keepdim shape), such that ``q.float() * scale`` approximates ``x``. An all-zero slice
    gets scale 1 (its values stay 0).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fake_quant(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    q, scale = fp8_quantize(x, dim)
    return (q.float() * scale).to(dtype)


class FP8EmulatedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is the W8A8 FP8 emulation of the module docstring.

    Made by changing an existing module's class (:func:`quantize_linears`), so its
    parameters, their names and ``state_dict`` are the plain ``nn.Linear``'s.
    """

    def _dequantised_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight.dtype)
        cached = self.__dict__.get("_fp8_cache")
        if cached is None or cached[0] != key:
            w = _fake_quant(self.weight.detach(), dim=1, dtype=self.weight.dtype)  # per out-channel
            cached = (key, w)
            self.__dict__["_fp8_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dequantised_weight()
        xq = _fake_quant(x, dim=-1, dtype=w.dtype)  # per token
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(xq, w, bias)


def quantize_linears(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Switch every ``nn.Linear`` of ``model`` (but those named in ``skip``) to
    :class:`FP8EmulatedLinear` in place; returns the switched modules' names."""
    done = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            mod.__class__ = FP8EmulatedLinear
            done.append(name)
    return done


def drop_fp8_cache(model: nn.Module) -> None:
    """Forget every cached quantised weight of ``model`` (call after its weights change)."""
    for mod in model.modules():
        mod.__dict__.pop("_fp8_cache", None)
