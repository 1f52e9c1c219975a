"""Backward objects: what each layer of a network sends back, decided by the rule, not the model.

A network's forward calls one `Backward` at four points (as diffrax's solvers call a swappable
adjoint), and plain ``jax.grad`` of the loss then returns the rule's updates:

* ``begin(x, n_out)`` once, returning the error carrier (DFA-style rules) or None;
* ``linear(i, op, x, w)`` for layer ``i``'s linear map ``op(x, w)`` (dense, conv, einsum);
* ``hidden(i, f, a, carrier) -> (h, carrier)`` for a hidden layer's activation ``f(a)``;
* ``into_last(h)`` and ``output(a, carrier)`` around the output layer.

`Backward` itself is backprop. The subclasses cover the feedback-alignment family; models
(`fbalign.models.MLP`, `LeNet5`) contain no rule logic. Each tape rule builds its own
(``TapeRule.backward``, in the rule's file); `fbalign._src.modes.backward_for_mode` is the one
place that reads the legacy mode strings of ``apply(params, x, feedback, mode)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax

from fbalign._src import channel as C
from fbalign._src import primitives as P
from fbalign._src.base import Array
from fbalign._src.feedback_init import sign_feedback

LinearOp = Callable[[Array, Array], Array]
Feedback = Sequence[Array | None] | Mapping[Any, Array]


@dataclasses.dataclass(frozen=True)
class Backward:
    """Backpropagation, with two channel options every rule shares.

    Attributes:
      derivative: if False, hidden activations pass the error with ``f'`` replaced by 1
        (`fbalign._src.channel.straight_through`; Baldi et al. 2018's derivative-free RBP).
      error_bits: quantise the error reaching each hidden layer's output to this many bits.
    """

    derivative: bool = True
    error_bits: int | None = None
    kind: ClassVar[str | None] = None  # the feedback layout, for diagnostics

    def begin(self, x: Array, n_out: int) -> Array | None:
        del x, n_out
        return None

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        del i
        return op(x, w)

    def hidden(self, i: Any, f: Callable[[Array], Array], a: Array,
               carrier: Array | None) -> tuple[Array, Array | None]:
        h = f(a) if self.derivative else C.straight_through(f, a)
        if self.error_bits is not None:
            h = C.quantize_error(h, self.error_bits)
        return self.tap(i, h, carrier)

    def tap(self, i: Any, h: Array, carrier: Array | None) -> tuple[Array, Array | None]:
        del i
        return h, carrier

    def into_last(self, h: Array) -> Array:
        return h

    def output(self, a: Array, carrier: Array | None) -> Array:
        del carrier
        return a


@dataclasses.dataclass(frozen=True)
class Shallow(Backward):
    """Only the output layer learns: the error stops at its input (`stop_error`)."""

    def into_last(self, h: Array) -> Array:
        return P.stop_error(h)


def feedback_entry(feedback: Feedback, i: Any) -> Array | None:
    if isinstance(feedback, Mapping):
        return feedback.get(i)
    return None if i == 0 else feedback[i]  # layer 0's input error goes nowhere


@dataclasses.dataclass(frozen=True)
class LinearFeedback(Backward):
    """Feedback alignment (Lillicrap et al. 2016): layer ``i`` sends the error back through
    ``op(., B_i)`` instead of ``op(., W_i)`` (`feedback_op`); ``B_i`` has ``W_i``'s shape.
    ``learn=True`` also hands ``B_i`` the weight's own cotangent (Kolen-Pollack, Akrout et al.
    2019). ``feedback`` is a sequence indexed by layer (entry 0 unused) or a mapping by name."""

    feedback: Feedback = ()
    learn: bool = False
    kind: ClassVar[str | None] = "fa"

    def checked_feedback(self, i: Any, w: Array) -> Array | None:
        """``B_i``, or None for a layer without feedback; a ValueError naming the layer when
        ``B_i`` does not have ``W_i``'s shape and dtype."""
        b = feedback_entry(self.feedback, i)
        if b is not None and (b.shape != w.shape or b.dtype != w.dtype):
            raise ValueError(
                f"feedback for layer {i} must have the weight's shape and dtype "
                f"{tuple(w.shape)} {w.dtype}, got {tuple(b.shape)} {b.dtype}"
                + (" (transposed?)" if b.shape == w.shape[::-1] else ""))
        return b

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        b = self.checked_feedback(i, w)
        if b is None:
            return op(x, w)
        return P.feedback_op(op, "weight" if self.learn else "zero")(x, w, b)


def custom_linear_op(op: LinearOp, send_down: Callable[[Array, Array, Array, Array], Array],
                     feedback_grad: Callable[[Array, Array, Array, Array], Array]):
    """``f(x, w, b) = op(x, w)`` whose backward gives ``w`` its ordinary gradient, ``x`` the
    error ``send_down(g, x, w, b)`` and ``b`` the cotangent ``feedback_grad(g, x, w, b)``: the
    one ``custom_vjp`` that feedback rules with their own way down (dynamic inversion) or their
    own feedback cotangent (learned feedback) fill in. Cache the result per rule setting."""

    @jax.custom_vjp
    def f(x: Array, w: Array, b: Array) -> Array:
        return op(x, w)

    def fwd(x, w, b):
        return op(x, w), (x, w, b)

    def bwd(res, g):
        x, w, b = res
        (gw,) = jax.vjp(lambda w_: op(x, w_), w)[1](g)
        return send_down(g, x, w, b), gw, feedback_grad(g, x, w, b)

    f.defvjp(fwd, bwd)
    return f


@dataclasses.dataclass(frozen=True)
class SignFeedback(Backward):
    """Sign symmetry (Liao, Leibo & Poggio 2016): the error goes back through
    ``sign(W_i) * M_i``, read from ``W_i`` at call time; ``feedback`` holds the magnitudes."""

    feedback: Feedback = ()
    kind: ClassVar[str | None] = "sign"

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        m = feedback_entry(self.feedback, i)
        if m is None:
            return op(x, w)
        return P.feedback_op(op)(x, w, jax.lax.stop_gradient(sign_feedback(w, m)))


@dataclasses.dataclass(frozen=True)
class DirectFeedback(Backward):
    """Direct feedback alignment (Nokland 2016): the output error reaches hidden layer ``i`` as
    ``e @ B_i`` through a `dfa_hidden` tap; ``B_i`` is ``(n_out, *shape of h_i)`` or flat.

    ``tap_cotangent`` is what ``jax.grad`` returns for ``B_i`` (`fbalign.ops.dfa_hidden`):
    ``"zero"``, ``"activity"`` (adaptive skipped RBP) or a rule's own feedback gradient
    (bidirectional DFA's `bdfa_feedback_grad`, which reads ``targets``)."""

    feedback: Feedback = ()
    tap_cotangent: Literal["zero", "activity"] | P.FeedbackGrad = "zero"
    targets: Array | None = None
    kind: ClassVar[str | None] = "dfa"

    def __post_init__(self):
        if hasattr(self.feedback, "ndim"):  # one array, not one entry per layer
            raise ValueError(
                "DirectFeedback needs one feedback entry per layer (None for the output layer), "
                f"got a single array of shape {tuple(self.feedback.shape)}; slice a shared "
                "matrix per layer with fbalign.ops.shared_dfa_feedback (LeNet5.apply does that "
                "for mode='dfa')")

    def begin(self, x: Array, n_out: int) -> Array:
        return P.dfa_carrier((x.shape[0], n_out), x.dtype)

    def tap(self, i: Any, h: Array, carrier: Array | None) -> tuple[Array, Array | None]:
        return P.dfa_hidden(h, carrier, self.feedback[i], feedback_cotangent=self.tap_cotangent,
                            targets=self.targets)

    def output(self, a: Array, carrier: Array | None) -> Array:
        return P.dfa_output(a, carrier)


@dataclasses.dataclass(frozen=True)
class TargetProjection(DirectFeedback):
    """Direct random target projection (Frenkel et al. 2021): the taps receive the one-hot
    target divided by the batch size (``targets``) instead of the output error."""

    def tap(self, i: Any, h: Array, carrier: Array | None) -> tuple[Array, Array | None]:
        return P.dfa_hidden(h, carrier, self.feedback[i])

    def output(self, a: Array, carrier: Array | None) -> Array:
        return C.target_output(a, carrier, self.targets)
