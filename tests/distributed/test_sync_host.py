"""The fleet's weight-sync host is rank 0's own address, shared with every rank (issue 18,
item 4). Under torchrun's c10d rendezvous rank 0 runs on the node whose FQDN sorts first,
so a launch script cannot name it; here each rank would resolve a different address and
all of them must end up with rank 0's."""

from __future__ import annotations

from megatron_alp.launch import run_on_ranks


def _share_body(endpoints: list[str]) -> tuple[str, dict]:
    import torch.distributed as dist

    from megatron_alp.train.sync_host import share_sync_host

    me = dist.get_rank()
    kwargs = {"sync_host": "auto", "endpoints": list(endpoints)}
    calls = []

    def resolve(eps):  # what this rank would find as its own address
        calls.append(list(eps))
        return f"host-of-rank-{me}"

    host = share_sync_host(kwargs, resolve=resolve)
    fixed = {"sync_host": "10.0.0.7", "endpoints": list(endpoints)}
    assert share_sync_host(fixed, resolve=resolve) == "10.0.0.7"  # an explicit host is kept
    return host, {"kwargs": kwargs, "resolved_here": calls}


def test_sync_host_comes_from_rank_0():
    eps = ["http://10.255.255.1:8100", "http://10.255.255.2:8100"]
    results = run_on_ranks(3, _share_body, eps, force_cpu=True, timeout_s=120)
    assert [h for h, _ in results] == ["host-of-rank-0"] * 3
    assert all(info["kwargs"]["sync_host"] == "host-of-rank-0" for _, info in results)
    # only rank 0 resolved (the others never looked at their own address)
    assert [info["resolved_here"] for _, info in results] == [[eps], [], []]


def test_own_address_is_the_interface_towards_remote_engines():
    import ipaddress
    import shutil
    import subprocess

    from megatron_alp.rollout.fleet import own_address

    assert own_address([]) == "127.0.0.1"  # a local fleet
    assert own_address(["http://127.0.0.1:8100", "http://localhost:8101"]) == "127.0.0.1"
    remote = own_address(["http://127.0.0.1:8100", "http://10.255.255.1:8100"])
    ip = shutil.which("ip")
    if ip:  # the kernel's own answer: `ip route get` names the source address of that route
        r = subprocess.run([ip, "route", "get", "10.255.255.1"], capture_output=True, text=True)
        if r.returncode == 0 and " src " in r.stdout:
            assert remote == r.stdout.split(" src ")[1].split()[0]
            return
    try:
        assert not ipaddress.ip_address(remote).is_loopback
    except ValueError:  # no route: the FQDN
        import socket

        assert remote == socket.getfqdn()
