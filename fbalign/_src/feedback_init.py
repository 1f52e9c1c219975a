"""Initialisers for feedback matrices: Gaussian, uniform and orthogonal, each with a scale."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Float, PRNGKeyArray

from fbalign._src import linalg
from fbalign._src.base import Array
from fbalign._src.checks import check_number

# init(key, shape, dtype) -> an array of that shape
Initializer = Callable[[PRNGKeyArray, tuple[int, ...], jnp.dtype], Float[Array, "*shape"]]


def kernel_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a ``(din, dout)`` matrix or a ``(*window, cin, cout)`` kernel, the
    window included (Glorot & Bengio 2010). ``fan_out`` is also the fan of FA's backward map:
    the error reaching one input unit sums over that many entries of ``B``."""
    window = math.prod(shape[:-2])
    return window * shape[-2], window * shape[-1]


def glorot_std(shape: tuple[int, ...]) -> float:
    """``sqrt(2 / (fan_in + fan_out))`` of a matrix or conv kernel (`kernel_fans`), the std of
    Glorot/Xavier initialisation (BioTorch's sign-symmetry scale)."""
    fan_in, fan_out = kernel_fans(shape)
    return math.sqrt(2.0 / (fan_in + fan_out))


def matched_std(kernel: Float[Array, " *shape"]) -> Float[Array, ""]:
    """``rms(W) = sqrt(mean(W^2))``, or the Glorot std of ``W``'s shape (`glorot_std`) for a
    zero kernel: the std of `matched_feedback`."""
    kernel = jnp.asarray(kernel)
    rms = jnp.sqrt(jnp.mean(jnp.square(kernel.astype(jnp.float32))))
    return jnp.where(rms > 0, rms, glorot_std(tuple(kernel.shape)))


def matched_feedback(key: PRNGKeyArray, kernel: Float[Array, " *shape"]) -> Float[Array, " *shape"]:
    r"""A feedback tensor ``B`` for ``kernel`` (``W``) with entries ``N(0, rms(W)^2)``, ``rms(W) =
    sqrt(mean(W^2))`` (`matched_std`): of ``W``'s scale, so that FA's error ``delta B^T`` has
    the norm of backprop's ``delta W^T`` when ``W``'s entries are random (as at
    initialisation): ``E|delta B^T|^2 = |delta|^2 fan rms(W)^2``. Whatever initialiser made
    ``W`` (Flax's LeCun normal, PyTorch's uniform fan-in, a trained kernel), the hidden errors
    start at backprop's magnitudes; a variance-preserving ``B`` (std ``1/sqrt(fan_out)``) is
    several times larger than a LeCun ``W`` wherever ``fan_out < fan_in``, and the errors it
    sends down grow by that factor at every layer. A zero kernel (a zero-initialised layer) has
    no scale: ``B`` then takes the Glorot std of its shape."""
    std = matched_std(kernel)
    return (std * jax.random.normal(key, jnp.shape(kernel), jnp.float32)).astype(
        jnp.asarray(kernel).dtype)


def gaussian(std: float = 1.0) -> Initializer:
    """Entries drawn i.i.d. from ``N(0, std^2)``."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


def uniform(limit: float = 1.0) -> Initializer:
    """Entries drawn i.i.d. from ``U[-limit, limit]`` (Lillicrap et al. 2016 use 0.5)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def xavier(gain: float = 1.0) -> Initializer:
    """Glorot/Xavier-uniform entries, ``U[-a, a]`` with ``a = gain * sqrt(6 / (fan_in +
    fan_out))`` from each matrix's own shape (`kernel_fans`: ``(din, dout)``, conv kernels
    ``(*window, cin, cout)``, DFA's ``(n_out, n_l)``): BioTorch's default feedback ("xavier"),
    one scale per layer (Glorot & Bengio 2010)."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = kernel_fans(tuple(shape))
        limit = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def orthogonal(gain: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``gain``: every singular value equals ``gain``."""
    return linalg.orthogonal(scale=gain)


def _mix32(x: Array) -> Array:
    # "lowbias32" (C. Wellons, 2018): an invertible 32-bit mixer with near-ideal avalanche.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    dtype: jnp.dtype = jnp.float32,
    minval: float = 0.0,
    maxval: float = 1.0,
) -> Float[Array, "*shape"]:
    """``U[minval, maxval)`` entries from a counter-based hash: for feedback redrawn every step.

    Two 32-bit seed words come from ``jax.random.bits(key)``; entry ``i`` is two rounds of the
    lowbias32 mixer over ``i`` and the seeds, its top 23 bits made a float in ``[0, 1)``. A
    deterministic function of ``(key, i)``, so it is reproducible, and equal under ``vmap`` to
    separate calls. Not for cryptography or Monte Carlo integrals: it exists because
    ``jax.random`` (threefry) costs about as much as a whole MLP train step on CPU when millions
    of feedback magnitudes are redrawn per batch (brSF), while this costs about 1/15 of that.
    """
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"hash_uniform draws at most 2**32 - 1 entries, got shape {shape}")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, n).reshape(shape)
    bits = _mix32(_mix32(idx ^ seed[0]) ^ seed[1])
    one_two = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    u = one_two - 1.0
    return (minval + (maxval - minval) * u).astype(dtype)


FEEDBACK_INITS = {"gaussian": gaussian, "uniform": uniform, "orthogonal": orthogonal,
                  "xavier": xavier}
# The public names say what these are (``fbalign.gaussian_feedback``); ``fbalign.rules`` keeps
# the short names too.
gaussian_feedback, uniform_feedback, orthogonal_feedback = gaussian, uniform, orthogonal


def resolve_initializer(init: str | Initializer, scale: float | None, fan: int) -> Initializer:
    """Turns a rule's ``init``/``scale`` arguments into an initialiser for one matrix.

    A name uses ``scale`` as its parameter (std, limit or gain); ``scale=None`` picks the
    variance-preserving default for a backward map with ``fan`` inputs: std ``1/sqrt(fan)``,
    limit ``sqrt(3/fan)``, gain 1. A callable is used as given, multiplied by ``scale`` if set.
    """
    check_number("feedback init", "scale", scale, low=0, low_open=True, optional=True)
    if callable(init):
        if scale is None:
            return init
        return lambda key, shape, dtype=jnp.float32: scale * init(key, shape, dtype)
    if init not in FEEDBACK_INITS:
        raise ValueError(
            f"unknown feedback init {init!r}; valid: {', '.join(sorted(FEEDBACK_INITS))} "
            "or a callable (key, shape, dtype) -> array"
        )
    if scale is None:
        scale = {
            "gaussian": 1.0 / math.sqrt(fan),
            "uniform": math.sqrt(3.0 / fan),
            "orthogonal": 1.0,
            "xavier": 1.0,  # the Glorot limit comes from each matrix's shape
        }[init]
    return FEEDBACK_INITS[init](scale)


def sign_feedback(
    w: Float[Array, "*window din dout"],
    magnitude: Float[Array, "*window din dout"] | Float[Array, ""] | float | None = None,
) -> Float[Array, "*window din dout"]:
    """``sign(W) * M``: the feedback of sign symmetry, in FA orientation (``W``'s shape).

    ``magnitude`` is an array of ``W``'s shape (frSF, brSF), a scalar (uSF), or None for uSF's
    Glorot std ``sqrt(2 / (fan_in + fan_out))`` of ``W``'s shape, as BioTorch uses (Liao, Leibo &
    Poggio 2016). The sign carries no gradient (``d sign / dW = 0``). The one helper the rules,
    the `Backward` objects and the Flax adapters share.
    """
    m = glorot_std(tuple(w.shape)) if magnitude is None else magnitude
    return jnp.sign(w) * jnp.asarray(m, w.dtype)
