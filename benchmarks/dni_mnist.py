"""Synthetic gradients on MNIST fully connected nets (Jaderberg et al. 2017, Table 1 and Fig. 5):
a thin wrapper around ``fbalign reproduce jaderberg2017``.

Every hidden layer of a 3-6 layer ReLU net is decoupled. Rules: backprop (bp), DNI (linear
synthesizers), cDNI (synthesizers that also see the one-hot label) and shallow (only the output
layer learns: the paper's "no bprop" baseline); then the asynchrony sweep, where at depth 4 every
layer and its synthesizer update with probability ``p_update`` per step. The setup, what could
not be read of the paper and what fbalign cannot express (batch normalisation) live in the recipe
``fbalign/recipes/jaderberg2017.toml``; this script only maps its flags onto
``fbalign reproduce``, so there is one way to run the reproduction:

    python benchmarks/dni_mnist.py             # = fbalign reproduce jaderberg2017 --budget paper
    python benchmarks/dni_mnist.py --quick     # the recipe's quick budget (the tests): digits,
                                               # depth 3, and cDNI at p_update 0.2

``--epochs N`` cuts every run, ``--seeds K`` trains K networks per rule (default 1), ``--out
DIR`` names the output directory (default ``runs/reproduce-jaderberg2017-<budget>-<time>``); any
other flag goes to ``fbalign reproduce``: ``--experiment mnist-fc3,mnist-fc6`` picks depths (and
``mnist-fc4-p0.2`` etc. the sweep), ``--resume``, ``--no-progress``, ``--no-figures``. The
report is ``DIR/report.md``. The recurrent half of the paper (copy, repeat copy) is ``dni_copy.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

RECIPE = "jaderberg2017"


def reproduce_argv(argv: list[str] | None = None) -> list[str]:
    """The ``fbalign`` command line this script runs for its own ``argv``."""
    return _bench.recipe_argv(RECIPE, argv or [], __doc__.split("\n\n")[0], seeds=1)


def main(argv: list[str] | None = None) -> int:
    """Runs the reproduction; returns ``fbalign reproduce``'s exit status."""
    return _bench.run_recipe(reproduce_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
