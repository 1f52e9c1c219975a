r"""Dense linear algebra that stays safe under `jax.vmap` on the CPU.

jaxlib 0.10's CPU LAPACK kernels (SVD, LU, Cholesky, QR, ...) split a *batched* call into
chunks, schedule them on XLA's intra-op thread pool and block the pool worker they run on until
the chunks finish. When as many batched calls run at once as the pool has threads (two on a
2-core machine: ADMM's weight and activation solves, which do not depend on each other, or the
per-layer QRs of an orthogonal initialiser), every worker waits for chunks no free worker can
run, and the program hangs with every thread idle. Measured here (jax 0.10.2, 2 cores):
``fbalign train --rule admm --seeds 2 --ensemble-impl vmap`` hung in 2 of 3 runs. JAX 0.11.2
compiles that path out of its open-source build; 0.10.2 is the newest on the registry today.

The functions here therefore run their batch, under `jax.vmap` and on the CPU only, as a
sequential `jax.lax.map` of unbatched calls (which LAPACK runs inline, on one worker). On other
platforms (GPU, TPU) the batched kernel runs as before: `jax.lax.platform_dependent` picks the
branch when the program is lowered. Outside `jax.vmap` nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from fbalign._src.base import Array


def vmap_sequential_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (positional array arguments, a pytree of arrays out), whose `jax.vmap` is a
    sequential `jax.lax.map` of unbatched calls on the CPU and `jax.vmap` of ``fn`` elsewhere.

    Not differentiable by itself (`jax.custom_batching.custom_vmap` has no reverse mode): wrap
    the result in a `jax.custom_vjp` whose rules call such functions again (see `solve_spd`)."""
    wrapped = custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size: int, in_batched: Any, *args: Any) -> tuple[Any, Any]:
        args = tuple(jax.tree.map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))), a, ab)
            for a, ab in zip(args, in_batched, strict=True))

        def sequential(*a: Any) -> Any:
            return jax.lax.map(lambda t: wrapped(*t), a)

        def batched(*a: Any) -> Any:
            return jax.vmap(fn)(*a)

        out = jax.lax.platform_dependent(*args, cpu=sequential, default=batched)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


_cholesky = vmap_sequential_on_cpu(lambda a: jnp.linalg.cholesky(a))
_cho_solve = vmap_sequential_on_cpu(
    lambda low, b: jax.scipy.linalg.cho_solve((low, True), b))


@jax.custom_vjp
def solve_spd(a: Array, b: Array) -> Array:
    r"""``x = A^{-1} b`` for a symmetric positive-definite ``A`` (``(n, n)``; ``b``: ``(n,)`` or
    ``(n, k)``), by a Cholesky factorisation, safe under `jax.vmap` on the CPU (see the module
    docstring). NaN where ``A`` is not positive definite, as `jax.scipy.linalg.solve` with
    ``assume_a="pos"``.

    Reverse-mode differentiable (``\bar b = A^{-1} \bar x``, ``\bar A = -\bar b x^\top``, the
    factor reused); forward mode is not defined (`jax.custom_vjp`)."""
    return _cho_solve(_cholesky(a), b)


def _solve_spd_fwd(a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    low = _cholesky(a)
    x = _cho_solve(low, b)
    return x, (low, x)


def _solve_spd_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    low, x = res
    gb = _cho_solve(low, g)
    ga = -(jnp.outer(gb, x) if x.ndim == 1 else gb @ x.T)
    return ga, gb


solve_spd.defvjp(_solve_spd_fwd, _solve_spd_bwd)

pinv: Callable[[Array], Array] = vmap_sequential_on_cpu(lambda a: jnp.linalg.pinv(a))
pinv.__doc__ = ("`jnp.linalg.pinv` (an SVD), safe under `jax.vmap` on the CPU (see the module "
                "docstring); not differentiable.")


def orthogonal(scale: float = 1.0) -> Callable[..., Array]:
    """`jax.nn.initializers.orthogonal` (a QR), safe under `jax.vmap` on the CPU (see the module
    docstring): ``init(key, shape, dtype)``."""
    base = jax.nn.initializers.orthogonal(scale=scale)

    def init(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return vmap_sequential_on_cpu(lambda k: base(k, tuple(shape), dtype))(key)

    return init
