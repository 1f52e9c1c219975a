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
