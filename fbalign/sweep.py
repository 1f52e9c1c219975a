"""Sweeps: a grid of seeds, learning rates, feedback scales and numeric rule options trained in
one compiled program (``fbalign sweep`` on the command line)."""

from fbalign._src.sweep import (
    BUILTIN_AXES,
    OPTIMIZERS,
    SHAPE_AXES,
    SweepResult,
    check_grid,
    grid_configs,
    parse_grid,
    sweep,
)

__all__ = [
    "BUILTIN_AXES",
    "OPTIMIZERS",
    "SHAPE_AXES",
    "SweepResult",
    "check_grid",
    "grid_configs",
    "parse_grid",
    "sweep",
]
