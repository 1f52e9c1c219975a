"""Sign symmetry: the error travels down through ``sign(W) * M`` (uSF, frSF, brSF)."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Float, PRNGKeyArray

from fbalign._src.backward import SignFeedback
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
from fbalign._src.checks import check_number
from fbalign._src.feedback_init import glorot_std, hash_uniform, sign_feedback

Magnitude = Literal["uniform", "fixed_random", "batch_random"]
MAGNITUDES = ("uniform", "fixed_random", "batch_random")
SIGN_ORIENTATION = (
    "feedback[l] is the magnitude M_l: a scalar for uSF, W_l's shape (din, dout) for frSF/brSF; "
    "the error goes back as delta @ (sign(W_l) * M_l).T"
)


class SignSymmetryState(NamedTuple):
    """``feedback[l]`` is the magnitude ``M_l`` of layer ``l``'s feedback ``sign(W_l) * M_l``.

    A scalar for uSF, an array of ``W_l``'s shape for frSF; ``feedback[0]`` is None (nothing
    is sent below the input). brSF stores a key instead (`BatchRandomSignState`). The sign
    is read from the current ``W_l`` at every step, so only magnitudes are stored.
    """

    feedback: tuple[Float[Array, ""] | Float[Array, "*window din dout"] | None, ...]


class BatchRandomSignState(NamedTuple):
    """brSF's state: the key from which the magnitudes of the *next* update are hashed.

    ``rule.feedback(params, state)`` gives them (a tuple like `SignSymmetryState.feedback`). Only
    the key is stored, so a step writes no weight-sized array: the hash of the magnitudes fuses
    into the construction of ``sign(W) * M`` inside the step.
    """

    key: PRNGKeyArray


DISTRIBUTIONS = ("uniform", "normal")


def draw_magnitude(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    dtype: Any,
    std: float,
    distribution: str = "uniform",
) -> Float[Array, "*shape"]:
    """Random sign-symmetry magnitudes ``|R|``, ``R`` of standard deviation ``std``.

    ``"uniform"``: ``R ~ U(-sqrt(3) std, sqrt(3) std)``, so ``|R| ~ U[0, sqrt(3) std)`` (BioTorch
    draws ``R`` with Xavier-uniform, whose std is ``sqrt(2 / (fan_in + fan_out))``); drawn with
    `fbalign._src.feedback_init.hash_uniform`, cheap enough to redraw every batch.
    ``"normal"``: ``R ~ N(0, std^2)`` with ``jax.random`` (threefry; costly to redraw per batch).
    """
    if distribution == "uniform":
        return hash_uniform(key, tuple(shape), dtype, 0.0, math.sqrt(3.0) * std)
    if distribution == "normal":
        return jnp.abs(std * jax.random.normal(key, shape, dtype))
    raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")


def _draw_magnitudes(
    key: PRNGKey, params: Params, scale: float | None, distribution: str = "uniform"
) -> tuple:
    layers = dense_layers(params)
    keys = jax.random.split(key, len(layers))
    out: list[Array | None] = [None]
    for k, (w, _) in zip(keys[1:], layers[1:], strict=True):
        std = glorot_std(w.shape) if scale is None else scale
        out.append(draw_magnitude(k, w.shape, w.dtype, std, distribution))
    return tuple(out)


def sign_symmetry(
    magnitude: Magnitude = "uniform", scale: float | None = None, distribution: str = "uniform"
) -> TapeRule:
    r"""Sign symmetry: feedback alignment through ``B_l = sign(W_l) \odot M_l``.

    .. math::
        \delta_{L-1} = e \odot f'(a_{L-1}), \quad
        \delta_{l-1} = \big(\delta_l\, (\mathrm{sign}(W_l) \odot M_l)^\top\big) \odot f'(a_{l-1}),
        \quad \Delta W_l = x_l^\top \delta_l

    with ``W_l`` of shape ``(din, dout)`` (row-major, see `fbalign.rules.TapeRule`). The
    sign is read from the current forward weights at every step; only magnitudes are chosen:

    * ``"uniform"`` (uSF): ``M_l = s`` one scalar per layer;
    * ``"fixed_random"`` (frSF): ``M_l = |R_l|`` drawn once by ``init``;
    * ``"batch_random"`` (brSF): ``M_l = |R_l|`` redrawn for every batch from the ``key``
      passed to ``update``. The state (`BatchRandomSignState`) stores that key, and the
      magnitudes of a step are hashed from the key stored at the previous one (the first from
      ``init``'s key): ``rule.feedback(params, state)`` gives the coming step's magnitudes.

    ``R_l`` has i.i.d. entries of std ``s``, uniform (BioTorch's Xavier-uniform draw; the
    default) or Gaussian (``distribution``; see `draw_magnitude`). ``s`` defaults to
    ``sqrt(2 / (din + dout))`` as in BioTorch. Magnitudes ``M_l = |W_l|`` give
    ``B_l = W_l``, exactly backprop.

    Args:
      magnitude: ``"uniform"``, ``"fixed_random"`` or ``"batch_random"``.
      scale: ``s`` above (the uniform magnitude, or the std of the random ones); None picks the
        Xavier-style default per layer.
      distribution: ``"uniform"`` or ``"normal"``, the law of ``R_l`` for frSF and brSF.

    Returns:
      A `TapeRule` whose state is `SignSymmetryState` (`BatchRandomSignState` for brSF).
      Its ``jax.grad`` form is ``MLP.apply(..., feedback=magnitudes, mode="sign")`` with
      ``magnitudes = fbalign.rules.rule_feedback(rule, params, state)``.

    References:
      Liao, Leibo & Poggio (2016), "How important is weight symmetry in backpropagation?", AAAI.
      Sanfiz & Akrout (2021), "Benchmarking the accuracy and robustness of feedback alignment
      algorithms" (BioTorch), arXiv:2108.13446.
    """
    check_number("sign_symmetry", "scale", scale, low=0, low_open=True, optional=True)
    if magnitude not in MAGNITUDES:
        raise ValueError(f"unknown magnitude {magnitude!r}; valid: {', '.join(MAGNITUDES)}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )

    def expected_shapes(params: Params):
        layers = dense_layers(params)
        shapes = [None if i == 0 else tuple(w.shape) for i, (w, _) in enumerate(layers)]
        if magnitude == "uniform":
            shapes = [None if s is None else () for s in shapes]
        return shapes

    def magnitudes_of(params: Params, state: Any) -> tuple:
        if magnitude == "batch_random":
            return _draw_magnitudes(state.key, params, scale, distribution)
        return state.feedback

    def init_fn(key: PRNGKey, params: Params) -> SignSymmetryState | BatchRandomSignState:
        if magnitude == "batch_random":
            return BatchRandomSignState(key)
        if magnitude == "uniform":
            del key
            out: list[Array | None] = [None]
            for w, _ in dense_layers(params)[1:]:
                s = glorot_std(w.shape) if scale is None else scale
                out.append(jnp.asarray(s, w.dtype))
            return SignSymmetryState(tuple(out))
        return SignSymmetryState(_draw_magnitudes(key, params, scale, distribution))

    def update_fn(
        params: Params,
        state: SignSymmetryState,
        tape: Tape,
        error: Array,
        *,
        key: PRNGKey | None = None,
        **extra: Any,
    ):
        del extra
        layers = dense_layers(params)
        if magnitude == "batch_random" and key is None:
            raise ValueError(
                "brsf (batch_random magnitudes) draws new magnitudes every batch: pass key=... "
                "to update"
            )
        mags = magnitudes_of(params, state)
        check_feedback_shapes(
            mags, expected_shapes(params), "sign_symmetry", SIGN_ORIENTATION,
            dtype=layers[0][0].dtype,
        )
        updates = chain_updates(
            params, tape, error, lambda i, d: tape.send_back(
                i, d, sign_feedback(layers[i][0], mags[i]))
        )
        if magnitude == "batch_random":
            state = BatchRandomSignState(key)
        return updates, state

    def advance_fn(
        params: Params,
        state: SignSymmetryState,
        updates: Any,
        feedback_grads: Any,
        *,
        key: PRNGKey | None = None,
        layers: Any = None,
    ):
        # brSF's jax.grad form (mode "sign") used this state's magnitudes; the next are hashed for
        # every layer, dense or conv, exactly as the explicit update does.
        del params, state, feedback_grads, layers
        if key is None:
            raise ValueError("brsf draws new magnitudes every batch: pass key=...")
        return updates, BatchRandomSignState(key)

    def backward(feedback: Any, labels: Any) -> SignFeedback:
        del labels  # the magnitudes (`rule_feedback`); the signs are read from W at call time
        return SignFeedback(feedback=feedback)

    if magnitude == "batch_random":
        return TapeRule(init_fn, update_fn, advance_fn, magnitudes_of, backward)
    return TapeRule(init_fn, update_fn, backward=backward)


def usf(scale: float | None = None) -> TapeRule:
    """Uniform sign-concordant feedback (uSF): ``B_l = s * sign(W_l)``; see `sign_symmetry`."""
    return sign_symmetry("uniform", scale)


def frsf(scale: float | None = None, distribution: str = "uniform") -> TapeRule:
    """Fixed random-magnitude sign-concordant feedback (frSF): ``B_l = |M_l| * sign(W_l)`` with
    ``M_l`` drawn once; see `sign_symmetry`."""
    return sign_symmetry("fixed_random", scale, distribution)


def brsf(scale: float | None = None, distribution: str = "uniform") -> TapeRule:
    """Batchwise random-magnitude sign-concordant feedback (brSF): ``|M_l|`` redrawn every batch
    from ``update``'s ``key``; see `sign_symmetry`."""
    return sign_symmetry("batch_random", scale, distribution)
