"""Forward gradient: an unbiased gradient estimate from forward-mode directional derivatives.

Baydin, Pearlmutter, Syme, Wood & Torr (2022), "Gradients without backpropagation".
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from fbalign._src.base import (
    Batch,
    EmptyState,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
)
from fbalign._src.checks import check_choice

TANGENTS = ("normal", "rademacher")


def sample_tangents(key: PRNGKey, params: Params, num_tangents: int,
                    distribution: Literal["normal", "rademacher"] = "normal") -> Params:
    """``num_tangents`` perturbation directions ``v_k`` shaped like ``params`` (each leaf gets a
    leading axis of that size), with ``E[v v^T] = I``: standard normal or Rademacher (+-1)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    if distribution == "normal":
        draw = lambda k, a: jax.random.normal(k, (num_tangents, *a.shape), a.dtype)
    else:
        draw = lambda k, a: jax.random.rademacher(k, (num_tangents, *a.shape), a.dtype)
    return jax.tree.unflatten(treedef, [draw(k, a) for k, a in zip(keys, leaves, strict=True)])


def forward_gradient(num_tangents: int = 1,
                     distribution: Literal["normal", "rademacher"] = "normal") -> LearningRule:
    """Weight-perturbed forward gradient (Baydin et al. 2022, "Gradients without backpropagation").

    For the batch loss ``f(theta)``, draw ``K`` tangents ``v_k`` with ``E[v v^T] = I`` and take
    the directional derivatives ``d_k = grad f(theta) . v_k`` in forward mode (one ``jax.jvp``
    each, no backward pass). The update is

    ``g = (1/K) sum_k d_k v_k``,  with ``E[g] = grad f(theta)`` (unbiased).

    For normal tangents, ``Var[g_i] = (||grad f||^2 + (grad f)_i^2) / K``; for Rademacher
    tangents ``(||grad f||^2 - (grad f)_i^2) / K``. The estimate always has a non-negative inner
    product with the gradient (``g . grad f = (1/K) sum_k d_k^2``).

    Works with any network that has ``apply(params, x)`` (no layer structure needed): an fbalign
    model or a wrapped Flax/Equinox model. The primal forward runs once (``jax.linearize``) and
    the ``K`` tangents are pushed through its linearisation in one vmapped program. Under data
    parallelism every device draws the same tangents (the step key is replicated), so averaging
    the per-device estimates gives the global-batch one.

    Args:
      num_tangents: ``K``, the tangents averaged per step.
      distribution: ``"normal"`` (the paper's) or ``"rademacher"``.

    Returns:
      A `LearningRule` with an `EmptyState`.

    Example:
      >>> rule = fbalign.rules.forward_gradient(num_tangents=8)
      >>> fbalign.train.fit(fbalign.mlp((64, 32, 10)), rule, optax.sgd(1e-2), data)
    """
    if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
        raise ValueError(f"forward_gradient: num_tangents must be a positive integer, got "
                         f"{num_tangents!r}")
    check_choice("forward_gradient", "distribution", distribution, TANGENTS)

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key, params, network
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        def f(p):
            out = context.network.apply(p, batch.x)
            return context.loss(out, batch.y), out

        (loss_val, out), f_jvp = jax.linearize(f, params)
        tangents = sample_tangents(key, params, num_tangents, distribution)
        d = jax.vmap(lambda v: f_jvp(v)[0])(tangents)  # (K,) directional derivatives
        updates = jax.tree.map(lambda v: jnp.tensordot(d, v, 1) / num_tangents, tangents)
        return updates, state, StepOutput(loss_val, out)

    return LearningRule(init_fn, step_fn, (), "forward_gradient")
