"""Option checks shared by the rule constructors: run once, when a rule is built (never per
step), each naming the rule, the option, the value and the range it must lie in."""

from __future__ import annotations

import math
from typing import Any


def check_number(rule: str, option: str, value: Any, *, low: float | None = None,
                 low_open: bool = False, high: float | None = None, high_open: bool = False,
                 optional: bool = False) -> None:
    """Raises a ValueError naming ``rule`` and ``option`` unless ``value`` is a finite real
    number in the interval given by ``low``/``high`` (``*_open``: the end itself excluded);
    ``optional`` admits None. Arrays and tracers (schedules, values under ``jit``) pass
    unchecked: only Python and NumPy scalars are known when a rule is built."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not _is_real(value):
        if hasattr(value, "shape") and not isinstance(value, bool):
            return  # an array (a schedule) or a tracer
        raise ValueError(f"{rule}: {option} must be a real number, got {value!r}")
    v = float(value)
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        want = " and ".join(p for p in (lo, hi) if p) or "finite"
        raise ValueError(f"{rule}: {option} must be {want} (and finite), got {value!r}")


def check_count(rule: str, option: str, value: Any, meaning: str) -> None:
    """Raises ``ValueError("<rule>: <option> must be a positive integer (<meaning>), got ...")``
    unless ``value`` is None or a positive int (bools refused)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{rule}: {option} must be a positive integer ({meaning}), got "
                         f"{value!r}")


def check_choice(rule: str, option: str, value: Any, valid: Any) -> None:
    """Raises ``ValueError("<rule>: unknown <option> <value>; valid: ...")`` unless ``value`` is
    one of ``valid`` (a sequence or mapping of names)."""
    if value not in valid:
        raise ValueError(f"{rule}: unknown {option} {value!r}; valid: {', '.join(valid)}")


def _is_real(value: Any) -> bool:
    if getattr(value, "ndim", 0) > 0:
        return False
    try:
        float(value)
    except (TypeError, ValueError):  # a tracer raises a TypeError
        return False
    return not isinstance(value, complex)
