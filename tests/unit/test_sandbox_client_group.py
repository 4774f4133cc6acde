"""Several sandbox services behind one client (``--rl-sandbox URL1,URL2``): programs are
spread over them, results come back in input order, none lost or run twice."""

from __future__ import annotations

import shutil

import pytest

from megatron_alp.sandbox import SandboxClient, SandboxClientGroup, SandboxLimits, sandbox_client
from megatron_alp.sandbox.serve import SandboxServer

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


def test_group_spreads_programs_and_keeps_order():
    limits = SandboxLimits(timeout_s=5.0)
    servers = [SandboxServer(max_concurrency=2, max_queue=64, max_request_bytes=64 * 1024,
                             limits=limits).start() for _ in range(2)]
    try:
        with sandbox_client(",".join(s.url for s in servers), max_concurrency=2) as group:
            assert isinstance(group, SandboxClientGroup)
            res = group.run_batch([f"print({k} * {k})" for k in range(10)])
            assert [r.stdout for r in res] == [f"{k * k}\n" for k in range(10)]
            done = [h["completed"] for h in group.health()]
        assert done == [5, 5]
    finally:
        for s in servers:
            s.shutdown(grace_s=10)


def test_one_url_is_a_plain_client_and_bad_urls_are_refused():
    one = sandbox_client("http://127.0.0.1:1")
    assert isinstance(one, SandboxClient)
    one.close()
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        sandbox_client("http://127.0.0.1:1,ftp://x")
