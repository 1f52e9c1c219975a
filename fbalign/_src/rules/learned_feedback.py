"""Feedback weights that learn by layer-wise regularisation: Kunin et al. (2020)'s primitives and
the alignment rules built from them (information, symmetric and activation alignment)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fbalign._src.backward import LinearFeedback, LinearOp, custom_linear_op
from fbalign._src.base import (
    Array,
    LayerOp,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
    descend_feedback,
    descending_advance,
    forwards_options,
)
from fbalign._src.checks import check_choice
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import FA_ORIENTATION, draw_feedback, fa_feedback_shapes

PRIMITIVES = ("decay", "amp", "null", "sparse", "self")
LOCAL_PRIMITIVES = ("decay", "amp", "null")

# The named rules of Kunin et al. (2020), Table 1 and Sec. 4-5: which primitive each of the
# constructor's coefficients (alpha, beta, gamma) weighs, and the coefficients' defaults.
NAMED_RULES: dict[str, tuple[tuple[str, float], ...]] = {
    "information_alignment": (("amp", 1.0), ("null", 1.0), ("decay", 0.1)),
    "symmetric_alignment": (("self", 1.0), ("decay", 1.0)),
    "activation_alignment": (("amp", 1.0), ("sparse", 1.0)),
}
SOURCES = ("activity", "noise")


class LearnedFeedbackState(NamedTuple):
    """``feedback[l]`` has ``W_l``'s shape ``(din, dout)``; ``feedback[0]`` is None. Every
    ``update`` (or ``advance``) moves it one gradient step down the layer's regulariser."""

    feedback: tuple[Array | None, ...]


def _matmul(x: Array, w: Array) -> Array:
    return x @ w


def primitive(name: str, x: Array, w: Array, b: Array,
              op: Callable[[Array, Array], Array] | None = None) -> Array:
    r"""One of Kunin et al. (2020)'s regularisation primitives of a layer's feedback ``B``.

    Row-major, as everywhere in fbalign: the layer's input is ``x`` ``(n, din)``, its output
    ``r = x W`` ``(n, dout)``, and ``B`` has ``W``'s shape, carrying an error ``e`` back as
    ``e B^\top`` (the paper's column-major ``B`` is our ``B^\top``):

    .. math::
        P_\text{decay} = \tfrac12 \lVert B\rVert_F^2, \qquad
        P_\text{amp} = -\tfrac1n \operatorname{tr}\bigl((xB)^\top r\bigr), \qquad
        P_\text{null} = \tfrac1{2n} \lVert r B^\top\rVert_F^2,

    .. math::
        P_\text{sparse} = \tfrac1{2n} \lVert x B\rVert_F^2, \qquad
        P_\text{self} = -\operatorname{tr}(W^\top B),

    with gradients ``B``, ``-x^T r / n`` (the Hebbian product of the synapse's two ends),
    ``B r^T r / n`` (the feedback's own response ``r B^T`` times its input ``r``),
    ``x^T x B / n`` and ``-W``. Decay, amp and null are local (each feedback synapse sees only
    the activity at its two ends); sparse (it needs ``x B``, the input sent forward through the
    feedback) and self (it reads ``W``) are not. The data terms are batch means (sums over
    every other axis), as in the authors' code; the quadratic terms carry the paper's 1/2.

    For a layer ``r = op(x, W)`` other than a matrix product (a convolution, linear in both
    arguments) ``xB`` becomes ``op(x, B)``, ``r B^T`` the transpose of ``op(., B)`` applied to
    ``r``, and the trace an inner product.

    Args:
      name: one of ``"decay"``, ``"amp"``, ``"null"``, ``"sparse"``, ``"self"``.
      x: the layer's input (or the noise that drives it), ``(n, ...)``.
      w: the forward weights ``W``; ``b``: the feedback ``B`` of ``W``'s shape.
      op: the layer's linear map ``op(x, W)``; None for ``x @ W``.

    Returns:
      The scalar ``P_name``.

    References:
      Kunin, Nayebi, Sagastuy-Brena, Ganguli, Bloom & Yamins (2020), "Two routes to scalable
      credit assignment without weight symmetry", ICML (Table 1).
    """
    op = _matmul if op is None else op
    n = x.shape[0]
    if name == "decay":
        return 0.5 * jnp.sum(b * b)
    if name == "self":
        return -jnp.sum(w * b)
    if name == "sparse":
        xb = op(x, b)
        return 0.5 * jnp.sum(xb * xb) / n
    r = op(x, w)
    if name == "amp":
        return -jnp.sum(op(x, b) * r) / n
    if name == "null":
        back = jax.vjp(lambda x_: op(x_, b), x)[1](r)[0]  # r B^T on a dense layer
        return 0.5 * jnp.sum(back * back) / n
    raise ValueError(f"unknown primitive {name!r}; valid: {', '.join(PRIMITIVES)}")


def regularizer(terms: Mapping[str, float] | Sequence[tuple[str, float]], x: Array, w: Array,
                b: Array, op: Callable[[Array, Array], Array] | None = None) -> Array:
    r"""A layer's regulariser ``R(B) = sum_k c_k P_k(x, W, B)`` (`primitive`), the weighted
    sum of primitives that defines a learning rule of Kunin et al. (2020), e.g. information
    alignment ``R_IA = alpha P_amp + beta P_null + gamma P_decay``."""
    items = terms.items() if isinstance(terms, Mapping) else terms
    return sum((c * primitive(k, x, w, b, op) for k, c in items if c != 0),
               jnp.zeros((), b.dtype))


def regularizer_grad(terms: Mapping[str, float] | Sequence[tuple[str, float]], x: Array,
                     w: Array, b: Array, op: Callable[[Array, Array], Array] | None = None
                     ) -> Array:
    r"""``\nabla_B R(B)`` of `regularizer`, the direction the feedback descends: ``B_l \leftarrow
    B_l - \eta \nabla_B R``. ``x`` and ``W`` are held fixed (no gradient flows to them)."""
    x, w = jax.lax.stop_gradient(x), jax.lax.stop_gradient(w)
    return jax.grad(lambda b_: regularizer(terms, x, w, b_, op))(b)


def _check_terms(terms: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    for k, c in terms.items():
        if k not in PRIMITIVES:
            raise ValueError(f"learned_feedback: unknown primitive {k!r} in terms; valid: "
                             f"{', '.join(PRIMITIVES)}")
        if not isinstance(c, (int, float)) or c != c:
            raise ValueError(f"learned_feedback: the coefficient of {k!r} must be a number, "
                             f"got {c!r}")
    if not any(c != 0 for c in terms.values()):
        raise ValueError("learned_feedback: every coefficient is zero: the feedback would never "
                         "learn (that is feedback alignment: use the 'fa' rule)")
    return tuple(sorted((k, float(c)) for k, c in terms.items()))


@functools.cache
def _regularized_op(op: LinearOp, terms: tuple[tuple[str, float], ...]):
    """``f(x, w, b) = op(x, w)`` whose backward sends the error through ``op(., b)`` (feedback
    alignment) and hands ``b`` the cotangent ``\\nabla_B R(x, W, B)``, the regulariser's gradient
    at the layer's recorded input: the ``jax.grad`` form of `learned_feedback`."""

    def through_b(g, x, w, b):
        return jax.vjp(lambda x_: op(x_, b), x)[1](g)[0]

    return custom_linear_op(op, through_b,
                            lambda g, x, w, b: regularizer_grad(terms, x, w, b, op))


@dataclasses.dataclass(frozen=True)
class RegularizedFeedback(LinearFeedback):
    """Feedback alignment through ``B_i`` whose ``jax.grad`` cotangent is ``\\nabla_B R``, the
    gradient of `learned_feedback`'s regulariser at the layer's input (`regularizer_grad`)."""

    terms: tuple[tuple[str, float], ...] = ()
    kind: ClassVar[str | None] = "fa"

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        b = self.checked_feedback(i, w)
        if b is None:
            return op(x, w)
        return _regularized_op(op, self.terms)(x, w, b)


def learned_feedback(
    rule: str = "information_alignment",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    learning_rate: float = 0.05,
    source: str = "activity",
    noise_std: float = 1.0,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    terms: Mapping[str, float] | None = None,
) -> TapeRule:
    r"""Feedback alignment whose feedback ``B_l`` descends a layer-wise regulariser.

    Kunin et al. (2020) cast learned-feedback rules as a regulariser ``R`` of each layer's
    feedback, a weighted sum of primitives (`primitive`) of the layer's input ``x``, output
    ``r = x W_l`` and ``B_l``. Errors travel as in feedback alignment (row-major, ``B_l`` of
    ``W_l``'s shape), and after every batch each ``B_l`` takes a gradient step:

    .. math::
        \delta_{l-1} = (\delta_l B_l^\top) \odot f'(a_{l-1}), \quad
        \text{updates}[l]_w = x_l^\top \delta_l, \quad
        B_l \leftarrow B_l - \eta\, \nabla_{B_l} R(x_l, W_l, B_l).

    The named rules (coefficients ``alpha``, ``beta``, ``gamma`` in this order):

    * ``"information_alignment"`` (IA, local): ``R = \alpha P_{amp} + \beta P_{null} + \gamma
      P_{decay}``. For white inputs the expected gradient ``-\alpha W + \beta B W^\top W +
      \gamma B`` vanishes at ``B = \alpha W (\gamma I + \beta W^\top W)^{-1}``, aligned with
      ``W`` and of bounded size (the null term is what IA adds to weight mirrors, ``amp +
      decay``, to make them robust to the coefficients).
    * ``"symmetric_alignment"`` (SA, non-local, a "weight estimation" rule): ``R = \alpha
      P_{self} + \beta P_{decay}``, whose minimum is ``B = (\alpha/\beta) W``; with ``\alpha =
      \beta``, ``R = \tfrac12\lVert B - W\rVert^2 + \text{const}`` and at its optimum the
      rule is backprop exactly.
    * ``"activation_alignment"`` (AA, non-local): ``R = \alpha P_{amp} + \beta P_{sparse}``,
      gradient ``x^\top x (\beta B - \alpha W)/n``: ``B = (\alpha/\beta) W`` on the span of
      the inputs.

    Weight mirrors (``amp + decay`` driven by noise) and Kolen-Pollack are the registered rules
    ``wm`` and ``kp``.

    Args:
      rule: ``"information_alignment"``, ``"symmetric_alignment"`` or
        ``"activation_alignment"``.
      alpha, beta, gamma: the coefficients of the rule's primitives, in the order above (None:
        the defaults, IA ``(1, 1, 0.1)``, SA ``(1, 1)``, AA ``(1, 1)``; ours, not the paper's
        ImageNet values).
      learning_rate: ``\eta``, the SGD step of the feedback weights.
      source: what drives the primitives: ``"activity"``, the layer's recorded input ``x_l``
        (the forward pass's own activity), or ``"noise"``, i.i.d. ``N(0, \sigma^2)`` of the
        same shape (as in weight mirrors' mirror phase; needs ``key=`` in ``update``).
      noise_std: ``\sigma`` for ``source="noise"``.
      init: initialiser of B (``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"``
        or a callable).
      scale: the initialiser's std/limit/gain (None: variance-preserving default).
      terms: a custom regulariser instead of a named rule, ``{primitive: coefficient}`` (then
        ``alpha``/``beta``/``gamma`` must be None).

    Returns:
      A `TapeRule` whose state, `LearnedFeedbackState`, holds B. ``jax.grad`` form: with
      ``source="activity"`` each layer's primitive hands its ``B_l`` the cotangent ``\nabla R``
      at its input (`RegularizedFeedback`) and ``advance`` descends it (`descending_advance`);
      with ``source="noise"`` ``advance`` drives each layer with noise (``model.layer_ops()``).

    References:
      Kunin, Nayebi, Sagastuy-Brena, Ganguli, Bloom & Yamins (2020), "Two routes to scalable
      credit assignment without weight symmetry", ICML (Table 1; Secs. 3-5).
    """
    if terms is not None:
        if rule not in (None, "custom") and rule not in NAMED_RULES:
            raise ValueError(f"learned_feedback: unknown rule {rule!r}; valid: "
                             f"{', '.join(NAMED_RULES)} (or terms={{...}})")
        if (alpha, beta, gamma) != (None, None, None):
            raise ValueError("learned_feedback: pass either terms={primitive: coefficient} or "
                             "alpha/beta/gamma for a named rule, not both")
        coeffs = _check_terms(dict(terms))
        name = "learned_feedback"
    else:
        check_choice("learned_feedback", "rule", rule, NAMED_RULES)
        spec = NAMED_RULES[rule]
        given = (alpha, beta, gamma)
        if len(spec) < 3 and gamma is not None:
            raise ValueError(f"learned_feedback: rule {rule!r} has two coefficients (alpha: "
                             f"{spec[0][0]}, beta: {spec[1][0]}); gamma must be None, got "
                             f"{gamma!r}")
        coeffs = _check_terms({k: d if g is None else g
                               for (k, d), g in zip(spec, given, strict=False)})
        name = rule
    check_choice("learned_feedback", "source", source, SOURCES)
    if not learning_rate > 0:
        raise ValueError(f"learned_feedback: learning_rate must be > 0, got {learning_rate!r}")
    if not noise_std > 0:
        raise ValueError(f"learned_feedback: noise_std must be > 0, got {noise_std!r}")
    noisy = source == "noise"

    def init_fn(key: PRNGKey, params: Params) -> LearnedFeedbackState:
        dtype = dense_layers(params)[0][0].dtype
        return LearnedFeedbackState(
            draw_feedback(key, fa_feedback_shapes(params), init, scale, dtype, 1))

    def new_feedback(params: Params, fb: tuple, inputs: Sequence[Array],
                     ops: Sequence[Callable[[Array, Array], Array]]) -> tuple:
        grads = tuple(
            None if b is None else regularizer_grad(coeffs, x, p["w"], b, op)
            for b, p, x, op in zip(fb, params, inputs, ops, strict=True)
        )
        return descend_feedback(fb, grads, learning_rate)

    def noise_inputs(key: PRNGKey, fb: tuple, shapes: Sequence[tuple[int, ...]], dtype: Any):
        keys = jax.random.split(key, len(fb))
        return [None if b is None else noise_std * jax.random.normal(k, s, dtype)
                for k, b, s in zip(keys, fb, shapes, strict=True)]

    def update_fn(params: Params, state: LearnedFeedbackState, tape: Tape, error: Array, *,
                  key: PRNGKey | None = None, **extra: Any):
        del extra
        dtype = dense_layers(params)[0][0].dtype
        check_feedback_shapes(state.feedback, fa_feedback_shapes(params), name,
                              FA_ORIENTATION, dtype=dtype)
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        ops = (tape.links.ops if tape.links is not None
               else (_matmul,) * tape.num_layers)
        inputs = list(tape.inputs)
        if noisy:
            if key is None:
                raise ValueError(f"{name} with source='noise' draws the noise that drives each "
                                 "layer: pass key=... to update")
            inputs = noise_inputs(key, fb, [x.shape for x in tape.inputs], dtype)
        return updates, LearnedFeedbackState(new_feedback(params, fb, inputs, ops))

    def noise_advance(params: Params, state: LearnedFeedbackState, updates: Any,
                      feedback_grads: Any, *, key: PRNGKey | None = None,
                      layers: Sequence[LayerOp] | None = None):
        del feedback_grads
        if key is None:
            raise ValueError(f"{name} with source='noise' draws noise: pass key=...")
        if layers is None:
            raise ValueError(f"{name}'s jax.grad form with source='noise' drives every layer "
                             "with noise: it needs the model's layer_ops() (fbalign.models.MLP "
                             "has one)")
        fb = state.feedback
        dtype = dense_layers(params)[0][0].dtype
        # A batch of noise as large as the data batch is unknown here: one sample per input
        # unit keeps the noise covariance full rank.
        shapes = [(max(1, layer.input_shape[-1]), *layer.input_shape) for layer in layers]
        inputs = noise_inputs(key, fb, shapes, dtype)
        return updates, LearnedFeedbackState(
            new_feedback(params, fb, inputs, [layer.op for layer in layers]))

    if noisy:
        return TapeRule(init_fn, update_fn, noise_advance,
                        backward=lambda feedback, labels: LinearFeedback(feedback=feedback))
    return TapeRule(init_fn, update_fn, descending_advance(LearnedFeedbackState, learning_rate),
                    backward=lambda feedback, labels: RegularizedFeedback(feedback=feedback,
                                                                          terms=coeffs))


@forwards_options(learned_feedback, ("rule", "alpha", "beta", "gamma", "terms"))
def information_alignment(alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.1,
                          **kwargs: Any) -> TapeRule:
    r"""Information alignment (IA, Kunin et al. 2020): `learned_feedback` with ``R = \alpha
    P_{amp} + \beta P_{null} + \gamma P_{decay}``; the other options as there."""
    return learned_feedback("information_alignment", alpha, beta, gamma, **kwargs)


@forwards_options(learned_feedback, ("rule", "alpha", "beta", "gamma", "terms"))
def symmetric_alignment(alpha: float = 1.0, beta: float = 1.0, learning_rate: float = 0.5,
                        **kwargs: Any) -> TapeRule:
    r"""Symmetric alignment (SA, Kunin et al. 2020): `learned_feedback` with ``R = \alpha
    P_{self} + \beta P_{decay}``, minimised by ``B = (\alpha/\beta) W``; the other options as
    there.

    Its step ``B \leftarrow (1 - \eta\beta) B + \eta\alpha W`` reads no data, so it is a
    contraction towards ``(\alpha/\beta) W`` for any ``0 < \eta\beta < 2``; the default
    ``\eta = 0.5`` halves the gap every step. (In the authors' code B descends R with the
    forward weights' own optimizer. At `learned_feedback`'s 0.05, B lagged a 3x64 ReLU MLP
    trained by SGD 0.02 with momentum 0.9 on digits, and the run diverged: 45% test error after
    8 epochs, against 4.2% at 0.5 and 2.8% for backprop.)"""
    return learned_feedback("symmetric_alignment", alpha, beta, learning_rate=learning_rate,
                            **kwargs)


@forwards_options(learned_feedback, ("rule", "alpha", "beta", "gamma", "terms"))
def activation_alignment(alpha: float = 1.0, beta: float = 1.0, **kwargs: Any) -> TapeRule:
    r"""Activation alignment (AA, Kunin et al. 2020): `learned_feedback` with ``R = \alpha
    P_{amp} + \beta P_{sparse}``; the other options as there."""
    return learned_feedback("activation_alignment", alpha, beta, **kwargs)
