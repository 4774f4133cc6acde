"""No host reads of tensor values inside the micro-batch loop (issue 18.6).

Under 1F1B every read of a device tensor's value on the host (``.item()``, ``bool(t)``,
a boolean selection whose size the host must know, ``.cpu()``, ``.tolist()``) waits for
the GPU and drains the pipeline. The update had three per micro-batch: the 0-dim
``sample_offset`` moved to the device and read back by ``perturbed()``, the log-probs'
``bool(out_of_range.any())`` and the mismatch metrics' boolean indexing in the loss.

A real trainer step (tiny Qwen2, ALP on, one rank, 2 mini-batches of 4 micro-batches)
runs under two recorders: a ``TorchDispatchMode`` that sees every aten op that needs
a value on the host (ops tagged ``data_dependent_output`` — ``_local_scalar_dense``
behind ``item``/``bool``/``float``, ``equal`` — or ``dynamic_output_shape`` — ``nonzero``,
``masked_select``, indexing with a boolean mask), and a ``TorchFunctionMode`` for the
Python-level copies (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.item()``). On a CPU
every tensor is a host tensor, so the recorders count what *would* be a host sync on a
GPU; the one exception is ALP's noise coordinates, a CPU tensor by construction
(``perturbation/context.py``), which the recorder names and skips. Each event keeps its
Python stack: none may come from inside ``schedule.forward_backward`` (the log-prob
pass and the updates). The GPU twin of this check, with CUDA's own sync detector, is
``tests/gpu/test_one_gpu.py::test_update_makes_no_host_sync``.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.e2e.train_bodies import base_argv, prepare_module

_PY_READS = ("cpu", "tolist", "numpy", "item", "__bool__", "__float__", "__int__", "__index__")


def _in_schedule(stack) -> bool:
    return any(f.name == "forward_backward" and f.filename.endswith("megatron_alp/schedule.py")
               for f in stack)


class HostReads(TorchDispatchMode):
    """Records every op that needs a tensor's value on the host, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, bool, str]] = []  # (op, inside forward_backward, caller)

    def _record(self, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        ours = [f for f in stack if "megatron_alp" in f.filename or "megatron/core" in f.filename]
        where = f"{ours[-1].filename.split('/')[-1]}:{ours[-1].lineno}" if ours else "?"
        self.events.append((name, _in_schedule(stack), where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = func.tags
        if torch.Tag.data_dependent_output in tags:
            self._record(str(func))
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                      torch.ops.aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in (args[1] or ())):
                self._record(str(func) + " (boolean mask)")
        elif torch.Tag.dynamic_output_shape in tags:
            self._record(str(func))
        return func(*args, **kwargs)


class PyReads(TorchFunctionMode):
    """``.cpu()`` / ``.tolist()`` / ``.item()`` ... (``.tolist()`` of a CPU tensor never
    reaches the dispatcher), except on ALP's noise coordinates, a host tensor by design."""

    def __init__(self, sink: HostReads) -> None:
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _PY_READS and not (args and _is_noise_coords(args[0])):
            self.sink._record("Tensor." + name)
        return func(*args, **(kwargs or {}))


def _is_noise_coords(t) -> bool:
    from megatron_alp.perturbation.context import COORDS_STATE, _tracker

    entry = _tracker().get_states().get(COORDS_STATE)
    return entry is not None and t is entry and entry.device.type == "cpu"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The trainer tests' tiny Qwen2 and task, not warmed up (values do not matter here)."""
    out = tmp_path_factory.mktemp("tiny_assets")
    prepare_module().build(out, seed=0, target=0.3, layers=2, hidden=32, warmup_max_steps=0)
    return out


def test_update_reads_nothing_on_the_host_inside_the_schedule(assets, tmp_path):
    from megatron_alp import parallel
    from megatron_alp.launch import free_port
    from megatron_alp.train.arguments import parse_args
    from megatron_alp.train.loop import Trainer

    argv = base_argv(assets, tmp_path / "run", "--rl-loss", "token-alp", "--train-iters", "1")
    cfg = parse_args(argv, world_size=1)
    parallel.init_distributed(rank=0, world_size=1, master_port=free_port())
    try:
        with parallel.model_parallel(cfg.parallel):
            tr = Trainer(cfg)
            tr.start_engine()
            tr.sync_weights()
            rec = HostReads()
            with rec, PyReads(rec):
                metrics = tr.train_step()
            tr.engine.close()
    finally:
        parallel.teardown()
    assert tr.opt_step == 2 and "actor/pg_loss" in metrics  # the two updates ran
    inside = [(op, where) for op, hot, where in rec.events if hot]
    assert inside == [], inside  # before issue 18.6: 120+ (3 per micro-batch and more)
    # the recorder is live: the step as a whole reads values (rollouts, metrics, counts)
    assert len(rec.events) > 10
