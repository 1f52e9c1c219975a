"""Kolen-Pollack and weight mirrors: two ways for the feedback path to learn W without transport."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jaxtyping import Float

from fbalign._src.backward import LinearFeedback
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
)
from fbalign._src.checks import check_number
from fbalign._src.feedback_init import Initializer
from fbalign._src.primitives import LinearOp
from fbalign._src.rules.feedback_alignment import FA_ORIENTATION, draw_feedback, fa_feedback_shapes


class KolenPollackState(NamedTuple):
    """``feedback[l]`` has ``W_l``'s shape ``(din, dout)``; ``feedback[0]`` is None. Updated by
    every ``update`` (it is the rule's own copy of the feedback weights, outside ``params``)."""

    feedback: tuple[Float[Array, "*window din dout"] | None, ...]


class WeightMirrorState(NamedTuple):
    """``feedback[l]`` has ``W_l``'s shape ``(din, dout)``; ``feedback[0]`` is None. Updated by
    the mirror phase that every ``update`` runs after computing the forward updates."""

    feedback: tuple[Float[Array, "*window din dout"] | None, ...]


def kolen_pollack(
    learning_rate: float = 0.01,
    weight_decay: float = 1e-3,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    decay_params: bool = True,
) -> TapeRule:
    r"""Kolen-Pollack: B receives the same update and the same weight decay as W.

    Errors travel as in feedback alignment, ``\delta_{l-1} = (\delta_l B_l^\top) \odot
    f'(a_{l-1})``, and with ``G_l = x_l^\top \delta_l`` (row-major, ``B_l`` of ``W_l``'s shape):

    .. math::
        \text{updates}[l]_w = G_l + \lambda W_l, \qquad
        B_l \leftarrow B_l - \eta\, (G_l + \lambda B_l)

    so under SGD with step ``\eta`` (``optax.sgd(learning_rate)``),
    ``W_l - B_l \leftarrow (1 - \eta\lambda)(W_l - B_l)``: the two converge geometrically and
    the rule becomes backprop. Both ``G_l`` terms are local: the forward synapse sees
    ``x_l`` and ``\delta_l``, the feedback synapse the same two signals from the other side.

    Args:
      learning_rate: ``\eta``, the step of the feedback update. The guarantee above needs the
        optimizer to step W by plain SGD with the same rate.
      weight_decay: ``\lambda``, applied to B here and, when ``decay_params`` is set, added to
        the returned weight updates (do not add it again in the optimizer). Biases are not
        decayed.
      init: initialiser of B (``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"``
        or a callable).
      scale: the initialiser's std/limit/gain (None: variance-preserving default).
      decay_params: add ``\lambda W_l`` to the returned weight updates.

    Returns:
      A `TapeRule` whose state, `KolenPollackState`, holds B. ``jax.grad`` form:
      ``MLP.apply(..., mode="kp")`` (or ``LeNet5.apply``, `kp_conv`) returns ``G_l`` for ``W_l``
      and for ``B_l`` (`kp_matmul`); ``advance`` then applies the B update and the decay, so
      KP trains conv nets too (``form="grad"``).

    References:
      Kolen & Pollack (1994), "Backpropagation without weight transport", ICNN.
      Akrout, Wilson, Humphreys, Lillicrap & Tweed (2019), "Deep learning without weight
      transport", NeurIPS 32 (eqs. 16-17).
    """
    check_number("kolen_pollack", "learning_rate", learning_rate, low=0)
    check_number("kolen_pollack", "weight_decay", weight_decay, low=0)

    def init_fn(key: PRNGKey, params: Params) -> KolenPollackState:
        dtype = dense_layers(params)[0][0].dtype
        return KolenPollackState(
            draw_feedback(key, fa_feedback_shapes(params), init, scale, dtype, 1))

    def update_fn(params: Params, state: KolenPollackState, tape: Tape, error: Array, **extra: Any):
        del extra
        check_feedback_shapes(
            state.feedback, fa_feedback_shapes(params), "kolen_pollack", FA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        fb = state.feedback
        grads = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        return step(params, fb, grads, [g["w"] for g in grads])

    def step(params: Params, fb: tuple, grads: Any, feedback_grads: Any):
        new_fb = tuple(
            None if b is None else b - learning_rate * (g + weight_decay * b)
            for b, g in zip(fb, feedback_grads, strict=True)
        )
        if decay_params:
            grads = [
                {**g, "w": g["w"] + weight_decay * p["w"]}
                for g, p in zip(grads, params, strict=True)
            ]
        return grads, KolenPollackState(new_fb)

    def advance_fn(
        params: Params,
        state: KolenPollackState,
        updates: Any,
        feedback_grads: Any,
        *,
        key: PRNGKey | None = None,
        layers: Any = None,
    ):
        # The kp primitives (mode "kp") give B_l the cotangent G_l of W_l, on any layer type.
        del key, layers
        return step(params, state.feedback, updates, feedback_grads)

    return TapeRule(init_fn, update_fn, advance_fn, backward=lambda feedback, labels:
                    LinearFeedback(feedback=feedback, learn=True))


def mirror_step(
    b: Float[Array, "din dout"],
    w: Float[Array, "din dout"],
    noise: Float[Array, "batch din"],
    learning_rate: float,
    weight_decay: float,
) -> Float[Array, "din dout"]:
    r"""One mirror-mode update of a feedback matrix from a batch of noise.

    .. math::
        y = \xi W, \qquad B \leftarrow B + \eta\, \xi^\top y / n - \lambda B

    with ``\xi`` the ``(n, din)`` noise driving the layer's input and ``y`` the layer's linear
    response. Since ``E[\xi^\top \xi / n] = \sigma^2 I``, the expected update is
    ``\eta\sigma^2 W - \lambda B``, whose fixed point is ``B = (\eta\sigma^2/\lambda) W``.
    """
    y = noise @ w
    return b + learning_rate * (noise.T @ y) / noise.shape[0] - weight_decay * b


def _matmul(x: Array, w: Array) -> Array:
    return x @ w


def mirror_op_step(
    b: Float[Array, "*window din dout"],
    w: Float[Array, "*window din dout"],
    noise: Float[Array, "batch *spatial din"],
    op: LinearOp,
    learning_rate: float,
    weight_decay: float,
) -> Float[Array, "*window din dout"]:
    r"""`mirror_step` for any layer ``y = op(x, W)`` linear in ``W`` (dense, convolution).

    .. math::
        y = \mathrm{op}(\xi, W), \qquad
        B \leftarrow B + \eta\, \mathrm{VJP}_W[\mathrm{op}(\xi, \cdot)](y) / m - \lambda B

    the Hebbian correlation of the noise at the layer's input with the response at its output,
    summed over the ``m`` output sites (batch times spatial positions; ``m = n`` for a dense
    layer, where this is exactly `mirror_step`). For a convolution every kernel entry sees
    ``m`` i.i.d. input/output pairs, so again ``E[update] = \eta\sigma^2 W - \lambda B`` (up to
    the zero padding at the borders).
    """
    y, vjp = jax.vjp(lambda w_: op(noise, w_), w)
    (corr,) = vjp(y)
    m = math.prod(y.shape[:-1])
    return b + learning_rate * corr / m - weight_decay * b


def weight_mirror(
    learning_rate: float = 0.1,
    weight_decay: float | None = None,
    noise_std: float = 1.0,
    batch_size: int = 32,
    steps: int = 1,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
) -> TapeRule:
    r"""Weight mirror: feedback alignment whose B learns W's direction in a noise-driven phase.

    *Engaged mode* (learning): the forward weights get feedback-alignment updates through the
    current ``B_l`` (``W_l``'s shape, errors go back as ``\delta_l B_l^\top``). *Mirror mode*,
    run ``steps`` times after it in every ``update``: each layer's input is driven by fresh
    i.i.d. noise ``\xi \sim N(0, \sigma^2)`` of shape ``(batch_size, din)``, the layer
    responds ``y = \xi W_l``, and the feedback synapses learn by the Hebbian product of the two
    ends, with decay (`mirror_step`):

    .. math::
        B_l \leftarrow B_l + \eta\, \xi^\top y / n - \lambda B_l,
        \qquad E[B_l] \to (\eta \sigma^2 / \lambda)\, W_l.

    Args:
      learning_rate: ``\eta``, the mirror learning rate.
      weight_decay: ``\lambda``; None picks ``\eta\sigma^2``, so that B's fixed point is W.
      noise_std: ``\sigma``, the noise amplitude of the mirror phase.
      batch_size: noise samples per mirror step.
      steps: mirror steps per ``update`` (run with ``lax.scan``).
      init: initialiser of B before any mirroring.
      scale: the initialiser's std/limit/gain.

    Returns:
      A `TapeRule` with `WeightMirrorState`; ``update`` needs ``key=`` (the mirror noise).
      Its forward updates have the ``jax.grad`` form ``MLP.apply(..., mode="fa")`` (or
      ``LeNet5.apply``); ``advance`` runs the mirror phase on the model's `LayerOp` list
      (`mirror_op_step`: conv layers are driven by noise images of their input shape).

    References:
      Akrout, Wilson, Humphreys, Lillicrap & Tweed (2019), "Deep learning without weight
      transport", NeurIPS 32.
    """
    check_number("weight_mirror", "learning_rate", learning_rate, low=0)
    check_number("weight_mirror", "weight_decay", weight_decay, low=0, optional=True)
    check_number("weight_mirror", "noise_std", noise_std, low=0, low_open=True)
    decay = learning_rate * noise_std**2 if weight_decay is None else weight_decay
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")

    def init_fn(key: PRNGKey, params: Params) -> WeightMirrorState:
        dtype = dense_layers(params)[0][0].dtype
        return WeightMirrorState(
            draw_feedback(key, fa_feedback_shapes(params), init, scale, dtype, 1))

    def mirror(key: PRNGKey, params: Params, fb: tuple, layers: Sequence[LayerOp]) -> tuple:
        ws = [p["w"] for p in params]
        idx = [i for i, b in enumerate(fb) if b is not None]

        def one_step(bs, k):
            keys = jax.random.split(k, max(len(idx), 1))
            new = []
            for kk, i, b in zip(keys, idx, bs, strict=False):
                w, layer = ws[i], layers[i]
                shape = (batch_size, *layer.input_shape)
                noise = noise_std * jax.random.normal(kk, shape, w.dtype)
                new.append(mirror_op_step(b, w, noise, layer.op, learning_rate, decay))
            return tuple(new), None

        bs, _ = jax.lax.scan(one_step, tuple(fb[i] for i in idx), jax.random.split(key, steps))
        out = list(fb)
        for i, b in zip(idx, bs, strict=True):
            out[i] = b
        return tuple(out)

    def update_fn(
        params: Params,
        state: WeightMirrorState,
        tape: Tape,
        error: Array,
        *,
        key: PRNGKey | None = None,
        **extra: Any,
    ):
        del extra
        check_feedback_shapes(
            state.feedback, fa_feedback_shapes(params), "weight_mirror", FA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        if key is None:
            raise ValueError("weight_mirror draws mirror-phase noise: pass key=... to update")
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        layers = tape.layer_ops() or [LayerOp(_matmul, (w.shape[0],))
                                      for w, _ in dense_layers(params)]
        return updates, WeightMirrorState(mirror(key, params, fb, layers))

    def advance_fn(
        params: Params,
        state: WeightMirrorState,
        updates: Any,
        feedback_grads: Any,
        *,
        key: PRNGKey | None = None,
        layers: Sequence[LayerOp] | None = None,
    ):
        del feedback_grads
        if key is None:
            raise ValueError("weight_mirror draws mirror-phase noise: pass key=...")
        if layers is None:
            raise ValueError(
                "weight_mirror's jax.grad form drives every layer with noise: it needs the "
                "model's layer_ops() (fbalign.models.MLP and LeNet5 have one)"
            )
        return updates, WeightMirrorState(mirror(key, params, state.feedback, layers))

    return TapeRule(init_fn, update_fn, advance_fn,
                    backward=lambda feedback, labels: LinearFeedback(feedback=feedback))
