"""The one place that sets up torch.distributed, Megatron ``parallel_state`` and seeds.

Typical use (torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)::

    info = parallel.initialize(ParallelConfig(tensor_model_parallel_size=2,
                                              pipeline_model_parallel_size=2))
    ...
    parallel.teardown()

Tests that sweep several layouts inside one group of ranks use
:func:`init_distributed` once and then ``with model_parallel(cfg): ...`` per layout.
Every configuration error is raised as a ``ValueError`` *before* any process group is
created, so a bad flag never leaves half-initialised ranks waiting on each other.

**Timeouts.** Every collective of the default group and of Megatron's groups fails after
``ParallelConfig.timeout_minutes`` (the trainer's ``--distributed-timeout-minutes``,
default 30; torch's NCCL watchdog aborts the job then). Phases where only rank 0 works
(engine start-up, generation, evaluation) may take longer: the other ranks wait for it
in :func:`wait_for_rank` on a gloo group of their own (``IDLE_TIMEOUT``, 24 h), where no
watchdog fires, and enter the next NCCL collective only when rank 0 is there too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import random
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_alp import platform

__all__ = [
    "ParallelConfig",
    "ParallelInfo",
    "DEFAULT_TIMEOUT_MINUTES",
    "IDLE_TIMEOUT",
    "destroy_model_parallel",
    "has_gloo_groups",
    "init_distributed",
    "initialize",
    "model_parallel",
    "set_seeds",
    "teardown",
    "wait_for_rank",
]

DEFAULT_TIMEOUT_MINUTES = 30.0
"""Collective timeout when ``--distributed-timeout-minutes`` is not given (Megatron's is 10)."""
IDLE_TIMEOUT = datetime.timedelta(hours=24)
"""How long :func:`wait_for_rank` waits for a rank busy on its own (rollouts, evaluation)."""
_idle_group: dist.ProcessGroup | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """How the model is split across ranks. The data-parallel size is what remains."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each weight matrix (Megatron TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages that split the layers (Megatron PP)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved 1F1B); None for no interleaving."""
    context_parallel_size: int = 1
    """Ranks that split each sequence (Megatron CP; needs Transformer Engine attention)."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP along the sequence over the TP group."""
    seed: int = 1234
    """Base seed: python/numpy/torch and Megatron's RNG tracker states derive from it."""
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    """Timeout of every collective (the default group's and Megatron's groups); see the
    module docstring for the phases where one rank works alone."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an integer >= 1, got {value!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if not isinstance(vpp, int) or vpp < 1:
                raise ValueError(
                    "ParallelConfig.virtual_pipeline_model_parallel_size must be None or an "
                    f"integer >= 1, got {vpp!r}"
                )
            if vpp > 1 and self.pipeline_model_parallel_size == 1:
                raise ValueError(
                    f"ParallelConfig.virtual_pipeline_model_parallel_size={vpp} needs "
                    "pipeline_model_parallel_size > 1"
                )
        t = self.timeout_minutes
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"ParallelConfig.timeout_minutes must be a number > 0, got {t!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "ParallelConfig.sequence_parallel=True needs tensor_model_parallel_size > 1 "
                "(sequence parallelism shards over the tensor-parallel group)"
            )

    @property
    def model_parallel_size(self) -> int:
        """TP x PP x CP: the ranks that hold one replica of the model."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` ranks; ValueError if it does not divide."""
        if world_size < 1 or world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline x context "
                f"parallel = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} x {self.context_parallel_size} = "
                f"{self.model_parallel_size}; use a world size that is a multiple of "
                f"{self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelInfo:
    """This rank's coordinates after :func:`initialize`."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> tuple[int, int]:
    """Initialise torch.distributed (and the CPU backend where CUDA is absent); idempotent.

    ``rank``/``world_size`` default to torchrun's ``RANK``/``WORLD_SIZE`` (a single
    process when unset); the rendezvous is ``MASTER_ADDR:MASTER_PORT`` (default
    127.0.0.1:29500); ``timeout_minutes`` bounds every collective of the default group.
    Returns ``(rank, world_size)``. The rank's CUDA device
    (:func:`megatron_alp.platform.device`) is made current every time, also when
    torch.distributed was already initialised by someone else.
    """
    platform.activate()
    # Before the early return: a process group set up elsewhere (a harness, a launcher)
    # leaves every rank on cuda:0, where megatron-core and ALP would then allocate.
    platform.select_device()
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = rank if rank is not None else (_env_int("RANK") or 0)
    world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or _env_int("MASTER_PORT") or 29500
    torch.distributed.init_process_group(
        backend=platform.backend(),
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world_size


def set_seeds(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's RNG tracker (model-parallel states)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=platform.current_device(),
    )


def initialize(
    cfg: ParallelConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> ParallelInfo:
    """Initialise torch.distributed, Megatron ``parallel_state`` for ``cfg``, and seeds.

    The world size is validated against ``cfg`` before any process group exists. If
    torch.distributed is already up (a test harness, a second layout in one job), it is
    reused; Megatron's model-parallel groups must not be (call
    :func:`destroy_model_parallel` first).
    """
    from megatron.core import parallel_state as ps

    if torch.distributed.is_initialized():
        ws = torch.distributed.get_world_size()
    else:
        ws = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
    cfg.data_parallel_size(ws)  # raises ValueError before any group is created
    init_distributed(
        rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
        timeout_minutes=cfg.timeout_minutes,
    )
    # Also when torch.distributed was up already (torchrun's entry, a test harness): the
    # default group's collectives follow cfg.timeout_minutes from here on.
    # torch.distributed.set_timeout is public from torch 2.14; the vLLM CPU environment's
    # torch 2.13 (the in-process engine's trainer runs there) has the same function under
    # its earlier private name, distributed_c10d._set_pg_timeout (same signature).
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    set_timeout(datetime.timedelta(minutes=cfg.timeout_minutes))
    if ps.model_parallel_is_initialized():
        raise RuntimeError(
            "Megatron model parallel is already initialised; call "
            "megatron_alp.parallel.destroy_model_parallel() before initialising another layout"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # gloo sub-groups are only needed by the distributed optimizer's CPU paths; the
        # default backend already is gloo on CPU.
        create_gloo_process_groups=has_gloo_groups(),
    )
    set_seeds(cfg.seed)
    return _info()


def has_gloo_groups() -> bool:
    """Whether Megatron's extra gloo groups exist (pass as ``use_gloo_process_groups``).

    On the CPU backend the default groups already are gloo, so the duplicates are skipped.
    """
    return not platform.cpu_backend_active()


def _destroy_subgroups() -> None:
    # megatron-core's destroy_model_parallel() only drops its references to the groups it
    # created; the groups themselves (each gloo group with its own threads) live on, so
    # sweeping layouts in one job piles up hundreds of idle-polling threads. Destroy every
    # group but the default one. torch has no public listing of groups: _world.pg_map is
    # the registry destroy_process_group itself uses.
    from torch.distributed import distributed_c10d as c10d

    global _idle_group
    _idle_group = None
    default = c10d._get_default_group()
    for pg in list(c10d._world.pg_map):
        if pg is not default:
            dist.destroy_process_group(pg)


def wait_for_rank(src: int = 0) -> None:
    """Collective: every rank returns once rank ``src`` has called this too.

    The ranks that arrive first wait on a gloo group of the whole world whose timeout is
    ``IDLE_TIMEOUT`` (not the collective timeout) and which has no NCCL watchdog: call it
    after a phase that only ``src`` works in (engine start-up, generation, evaluation),
    before the next collective on the default or Megatron's groups. A dead ``src`` still
    ends the wait (gloo reports the closed connection). Costs one small gloo collective.
    """
    global _idle_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if _idle_group is None:  # collective: every rank gets here in the same order
        _idle_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    flag = torch.zeros(1)
    dist.broadcast(flag, src=src, group=_idle_group)


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel groups; torch.distributed stays up."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        _destroy_subgroups()
    # Models, DDP wrappers and optimizers built under the layout reference its groups
    # from reference cycles; a destroyed gloo group stops its I/O threads only when the
    # object is freed, so collect the cycles now rather than at some later GC pass
    # (without this, ~50 threads per layout built on 4 ranks pile up).
    gc.collect()


def teardown() -> None:
    """Tear down Megatron's groups and torch.distributed; safe to call twice."""
    destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def model_parallel(cfg: ParallelConfig) -> Iterator[ParallelInfo]:
    """``initialize(cfg)`` for the duration of a block, then destroy the model-parallel groups."""
    info = initialize(cfg)
    try:
        yield info
    finally:
        destroy_model_parallel()
