"""Rollout engines: the protocol, the embedded ``local`` engine and the ``vllm`` fleet."""

from megatron_alp.rollout import fleet, local, vllm_engine  # noqa: F401  (register engines)
from megatron_alp.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingParams,
    available_engines,
    create_engine,
    register_engine,
)
from megatron_alp.rollout.local import LocalEngine

__all__ = [
    "Completion",
    "LocalEngine",
    "RolloutEngine",
    "SamplingParams",
    "available_engines",
    "create_engine",
    "register_engine",
]
