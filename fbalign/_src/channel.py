"""Error-channel primitives: k-bit quantisation, derivative-free activations, target taps.

These are the pieces of the random-backprop family (Baldi, Sadowski & Lu 2018) and of direct
random target projection (Frenkel, Lefebvre & Bol 2021) that act on the *error channel* rather
than on a weight: each has a plain function for the explicit form of a rule and a
``jax.custom_vjp`` twin whose backward does the same thing inside ``jax.grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Float, Int

from fbalign._src.base import Array


def quantize(x: Float[Array, " batch *rest"], bits: int) -> Float[Array, " batch *rest"]:
    r"""Uniform mid-rise quantiser with ``2**bits`` levels, one scale per example.

    With ``m`` the largest ``|x|`` of an example (the maximum over all axes but the first) and
    ``K = 2**bits``, every entry is mapped to the centre of its cell of ``[-m, m]`` cut into
    ``K`` equal cells:

    .. math::
        j = \mathrm{clip}(\lfloor (x/m + 1) K / 2 \rfloor, 0, K-1), \qquad
        q(x) = m \left(\frac{2j + 1}{K} - 1\right).

    So an example's signal takes at most ``K`` distinct values, symmetric about zero; ``bits=1``
    sends ``\pm m/2``, the sign of the error with one shared magnitude. An all-zero example stays
    zero.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    levels = 2**bits
    axes = tuple(range(1, x.ndim)) if x.ndim > 1 else None
    m = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    safe = jnp.where(m > 0, m, 1.0)
    j = jnp.clip(jnp.floor((x / safe + 1.0) * (levels / 2)), 0, levels - 1)
    return (m * ((2.0 * j + 1.0) / levels - 1.0)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_error(x: Float[Array, " batch *rest"], bits: int) -> Float[Array, " batch *rest"]:
    """Identity on ``x``; the backward pass sends ``quantize(g, bits)`` instead of ``g``.

    Placed on a hidden layer's output, it quantises the error signal arriving there through the
    learning channel, before the activation derivative is applied.
    """
    del bits
    return x


def _quantize_error_fwd(x, bits):
    del bits
    return x, None


def _quantize_error_bwd(bits, _, g):
    return (quantize(g, bits),)


quantize_error.defvjp(_quantize_error_fwd, _quantize_error_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def straight_through(
    f: Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]], a: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """``f(a)`` whose backward pass treats ``f`` as the identity (``f'`` replaced by 1).

    The variant of random backpropagation without the activation derivative (Baldi et al. 2018,
    who show that learning needs the derivative): the error reaching ``f(a)`` passes to ``a``
    unchanged.
    """
    return f(a)


def _straight_through_fwd(f, a):
    return f(a), None


def _straight_through_bwd(f, _, g):
    del f
    return (g,)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def as_targets(
    labels: Int[Array, " batch"] | Float[Array, "batch n_out"], n_out: int, dtype=jnp.float32
) -> Float[Array, "batch n_out"]:
    """Integer class labels ``(batch,)`` become one-hot ``(batch, n_out)``; arrays pass as given."""
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.ndim == 1:
        return jax.nn.one_hot(labels, n_out, dtype=dtype)
    if labels.ndim != 2 or labels.shape[1] != n_out:
        raise ValueError(
            f"targets must be integer labels (batch,) or an array (batch, {n_out}), got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    return labels.astype(dtype)


@jax.custom_vjp
def target_output(
    y: Float[Array, "batch n_out"],
    carrier: Float[Array, "batch n_out"],
    target: Float[Array, "batch n_out"],
) -> Float[Array, "batch n_out"]:
    """Identity on ``y``; in the backward pass puts ``target`` (not the error) into ``carrier``.

    The direct-random-target-projection twin of `fbalign.ops.dfa_output`: with the same
    `fbalign.ops.dfa_hidden` taps, hidden layer ``l`` then receives ``target @ B_l`` (Frenkel,
    Lefebvre & Bol 2021). ``y`` itself receives its ordinary error, so the output layer learns
    as in backprop.
    """
    del carrier, target
    return y


def _target_output_fwd(y, carrier, target):
    del carrier
    return y, target


def _target_output_bwd(target, g):
    return g, target.astype(g.dtype), jnp.zeros_like(target)


target_output.defvjp(_target_output_fwd, _target_output_bwd)
