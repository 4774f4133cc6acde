"""Suite-wide isolation: no test may leave torch.distributed up in the pytest process.

Multi-rank tests run their ranks in child processes; a test that initialises a process
group in pytest's own process (a one-rank group, a client) must tear it down. If one does
not, the next test would see a foreign group (e.g. ``parallel.initialize`` reusing a world
of size 1): this fixture tears it down after the test and reports the test by name.
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_process_group_leaks(request):
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron_alp import parallel

        print(f"\n[conftest] {request.node.nodeid} left torch.distributed initialised; tearing it down",
              file=sys.stderr)
        parallel.teardown()
