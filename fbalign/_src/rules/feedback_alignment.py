"""Feedback alignment (FA) and direct feedback alignment (DFA)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jaxtyping import Float, PRNGKeyArray

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
)
from fbalign._src.feedback_init import Initializer, kernel_fans, resolve_initializer
from fbalign._src.primitives import project_error

FA_ORIENTATION = "B_l has the shape of W_l, (din, dout); the error goes back as delta @ B_l.T"
DFA_ORIENTATION = "B_l has shape (n_out, n_l); hidden layer l receives e @ B_l"


class FeedbackAlignmentState(NamedTuple):
    """Fixed random feedback: ``feedback[l]`` has ``W_l``'s shape; ``feedback[0]`` is None."""

    feedback: tuple[Float[Array, "*window din dout"] | None, ...]


class DirectFeedbackAlignmentState(NamedTuple):
    """``feedback[l]`` has shape ``(n_out, n_l)`` for hidden layers; the output layer's is None."""

    feedback: tuple[Float[Array, " n_out *map"] | None, ...]


def fa_feedback_shapes(params: Params) -> list[tuple[int, int] | None]:
    """Feedback shapes FA needs: ``W_l.shape`` for every layer but the first (None there)."""
    return [None if i == 0 else tuple(w.shape) for i, (w, _) in enumerate(dense_layers(params))]


def dfa_feedback_shapes(params: Params, tape: Tape | None = None,
                        feedback: Sequence[Float[Array, " n_out *map"] | None] | None = None,
                        feature_shapes: Any = None,
                        ) -> list[tuple[int, ...] | None]:
    """Feedback shapes DFA needs: ``(n_out, n_l)`` for hidden layers, None for the output.

    Given the `Tape` of a network that is not a dense chain (a conv net), layer ``l``'s shape
    is ``(n_out, *out_shape_l)`` (its feature map), or ``(n_out, prod(out_shape_l))`` where the
    ``feedback`` entry is flat; `project` reshapes the projection to the map either way. Given
    the network's ``feature_shapes`` (each layer's per-example output shape, the last the
    output's ``(n_out,)``; what a rule's ``init`` receives from a layered network), layer ``l``'s
    is ``(n_out, *feature_shapes[l])``.
    """
    if feature_shapes is not None:
        shapes = [tuple(int(d) for d in f) for f in feature_shapes]
        if len(shapes) != len(dense_layers(params)):
            raise ValueError(f"feature_shapes has {len(shapes)} entries for a network of "
                             f"{len(dense_layers(params))} layers (one per layer, the output's "
                             "last)")
        return [(shapes[-1][0], *f) for f in shapes[:-1]] + [None]
    if tape is not None and not tape.is_dense:
        n_out = tape.output.shape[-1]
        out = []
        for i, a in enumerate(tape.preacts[:-1]):
            b = None if feedback is None or i >= len(feedback) else feedback[i]
            flat = b is not None and getattr(b, "ndim", 0) == 2
            out.append((n_out, math.prod(a.shape[1:])) if flat else (n_out, *a.shape[1:]))
        return out + [None]
    layers = dense_layers(params)
    n_out = layers[-1][0].shape[1]
    return [(n_out, w.shape[1]) for w, _ in layers[:-1]] + [None]


def project(
    tape: Tape, i: int, e: Float[Array, "batch n_out"], b: Float[Array, " n_out *map"]
) -> Float[Array, " batch *map"]:
    """``e @ B_i`` (`project_error`) shaped like hidden layer ``i``'s pre-activation: the
    direct feedback of DFA-style rules, on dense layers or feature maps."""
    return project_error(e, b).reshape(tape.preacts[i].shape)


def draw_feedback(key: PRNGKeyArray, shapes, init, scale, dtype, fan_axis: int,
                  glorot: bool = False) -> tuple[Float[Array, " ..."] | None, ...]:
    """Random feedback of the given ``shapes`` (None entries stay None), one key per entry.

    ``init``/``scale`` as in `feedback_alignment`; the default scale uses the fan that one
    error unit sums over: ``shape[0]`` with ``fan_axis=0`` (DFA: the ``n_out`` outputs), else
    the output fan of ``kernel_fans(shape)`` (FA: ``dout``, times the window for a conv).
    ``glorot`` (DFA only): Glorot's fan ``(n_out + n_l) / 2`` instead (`direct_fan`).
    """
    keys = jax.random.split(key, len(shapes))
    out = []
    for k, shape in zip(keys, shapes, strict=True):
        if shape is None:
            out.append(None)
        else:
            # FA: the error reaching one input unit sums over dout outputs (times the kernel
            # window kh*kw... for a conv kernel (..., cin, cout)); DFA: over the n_out outputs.
            fan = direct_fan(shape, glorot) if fan_axis == 0 else kernel_fans(shape)[1]
            draw = resolve_initializer(init, scale, fan=fan)
            if init == "xavier" and fan_axis == 0 and len(shape) > 2:  # fans (n_out, n_l)
                flat = (shape[0], math.prod(shape[1:]))
                out.append(draw(k, flat, dtype).reshape(shape))
            else:
                out.append(draw(k, shape, dtype))
    return tuple(out)


def direct_fan(shape: tuple[int, ...], glorot: bool) -> float:
    """The default fan of a DFA-style ``B_l`` of shape ``(n_out, *map_l)``: ``n_out`` (Nokland
    2016: one hidden unit sums ``n_out`` errors), or with ``glorot`` Glorot's ``(n_out + n_l) /
    2`` (std ``sqrt(2 / (n_out + n_l))``, BioTorch's Xavier default). Rules use Glorot on
    networks with feature maps: a conv map has thousands of units, and an error of the output's
    size at each of them swamps the kernel update (LeNet-5 with ``1/sqrt(n_out)`` feedback
    barely trains)."""
    return (shape[0] + math.prod(shape[1:])) / 2 if glorot else shape[0]


def direct_feedback(
    key: PRNGKeyArray, params: Params, init, scale, feature_shapes=None
) -> tuple[Float[Array, " n_out *map"] | None, ...]:
    """The feedback of a DFA-style rule: one ``B_l`` per hidden layer, None for the output,
    shaped by `dfa_feedback_shapes` (the feature maps where a layered network gives
    ``feature_shapes``), with Glorot's default scale on networks with feature maps
    (`direct_fan`)."""
    shapes = dfa_feedback_shapes(params, feature_shapes=feature_shapes)
    glorot = feature_shapes is not None and any(len(f) > 1 for f in feature_shapes)
    dtype = dense_layers(params)[0][0].dtype
    return draw_feedback(key, shapes, init, scale, dtype, fan_axis=0, glorot=glorot)


def feedback_alignment(
    init: str | Initializer = "gaussian", scale: float | None = None
) -> TapeRule:
    r"""Feedback alignment: the error travels down through fixed random matrices ``B_l``.

    .. math::
        \delta_{L-1} = e \odot f'(a_{L-1}), \quad
        \delta_{l-1} = (\delta_l B_l^\top) \odot f'(a_{l-1}), \quad
        \Delta W_l = x_l^\top \delta_l

    with ``B_l`` of ``W_l``'s shape (``din x dout``). ``B_l = W_l`` recovers backprop.

    Args:
      init: ``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"`` or a callable.
      scale: the initialiser's std/limit/gain; None picks ``1/sqrt(dout)``-style scaling.

    Returns:
      A `TapeRule` whose state is `FeedbackAlignmentState`.

    References:
      Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback weights support
      error backpropagation for deep learning", Nature Communications 7:13276.
    """

    def init_fn(key: PRNGKey, params: Params) -> FeedbackAlignmentState:
        shapes = fa_feedback_shapes(params)
        dtype = dense_layers(params)[0][0].dtype
        return FeedbackAlignmentState(draw_feedback(key, shapes, init, scale, dtype, fan_axis=1))

    def update_fn(
        params: Params, state: FeedbackAlignmentState, tape: Tape, error: Array, **extra: Any
    ):
        del extra
        check_feedback_shapes(
            state.feedback, fa_feedback_shapes(params), "feedback_alignment", FA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        return updates, state

    return TapeRule(init_fn, update_fn,
                    backward=lambda feedback, labels: LinearFeedback(feedback=feedback))


def direct_feedback_alignment(
    init: str | Initializer = "gaussian", scale: float | None = None
) -> TapeRule:
    r"""Direct feedback alignment: every hidden layer receives the output error directly.

    .. math::
        e = \partial L / \partial a_{L-1}, \quad
        \delta_l = (e B_l) \odot f'(a_l), \quad \Delta W_l = x_l^\top \delta_l

    with ``B_l`` of shape ``(n_out, n_l)``; the output layer learns from ``e`` as in backprop.
    With one hidden layer, ``B_0 = W_1.T`` recovers backprop.

    Args:
      init: ``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"`` or a callable.
      scale: the initialiser's std/limit/gain; None picks ``1/sqrt(n_out)``-style scaling.

    Returns:
      A `TapeRule` whose state is `DirectFeedbackAlignmentState`.

    References:
      Nokland (2016), "Direct feedback alignment provides learning in deep neural networks",
      NeurIPS 29.
    """

    def init_fn(key: PRNGKey, params: Params,
                feature_shapes: Any = None) -> DirectFeedbackAlignmentState:
        return DirectFeedbackAlignmentState(
            direct_feedback(key, params, init, scale, feature_shapes))

    def update_fn(
        params: Params,
        state: DirectFeedbackAlignmentState,
        tape: Tape,
        error: Array,
        **extra: Any,
    ):
        del extra
        check_feedback_shapes(
            state.feedback,
            dfa_feedback_shapes(params, tape, state.feedback),
            "direct_feedback_alignment",
            DFA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        fb = state.feedback
        out_delta = error * tape.derivs[-1]
        updates = chain_updates(
            params, tape, error, lambda i, d: project(tape, i - 1, out_delta, fb[i - 1]))
        return updates, state

    return TapeRule(init_fn, update_fn,
                    backward=lambda feedback, labels: DirectFeedback(feedback=feedback))
