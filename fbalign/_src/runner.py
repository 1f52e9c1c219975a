"""Pieces shared by the single-device epoch runner (`train`) and the sharded one (`sharding`).

A leaf module (it imports only JAX), so that both runners can import it at top level.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def reduce_chunk(ms: dict[str, Array]) -> dict[str, Array]:
    """Means over the chunk's steps; ``nonfinite`` flags become the number of bad steps, the
    index of the first one in the chunk, which leaves were bad there, and the per-step flags
    (``nonfinite_per_step``, for the host's count of consecutive skips)."""
    ms = dict(ms)
    bad = ms.pop("nonfinite", None)
    out = jax.tree.map(lambda a: jnp.mean(a, axis=0), ms)
    if bad is not None:
        bad = bad.reshape(bad.shape[0], -1, bad.shape[-1])  # (chunk, seeds, leaves)
        per_step = jnp.any(bad, axis=(1, 2))
        first = jnp.argmax(per_step)
        out.update(nonfinite_steps=jnp.sum(per_step), nonfinite_first=first,
                   nonfinite_leaves=jnp.any(bad[first], axis=0), nonfinite_per_step=per_step)
    return out


def ensemble_step(step: Callable, impl: str = "vmap") -> Callable:
    """``step`` over K networks whose arguments and results all carry a leading axis of size K.

    ``impl="vmap"``: ``jax.vmap(step)``, one batched program. ``"map"``: ``jax.lax.map``, one
    program that loops over the networks, each running the single-network kernels. Both give
    every network exactly its own single run (up to float rounding of batched kernels); see
    `fbalign.train.resolve_ensemble_impl` for which is faster where.
    """
    if impl == "vmap":
        return jax.vmap(step)
    if impl == "map":
        return lambda *args: jax.lax.map(lambda a: step(*a), args)
    raise ValueError(f"ensemble_step: impl must be 'vmap' or 'map', got {impl!r} (resolve "
                     f"'auto' with resolve_ensemble_impl)")
