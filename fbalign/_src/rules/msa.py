r"""The extended method of successive approximations (E-MSA): training as optimal control.

Li, Chen, Tai & E (2018), "Maximum principle based algorithms for deep learning", Journal of
Machine Learning Research 18(165) (arXiv:1710.09513); its discrete-time form for feedforward
networks: Li & Hao (2018), "An optimal control approach to deep learning and applications to
discrete-weight neural networks", ICML (arXiv:1803.01299).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.base import (
    Array,
    Batch,
    EmptyState,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
)
from fbalign._src.models import require_mlp

Activation = Callable[[Array], Array]

_NAME = "emsa"
_WHY = "its states and co-states are the layer outputs x_{t+1} = f_t(x_t W_t + b_t)"


def _layer(theta: dict[str, Array], f: Activation, x: Array) -> Array:
    a = x @ theta["w"]
    return f(a + theta["b"] if "b" in theta else a)


def msa_states(params: Params, acts: Sequence[Activation], x: Array, target: Array,
               loss: Callable[[Array, Array], Array]) -> tuple[list[Array], list[Array]]:
    r"""The states and co-states of the network seen as a discrete-time control system.

    States (forward): ``x_0 = x``, ``x_{t+1} = f_t(x_t, \theta_t) = \sigma_t(x_t W_t + b_t)``.
    Co-states (backward), one per example ``s``:

    .. math:: p_T^s = -\nabla_{x} \Phi(x_T^s, y^s), \qquad
              p_t^s = \nabla_x H_t(x_t^s, p_{t+1}^s, \theta_t), \qquad
              H_t(x, p, \theta) = p \cdot f_t(x, \theta),

    with ``\Phi`` the per-example loss (``N`` times the batch-mean ``loss``'s gradient, for a
    batch of ``N``). ``p_t^s = -\partial \Phi^s / \partial x_t^s``: the negative adjoints.

    Returns:
      ``([x_0, ..., x_T], [p_0, ..., p_T])``, each ``(batch, width_t)``.
    """
    xs = [x]
    for theta, f in zip(params, acts, strict=True):
        xs.append(_layer(theta, f, xs[-1]))
    n = x.shape[0]
    p = -n * jax.grad(lambda o: loss(o, target))(xs[-1])
    ps = [p]
    for t in range(len(params) - 1, -1, -1):
        theta, f = params[t], acts[t]
        p = jax.vjp(lambda z, theta=theta, f=f: _layer(theta, f, z), xs[t])[1](p)[0]
        ps.insert(0, p)
    return xs, ps


def extended_hamiltonian(theta: dict[str, Array], f: Activation, x: Array, p_next: Array,
                         x_next: Array, p: Array, rho: float,
                         weight_decay: float = 0.0) -> Array:
    r"""Layer ``t``'s extended Hamiltonian, averaged over the batch of ``N``:

    .. math:: \tilde H_t(\theta) = \frac1N \sum_s \Big[ p_{t+1}^s \cdot f_t(x_t^s, \theta)
        - \tfrac{\rho}{2} \|x_{t+1}^s - f_t(x_t^s, \theta)\|^2
        - \tfrac{\rho}{2} \|p_t^s - \nabla_x H_t(x_t^s, p_{t+1}^s, \theta)\|^2 \Big]
        - \tfrac{\lambda}{2} \|\theta\|^2

    with ``x``, ``p`` held at the values the current ``theta`` produced. ``\lambda`` is the
    running cost ``L(\theta)`` of the paper's Hamiltonian ``H = p \cdot f - L`` (0: none).

    The continuous-time paper writes the co-state penalty as ``\|\dot p + \nabla_x H\|^2``; in
    discrete time the co-state recursion is ``p_t = \nabla_x H_t`` (``p`` runs backwards, so
    ``\dot p \approx p_{t+1} - p_t`` flips sign), which makes it ``\|p_t - \nabla_x H_t\|^2``
    (Li & Hao 2018; zero at the current ``theta``, as both penalties must be).
    """
    n = x.shape[0]
    out, pull = jax.vjp(lambda z: _layer(theta, f, z), x)
    grad_x = pull(p_next)[0]
    value = (jnp.sum(p_next * out) - 0.5 * rho * jnp.sum((x_next - out) ** 2)
             - 0.5 * rho * jnp.sum((p - grad_x) ** 2)) / n
    if weight_decay:
        value = value - 0.5 * weight_decay * sum(jnp.sum(v**2) for v in jax.tree.leaves(theta))
    return value


def _check_number(name: str, value: Any, *, positive: bool, what: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > 0 if positive else value >= 0) and value == value and value != float("inf")
    if not ok:
        bound = "a positive" if positive else "a non-negative"
        raise ValueError(f"extended_msa: {name} ({what}) must be {bound} finite number, got "
                         f"{value!r}")


def extended_msa(rho: float = 0.1, inner_steps: int = 10, inner_lr: float = 0.1, *,
                 weight_decay: float = 0.0) -> LearningRule:
    r"""The extended method of successive approximations (E-MSA; Li, Chen, Tai & E 2018,
    "Maximum principle based algorithms for deep learning", JMLR 18) on a dense
    `fbalign.models.mlp`.

    The network is a discrete-time control system: states ``x_{t+1} = f_t(x_t, \theta_t) =
    \sigma_t(x_t W_t + b_t)``, controls ``\theta_t = (W_t, b_t)``, terminal cost ``\Phi(x_T,
    y)`` (the loss). One step of Algorithm 2 (E-MSA), on a batch of ``N``:

    1. **forward**: ``x_0 = x``, ``x_{t+1} = f_t(x_t, \theta_t)``;
    2. **backward**: ``p_T^s = -\nabla_x \Phi(x_T^s, y^s)``, ``p_t^s = \nabla_x H_t(x_t^s,
       p_{t+1}^s, \theta_t)`` with the Hamiltonian ``H_t(x, p, \theta) = p \cdot f_t(x,
       \theta) - L(\theta)`` (`msa_states`);
    3. **maximise** for every layer, with ``x`` and ``p`` frozen, the batch-averaged extended
       Hamiltonian (`extended_hamiltonian`)

       .. math:: \tilde H_t(\theta) = \frac1N \sum_s p_{t+1}^s \cdot f_t(x_t^s, \theta)
           - \tfrac{\rho}{2} \|x_{t+1}^s - f_t(x_t^s, \theta)\|^2
           - \tfrac{\rho}{2} \|p_t^s - \nabla_x H_t(x_t^s, p_{t+1}^s, \theta)\|^2
           - L(\theta).

       The ``\rho`` terms keep the new ``\theta`` where the forward and backward equations
       still (nearly) hold, which is what makes the MSA converge (the paper's error estimate).
       As in the paper's experiments, the maximisation is approximate: ``inner_steps`` steps
       of gradient ascent ``\theta \leftarrow \theta + \eta\, \nabla_\theta \tilde H_t``
       (``\eta`` = ``inner_lr``) from the current ``\theta_t``. The layers' maximisations are
       independent (``\theta_t`` enters only ``\tilde H_t``).

    The update returned is ``\theta_{old} - \theta_{new}`` (the gradient's sign), so
    **``optax.sgd(1.0)`` applies the maximisation exactly**; other optimizers treat it as a
    preconditioned direction.

    **Limit.** ``\nabla_\theta \frac1N \sum_s H_t = -\nabla_{\theta_t}`` of the batch-mean loss
    (``p`` are the negative adjoints), and the ``\rho`` terms have zero gradient at the current
    ``\theta``: with ``inner_steps=1`` the update is ``\eta`` times backprop's gradient (plus
    ``\eta \lambda \theta``), for any ``\rho`` (tested against ``jax.grad``); more steps or
    larger ``\rho`` depart from it.

    Under data parallelism (``context.axis_name``) the ascent's gradients are averaged over
    devices at every inner step, so every device maximises the global batch's Hamiltonian.

    Args:
      rho: ``\rho \ge 0``, the weight of the feasibility penalties (0: plain MSA).
      inner_steps: gradient-ascent steps on ``\tilde H`` per training step.
      inner_lr: ``\eta``, the ascent's step size.
      weight_decay: ``\lambda \ge 0``: running cost ``L(\theta) = \tfrac\lambda2
        \|\theta_t\|^2`` (weights and biases) in the Hamiltonian.

    Returns:
      A `LearningRule` (`EmptyState`). Metrics: ``emsa_hamiltonian`` and
      ``emsa_hamiltonian_start``, ``\sum_t \tilde H_t`` after and before the ascent.
    """
    _check_number("rho", rho, positive=False, what="the feasibility penalties' weight")
    _check_number("inner_lr", inner_lr, positive=True, what="the ascent's step size")
    _check_number("weight_decay", weight_decay, positive=False, what="the running cost")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"extended_msa: inner_steps must be a positive integer (the gradient-"
                         f"ascent steps on the extended Hamiltonian), got {inner_steps!r}")
    rho, inner_lr, weight_decay = float(rho), float(inner_lr), float(weight_decay)

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key, params
        require_mlp(network, _NAME, _WHY)
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        del key
        require_mlp(context.network, _NAME, _WHY)
        acts = context.network.activations()
        xs, ps = msa_states(params, acts, batch.x, batch.y, context.loss)
        xs, ps = jax.lax.stop_gradient((xs, ps))

        def total(theta: Params) -> Array:
            return sum(extended_hamiltonian(theta[t], acts[t], xs[t], ps[t + 1], xs[t + 1],
                                            ps[t], rho, weight_decay)
                       for t in range(len(theta)))

        def ascend(_, theta):
            g = jax.grad(total)(theta)
            if context.axis_name is not None:
                g = jax.lax.pmean(g, context.axis_name)
            return jax.tree.map(lambda v, d: v + inner_lr * d, theta, g)

        new = jax.lax.fori_loop(0, inner_steps, ascend, params)
        updates = jax.tree.map(lambda old, v: old - v, params, new)
        metrics = {"emsa_hamiltonian": total(new), "emsa_hamiltonian_start": total(params)}
        out = xs[-1]
        return updates, state, StepOutput(context.loss(out, batch.y), out, metrics)

    return LearningRule(init_fn, step_fn, (), _NAME)
