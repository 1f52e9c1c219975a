r"""Predictive coding: inference on latent activities by descent of a prediction-error energy,
then local (Hebbian) weight updates at the relaxed activities.

Whittington & Bogacz (2017), "An approximation of the error backpropagation algorithm in a
predictive coding network with local Hebbian synaptic plasticity", Neural Computation 29(5);
Millidge, Tschantz & Buckley (2022), "Predictive coding approximates backprop along arbitrary
computation graphs", Neural Computation 34(6); Song, Lukasiewicz, Xu & Bogacz (2020), "Can the
brain do backpropagation? Exact implementation of backpropagation in predictive coding
networks", NeurIPS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fbalign._src.activations import derivative
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
from fbalign._src.relax import relax

Activation = Callable[[Array], Array]


_WHY = "its energy is stated layer by layer on x @ W + b"


def _preact(layer: dict[str, Array], x: Array) -> Array:
    a = x @ layer["w"]
    return a + layer["b"] if "b" in layer else a


def feedforward(params: Params, acts: Sequence[Activation],
                x: Array) -> tuple[list[Array], list[Array]]:
    """The ordinary forward pass: ``([a_1, ..., a_L], [h_1, ..., h_L])``, ``h_L`` the output."""
    preacts, outs = [], []
    for layer, f in zip(params, acts, strict=True):
        preacts.append(_preact(layer, x))
        x = f(preacts[-1])
        outs.append(x)
    return preacts, outs


def pc_energy(params: Params, acts: Sequence[Activation], inputs: Sequence[Array],
              latents: Sequence[Array], target: Array,
              loss: Callable[[Array, Array], Array], gamma: float = 1.0) -> Array:
    r"""The predictive-coding energy, summed over the batch:

    .. math:: E = \sum_{l=1}^{L-1} \tfrac12 \|z_l - f_l(u_{l-1} W_l + b_l)\|^2
                  + \gamma\, N\, \mathcal{L}(f_L(u_{L-1} W_L + b_L), y)

    where ``u = inputs`` are the presynaptic activities (``(x, z_1, ..., z_{L-1})`` for
    standard PC), ``z = latents`` the layers' activities, ``N`` the batch size and
    ``\mathcal{L}`` the batch-mean loss (so the output term is the per-example loss summed over
    the batch: ``\tfrac12 \|y - \mu_L\|^2`` summed for squared error, the classic clamped output).
    """
    n = inputs[0].shape[0]
    energy = jnp.zeros((), inputs[0].dtype)
    last = len(params) - 1
    for i, (layer, f, u) in enumerate(zip(params, acts, inputs, strict=True)):
        mu = f(_preact(layer, u))
        if i < last:
            energy = energy + 0.5 * jnp.sum((latents[i] - mu) ** 2)
        else:
            energy = energy + gamma * n * loss(mu, target)
    return energy


def fixed_prediction_energy(params: Params, acts: Sequence[Activation], preacts: Sequence[Array],
                            outs: Sequence[Array], latents: Sequence[Array], target: Array,
                            loss: Callable[[Array, Array], Array], gamma: float = 1.0) -> Array:
    r"""The energy of inference under the fixed-prediction assumption (Millidge et al. 2022).

    Its value is `pc_energy` with every prediction frozen at its feedforward value ``\mu_l =
    h_l``: ``\sum_l \tfrac12 \|z_l - h_l\|^2 + \gamma N \mathcal{L}(h_L, y)``. Its gradient is
    the fixed-prediction inference dynamics,

    .. math:: \partial E / \partial z_l = \epsilon_l + g_{l+1} W_{l+1}^\top, \quad
        g_{l+1} = -\epsilon_{l+1} \odot f'(a_{l+1}) \ (l+1 < L), \quad
        g_L = \gamma N\, \partial\mathcal{L}/\partial h_L \odot f'(a_L),

    with ``\epsilon_l = z_l - h_l`` and ``a`` the feedforward pre-activations. These dynamics are
    not a gradient flow (layer ``l`` feels layer ``l+1``'s error, not the reverse), so the
    coupling enters as ``c - stop_gradient(c)`` with ``c = \sum_l \langle z_l,
    stop\_gradient(g_{l+1}) W_{l+1}^\top \rangle``: zero in value, the dynamics in gradient.
    """
    n = outs[0].shape[0]
    sg = jax.lax.stop_gradient
    errs = [z - h for z, h in zip(latents, outs[:-1], strict=True)]
    out_grad = jax.grad(lambda o: loss(o, target))(outs[-1])
    value = gamma * n * loss(outs[-1], target)
    coupling = jnp.zeros((), value.dtype)
    for j, e in enumerate(errs):
        value = value + 0.5 * jnp.sum(e**2)
        above = j + 1
        if above == len(params) - 1:
            g = gamma * n * out_grad
        else:
            g = -errs[above]
        g = sg(g * derivative(acts[above], preacts[above]))
        coupling = coupling + jnp.sum(latents[j] * (g @ params[above]["w"].T))
    return value + coupling - sg(coupling)


def _check_options(steps: int | None, step_size: float | None, tol: float | None, gamma: float,
                   inference_optimizer: Any) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"predictive_coding: steps must be a positive integer (the inference "
                         f"steps T), got {steps!r}")
    if step_size is not None and not (isinstance(step_size, (int, float))
                                      and not isinstance(step_size, bool) and step_size > 0):
        raise ValueError(f"predictive_coding: step_size must be a positive number, got "
                         f"{step_size!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"predictive_coding: tol must be positive or None, got {tol!r}")
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"predictive_coding: gamma (the output clamp's weight) must be "
                         f"positive, got {gamma!r}")
    if inference_optimizer is not None and not hasattr(inference_optimizer, "update"):
        raise TypeError(f"predictive_coding: inference_optimizer must be an optax "
                        f"GradientTransformation or None, got {type(inference_optimizer)}")


def predictive_coding(steps: int | None = None, step_size: float | None = None,
                      tol: float | None = None, *, fixed_prediction: bool = False,
                      gamma: float = 1.0,
                      inference_optimizer: optax.GradientTransformation | None = None,
                      ) -> LearningRule:
    r"""Predictive coding (PC) on a dense `fbalign.models.mlp` (Whittington & Bogacz 2017).

    Activities ``z_0 = x`` (clamped), ``z_1..z_{L-1}`` (free); predictions ``\mu_l =
    f_l(z_{l-1} W_l + b_l)``; the energy (`pc_energy`, summed over the batch of ``N``)

    .. math:: E(z, \theta) = \sum_{l=1}^{L-1} \tfrac12 \|z_l - \mu_l\|^2
                             + \gamma N \mathcal{L}(\mu_L, y)

    clamps the output through the loss: for squared error it is ``\tfrac12\|y - \mu_L\|^2``
    per example, the classic PC network with the output fixed to the target; for cross-entropy
    the output unit's "error" is the loss gradient. **Inference** (`fbalign._src.relax.relax`)
    descends ``E`` over ``z_1..z_{L-1}`` from the feedforward values ``z_l = h_l``: ``T =
    steps`` steps of size ``step_size`` per example (the energy is a sum over examples, so the
    step size does not depend on the batch size), or until ``max |dE/dz| < tol``. **Learning**:
    the updates are ``(1 / \gamma N)\, \partial E / \partial \theta`` at the relaxed ``z``
    (``jax.grad`` with ``z`` held fixed): ``-z_{l-1}^\top (\epsilon_l \odot f'(a_l)) /
    (\gamma N)``, local and Hebbian, with the gradient's sign and the batch-mean loss's scale.

    **Limit.** At equilibrium ``\epsilon_l = -\gamma\, \partial \mathcal{L}_n / \partial h_l +
    O(\gamma^2)`` (errors of a weak output clamp propagate as backprop's adjoints), so the
    updates equal backprop's gradient up to ``O(\gamma)``: the gap shrinks linearly as the
    clamp ``\gamma \to 0`` (Whittington & Bogacz's small-error limit; tested). With ``\gamma =
    1`` PC differs from backprop by an amount that grows with the output error.

    **Fixed prediction** (``fixed_prediction=True``; Millidge et al. 2022's fixed-prediction
    assumption, Song et al. 2020's zero-divergence inference learning Z-IL): predictions are
    frozen at their feedforward values during inference (`fixed_prediction_energy`) and the
    weight updates use the feedforward presynaptic activities. Errors then obey ``\epsilon_l
    \leftarrow (1-\eta)\epsilon_l - \eta\, g_{l+1} W_{l+1}^\top``: with ``\eta = 1`` (the
    default here) the backward wave reaches layer ``L-1-k`` after ``k+1`` steps and never
    changes after, so ``T = L-1`` steps (the default) give exactly backprop's gradient (Z-IL);
    any ``0 < \eta \le 1`` converges to it geometrically.

    Args:
      steps: inference steps ``T`` (the most, with ``tol``). Default: 100, or ``L - 1`` with
        ``fixed_prediction``.
      step_size: ``\eta``. Default 0.1 (the energy then decreases monotonically on
        LeCun-initialised tanh networks), or 1.0 with ``fixed_prediction``.
      tol: stop inference once ``max |dE/dz| < tol`` (a ``while_loop``; not reverse-mode
        differentiable). None: exactly ``steps`` steps.
      fixed_prediction: the exact fixed-prediction/Z-IL variant above.
      gamma: ``\gamma``, the output clamp's weight (1: the classic clamped output).
      inference_optimizer: an optax transformation for inference in place of plain descent.

    Returns:
      A `LearningRule` (`EmptyState`). Metrics: ``pc_energy`` (the energy after inference,
      per example: ``E / N``), ``pc_energy_start`` (before inference) and ``pc_steps``.
    """
    _check_options(steps, step_size, tol, gamma, inference_optimizer)
    eta = step_size if step_size is not None else (1.0 if fixed_prediction else 0.1)
    name = "predictive_coding"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key, params
        require_mlp(network, name, _WHY)
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        del key
        require_mlp(context.network, name, _WHY)
        acts = context.network.activations()
        x, y, loss = batch.x, batch.y, context.loss
        preacts, outs = feedforward(params, acts, x)
        if fixed_prediction:
            energy = lambda z: fixed_prediction_energy(params, acts, preacts, outs, z, y, loss,
                                                       gamma)
        else:
            energy = lambda z: pc_energy(params, acts, [x, *z], z, y, loss, gamma)
        t = steps if steps is not None else (len(params) - 1 if fixed_prediction else 100)
        start = list(outs[:-1])
        res = relax(energy, start, steps=t, step_size=eta, optimizer=inference_optimizer,
                    tol=tol)
        z = list(res.state)
        pre = [x, *(outs[:-1] if fixed_prediction else z)]
        n = x.shape[0]
        grads = jax.grad(lambda p: pc_energy(p, acts, pre, z, y, loss, gamma))(params)
        updates = jax.tree.map(lambda g: g / (gamma * n), grads)
        metrics = {"pc_energy": res.energy / n, "pc_energy_start": energy(start) / n,
                   "pc_steps": res.steps.astype(res.energy.dtype)}
        return updates, state, StepOutput(loss(outs[-1], y), outs[-1], metrics)

    return LearningRule(init_fn, step_fn, (), name)
