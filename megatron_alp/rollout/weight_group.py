"""The weight-broadcast group of the CPU twin: gloo over its own TCP store.

The trainer's sending rank (rank 0, hosting the store) and every engine form a
``ProcessGroupGloo`` that is independent of the trainer's ``torch.distributed`` world
(a process can only have one default group; this one is built directly from a store, as
vLLM's ``StatelessProcessGroup`` does for NCCL). Each membership change (an engine died
or was restarted) forms a new group under a new *epoch*, on its own port, so a dead
member of an old group can never block a new one. Timeouts bound the rendezvous and
every broadcast: a member that does not answer raises instead of hanging.
"""

from __future__ import annotations

import datetime
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_alp.rollout.base import WeightBucket

__all__ = ["GlooGroup", "broadcast_bucket", "receive_tensors"]


class GlooGroup:
    """One epoch of the weight-broadcast group (rank 0 = the sender, which hosts the store)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        # The master store is created by rank 0 before the engines are asked to join,
        # so their connection attempts find it listening.
        self.store = dist.TCPStore(host, port, world_size=None, is_master=rank == 0, timeout=timeout)
        self.pg: Any = None
        self._timeout = timeout

    def connect(self) -> None:
        """The rendezvous proper (blocks until all ``world_size`` members connect)."""
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("weights/", self.store), self.rank,
                                        self.world_size, self._timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """In-place broadcast from rank 0 (CPU tensors: gloo)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait(self._timeout)


def broadcast_bucket(group: GlooGroup, bucket: WeightBucket) -> int:
    """Send every tensor of a bucket (rank 0's side); returns the bytes sent."""
    n = 0
    for _, t in bucket:
        t = t.detach().to("cpu").contiguous()
        group.broadcast(t)
        n += t.numel() * t.element_size()
    return n


def receive_tensors(
    group: GlooGroup, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[tuple[str, torch.Tensor]]:
    """Receive one bucket described by its metadata (an engine's side)."""
    out = []
    for name, dt, shape in zip(names, dtypes, shapes, strict=True):
        t = torch.empty([int(s) for s in shape], dtype=getattr(torch, dt))
        group.broadcast(t)
        out.append((name, t))
    return out
