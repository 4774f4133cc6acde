"""Entry point of the CPU multi-turn example: the trainer with the example's engine registered.

    torchrun --standalone --nproc-per-node 2 examples/multiturn_cpu/train.py [trainer flags]

Exactly ``python -m megatron_alp.train``, plus one import: ``scripted_engine`` registers
the ``scripted-first-turn`` rollout engine in every rank (see its docstring). The
trainer's own launcher starts its ranks as ``python -m megatron_alp.train``, which would
not import it, so this script runs under torchrun (one process per rank).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scripted_engine  # noqa: E402,F401  (registers scripted-first-turn)

from megatron_alp.train.__main__ import main  # noqa: E402

if __name__ == "__main__":
    if "RANK" not in os.environ:
        print("error: run this under torchrun (see examples/multiturn_cpu/run.sh): "
              "torchrun --standalone --nproc-per-node 2 examples/multiturn_cpu/train.py ...",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
