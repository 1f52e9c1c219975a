"""Bidirectional feedback alignment: the feedback weights learn to generate the input (BFA) or
the hidden layers' activity (BDFA) from the target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.activations import get_activation
from fbalign._src.backward import DirectFeedback, LinearFeedback
from fbalign._src.base import (
    Array,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
    descending_advance,
)
from fbalign._src.channel import as_targets
from fbalign._src.checks import check_number
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import (
    DFA_ORIENTATION,
    dfa_feedback_shapes,
    direct_feedback,
    draw_feedback,
    project,
)

BFA_ORIENTATION = (
    "B_l has the shape of W_l, (din, dout), for every layer (B_0 generates the input); the "
    "error goes back as delta @ B_l.T"
)


class BidirectionalFeedbackAlignmentState(NamedTuple):
    """``feedback[l]`` has ``W_l``'s shape ``(din, dout)`` for *every* layer: ``B_1..B_{L-1}``
    carry the error down, and all of them form the top-down network that generates the input."""

    feedback: tuple[Float[Array, "din dout"], ...]


def _activation(f: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
    if callable(f):
        return f
    return get_activation(f)


def _value_and_deriv(f: Callable[[Array], Array], a: Array) -> tuple[Array, Array]:
    return jax.jvp(f, (a,), (jnp.ones_like(a),))


def bidirectional_feedback_alignment(
    learning_rate: float = 0.01,
    activation: str | Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]] = "tanh",
    input_activation: str | Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]] = "linear",
    init: str | Initializer = "gaussian",
    scale: float | None = None,
) -> TapeRule:
    r"""Bidirectional FA (BFA): W and B each learn with the other as their feedback.

    *Forward learning* is feedback alignment through the current ``B`` (row-major, ``B_l`` of
    ``W_l``'s shape): ``\delta_{l-1} = (\delta_l B_l^\top) \odot f'(a_{l-1})``,
    ``\Delta W_l = x_l^\top \delta_l``.

    *Backward learning*: ``B`` is the weight set of a top-down network that maps the target
    ``t`` (one-hot ``labels``) back to the input, and it learns to reconstruct the input with
    ``W`` as *its* feedback:

    .. math::
        g_L = t,\quad r_l = g_{l+1} B_l^\top,\quad g_l = \sigma(r_l)\ (l \ge 1),\quad
        \hat x = \sigma_x(r_0),\quad \overleftarrow{L} = \tfrac{1}{2n}\lVert \hat x - x\rVert^2

    .. math::
        \varepsilon_0 = (\hat x - x) \odot \sigma_x'(r_0) / n,\quad
        \varepsilon_l = (\varepsilon_{l-1} W_{l-1}) \odot \sigma'(r_l),\quad
        B_l \leftarrow B_l - \eta\, \varepsilon_l^\top g_{l+1}.

    The top-down network has no biases. The forward updates are computed with ``B`` before its
    own update, as in the paper's forward-then-backward phases per batch.

    Args:
      learning_rate: ``\eta``, the SGD step of the feedback weights.
      activation: ``\sigma`` of the top-down hidden layers (match the MLP's hidden activation).
      input_activation: ``\sigma_x`` of the reconstructed input.
      init: initialiser of B.
      scale: the initialiser's std/limit/gain.

    Returns:
      A `TapeRule` with `BidirectionalFeedbackAlignmentState`; ``update`` needs
      ``labels=`` (class indices or targets of the output's shape). Its forward updates have
      the ``jax.grad`` form ``MLP.apply(..., mode="fa")``.

    References:
      Luo, Fu & Glass (2017), "Bidirectional backpropagation: Towards biologically plausible
      error signal transmission in neural networks", arXiv:1702.07097 (BFA, eqs. 15-29).
    """
    check_number("bidirectional_feedback_alignment", "learning_rate",
                 learning_rate, low=0)
    act = _activation(activation)
    act_x = _activation(input_activation)

    def shapes(params: Params):
        return [tuple(w.shape) for w, _ in dense_layers(params)]

    def init_fn(key: PRNGKey, params: Params) -> BidirectionalFeedbackAlignmentState:
        dtype = dense_layers(params)[0][0].dtype
        return BidirectionalFeedbackAlignmentState(
            draw_feedback(key, shapes(params), init, scale, dtype, fan_axis=1)
        )

    def update_fn(
        params: Params,
        state: BidirectionalFeedbackAlignmentState,
        tape: Tape,
        error: Array,
        *,
        labels: Array | None = None,
        **extra: Any,
    ):
        del extra
        check_feedback_shapes(
            state.feedback, shapes(params), "bidirectional_feedback_alignment", BFA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        if labels is None:
            raise ValueError(
                "bidirectional_feedback_alignment generates the input from the target: pass "
                "labels=... to update"
            )
        tape.require_dense("bidirectional_feedback_alignment", "its feedback learns to generate "
                           "the input from the target through every B_l^T, which Luo et al. "
                           "2017 state for dense layers; on conv nets train fa, kp or bdfa")
        layers = dense_layers(params)
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))

        x = tape.inputs[0]
        n = x.shape[0]
        g = as_targets(labels, layers[-1][0].shape[1], x.dtype)
        gs, derivs = [None] * len(layers), [None] * len(layers)  # g_{l+1} and sigma'(r_l)
        for i in reversed(range(len(layers))):
            gs[i] = g
            r = g @ fb[i].T
            g, derivs[i] = _value_and_deriv(act if i > 0 else act_x, r)
        eps = (g - x) * derivs[0] / n
        new_fb = []
        for i in range(len(layers)):
            if i > 0:
                eps = (eps @ layers[i - 1][0]) * derivs[i]
            new_fb.append(fb[i] - learning_rate * (eps.T @ gs[i]))
        return updates, BidirectionalFeedbackAlignmentState(tuple(new_fb))

    return TapeRule(init_fn, update_fn,
                    backward=lambda feedback, labels: LinearFeedback(feedback=feedback))


class BidirectionalDirectFeedbackAlignmentState(NamedTuple):
    """``feedback[l]`` has shape ``(n_out, n_l)`` for hidden layers (None for the output layer):
    it carries the output error down to layer ``l`` and predicts that layer's activity from the
    target."""

    feedback: tuple[Float[Array, " n_out *map"] | None, ...]


def bidirectional_direct_feedback_alignment(
    learning_rate: float = 0.01,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
) -> TapeRule:
    r"""Bidirectional direct FA (BDFA): DFA whose direct feedback learns top-down from the target.

    *Forward learning* is direct feedback alignment through the current ``B`` (row-major,
    ``B_l`` of shape ``(n_out, n_l)``, eqs. 35-38): with ``e = \delta_{L-1}`` the output error,
    ``\delta_l = (e B_l) \odot f'(a_l)`` and ``\Delta W_l = x_l^\top \delta_l``.

    *Backward learning*: the same ``B_l`` projects the target ``t`` (one-hot ``labels``) straight
    to hidden layer ``l``, a top-down prediction of that layer's forward activity
    ``h_l = f(a_l)`` (eq. 39). Each layer scores the agreement with the logistic ``\sigma``
    (eqs. 31, 40-41) and ``B`` descends the summed score:

    .. math::
        \overleftarrow{a}_l = t B_l,\quad z_l = \overleftarrow{a}_l \odot h_l,\quad
        \overleftarrow{L} = \tfrac{1}{n} \sum_{\text{batch}} \sum_l \sum_{\text{units}}
        \bigl(1 - \sigma(z_l)\bigr)

    .. math::
        B_l \leftarrow B_l - \eta\, \partial \overleftarrow{L} / \partial B_l
        = B_l + \tfrac{\eta}{n}\, t^\top \bigl(\sigma'(z_l) \odot h_l\bigr),

    a local product of the target at the channel's source and a term of layer ``l``'s own
    activity. Two readings of the paper: (1) its eqs. 36-41 pair ``\overleftarrow{w}_1 y``
    (the matrix that feeds layer 2 in eq. 36) with ``h_1``; with layers of different widths only
    the matrix that carries the error to layer ``l`` can predict ``h_l``, which is what we use.
    (2) Eq. 42 prints the update as ``-\overleftarrow{l}_i y^\top``, the loss itself times
    the target: the loss is positive, so for a one-hot ``y`` that only ever lowers ``B``,
    whatever the sign of ``h``, and cannot fit ``h``; we take the gradient of the stated loss
    instead. The forward
    updates are computed with ``B`` before its own update (forward, then backward phase, per
    batch). The CIFAR-10 variant of eq. 51 (training ``B`` on ``y + 0.25 \hat y``) is not
    included.

    Args:
      learning_rate: ``\eta``, the SGD step of the feedback weights.
      init: initialiser of B (as `direct_feedback_alignment`: the same key draws the same B).
      scale: the initialiser's std/limit/gain.

    Returns:
      A `TapeRule` with `BidirectionalDirectFeedbackAlignmentState`; ``update`` needs
      ``labels=`` (class indices or targets of the output's shape). Its ``jax.grad`` form is
      ``MLP.apply(..., mode="bdfa", labels=...)`` (or ``LeNet5.apply``: B_l then predicts a
      conv feature map): the parameters get DFA's updates and each ``B_l`` its backward-loss
      gradient, which ``advance`` applies.

    References:
      Luo, Fu & Glass (2017), "Bidirectional backpropagation: Towards biologically plausible
      error signal transmission in neural networks", arXiv:1702.07097 (v4, Sec. 4.2: BDFA,
      eqs. 30-42).
    """
    check_number("bidirectional_direct_feedback_alignment", "learning_rate",
                 learning_rate, low=0)
    name = "bidirectional_direct_feedback_alignment"

    def init_fn(key: PRNGKey, params: Params,
                feature_shapes: Any = None) -> BidirectionalDirectFeedbackAlignmentState:
        return BidirectionalDirectFeedbackAlignmentState(
            direct_feedback(key, params, init, scale, feature_shapes))

    def update_fn(
        params: Params,
        state: BidirectionalDirectFeedbackAlignmentState,
        tape: Tape,
        error: Array,
        *,
        labels: Array | None = None,
        **extra: Any,
    ):
        del extra
        check_feedback_shapes(
            state.feedback, dfa_feedback_shapes(params, tape, state.feedback), name,
            DFA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        if labels is None:
            raise ValueError(
                f"{name} predicts the hidden layers from the target: pass labels=... to update"
            )
        fb = state.feedback
        out_delta = error * tape.derivs[-1]
        updates = chain_updates(
            params, tape, error, lambda i, d: project(tape, i - 1, out_delta, fb[i - 1]))

        t = as_targets(labels, error.shape[-1], error.dtype)
        n = t.shape[0]
        new_fb = []
        for i, b in enumerate(fb):
            if b is None:
                new_fb.append(None)
                continue
            # h_i = f(a_i), the forward activity of hidden layer i (a feature map flattened)
            h = tape.activity(i).reshape(n, -1)
            bf = b.reshape(b.shape[0], -1)
            s = jax.nn.sigmoid((t @ bf) * h)
            new_fb.append((bf + (learning_rate / n) * (t.T @ (s * (1 - s) * h))).reshape(b.shape))
        return updates, BidirectionalDirectFeedbackAlignmentState(tuple(new_fb))

    # jax.grad form: mode "bdfa", whose taps (`dfa_hidden` with `bdfa_feedback_grad`) give each
    # B_l the gradient of the backward loss above, on dense layers or feature maps.
    advance_fn = descending_advance(BidirectionalDirectFeedbackAlignmentState, learning_rate)

    def backward(feedback: Any, labels: Any) -> DirectFeedback:
        if labels is None:
            raise ValueError("bdfa's jax.grad form reads the targets: pass labels")
        b = next(f for f in feedback if f is not None)  # (n_out, ...)
        return DirectFeedback(feedback=feedback, tap_cotangent=bdfa_feedback_grad,
                              targets=as_targets(labels, b.shape[0], b.dtype))

    return TapeRule(init_fn, update_fn, advance_fn, backward=backward)


def bdfa_feedback_grad(
    e: Float[Array, "batch n_out"],
    h: Float[Array, "batch n_h"],
    b: Float[Array, "n_out n_h"],
    t: Float[Array, "batch n_out"],
) -> Float[Array, "n_out n_h"]:
    """``d/dB`` of bidirectional DFA's backward loss ``mean_batch sum_units 1 - sigmoid((t B)
    * h)`` (Luo, Fu & Glass 2017, Sec. 4.2): ``-(1/n) t^T (s (1 - s) h)`` with ``s =
    sigmoid((t B) * h)``, on flattened ``h`` ``(n, n_h)``, ``B`` ``(n_out, n_h)`` and one-hot
    ``t`` ``(n, n_out)``. The `dfa_hidden` taps of the rule's ``jax.grad`` form hand it to
    ``B`` as its cotangent (``e`` is not used: the loss reads the target, not the error)."""
    del e
    s = jax.nn.sigmoid((t @ b) * h)
    return -(t.T @ (s * (1 - s) * h)) / h.shape[0]
