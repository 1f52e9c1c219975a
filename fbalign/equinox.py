"""Equinox adapters: layers whose backward is a feedback rule, and `convert` (imports equinox).

``import fbalign`` never imports equinox; ``import fbalign.equinox`` does (``pip install
fbalign[equinox]``).

* `Linear`, `Conv`, `Conv2d`: subclasses of ``eqx.nn.Linear``/``eqx.nn.Conv`` (same fields,
  ``(dout, din)`` weights, same forward) with ``rule`` in `RULES`: ``"bp"``, ``"fa"``,
  ``"kp"``, ``"usf"``/``"sign"``, ``"frsf"``. They take one example (``jax.vmap`` over the
  batch) or a batch directly; the batch is faster (no per-example outer products).
* `FixedFeedback`: fixed feedback stored as its bit pattern (an unsigned-integer leaf), so
  ``eqx.filter(model, eqx.is_inexact_array)``, ``eqx.filter_grad`` and optax (weight decay
  included) never touch it; `feedback_array` reads any layer's feedback as floats.
  Kolen-Pollack's ``B`` is a plain array: the optimizer gives it ``W``'s update and decay.
* Direct feedback alignment: `dfa_carrier`, `DFATap`, `dfa_output`, correct under ``jax.vmap``
  (each example receives its own output error); `DirectFeedbackMLP`.
* `convert(model, rule, key=...)`: swaps every ``eqx.nn.Linear``/``eqx.nn.Conv`` in a model
  (``"dfa"``: wraps an ``eqx.nn.MLP``), warning about weighted layers it leaves alone.
"""

try:
    import equinox  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fbalign.equinox needs equinox, which is not installed: pip install fbalign[equinox] "
        "(or pip install equinox)") from err

from fbalign._src.equinox_adapters import (
    DFA_RULES,
    RULES,
    Conv,
    Conv2d,
    DFATap,
    DirectFeedbackMLP,
    FixedFeedback,
    Linear,
    convert,
    dfa_carrier,
    dfa_output,
    feedback_array,
)

__all__ = [
    "DFA_RULES",
    "RULES",
    "Conv",
    "Conv2d",
    "DFATap",
    "DirectFeedbackMLP",
    "FixedFeedback",
    "Linear",
    "convert",
    "dfa_carrier",
    "dfa_output",
    "feedback_array",
]
