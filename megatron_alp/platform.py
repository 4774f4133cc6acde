"""Device and backend selection; the CPU backend that lets megatron-core run without CUDA.

On a machine with CUDA this module does nothing beyond answering ``backend() == "nccl"``
and ``device() == cuda:<local rank mod visible GPUs>``. Without CUDA (laptops, CI, the
embedded demo) it switches megatron-core onto the CPU with gloo.
``MEGATRON_ALP_FORCE_CPU=1`` in the environment (read here and nowhere else, by
:func:`force_cpu`) makes a machine with CUDA behave as one without: gloo, the CPU, the
CPU backend below — for running the CPU test tiers on a GPU host, or more ranks than it
has GPUs (``RankGroup`` sets it then). megatron-core 0.19 assumes a GPU in a handful of
places; this is the one sanctioned module that works around them, and every redirect is
listed here with the reason:

1. ``device="cuda"`` / ``device=torch.cuda.current_device()`` in tensor factories, and
   ``Tensor.cuda()`` / ``Tensor.to("cuda")``: rewritten to the CPU by a
   ``TorchFunctionMode`` (``_CPUDeviceMode``). megatron-core allocates buffers (grad
   buffers, p2p receive buffers, rotary tables, reductions) on ``current_device()``.
2. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Most allocations in
   megatron-core pass it as ``device=``, so they land on the CPU directly; this also
   covers code that runs inside autograd's backward, where a TorchFunctionMode entered
   around ``torch.autograd.backward`` is no longer active. And
   ``torch.cuda.synchronize`` / ``empty_cache`` are no-ops: there is nothing to wait for.
3. The CUDA RNG-states tracker (``tensor_parallel.random``) is replaced by
   :class:`CPURNGStatesTracker`, with the same ``add / fork / get_states / set_states /
   reset`` semantics on the CPU generator, and the module's private get/set-state helpers
   (used by activation recompute) read and write the CPU generator.
4. ``Tensor.type()`` (no argument) reports ``torch.cuda.*Tensor`` names for CPU tensors,
   because megatron-core's fp32 grad clipping asserts that name.
5. Activation recompute re-runs layer forwards *inside* the backward, where the mode of
   (1) is not active (a mode is popped while its handler runs, and recent torch
   dispatches ``torch.autograd.backward`` through it), and those forwards allocate on
   ``device="cuda"`` (e.g. the default causal mask). ``CheckpointFunction.backward`` and
   ``CheckpointWithoutOutput._recompute`` therefore run under a fresh instance of the mode.

6. Only under ``MEGATRON_ALP_FORCE_CPU=1`` on a machine with CUDA:
   ``torch.cuda.is_available()`` answers False, so megatron-core's own CUDA checks take
   their CPU branches.

None of this is active when CUDA is present (and not forced off), and nothing here
changes numerics: the same ops run on the CPU. Call :func:`activate` once per process (``parallel.init_distributed``
does) before megatron-core builds anything.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "CPURNGStatesTracker",
    "FORCE_CPU_ENV",
    "activate",
    "backend",
    "cpu_backend_active",
    "cuda_available",
    "current_device",
    "device",
    "force_cpu",
    "select_device",
]

FORCE_CPU_ENV = "MEGATRON_ALP_FORCE_CPU"
"""Environment variable: ``1`` runs gloo + CPU even where CUDA is visible (see module doc)."""
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

_ACTIVE = False
_MODE: TorchFunctionMode | None = None


def force_cpu() -> bool:
    """True when ``MEGATRON_ALP_FORCE_CPU`` asks for gloo + CPU even where CUDA is visible.

    The one place that reads the switch. ValueError (naming the variable) for a value
    that is neither true (1/true/yes/on) nor false (unset, empty, 0/false/no/off).
    """
    value = os.environ.get(FORCE_CPU_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable {FORCE_CPU_ENV}={os.environ[FORCE_CPU_ENV]!r} is not a boolean; "
        "allowed: 1/true/yes/on or 0/false/no/off (or unset)"
    )


def cuda_available() -> bool:
    """True when a CUDA device is used (the production path, with NCCL).

    False without CUDA, and under ``MEGATRON_ALP_FORCE_CPU=1``.
    """
    return torch.cuda.is_available() and not force_cpu()


def backend() -> str:
    """The torch.distributed backend for this machine: ``"nccl"`` with CUDA, else ``"gloo"``."""
    return "nccl" if cuda_available() else "gloo"


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={value!r} is not an integer") from None


def device() -> torch.device:
    """The device this rank computes on: ``cuda:<LOCAL_RANK mod visible GPUs>``, else the CPU.

    The modulo makes the common launches right: one GPU per local rank (LOCAL_RANK = GPU
    index), and one *visible* GPU per rank (``CUDA_VISIBLE_DEVICES`` narrowed by the
    scheduler: every rank uses its ``cuda:0``).
    """
    if cuda_available():
        return torch.device("cuda", _local_rank() % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def select_device() -> torch.device:
    """Make :func:`device` the current CUDA device (nothing to do on the CPU); return it.

    Called unconditionally by ``parallel.init_distributed``, also when torch.distributed
    was initialised by someone else: megatron-core and ALP allocate on the *current*
    device, which otherwise stays ``cuda:0`` on every rank.
    """
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def current_device() -> torch.device:
    """The device work is placed on right now: the current CUDA device, or the CPU.

    Megatron's RNG tracker forks the current device's generator; draw from it here.
    """
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_backend_active() -> bool:
    """True once :func:`activate` switched this process onto the CPU backend."""
    return _ACTIVE


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int is what torch.cuda.current_device() hands out; there is no other
    # integer device on a CPU-only machine.
    return isinstance(dev, int) and not isinstance(dev, bool)


_CUDA_TENSOR_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CPUDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (redirects 1 and 4 of the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TENSOR_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


class _CPUStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event


class CPURNGStatesTracker:
    """CPU twin of megatron-core's ``CudaRNGStatesTracker`` (redirect 3).

    Named states are snapshots of the CPU generator. ``fork(name)`` swaps the named state
    in, runs the block, stores the advanced state back and restores the previous one,
    exactly like the CUDA tracker does with the CUDA generator. Built as a subclass at
    activation time so ``isinstance(tracker, CudaRNGStatesTracker)`` stays true for
    megatron-core's own checks.
    """


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mpu_random

    class _Tracker(mpu_random.CudaRNGStatesTracker, CPURNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    _Tracker.__name__ = _Tracker.__qualname__ = "CPURNGStatesTracker"
    return _Tracker


def _install_rng_redirect() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    tracker_cls = _make_cpu_tracker_class()
    megatron_initialize = mpu_random.initialize_rng_tracker

    def initialize_rng_tracker(
        use_te_rng_tracker: bool = False,
        inference_rng_tracker: bool = False,
        use_cudagraphable_rng: bool = False,
        force_reset: bool = False,
    ) -> None:
        if inference_rng_tracker:
            # megatron-core's own inference tracker (add / fork / set_states are no-ops,
            # nothing touches CUDA), so the CPU backend behaves as CUDA does there.
            megatron_initialize(inference_rng_tracker=True, force_reset=force_reset)
            return
        if force_reset or not mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mpu_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
            mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mpu_random.initialize_rng_tracker = initialize_rng_tracker
    mpu_random._get_cuda_rng_state = get_rng_state
    mpu_random._set_cuda_rng_state = set_rng_state
    initialize_rng_tracker(force_reset=True)


def _install_recompute_redirect() -> None:
    """Redirect 5: recompute inside the backward runs under the CPU device mode."""
    from megatron.core.tensor_parallel import random as mpu_random

    ckpt_backward = mpu_random.CheckpointFunction.backward

    def backward(ctx: Any, *grads: Any) -> Any:
        with _CPUDeviceMode():
            return ckpt_backward(ctx, *grads)

    mpu_random.CheckpointFunction.backward = staticmethod(backward)  # type: ignore[method-assign]

    recompute = mpu_random.CheckpointWithoutOutput._recompute

    def _recompute(self: Any, grad: Any) -> Any:
        with _CPUDeviceMode():
            return recompute(self, grad)

    mpu_random.CheckpointWithoutOutput._recompute = _recompute  # type: ignore[method-assign]


def activate() -> bool:
    """Switch this process onto the CPU backend if CUDA is absent (or forced off); idempotent.

    Returns True when the CPU backend is (now) active, False on a CUDA machine, where
    nothing is changed.
    """
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    if torch.cuda.is_available():  # CUDA visible but forced off (redirect 6)
        torch.cuda.is_available = lambda: False  # type: ignore[assignment]
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.Stream = _CPUStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda device=None: _CPUStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    _install_rng_redirect()
    _install_recompute_redirect()
    _MODE = _CPUDeviceMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True
