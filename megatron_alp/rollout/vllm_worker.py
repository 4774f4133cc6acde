"""Worker extension loaded into every vLLM worker (``worker_extension_cls``).

vLLM mixes this class into its GPU worker, and the engine side calls its methods with
``LLM.collective_rpc(name, args=...)``. Two transports:

* NCCL (a separate fleet): ``init_weight_sync`` joins a stateless process group with the
  trainer (rank 0) — independent of both sides' torch.distributed worlds — and
  ``receive_bucket(meta)`` receives each tensor of a bucket by broadcast, then hands the
  HF-named full tensors to ``model.load_weights``, which fuses (q/k/v, gate/up) and
  shards for vLLM's own tensor parallelism.
* CUDA IPC (colocated on the trainer's GPUs): ``receive_ipc(handles)`` rebuilds tensors
  from IPC handles keyed by the GPU's UUID, no copy through the host.

Nothing here imports vLLM at module level, so the module can be imported (and its name
given to vLLM) on any machine.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WeightSyncExtension"]


class WeightSyncExtension:
    """Methods added to vLLM's worker; ``self`` is the worker (``self.device``,
    ``self.model_runner``)."""

    _weight_comm: Any = None

    def init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> None:
        """Join the trainer's weight-sync group as rank ``rank_offset + local rank``."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        pg = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank, world_size=world_size
        )
        self._weight_comm = PyNcclCommunicator(pg, device=self.device)

    def receive_bucket(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> int:
        """Receive one bucket by NCCL broadcast from rank 0 and load it; return its bytes."""
        if self._weight_comm is None:
            raise RuntimeError("init_weight_sync must run before receive_bucket")
        weights = []
        nbytes = 0
        for name, dt, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dt), device=self.device)
            self._weight_comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
            weights.append((name, t))
            nbytes += t.numel() * t.element_size()
        torch.cuda.current_stream().synchronize()
        self.model_runner.model.load_weights(weights=weights)
        return nbytes

    def receive_ipc(self, handles: dict[str, list[tuple[str, Any]]]) -> int:
        """Load a bucket shared by CUDA IPC; ``handles`` maps GPU UUID -> [(name, handle)]."""
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        weights = []
        for name, (rebuild, args) in handles[uuid]:
            args = list(args)
            args[6] = self.device.index  # the receiving process's own device index
            weights.append((name, rebuild(*args)))
        self.model_runner.model.load_weights(weights=weights)
        torch.cuda.synchronize()
        return len(weights)

    def weights_checksum(self) -> float:
        """Sum of all parameters (fp64): lets tests check that an update arrived."""
        return float(sum(p.double().sum() for p in self.model_runner.model.parameters()))
