"""The smoke job refuses impossible counts at parse time (exit 2, the flag named), instead
of starting ranks and failing late."""

import pytest

from megatron_alp.smoke import _parse


@pytest.mark.parametrize("argv,message", [
    (["--steps", "-1"], "argument --steps: -1 is below the minimum 1"),
    (["--micro-batches", "0"], "argument --micro-batches: 0 is below the minimum 1"),
    (["--tol", "-1"], "argument --tol: -1.0 is below the minimum 0.0"),
    (["--tp", "0"], "argument --tp: 0 is below the minimum 1"),
    (["--steps", "two"], "argument --steps: 'two' is not an integer"),
])
def test_bad_counts_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_parse():
    ns = _parse([])
    assert (ns.tp, ns.pp, ns.steps, ns.micro_batches, ns.tol) == (2, 2, 3, 4, 1e-5)
