"""Relaxation: descent of an energy on a pytree of states (activities), the inner loop shared by
equilibrium propagation, predictive coding and activation relaxation.

``relax(energy, init, steps=T)`` runs ``s <- s - step_size * dE/ds`` (or an optax optimizer's
update) for ``T`` steps under ``lax.scan``, or, with ``tol``, until the largest gradient entry
falls below ``tol`` (at most ``T`` steps, ``lax.while_loop``). Everything is jittable and
vmappable; divergence (a non-finite energy) is reported in the result, not raised, so that a
jitted step can hand it to the harness (`check_relaxation` raises on the host, naming the phase).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fbalign._src.base import Array


class RelaxResult(NamedTuple):
    """The outcome of `relax`.

    Attributes:
      state: the relaxed states (the pytree ``init`` had).
      energy: the energy at ``state``.
      steps: the number of descent steps taken (int32).
      grad_norm: the largest ``|dE/ds|`` entry at ``state``.
      diverged: True when the energy became NaN or infinite (the loop then stops).
      trajectory: with ``record=True``, the energy before each step, ``(steps,)``; entries after
        an early stop (``tol``, divergence) are NaN. Else None.
    """

    state: Any
    energy: Array
    steps: Array
    grad_norm: Array
    diverged: Array
    trajectory: Array | None = None


def _max_abs(tree: Any) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in leaves]))


def relax(
    energy: Callable[[Any], Array],
    init: Any,
    *,
    steps: int,
    step_size: float = 0.1,
    optimizer: optax.GradientTransformation | None = None,
    tol: float | None = None,
    record: bool = False,
) -> RelaxResult:
    r"""Minimises ``energy(s)`` over the states ``s`` from ``init`` by gradient descent.

    .. math:: s_{t+1} = s_t - \eta \, \partial E / \partial s \,(s_t)

    (or ``s_{t+1} = s_t + u_t`` with ``u_t`` from ``optimizer``, e.g. ``optax.sgd`` with
    momentum, fresh at every call). Used by predictive coding (Whittington & Bogacz 2017),
    equilibrium propagation (Scellier & Bengio 2017) and activation relaxation (Millidge et al.
    2020), whose inference phases are this descent on their own energies.

    Args:
      energy: ``E(s) -> scalar``; its gradient is taken with ``jax.value_and_grad``.
      init: the starting states (any pytree of arrays).
      steps: the number of steps (with ``tol``: the most steps).
      step_size: ``eta``, when no ``optimizer`` is given.
      optimizer: an optax transformation applied to ``dE/ds``.
      tol: stop at the first state where ``max |dE/ds| < tol`` (``lax.while_loop``, one energy
        gradient per step); None runs exactly ``steps`` steps (``lax.scan``, reverse-mode
        differentiable).
      record: also return the energy before every step (``trajectory``).

    Returns:
      A `RelaxResult`. The loop stops early (keeping the last finite state) when the energy
      becomes non-finite; ``diverged`` says so.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"relax: steps must be a non-negative int, got {steps!r}")
    if optimizer is None:
        if not step_size > 0:
            raise ValueError(f"relax: step_size must be positive, got {step_size}")
        optimizer = optax.sgd(step_size)
    value_and_grad = jax.value_and_grad(energy)
    opt_state = optimizer.init(init)

    def descend(s, o):
        e, g = value_and_grad(s)
        u, o = optimizer.update(g, o, s)
        bad = ~jnp.isfinite(e)
        s_new = jax.tree.map(lambda a, b: jnp.where(bad, a, b), s, optax.apply_updates(s, u))
        return s_new, o, e, bad

    if tol is None:
        def body(carry, _):
            s, o, stopped, n = carry
            s_new, o_new, e, bad = descend(s, o)
            keep = stopped | bad
            s = jax.tree.map(lambda a, b: jnp.where(keep, a, b), s, s_new)
            o = jax.tree.map(lambda a, b: jnp.where(keep, a, b), o, o_new)
            n = n + jnp.where(keep, 0, 1)
            return (s, o, keep, n), jnp.where(stopped, jnp.nan, e)

        (s, _, diverged, n), traj = lax.scan(
            body, (init, opt_state, jnp.zeros((), bool), jnp.zeros((), jnp.int32)), None,
            length=steps)
    else:
        dtype = jnp.result_type(*jax.tree.leaves(init)) if jax.tree.leaves(init) else float
        traj0 = jnp.full((steps,), jnp.nan, dtype)

        def cond(carry):
            return (carry[2] < steps) & ~carry[3]

        def body(carry):
            s, o, n, _, _, traj = carry
            e, g = value_and_grad(s)  # one energy gradient per step, as in the scan
            bad = ~jnp.isfinite(e)
            stop = bad | (_max_abs(g) < tol)
            u, o_new = optimizer.update(g, o, s)
            s = jax.tree.map(lambda a, b: jnp.where(stop, a, b), s, optax.apply_updates(s, u))
            o = jax.tree.map(lambda a, b: jnp.where(stop, a, b), o, o_new)
            traj = jnp.where(stop & ~bad, traj, traj.at[n].set(e))
            return s, o, n + jnp.where(stop, 0, 1), stop, bad, traj

        s, _, n, _, diverged, traj = lax.while_loop(
            cond, body, (init, opt_state, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                         jnp.zeros((), bool), traj0))
    e, g = value_and_grad(s)
    return RelaxResult(s, e, n, _max_abs(g), diverged | ~jnp.isfinite(e),
                       traj if record else None)


class RelaxationError(FloatingPointError):
    """A relaxation diverged (its energy became NaN or infinite)."""


def check_relaxation(result: RelaxResult, phase: str, step_size: float | None = None) -> None:
    """On the host: raises `RelaxationError` naming ``phase`` (``"free"``, ``"nudged"``,
    ``"inference"``), the step and the energy when ``result`` diverged, suggesting a smaller
    step size. Call it once per run or on a logged result, never inside ``jit``."""
    if bool(jnp.any(result.diverged)):
        hint = f" (step_size={step_size})" if step_size is not None else ""
        raise RelaxationError(
            f"the {phase} relaxation diverged after {int(jnp.max(result.steps))} steps: energy "
            f"{float(jnp.max(result.energy))}; use a smaller step size{hint} or fewer steps")
