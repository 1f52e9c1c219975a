"""Losses used by the harness: mean over the batch, so their gradient matches ``jax.grad``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Float, Int

from fbalign._src.base import Array

# Integer class labels or float (one-hot, regression) targets of the output's shape.
Target = Int[Array, "*batch"] | Float[Array, "*batch n_out"]
# loss(output, target) -> scalar
Loss = Callable[[Float[Array, "*batch n_out"], Target], Float[Array, ""]]


def _targets_like(y: Array, target: Array) -> Array:
    if target.ndim == y.ndim - 1 and jnp.issubdtype(target.dtype, jnp.integer):
        return jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype)
    return target.astype(y.dtype)


def cross_entropy(logits: Float[Array, "*batch n_out"], target: Target) -> Float[Array, ""]:
    """Softmax cross-entropy, mean over the batch; ``target`` is integer labels or one-hot."""
    return jnp.mean(optax.softmax_cross_entropy(logits, _targets_like(logits, target)))


def squared_error(y: Float[Array, "*batch n_out"], target: Target) -> Float[Array, ""]:
    """``0.5 * ||y - t||^2`` per example, mean over the batch; integer labels become one-hot."""
    t = _targets_like(y, target)
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))


def binary_hinge(output: Float[Array, "*batch n_out"], target: Target) -> Float[Array, ""]:
    r"""Taylor et al.'s (2016) binary hinge loss, per output unit, summed over units and averaged
    over the batch: ``\ell(z, y) = \max(1 - z, 0)`` for ``y = 1`` and ``\max(z, 0)`` for ``y =
    0``. ``target``: ``(batch, n_out)`` in ``{0, 1}``, or integer class indices ``(batch,)``
    (one-vs-all: one-hot). ``--loss hinge``; with `fbalign.rules.admm`, whose output block is
    solved for it with ``output_loss="hinge"``."""
    t = _targets_like(output, target)
    per = jnp.where(t > 0.5, jnp.maximum(1 - output, 0), jnp.maximum(output, 0))
    return jnp.mean(jnp.sum(per, axis=-1))


LOSSES: dict[str, Loss] = {"cross_entropy": cross_entropy, "squared_error": squared_error,
                           "hinge": binary_hinge}


def get_loss(name: str) -> Loss:
    """Looks up a loss by name; the error lists the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}") from None


def check_targets(x: Any, y: Any, n_out: int, what: str = "y") -> None:
    """Raises a `ValueError` naming what is wrong when targets ``y`` cannot be right for a
    network with ``n_out`` outputs on inputs ``x``: a length that differs from ``x``'s, integer
    class labels outside ``[0, n_out)`` (one-hot encoding would give them zero loss and zero
    gradient), float targets of another shape than ``(n, n_out)`` (a ``(n,)`` vector would
    broadcast against ``(n, 1)`` outputs). Host-side and O(n): call it once per dataset."""
    y = np.asarray(y)
    if len(y) != len(x):
        raise ValueError(f"{what} has {len(y)} entries but the inputs have {len(x)}")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        if y.ndim != 1:
            raise ValueError(f"{what}: integer class labels must be a vector (n,), got shape "
                             f"{y.shape}")
        bad = (y < 0) | (y >= n_out)
        if np.any(bad):
            raise ValueError(
                f"{what}: {int(bad.sum())} labels lie outside [0, {n_out}) (min {y.min()}, max "
                f"{y.max()}); the network has {n_out} outputs, one per class: build it with as "
                f"many outputs as the data has classes (Dataset.num_classes), or fix the labels")
        return
    if y.ndim != 2 or y.shape[1] != n_out:
        hint = (" Class labels must be integers (y.astype(int))." if y.ndim == 1 and n_out > 1
                else f" Reshape them to ({len(y)}, {n_out}).")
        raise ValueError(f"{what}: float targets have shape {y.shape} but the network's "
                         f"outputs are ({len(y)}, {n_out}).{hint}")
