"""Elementwise activations by name (a leaf module: models and rules both read it)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbalign._src.base import Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    # sigmoid(4 (x - 1/2)): Laborieux et al.'s (2021) `my_sigmoid`, the smooth counterpart of the
    # hard sigmoid clip(x, 0, 1) (value 1/2 and slope 1 at 1/2)
    "steep_sigmoid": lambda x: jax.nn.sigmoid(4.0 * (x - 0.5)),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Looks up an activation by name; the error lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}"
        ) from None


def derivative(f: Callable[[Array], Array], a: Array) -> Array:
    """``f'(a)`` of an elementwise activation: its JVP along ones (XLA fuses it)."""
    return jax.jvp(f, (a,), (jnp.ones_like(a),))[1]
