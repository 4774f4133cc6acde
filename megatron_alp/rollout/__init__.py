"""Rollout engines (the protocol, the embedded ``local`` engine, the ``vllm`` fleet) and
multi-turn tool-use rollouts over any of them."""

from megatron_alp.rollout import fleet, local, vllm_engine  # noqa: F401  (register engines)
from megatron_alp.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingParams,
    available_engines,
    create_engine,
    engine_can_sleep,
    register_engine,
)
from megatron_alp.rollout.local import LocalEngine
from megatron_alp.rollout.multiturn import (
    MultiTurnConfig,
    Trajectory,
    multiturn_metrics,
    run_multiturn,
)

__all__ = [
    "Completion",
    "LocalEngine",
    "MultiTurnConfig",
    "RolloutEngine",
    "SamplingParams",
    "Trajectory",
    "available_engines",
    "create_engine",
    "engine_can_sleep",
    "multiturn_metrics",
    "register_engine",
    "run_multiturn",
]
