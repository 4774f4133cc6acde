"""Isolated execution of untrusted Python (bubblewrap + rlimits), see ``docs/sandbox.md``.

Two faces over one core (:mod:`~megatron_alp.sandbox.isolation`): the in-process
:class:`SandboxPool`, and the HTTP service ``python -m megatron_alp.sandbox.serve`` with
its :class:`SandboxClient`. Both offer ``run(code) -> SandboxResult`` and
``run_batch(codes) -> list[SandboxResult]``.
"""

from megatron_alp.sandbox.client import SandboxClient, SandboxClientGroup, sandbox_client
from megatron_alp.sandbox.isolation import find_bwrap
from megatron_alp.sandbox.pool import SandboxPool
from megatron_alp.sandbox.types import SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = [
    "SandboxClient",
    "SandboxClientGroup",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailable",
    "find_bwrap",
    "sandbox_client",
]
