r"""Activation relaxation: after the feedforward pass, activities relax to backprop's adjoints
under local leaky dynamics; weights then learn from the relaxed activities.

Millidge, Tschantz, Seth & Buckley (2020), "Activation relaxation: a local dynamical
approximation to backpropagation in the brain" (arXiv:2009.05359); Millidge, Tschantz, Seth &
Buckley (2020), "Investigating the scalability and biological plausibility of the activation
relaxation algorithm" (arXiv:2010.06219).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbalign._src.base import (
    Array,
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
    dense_grads,
)
from fbalign._src.models import require_mlp
from fbalign._src.relax import relax

Activation = Callable[[Array], Array]


class ActivationRelaxationState(NamedTuple):
    """``feedback[l]``: the learned backward weights ``B_l`` of layer ``l``, shaped like ``W_l``
    ``(din, dout)`` (the package's orientation: the activity travels down as ``x @ B_l.T``, so
    ``B_l = W_l`` is the paper's ``B = W^T``); ``feedback[0]`` is None. Without
    ``learn_backward`` the tuple is empty and ``W_l`` itself carries the relaxation."""

    feedback: tuple[Array | None, ...] = ()


_WHY = "its dynamics are stated layer by layer on x @ W + b"


def relaxation_targets(xs: Sequence[Array], top: Array, derivs: Sequence[Array],
                       backward: Sequence[Array]) -> list[Array]:
    r"""The fixed-point map of the dynamics: ``T_l(x) = (x_{l+1} \odot f'(a_{l+1}))
    B_{l+1}^\top`` for every hidden layer (``x_L = top``, the clamped output error), with
    ``B = W`` for the paper's rule. ``xs[j]`` is hidden layer ``j``'s activity (layer ``j+1``
    counting the input as 0), ``derivs[j]`` and ``backward[j]`` belong to weight layer ``j``."""
    above = [*xs, top]
    return [(above[j + 1] * derivs[j + 1]) @ backward[j + 1].T for j in range(len(xs))]


def relaxation_energy(xs: Sequence[Array], top: Array, derivs: Sequence[Array],
                      backward: Sequence[Array]) -> Array:
    r"""``E(x) = \sum_l \tfrac12 \|x_l - \mathrm{sg}(T_l(x))\|^2`` (``sg``: stop-gradient).

    The paper's dynamics ``dx_l/dt = -x_l + T_l(x)`` are not a gradient flow (layer ``l``
    feels layer ``l+1``, not the reverse: the Jacobian is block triangular), so no energy has
    them as its exact gradient. This one does by construction: ``\partial E / \partial x_l =
    x_l - T_l(x) = -dx_l/dt``, so descent with step ``\eta`` is the paper's Euler step, and its
    value is half the squared residual (zero exactly at the fixed point).
    """
    targets = relaxation_targets(xs, top, derivs, backward)
    sg = jax.lax.stop_gradient
    return sum((0.5 * jnp.sum((x - sg(t)) ** 2) for x, t in zip(xs, targets, strict=True)),
               jnp.zeros((), top.dtype))


def _angle(a: Array, b: Array) -> Array:
    a, b = jnp.ravel(a), jnp.ravel(b)
    cos = jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def _check_options(steps: int, step_size: float, tol: float | None, backward_lr: float,
                   backward_decay: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"activation_relaxation: steps must be a positive integer (the "
                         f"relaxation steps), got {steps!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or step_size <= 0:
        raise ValueError(f"activation_relaxation: step_size must be a positive number, got "
                         f"{step_size!r}")
    if step_size >= 2:
        raise ValueError(f"activation_relaxation: step_size must be below 2 (the relaxation "
                         f"contracts by |1 - step_size| per step), got {step_size!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"activation_relaxation: tol must be positive or None, got {tol!r}")
    if not backward_lr > 0 or not backward_decay >= 0:
        raise ValueError(f"activation_relaxation: backward_lr must be positive and "
                         f"backward_decay non-negative, got {backward_lr!r}, {backward_decay!r}")


def activation_relaxation(steps: int = 100, step_size: float = 0.1, tol: float | None = None, *,
                          derivative: bool = True, learn_backward: bool = False,
                          backward_lr: float = 0.01, backward_decay: float = 0.0,
                          ) -> LearningRule:
    r"""Activation relaxation (AR; Millidge et al. 2020) on a dense `fbalign.models.mlp`.

    After the feedforward pass (pre-activations ``a_l`` and activities ``h_l`` frozen), the
    output unit is clamped to ``x_L = \partial\mathcal{L}/\partial h_L`` and the hidden
    activities, starting from ``x_l = h_l``, follow

    .. math:: dx_l/dt = -x_l + (x_{l+1} \odot f'(a_{l+1})) W_{l+1}^\top,

    Euler steps of size ``\eta`` (`relax` on `relaxation_energy`, whose gradient is exactly
    ``-dx/dt``). The fixed point is backprop's adjoint ``x_l^* = \partial\mathcal{L}/\partial
    h_l``; the error of the top hidden layer decays as ``(1-\eta)^t``, of layer ``L-1-k`` as
    ``O(t^k (1-\eta)^{t-k})``, and ``\eta = 1`` is exact after ``L-1`` steps. The updates
    (gradient sign) are ``\Delta W_l = h_{l-1}^\top (x_l \odot f'(a_l))``, ``\Delta b_l =
    \sum x_l \odot f'(a_l)``: ``jax.grad`` of the loss once relaxed (``\mathcal{L}`` is the
    batch mean, so ``x`` carries the ``1/N``).

    Args:
      steps: relaxation steps (the most, with ``tol``).
      step_size: ``\eta``, in ``(0, 2)``.
      tol: stop once ``max |dx/dt| < tol``; None runs exactly ``steps`` steps.
      derivative: False drops every ``f'`` (relaxation and update; the "removing the
        nonlinear derivative" simplification of arXiv:2010.06219): no longer backprop, still
        learns.
      learn_backward: relax through learned backward weights ``B_l`` (rule state, drawn
        ``N(0, 1/din)``) in place of ``W_l`` (arXiv:2010.06219's "learnable backwards weights").
        ``B_l`` gets the forward weight's own update, Kolen-Pollack-like: ``B_l \leftarrow
        (1 - \alpha\lambda) B_l - \alpha \Delta W_l`` with ``\alpha = `` ``backward_lr``,
        ``\lambda = `` ``backward_decay``. With ``optax.sgd(alpha)`` and the same decay on
        ``W`` (``optax.add_decayed_weights``), ``W_l - B_l`` shrinks by ``1 - \alpha\lambda``
        per step; without decay the shared updates still turn ``B_l`` towards ``W_l``.

    Returns:
      A `LearningRule` with an `ActivationRelaxationState`. Metrics: ``ar_steps``,
      ``ar_residual`` (``max |dx/dt|`` after relaxation) and, with ``learn_backward``,
      ``ar_backward_angle`` (degrees between ``B_l`` and ``W_l``, i.e. the paper's ``B`` and
      ``W^T``, averaged over layers).
    """
    _check_options(steps, step_size, tol, backward_lr, backward_decay)
    name = "activation_relaxation"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> ActivationRelaxationState:
        require_mlp(network, name, _WHY)
        if not learn_backward:
            return ActivationRelaxationState()
        keys = jax.random.split(key, len(params))
        fb = [None] + [
            jax.random.normal(k, p["w"].shape, p["w"].dtype)
            / jnp.sqrt(p["w"].shape[0]).astype(p["w"].dtype)
            for k, p in zip(keys[1:], params[1:], strict=True)]
        return ActivationRelaxationState(tuple(fb))

    def step_fn(params: Params, state: ActivationRelaxationState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, ActivationRelaxationState, StepOutput]:
        del key
        require_mlp(context.network, name, _WHY)
        out, tape = context.network.forward(params, batch.x)
        inputs = tape.inputs  # x, h_1, ..., h_{L-1}
        loss_val, top = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
        derivs = tape.derivs if derivative else [jnp.ones_like(d) for d in tape.derivs]
        back = list(state.feedback) if learn_backward else [p["w"] for p in params]
        res = relax(lambda xs: relaxation_energy(xs, top, derivs, back), list(inputs[1:]),
                    steps=steps, step_size=step_size, tol=tol)
        xs = [*res.state, top]
        updates = [dense_grads(h, x * d, "b" in p)
                   for h, x, d, p in zip(inputs, xs, derivs, params, strict=True)]
        metrics = {"ar_steps": res.steps.astype(out.dtype), "ar_residual": res.grad_norm}
        if learn_backward:
            metrics["ar_backward_angle"] = jnp.mean(jnp.stack(
                [_angle(b, p["w"]) for b, p in zip(back[1:], params[1:], strict=True)]
                or [jnp.zeros((), out.dtype)]))
            state = ActivationRelaxationState(tuple(
                None if b is None else (1 - backward_lr * backward_decay) * b
                - backward_lr * u["w"] for b, u in zip(back, updates, strict=True)))
        return updates, state, StepOutput(loss_val, out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
