"""Random backpropagation and its variants (Baldi, Sadowski & Lu): RBP, SRBP, ARBP, ASRBP,
sparse, k-bit error channel, and the variant without activation derivatives."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.backward import Backward, DirectFeedback, LinearFeedback
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
    forwards_options,
)
from fbalign._src.channel import quantize
from fbalign._src.checks import check_number
from fbalign._src.feedback_init import Initializer, resolve_initializer
from fbalign._src.rules.feedback_alignment import (
    DFA_ORIENTATION,
    FA_ORIENTATION,
    dfa_feedback_shapes,
    direct_feedback,
    draw_feedback,
    fa_feedback_shapes,
    project,
)


class RandomBackpropState(NamedTuple):
    """Feedback of the learning channel.

    RBP/ARBP: ``feedback[l]`` has ``W_l``'s shape ``(din, dout)`` and ``feedback[0]`` is None.
    SRBP/ASRBP: ``feedback[l]`` has shape ``(n_out, n_l)`` for hidden layers and the output's is
    None.
    """

    feedback: tuple[Float[Array, "*window din dout"] | Float[Array, " n_out *map"] | None, ...]


def nonzeros_per_unit(density: float, fan: int, nonzeros: int | None = None) -> int:
    """Nonzero feedback connections each receiving unit keeps out of ``fan``.

    ``min(nonzeros, fan)`` if ``nonzeros`` is given, else ``max(1, round(density * fan))``.
    """
    if nonzeros is not None:
        return min(nonzeros, fan)
    return max(1, min(fan, round(density * fan)))


def _sparse_draw(key, shapes, init, scale, dtype, fan_axis: int, density: float, nonzeros):
    """Each receiving unit keeps exactly ``nonzeros_per_unit(...)`` random entries.

    SRBP (``fan_axis=0``, ``(n_out, n_l)``): a hidden unit is a column, its fan the ``n_out``
    rows. RBP (``fan_axis=1``): the unit receiving the error is an input unit of the layer, the
    axis ``-2`` of ``W`` (``din`` of a dense ``(din, dout)``, ``cin`` of a ``(*window, cin,
    cout)`` conv kernel), and its fan is every other entry (``dout``, or ``window * cout``).
    """
    keys = jax.random.split(key, len(shapes))
    out = []
    for k, shape in zip(keys, shapes, strict=True):
        if shape is None:
            out.append(None)
            continue
        k_val, k_mask = jax.random.split(k)
        u = jax.random.uniform(k_mask, shape)
        if fan_axis == 0:
            fan = shape[0]
            nnz = nonzeros_per_unit(density, fan, nonzeros)
            keep = jnp.argsort(jnp.argsort(u, axis=0), axis=0) < nnz
        else:
            units = jnp.moveaxis(u, -2, 0)
            flat = units.reshape(units.shape[0], -1)
            fan = flat.shape[1]
            nnz = nonzeros_per_unit(density, fan, nonzeros)
            keep_flat = jnp.argsort(jnp.argsort(flat, axis=1), axis=1) < nnz
            keep = jnp.moveaxis(keep_flat.reshape(units.shape), 0, -2)
        values = resolve_initializer(init, scale, fan=nnz)(k_val, shape, dtype)
        out.append(jnp.where(keep, values, jnp.zeros((), dtype)))
    return tuple(out)


def _flat(h: Array) -> Array:
    return h.reshape(h.shape[0], -1)


def random_backprop(
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    skip: bool = False,
    adaptive: bool = False,
    learning_rate: float = 0.01,
    density: float = 1.0,
    nonzeros: int | None = None,
    error_bits: int | None = None,
    derivative: bool = True,
) -> TapeRule:
    r"""Random backpropagation (RBP) and the variants of the learning channel of Baldi et al.

    Row-major notation (``a_l = x_l W_l + b_l``, ``W_l`` of shape ``(din, dout)``); ``e`` is
    ``dL/dy`` and ``\delta_l = dL/da_l`` as the rule computes it. The top layer learns from its
    true error, ``\delta_{L-1} = e \odot f'(a_{L-1})``; every layer updates
    ``\Delta W_l = x_l^\top \delta_l``. Hidden layers receive a signal ``s_l`` from the channel:

    * **RBP** (default): ``s_{l} = \delta_{l+1} C_{l+1}^\top`` with fixed random ``C`` of
      ``W``'s shape (feedback alignment, Lillicrap et al. 2016);
    * **SRBP** (``skip=True``): ``s_l = \delta_{L-1} C_l`` with ``C_l`` of shape
      ``(n_out, n_l)``, the output error sent straight to every hidden layer (as DFA);
    * **ARBP** (``adaptive=True``): RBP whose channel learns with the same local product of
      presynaptic activity and postsynaptic error as the forward weights,
      ``C_l \leftarrow C_l - \eta\, x_l^\top \delta_l`` (``\eta`` = ``learning_rate``). This is
      the paper's ``\Delta c^l_{rs} = \eta R^{l+1}_s O^l_r`` (Sec. 3, list of variants), whose
      layers count neurons from the input: ``O^l = x_l`` is the activity at the channel's lower
      end and ``R^{l+1} = -\delta_l`` the randomly backpropagated error at its upper end;
    * **ASRBP** (``skip=True, adaptive=True``): SRBP whose skip matrices learn. The paper defines
      ASRBP only as "adaptation combined with SRBP" (Sec. 3), without an equation; we carry
      ARBP's rule over to the skip connection: each channel weight changes by the product of the
      signals at its two ends, the output error at its source and the forward activity
      ``h_l = f(a_l)`` of the hidden unit it reaches,
      ``C_l \leftarrow C_l - \eta\, \delta_{L-1}^\top h_l`` (shape ``(n_out, n_l)``). With one
      hidden layer, ASRBP is ARBP with ``C = B^\top`` (same updates, same channel update);
    * **sparse** (``density < 1`` or ``nonzeros=k``): every receiving unit (a row of ``C_l``
      for RBP, a column for SRBP) keeps exactly ``max(1, round(density * fan))`` (or
      ``min(k, fan)``) nonzero channel weights, down to one per unit;
    * **k-bit channel** (``error_bits=k``): ``s_l`` is replaced by ``quantize(s_l, k)``, at most
      ``2^k`` levels per example (`fbalign._src.channel.quantize`);
    * **no derivative** (``derivative=False``): ``\delta_l = s_l`` instead of
      ``s_l \odot f'(a_l)`` in the hidden layers (the paper shows learning then fails).

    Then ``\delta_l = s_l \odot f'(a_l)``. With the defaults this is exactly
    `feedback_alignment` (same key, same feedback).

    Args:
      init: feedback initialiser name (``"gaussian"``, ``"uniform"``, ``"orthogonal"``) or a
        callable ``(key, shape, dtype)``.
      scale: the initialiser's std/limit/gain; None picks a variance-preserving default for the
        number of nonzero inputs of each receiving unit.
      skip: SRBP (direct projection of the output error).
      adaptive: ARBP (ASRBP with ``skip``); the new channel weights are returned in the state.
        Every channel weight adapts, so a sparse channel does not stay sparse.
      learning_rate: ARBP's/ASRBP's step size for the channel weights (use the optimizer's SGD
        rate).
      density: fraction of nonzero channel weights per receiving unit, in ``(0, 1]``.
      nonzeros: a fixed number of nonzero channel weights per receiving unit (overrides
        ``density``); ``nonzeros=1`` is the sparsest channel.
      error_bits: quantise the channel's signal to this many bits; None keeps full precision.
      derivative: multiply by ``f'(a_l)`` in hidden layers.

    Returns:
      A `TapeRule` with `RandomBackpropState`. ``jax.grad`` forms: ``MLP.apply`` with mode
      ``"fa"`` (RBP, sparse), ``"dfa"`` (SRBP), ``"kp"`` (ARBP: the feedback's gradient is the
      channel update), ``"adfa"`` (ASRBP: the skip channel's gradient is ``e^T h_l``), and the
      options ``derivative=``/``error_bits=`` of ``MLP.apply``; ``advance`` applies ARBP's and
      ASRBP's channel updates, so they train conv nets too.

    References:
      Baldi, Sadowski & Lu (2018), "Learning in the machine: Random backpropagation and the deep
      learning channel", Artificial Intelligence 260:1-35 (arXiv:1612.02734).
    """
    check_number("random_backprop", "learning_rate", learning_rate, low=0)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if nonzeros is not None and (not isinstance(nonzeros, int) or nonzeros < 1):
        raise ValueError(f"nonzeros must be a positive integer or None, got {nonzeros!r}")
    if error_bits is not None and (not isinstance(error_bits, int) or error_bits < 1):
        raise ValueError(f"error_bits must be a positive integer or None, got {error_bits!r}")
    name = "skipped_random_backprop" if skip else "random_backprop"
    if skip and adaptive:
        name = "adaptive_skipped_random_backprop"
    shapes_of = dfa_feedback_shapes if skip else fa_feedback_shapes
    orientation = DFA_ORIENTATION if skip else FA_ORIENTATION
    fan_axis = 0 if skip else 1  # axis of B summed over by each receiving unit

    def init_fn(key: PRNGKey, params: Params, feature_shapes: Any = None) -> RandomBackpropState:
        # feature_shapes (skipped variants): B_l onto layer l's feature map, Glorot's scale on
        # networks with maps (`direct_feedback`); FA-like variants size B by W.
        dtype = dense_layers(params)[0][0].dtype
        if density == 1.0 and nonzeros is None:
            if skip:
                return RandomBackpropState(direct_feedback(key, params, init, scale,
                                                           feature_shapes))
            return RandomBackpropState(draw_feedback(key, shapes_of(params), init, scale, dtype,
                                                     fan_axis))
        shapes = (dfa_feedback_shapes(params, feature_shapes=feature_shapes) if skip
                  else shapes_of(params))
        return RandomBackpropState(
            _sparse_draw(key, shapes, init, scale, dtype, fan_axis, density, nonzeros)
        )

    def update_fn(
        params: Params, state: RandomBackpropState, tape: Tape, error: Array, **extra: Any
    ):
        del extra
        check_feedback_shapes(
            state.feedback, shapes_of(params, tape, state.feedback) if skip
            else shapes_of(params), name, orientation,
            dtype=dense_layers(params)[0][0].dtype,
        )
        fb = state.feedback
        if not derivative:
            ones = tuple(jnp.ones_like(d) for d in tape.derivs[:-1])
            tape = tape._replace(derivs=ones + (tape.derivs[-1],))
        out_delta = error * tape.derivs[-1]

        def send_back(i: int, delta: Array) -> Array:
            s = project(tape, i - 1, out_delta, fb[i - 1]) if skip else tape.send_back(i, delta,
                                                                                      fb[i])
            return s if error_bits is None else quantize(s, error_bits)

        updates = chain_updates(params, tape, error, send_back)
        if adaptive and skip:  # ASRBP: output error (source) x hidden activity h_l (target)
            new = tuple(
                None if b is None
                else b - learning_rate * (out_delta.T @ _flat(tape.activity(i))).reshape(b.shape)
                for i, b in enumerate(fb)
            )
            state = RandomBackpropState(new)
        elif adaptive:
            new = tuple(
                None if b is None else b - learning_rate * u["w"]
                for b, u in zip(fb, updates, strict=True)
            )
            state = RandomBackpropState(new)
        return updates, state

    # ARBP's jax.grad form is mode "kp": the channel's cotangent is the forward weights' own
    # local update x_l^T delta_l, on any layer type (dense, conv). ASRBP's is mode "adfa": the
    # skip channel's cotangent is e^T h_l (`dfa_hidden`, "activity").
    advance_fn = descending_advance(RandomBackpropState, learning_rate)

    def backward(feedback: Any, labels: Any) -> Backward:
        del labels
        channel = dict(derivative=derivative, error_bits=error_bits)
        if skip:  # SRBP / ASRBP: DFA taps, the skip channel learning from e^T h_l if adaptive
            return DirectFeedback(**channel, feedback=feedback,
                                  tap_cotangent="activity" if adaptive else "zero")
        return LinearFeedback(**channel, feedback=feedback, learn=adaptive)  # RBP / ARBP

    return TapeRule(init_fn, update_fn, advance_fn if adaptive else None, backward=backward)


@forwards_options(random_backprop, ("init", "scale", "skip"))
def skipped_random_backprop(
    init: str | Initializer = "gaussian", scale: float | None = None, **options: Any
) -> TapeRule:
    """Skipped RBP (SRBP): the output error goes straight to every hidden layer through fixed
    random ``(n_out, n_l)`` matrices; `random_backprop` with ``skip=True`` (options as there)."""
    return random_backprop(init, scale, skip=True, **options)


@forwards_options(random_backprop, ("init", "scale", "adaptive", "learning_rate"))
def adaptive_random_backprop(
    learning_rate: float = 0.01,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    **options: Any,
) -> TapeRule:
    """Adaptive RBP (ARBP): the channel ``C_l`` learns by ``C_l -= lr * x_l^T delta_l``, the
    forward weights' own local update; `random_backprop` with ``adaptive=True``."""
    check_number("adaptive_random_backprop", "learning_rate", learning_rate, low=0)
    return random_backprop(init, scale, adaptive=True, learning_rate=learning_rate, **options)


@forwards_options(random_backprop, ("init", "scale", "skip", "adaptive", "learning_rate"))
def adaptive_skipped_random_backprop(
    learning_rate: float = 0.01,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    **options: Any,
) -> TapeRule:
    """Adaptive skipped RBP (ASRBP): SRBP whose skip matrices ``C_l`` (``(n_out, n_l)``) learn by
    ``C_l -= lr * delta_out^T h_l``, the product of the output error and the hidden activity at
    the two ends of the channel (ARBP's rule on the skip connection; our reading, as the paper
    gives no equation); `random_backprop` with ``skip=True, adaptive=True``."""
    check_number("adaptive_skipped_random_backprop", "learning_rate",
                 learning_rate, low=0)
    return random_backprop(
        init, scale, skip=True, adaptive=True, learning_rate=learning_rate, **options
    )


@forwards_options(random_backprop, ("init", "scale", "density", "nonzeros"))
def sparse_random_backprop(
    density: float = 0.1,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    nonzeros: int | None = None,
    **options: Any,
) -> TapeRule:
    """Sparse RBP: each receiving unit keeps ``max(1, round(density * fan))`` nonzero channel
    weights, or exactly ``nonzeros`` of them (``nonzeros=1``: one per unit). Options as in
    `random_backprop` (e.g. ``skip=True`` for sparse SRBP)."""
    return random_backprop(init, scale, density=density, nonzeros=nonzeros, **options)


@forwards_options(random_backprop, ("init", "scale", "error_bits"))
def quantized_random_backprop(
    bits: int = 2,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    **options: Any,
) -> TapeRule:
    """RBP whose channel carries ``bits``-bit signals (at most ``2**bits`` levels per example);
    `random_backprop` with ``error_bits=bits`` (``skip=True`` quantises SRBP's channel)."""
    return random_backprop(init, scale, error_bits=bits, **options)


@forwards_options(random_backprop, ("init", "scale", "derivative"))
def derivative_free_random_backprop(
    init: str | Initializer = "gaussian", scale: float | None = None, **options: Any
) -> TapeRule:
    """RBP without the activation derivative in hidden layers (``f'`` replaced by 1), the
    variant Baldi et al. show to fail; `random_backprop` with ``derivative=False``."""
    return random_backprop(init, scale, derivative=False, **options)
