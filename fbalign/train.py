"""Training harness: jitted train steps for any rule, an epoch loop, evaluation."""

from fbalign._src.lift import FORMS
from fbalign._src.sweep import fit
from fbalign._src.train import (
    ENSEMBLE_IMPLS,
    NONFINITE_MODES,
    FitResult,
    NonFiniteError,
    TrainState,
    compute_updates,
    ensemble_step,
    evaluate,
    init_rule_state,
    init_train_state,
    make_epoch_runner,
    make_eval_fn,
    make_train_step,
    nonfinite_leaf_names,
    resolve_ensemble_impl,
)

__all__ = [
    "ENSEMBLE_IMPLS",
    "FORMS",
    "FitResult",
    "NONFINITE_MODES",
    "NonFiniteError",
    "TrainState",
    "compute_updates",
    "ensemble_step",
    "evaluate",
    "fit",
    "init_rule_state",
    "init_train_state",
    "make_epoch_runner",
    "make_eval_fn",
    "make_train_step",
    "nonfinite_leaf_names",
    "resolve_ensemble_impl",
]
