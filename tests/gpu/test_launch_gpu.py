"""One GPU: what the trainer says at start-up, and a save on SIGTERM under torchrun on CUDA.

* the start-up line names Transformer Engine's spec where TE works (a broken TE — an
  extension built for another torch — is a WARNING naming the reason: the CPU twin is
  ``tests/unit/test_fusions.py::test_start_up_names_the_layer_spec_and_why``);
* SIGTERM during a slow rollout (torchrun, one NCCL rank on this GPU, the tiny model):
  the last completed step is saved before torchrun's 30 s SIGKILL (CPU twin:
  ``tests/e2e/test_signals.py``). The seconds are printed (run with ``-s``).
"""

from __future__ import annotations

from tests.e2e.train_bodies import TORCHRUN_GRACE_S, build_assets, sigterm_during_slow_rollout
from tests.gpu.gpu_env import needs_cuda, needs_te

pytestmark = needs_cuda


def test_start_up_names_the_transformer_engine_spec():
    from megatron_alp.models.builder import layer_spec_report

    needs_te()
    line, loud = layer_spec_report()
    assert not loud and line.startswith("layer spec: Transformer Engine (transformer_engine "), line
    print(line)


def test_sigterm_during_a_slow_rollout_saves_under_torchrun_on_cuda(tmp_path):
    assets = build_assets(tmp_path / "assets")
    said, elapsed, code = sigterm_during_slow_rollout(assets, tmp_path, nproc=1)
    print(f"SIGTERM -> checkpoint saved {said:.1f} s; torchrun exited after {elapsed:.1f} s "
          f"(its SIGKILL comes at {TORCHRUN_GRACE_S} s) with {code}")
