"""Array annotations of the public API are jaxtyping shapes (``Float[Array, "batch din"]``).

Every callable exported by ``fbalign.ops``, ``fbalign.losses`` and ``fbalign.metrics`` (their
``__all__``), and the feedback-state NamedTuples of the FA family, must say the shape of each
array it takes or returns: after ``typing.get_type_hints``, no parameter, return or field hint
may contain a bare ``jax.Array`` (nor an unresolved string), looking inside unions, tuples,
lists, dicts and ``Callable`` signatures. Annotations are documentation (no run-time checker
is installed), so this is what keeps them from drifting back to ``jax.Array``.
"""

from __future__ import annotations

import inspect
import typing

import jax
import jaxtyping

import fbalign.losses
import fbalign.metrics
import fbalign.ops
import fbalign.rules

MODULES = (fbalign.ops, fbalign.losses, fbalign.metrics)
STATES = (
    "FeedbackAlignmentState",
    "DirectFeedbackAlignmentState",
    "KolenPollackState",
    "WeightMirrorState",
    "RandomBackpropState",
    "SignSymmetryState",
    "BatchRandomSignState",
    "BidirectionalFeedbackAlignmentState",
    "BidirectionalDirectFeedbackAlignmentState",
    "DirectRandomTargetProjectionState",
    "PALState",
    "ModularDFAState",
)


def _is_jaxtyping(hint) -> bool:
    # jaxtyping 0.3: `Float[Array, "..."]` is a class deriving from AbstractArray with a dim_str
    return isinstance(hint, type) and issubclass(hint, jaxtyping.AbstractArray)


def _walk(hint, where: str, bad: list[str], found: list[str]) -> None:
    """Records in ``bad`` every bare array (or unresolved string) inside ``hint``."""
    if _is_jaxtyping(hint):
        found.append(f"{where}: {hint.dim_str!r}")
        return
    if hint is jax.Array or (isinstance(hint, type) and issubclass(hint, jax.Array)):
        bad.append(f"{where}: bare {hint!r}")
        return
    if typing.get_origin(hint) is typing.Literal:  # its strings are values, not types
        return
    if isinstance(hint, (str, typing.ForwardRef)):
        bad.append(f"{where}: unresolved {hint!r}")
        return
    if isinstance(hint, (list, tuple)):  # the argument list of a Callable
        for h in hint:
            _walk(h, where, bad, found)
        return
    for arg in typing.get_args(hint):
        _walk(arg, where, bad, found)


def _public_callables():
    for mod in MODULES:
        names = getattr(mod, "__all__", None)
        assert names, f"{mod.__name__} has no __all__"
        for name in names:
            obj = getattr(mod, name)
            if callable(obj) and not isinstance(obj, type):
                yield f"{mod.__name__}.{name}", obj


def test_public_array_annotations_are_jaxtyping():
    bad: list[str] = []
    found: list[str] = []
    checked = 0
    for qualname, obj in _public_callables():
        fn = inspect.unwrap(getattr(obj, "fun", obj))  # jax.custom_vjp keeps the function in .fun
        if not inspect.isfunction(fn):
            continue
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        if "return" not in hints:
            bad.append(f"{qualname}: no return annotation")
        for pname, p in sig.parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or pname in hints:
                continue
            if p.default is inspect.Parameter.empty:  # a required argument says what it is
                bad.append(f"{qualname}({pname}): no annotation")
        for key, hint in hints.items():
            _walk(hint, f"{qualname}({key})", bad, found)
        checked += 1
    for name in STATES:
        cls = getattr(fbalign.rules, name)
        for field, hint in typing.get_type_hints(cls).items():
            _walk(hint, f"fbalign.rules.{name}.{field}", bad, found)
        checked += 1
    assert not bad, "array annotations that are not jaxtyping shapes:\n" + "\n".join(bad)
    # The walk really sees the annotations (a detector that matched nothing would pass above).
    assert checked >= 30, checked
    assert "fbalign.ops.fa_matmul(w): 'din dout'" in found, found
    assert "fbalign.losses.cross_entropy(return): ''" in found, found
    assert len(found) >= 80, len(found)
