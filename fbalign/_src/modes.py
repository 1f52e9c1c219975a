"""The legacy mode strings of ``apply(params, x, feedback, mode)``, read in this one place.

Each mode names a `fbalign._src.backward.Backward`; rules build theirs themselves
(``TapeRule.backward``). Kept for code that calls ``apply`` with a mode.
"""

from __future__ import annotations

from typing import Any

from fbalign._src import channel as C
from fbalign._src.backward import (
    Backward,
    DirectFeedback,
    LinearFeedback,
    Shallow,
    SignFeedback,
    TargetProjection,
)
from fbalign._src.base import Array
from fbalign._src.rules.bidirectional import bdfa_feedback_grad

MODES = ("bp", "fa", "kp", "dfa", "shallow", "sign", "fa_noderiv", "drtp", "adfa", "bdfa")
_TAPS = {"dfa": "zero", "adfa": "activity", "bdfa": bdfa_feedback_grad}
_NEEDS_FEEDBACK = ("fa", "kp", "dfa", "sign", "fa_noderiv", "drtp", "adfa", "bdfa")


def mode_kind(mode: str | None) -> str | None:
    """The feedback layout (``"fa"``, ``"sign"``, ``"dfa"``) of a mode's backward, else None."""
    if mode not in MODES:
        return None
    return {"fa": "fa", "kp": "fa", "fa_noderiv": "fa", "sign": "sign"}.get(
        mode, "dfa" if mode in (*_TAPS, "drtp") else None)


def backward_for_mode(mode: str, feedback: Any, *, num_layers: int, n_out: int,
                      batch: int, dtype: Any, labels: Array | None = None,
                      derivative: bool = True, error_bits: int | None = None) -> Backward:
    """The `Backward` that ``apply(params, x, feedback, mode, ...)`` runs: the one place that
    interprets mode strings (`MODES`), checking the feedback count and labels."""
    if mode not in MODES:
        raise ValueError(f"unknown backward mode {mode!r}; valid: {', '.join(MODES)}")
    if mode in _NEEDS_FEEDBACK and (feedback is None or len(feedback) != num_layers):
        raise ValueError(f"mode {mode!r} needs one feedback entry per layer ({num_layers}), got "
                         f"{None if feedback is None else len(feedback)}")
    if mode == "fa_noderiv":
        mode, derivative = "fa", False
    channel = dict(derivative=derivative, error_bits=error_bits)
    targets = None
    if mode in ("drtp", "bdfa"):
        if labels is None:
            raise ValueError(f"mode {mode!r} reads the target: pass labels=...")
        targets = C.as_targets(labels, n_out, dtype)
    if mode in ("fa", "kp"):
        return LinearFeedback(**channel, feedback=feedback, learn=mode == "kp")
    if mode == "sign":
        return SignFeedback(**channel, feedback=feedback)
    if mode in _TAPS:
        return DirectFeedback(**channel, feedback=feedback, tap_cotangent=_TAPS[mode],
                              targets=targets)
    if mode == "drtp":
        return TargetProjection(**channel, feedback=feedback, targets=targets / batch)
    return Shallow(**channel) if mode == "shallow" else Backward(**channel)
