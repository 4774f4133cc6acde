"""Skip rules and helpers shared by the GPU tier (``python -m pytest tests/gpu``)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if CUDA else 0

needs_cuda = pytest.mark.skipif(
    not CUDA,
    reason="tests/gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
    "(run `python -m pytest tests/gpu -v` on a 1-2 GPU machine; see tests/gpu/README.md)",
)
needs_two_gpus = pytest.mark.skipif(
    N_GPUS < 2, reason=f"needs 2 CUDA GPUs (one per rank, NCCL); this machine has {N_GPUS}"
)


def needs_te() -> None:
    """Skip the calling test unless Transformer Engine works here (the TE layer spec)."""
    from megatron_alp.models import te_available

    if not te_available():
        pytest.skip("needs a working Transformer Engine (pip install --no-build-isolation -e '.[gpu]'; "
                    "docs/gpu.md, Transformer Engine)")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place between two bf16 tensors of one sign."""
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    return (ia - ib).abs()
