"""Lillicrap et al. (2016), MNIST: a thin wrapper around ``fbalign reproduce lillicrap2016``.

The setup (784-1000-10 sigmoid network, squared error, SGD with the paper's learning rate and
weight decay; BP, FA and shallow learning), the paper's numbers and what fbalign cannot express
live in the recipe ``fbalign/recipes/lillicrap2016.toml`` (its ``mnist`` experiment). This script
only maps its flags onto ``fbalign reproduce``, so there is one way to run the reproduction:

    python benchmarks/lillicrap_mnist.py --epochs 20   # = fbalign reproduce lillicrap2016
                                                       #   --experiment mnist --budget paper
                                                       #   --epochs 20
    python benchmarks/lillicrap_mnist.py --quick       # the recipe's quick budget (what the
                                                       # tests run): 1,000 MNIST examples

``--seeds K`` trains K networks per rule, ``--out DIR`` names the output directory (default
``runs/reproduce-lillicrap2016-<budget>-<time>``); any other flag goes to ``fbalign reproduce``
(``--resume``, ``--overwrite``, ``--no-progress``, ``--no-figures``). The report
(``DIR/report.md``) puts the paper's number beside ours for every rule; its figure has the loss,
test-error and alignment curves. A different setup is a
``fbalign train`` run or an edit of the recipe, not a flag here. MNIST is read from
``$FBALIGN_DATA`` (or downloaded).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

RECIPE, EXPERIMENT = "lillicrap2016", "mnist"


def reproduce_argv(argv: list[str] | None = None) -> list[str]:
    """The ``fbalign`` command line this script runs for its own ``argv``."""
    return _bench.recipe_argv(RECIPE, argv or [], __doc__.split("\n\n")[0], seeds=1,
                              experiment=EXPERIMENT)


def main(argv: list[str] | None = None) -> int:
    """Runs the reproduction; returns ``fbalign reproduce``'s exit status."""
    return _bench.run_recipe(reproduce_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
