"""Nokland (2016), Table 1: a thin wrapper around ``fbalign reproduce nokland2016``.

BP, FA and DFA on MNIST tanh MLPs 1x800, 2x800 and 7x240, each rule a ``--seeds`` ensemble
(one vmapped program; the report gives mean +- std over seeds). The setup (the author's code,
anokland/dfa-torch, where our options express it: RMSprop 1e-4, batch 64, 300 epochs, inputs in
[0, 1], uniform feedback U[-1/sqrt(n), 1/sqrt(n)]), where the paper's numbers stand (they could
not be read) and what fbalign cannot express (zero initial weights for FA and DFA, sigmoid
outputs with binary cross-entropy) live in the recipe ``fbalign/recipes/nokland2016.toml``. This
script only maps its flags onto ``fbalign reproduce``, so there is one way to run it:

    python benchmarks/nokland_mnist.py --epochs 5    # = fbalign reproduce nokland2016
                                                     #   --budget paper --epochs 5 --seeds 3
    python benchmarks/nokland_mnist.py --quick       # the recipe's quick budget (the tests):
                                                     # digits, 1x64 and 7x32, 3 seeds

``--seeds K`` (default 3), ``--out DIR`` (default ``runs/reproduce-nokland2016-<budget>-<time>``);
any other flag goes to ``fbalign reproduce``: ``--experiment mnist-1x800,mnist-7x240`` picks
architectures, ``--resume`` continues an interrupted run, ``--no-progress``, ``--no-figures``.
The report is ``DIR/report.md``, with one figure per architecture.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

RECIPE = "nokland2016"


def reproduce_argv(argv: list[str] | None = None) -> list[str]:
    """The ``fbalign`` command line this script runs for its own ``argv``."""
    return _bench.recipe_argv(RECIPE, argv or [], __doc__.split("\n\n")[0], seeds=3)


def main(argv: list[str] | None = None) -> int:
    """Runs the reproduction; returns ``fbalign reproduce``'s exit status."""
    return _bench.run_recipe(reproduce_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
