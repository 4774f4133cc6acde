"""Checkpoints in Megatron's layout, written atomically, resumed exactly.

``--save DIR`` holds ``iter_0000010/`` folders and ``latest_checkpointed_iteration.txt``
(Megatron-LM's convention). One folder holds:

* the sharded state (``megatron.core.dist_checkpointing``, torch_dist): model chunks
  ``model0..`` (ALP sigma included), the optimizer (resharded on load, so a checkpoint
  loads under another TP / PP / DP), the LR scheduler, the step;
* ``rng/rank_XXXXX.pt``: every RNG state of the rank (Python, NumPy, torch, Megatron's
  tracker states incl. ALP's ``"alp-noise"``) — restored when the world size matches;
* ``trainer_state.pt`` (rank 0): step, prompt-sampler position, the wandb run id, the
  effective config;
* ``engine_weights.pt`` (rank 0, under ``--rl-generation-lag``): the weights the rollout
  engine holds and will hold next — read back by rank 0 only, the rank with the engine;
* ``config.json`` (rank 0): the effective configuration, readable without Python;
* ``.megatron-alp-checkpoint``: the marker that says this folder was written by us.

Writing goes to ``DIR/.tmp-iter_0000010-<id>/`` and is renamed into place only when every
rank has finished, then ``latest_checkpointed_iteration.txt`` is replaced atomically: a
kill at any moment leaves the previous checkpoint intact and loadable. Leftover temporary
folders of a killed run (recognised by the marker) are removed, and reported, at the next
start. ``--save`` may not be, contain or lie inside ``--hf-model`` or a data file.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "LATEST",
    "MARKER",
    "check_save_path",
    "clean_stale",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

LATEST = "latest_checkpointed_iteration.txt"
MARKER = ".megatron-alp-checkpoint"


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def find_checkpoint(root: Path, *, required: bool = True) -> tuple[Path, int | None] | None:
    """``(folder, step)`` of the checkpoint ``--load`` points at.

    ``root`` with ``latest_checkpointed_iteration.txt``: the latest ``iter_*`` (step from the
    file); a converted model checkpoint (a dist checkpoint with ``.metadata``): step None;
    ``required`` False returns None for an empty or absent folder (a fresh run whose
    ``--save`` equals ``--load``). ValueError naming the path otherwise.
    """
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"--load {root}: {LATEST} holds {text!r}, expected an iteration number")
        step = int(text)
        folder = iter_dir(root, step)
        if not (folder / ".metadata").is_file():
            raise ValueError(f"--load {root}: {LATEST} names iteration {step} but {folder} is missing or incomplete")
        return folder, step
    if (root / ".metadata").is_file():
        return root, None
    if not required and (not root.exists() or not any(p for p in root.iterdir() if not p.name.startswith("."))):
        return None
    raise ValueError(
        f"--load {root}: no checkpoint there (expected {LATEST} from a trainer run, or a "
        "converted dist checkpoint with .metadata)"
    )


def overlapping_input(out: Path, inputs: dict[str, Path]) -> tuple[str, Path] | None:
    """The first ``(flag, path)`` of ``inputs`` that ``out`` equals, contains or lies inside."""
    s = out.resolve()
    for flag, path in inputs.items():
        p = Path(path).resolve()
        if s == p or p.is_relative_to(s) or s.is_relative_to(p):
            return flag, path
    return None


def check_save_path(save: Path, inputs: dict[str, Path]) -> None:
    """Refuse a ``--save`` that is, contains or lies inside one of ``inputs`` (flag -> path)."""
    s = save.resolve()
    hit = overlapping_input(save, inputs)
    if hit:
        raise ValueError(
            f"--save {save} overlaps {hit[0]} {hit[1]} (equal, containing or inside it); a run "
            "never writes where its inputs live: choose another --save"
        )
    if s.exists() and not s.is_dir():
        raise ValueError(f"--save {save} exists and is not a folder")
    latest = s / LATEST
    if latest.is_file():
        text = latest.read_text().strip()
        folder = iter_dir(s, int(text)) if text.isdigit() else None
        if folder is None or not (folder / MARKER).is_file():
            raise ValueError(
                f"--save {save} holds a checkpoint that this trainer did not write ({LATEST} -> "
                f"{text!r}); it never replaces what it did not write: choose another --save"
            )


def clean_stale(save: Path) -> list[Path]:
    """Remove temporary checkpoint folders of killed runs (only ours: marker inside)."""
    removed = []
    if not save.is_dir():
        return removed
    for p in save.glob(".tmp-iter_*"):
        if p.is_dir() and (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _prepare_optimizer_state_for_load(optimizer: Any) -> None:
    """Workaround (megatron-core 0.19.2, no apex / Transformer Engine, i.e. the CPU backend).

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` first fills a fresh
    optimizer's state with ``init_state_fn`` — zeros for ``exp_avg`` / ``exp_avg_sq`` but
    no ``step`` — and then calls ``state_dict()``, whose torch-optimizer branch reads
    ``state["step"]`` of every parameter and asserts they agree: a fresh optimizer fails
    there (with apex or TE, as on GPU clusters, that branch is not taken). Filling the
    state ourselves with ``step = 0`` first gives it what it reads; the loaded
    checkpoint then overwrites every value.
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.init_state_fn is None:
            continue
        inner = opt.optimizer
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def _sharded_state(policy: Any, *, loading: bool, with_optimizer: bool) -> dict[str, Any]:
    from megatron_alp.convert.load import sharded_state_dict_of

    sd = sharded_state_dict_of(policy.model)
    if with_optimizer:
        # The metadata megatron.training uses for torch_dist checkpoints (its default
        # `dp_reshardable` sharding of the distributed optimizer's state); the plain
        # optimizer ignores it.
        metadata = {
            "distrib_optim_sharding_type": "dp_reshardable",
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
        }
        if loading:
            _prepare_optimizer_state_for_load(policy.optimizer)
        sd["optimizer"] = policy.optimizer.sharded_state_dict(sd, is_loading=loading, metadata=metadata)
        sd["opt_param_scheduler"] = policy.scheduler.state_dict()
    return sd


def _broadcast_str(value: str | None) -> str:
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


ENGINE_WEIGHTS = "engine_weights.pt"


def save_checkpoint(
    save: Path, step: int, policy: Any, trainer_state: dict[str, Any], engine_weights: Any = None
) -> Path:
    """Write ``iter_{step}`` atomically (collective; see the module docstring).

    ``engine_weights`` (rank 0's lagged engine weights, or None) go to their own file.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    token = _broadcast_str(uuid.uuid4().hex[:8] if rank == 0 else None)
    tmp = save / f".tmp-iter_{step:07d}-{token}"
    if rank == 0:
        tmp.mkdir(parents=True)
        (tmp / MARKER).write_text(f"megatron-alp trainer checkpoint, step {step}\n")
    dist.barrier()
    sd = _sharded_state(policy, loading=False, with_optimizer=True)
    sd["iteration"] = step
    dist_checkpointing.save(sd, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        with open(tmp / "trainer_state.pt.part", "wb") as f:
            pickle.dump(trainer_state, f)
        os.replace(tmp / "trainer_state.pt.part", tmp / "trainer_state.pt")
        if "config" in trainer_state:  # the effective configuration, readable without Python
            (tmp / "config.json").write_text(str(trainer_state["config"]) + "\n")
        if engine_weights is not None:
            torch.save(engine_weights, tmp / ENGINE_WEIGHTS)
    dist.barrier()
    final = iter_dir(save, step)
    if rank == 0:
        old = None
        if final.exists():
            if not (final / MARKER).is_file():
                raise ValueError(f"--save: {final} exists and was not written by this trainer; not replacing it")
            old = save / f".tmp-iter_{step:07d}-old-{token}"
            os.rename(final, old)
            (old / MARKER).touch()
        os.rename(tmp, final)
        part = save / (LATEST + ".part")
        part.write_text(f"{step}\n")
        os.replace(part, save / LATEST)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    folder: Path, policy: Any, *, finetune: bool, load_optim: bool, load_rng: bool
) -> dict[str, Any] | None:
    """Load a checkpoint into ``policy``; return the trainer state (None with ``finetune``).

    A converted model checkpoint (no trainer state) loads the model only and needs
    ``finetune``.
    """
    from megatron.core import dist_checkpointing

    from megatron_alp.convert.load import load_megatron_checkpoint

    has_trainer = (folder / "trainer_state.pt").is_file()
    if not has_trainer and not finetune:
        raise ValueError(
            f"--load {folder}: a converted model checkpoint (no trainer state); add --finetune to "
            "start training from its weights"
        )
    if finetune or not has_trainer:
        load_megatron_checkpoint([_unwrapped(m) for m in policy.model], folder)
        _reload_main_params(policy)
        return None
    sd = _sharded_state(policy, loading=True, with_optimizer=load_optim)
    sd["iteration"] = 0
    with torch.no_grad():  # loads write into parameter views in place
        loaded = dist_checkpointing.load(sd, str(folder))
        for i, m in enumerate(policy.model):
            _unwrapped(m).load_state_dict(loaded[f"model{i}"], strict=True)
        if load_optim:
            policy.optimizer.load_state_dict(loaded["optimizer"])
            policy.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if not load_optim:
        _reload_main_params(policy)
    rng_file = folder / "rng" / f"rank_{dist.get_rank():05d}.pt"
    n_rng = len(list((folder / "rng").glob("rank_*.pt")))
    if load_rng and n_rng == dist.get_world_size() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    with open(folder / "trainer_state.pt", "rb") as f:
        return pickle.load(f)


def _unwrapped(m: torch.nn.Module) -> torch.nn.Module:
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return m


def _reload_main_params(policy: Any) -> None:
    # fp32 main copies of a bf16 model were made from the weights before loading
    reload = getattr(policy.optimizer, "reload_model_params", None)
    if reload is not None:
        reload()
