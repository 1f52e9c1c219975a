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

import argparse
import sys

from fbalign.cli import main as fbalign_main

RECIPE, EXPERIMENT = "lillicrap2016", "mnist"


def reproduce_argv(argv: list[str] | None = None) -> list[str]:
    """The ``fbalign`` command line this script runs for its own ``argv``."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag goes to fbalign reproduce (see fbalign reproduce --help): "
               "--resume, --overwrite, --no-progress, --no-figures.")
    ap.add_argument("--quick", action="store_true", help="the recipe's quick budget (tests)")
    ap.add_argument("--epochs", type=int, default=None, help="cut every run to N epochs")
    ap.add_argument("--seeds", type=int, default=1, help="networks per rule (default 1)")
    ap.add_argument("--out", default=None, help="output directory")
    args, rest = ap.parse_known_args(argv)
    if any(a.startswith("--experiment") for a in rest):
        ap.error(f"this script runs the {EXPERIMENT!r} experiment of {RECIPE}; for another, run "
                 f"fbalign reproduce {RECIPE} --experiment NAME")
    out = ["reproduce", RECIPE, "--experiment", EXPERIMENT,
           "--budget", "quick" if args.quick else "paper", "--seeds", str(args.seeds)]
    out += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    out += ["--out", args.out] if args.out else []
    return out + rest


def main(argv: list[str] | None = None) -> int:
    """Runs the reproduction; returns ``fbalign reproduce``'s exit status."""
    cmd = reproduce_argv(sys.argv[1:] if argv is None else argv)
    print("fbalign " + " ".join(cmd), flush=True)
    return fbalign_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
