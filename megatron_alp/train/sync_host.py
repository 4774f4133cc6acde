"""The weight-sync host comes from rank 0: ``--rl-fleet-sync-host auto``.

Rank 0 sends the weights to the fleet, so the rendezvous address the engines connect to
must be rank 0's. A launch script cannot know it in advance: under torchrun's c10d
rendezvous the global ranks follow the nodes' sorted FQDNs (torch 2.14.1,
``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py``
``_mark_rendezvous_complete``: ``for rank, node in enumerate(sorted(state.participants))``),
so with nodes ``node9`` and ``node10`` rank 0 runs on ``node10``, not on the first node of
the allocation. Rank 0 therefore resolves its own address and broadcasts it, so that every
rank's configuration (and ``config.json``) names the same host.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.distributed as dist

__all__ = ["share_sync_host"]


def share_sync_host(
    engine_kwargs: dict[str, Any],
    *,
    resolve: Callable[[Sequence[str]], str] | None = None,
) -> str | None:
    """Replace ``sync_host="auto"`` in ``engine_kwargs`` by rank 0's address, on every rank.

    Collective (every rank calls it); ``resolve(endpoints)`` runs on rank 0 only
    (default :func:`megatron_alp.rollout.fleet.own_address`). Returns the host, or None
    when the engine takes no ``sync_host`` (not the fleet).
    """
    host = engine_kwargs.get("sync_host")
    if host != "auto":
        return host
    if resolve is None:
        from megatron_alp.rollout.fleet import own_address as resolve
    value = [resolve(list(engine_kwargs.get("endpoints") or [])) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    engine_kwargs["sync_host"] = value[0]
    return value[0]
