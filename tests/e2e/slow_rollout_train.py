"""The trainer with a deliberately slow rollout engine, for the signal tests (run under torchrun).

    torchrun --standalone --nproc-per-node 2 tests/e2e/slow_rollout_train.py [trainer flags] \
        --rl-rollout-engine slow-local

``slow-local`` is the local engine whose generation, from its ``SLOW_FROM``-th call on
(env ``MEGATRON_ALP_TEST_SLOW_FROM``, default 2: the second step's rollouts), first
writes the file ``MEGATRON_ALP_TEST_MARKER`` and then takes ``MEGATRON_ALP_TEST_SLOW_S``
seconds (default 600) — a 7B multi-turn step's rollouts, in miniature. Otherwise exactly
``python -m megatron_alp.train``.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_alp.rollout import LocalEngine, available_engines, register_engine  # noqa: E402

if "slow-local" not in available_engines():

    @register_engine("slow-local")
    class SlowLocalEngine(LocalEngine):
        calls = 0

        def generate(self, *args, **kwargs):  # type: ignore[override]
            SlowLocalEngine.calls += 1
            if SlowLocalEngine.calls >= int(os.environ.get("MEGATRON_ALP_TEST_SLOW_FROM", "2")):
                marker = os.environ.get("MEGATRON_ALP_TEST_MARKER")
                if marker:
                    Path(marker).write_text(f"{time.time()}\n")
                end = time.monotonic() + float(os.environ.get("MEGATRON_ALP_TEST_SLOW_S", "600"))
                while time.monotonic() < end:  # busy in Python, as a generation loop is
                    time.sleep(0.05)
            return super().generate(*args, **kwargs)


from megatron_alp.train.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
