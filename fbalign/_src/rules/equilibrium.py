"""Equilibrium propagation: a free and a nudged relaxation of a Hopfield energy, and a local
contrastive update of the weights.

Scellier & Bengio (2017), "Equilibrium propagation: bridging the gap between energy-based models
and backpropagation", Frontiers in Computational Neuroscience 11:24; Laborieux, Ernoult,
Scellier, Bengio, Grollier & Querlioz (2021), "Scaling equilibrium propagation to deep ConvNets
by drastically reducing its gradient estimator bias", Frontiers in Neuroscience 15 (symmetric
nudging, random sign of beta).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

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
from fbalign._src.checks import check_choice, check_count
from fbalign._src.hopfield import EnergyNetwork
from fbalign._src.relax import RelaxResult

NUDGINGS = ("one_sided", "symmetric")
COSTS = ("squared", "cross_entropy")


class PersistentParticles(NamedTuple):
    """Each training example's last free fixed point (Scellier & Bengio 2017's "persistent
    particles"), rows indexed by ``Batch.index``.

    Attributes:
      states: one ``(num_examples, *state_shape)`` array per free state layer.
      seen: ``(num_examples,)`` bool: whether the example's fixed point is stored (an unseen
        example's free phase starts from zero).
    """

    states: tuple[Array, ...]
    seen: Array


def _particles(net: EnergyNetwork, params: Params, num_examples: int) -> PersistentParticles:
    dtype = params[0]["w"].dtype
    zeros = net.zero_states(jnp.zeros((num_examples, 1), dtype), dtype)
    return PersistentParticles(tuple(zeros), jnp.zeros((num_examples,), bool))


def _particle_start(state: PersistentParticles, index: Array) -> list[Array]:
    """The stored fixed points of the batch's examples (zeros for unseen ones)."""
    seen = state.seen[index]
    return [jnp.where(seen.reshape(-1, *([1] * (s.ndim - 1))), s[index], 0.0).astype(s.dtype)
            for s in state.states]


def _particle_store(state: PersistentParticles, index: Array,
                    s_star: list[Array]) -> PersistentParticles:
    return PersistentParticles(
        tuple(all_.at[index].set(s.astype(all_.dtype)) for all_, s in zip(state.states, s_star,
                                                                          strict=True)),
        state.seen.at[index].set(True))


def _check_persistent(batch: Batch, context: StepContext) -> Array:
    if batch.index is None:
        raise ValueError("equilibrium_propagation(persistent=True) keeps each example's fixed "
                         "point and needs batch.index (the examples' positions in the training "
                         "set): fbalign.train.fit passes it; with make_train_step call "
                         "step(state, x, y, index), or pass Batch(x, y, index) to rule.step")
    if context.axis_name is not None:
        raise NotImplementedError(
            f"equilibrium_propagation(persistent=True) under data parallelism (axis_name="
            f"{context.axis_name!r}) is not supported: its per-example states live on one "
            "device; train without devices=/axis_name, or with persistent=False")
    return batch.index


def ep_targets(y: Array, output: Array) -> Array:
    """Integer labels ``(batch,)`` as one-hot rows of the output's width; arrays unchanged."""
    if y.ndim == output.ndim - 1 and jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, output.shape[-1], dtype=output.dtype)
    return y.astype(output.dtype)


def ep_cost(cost: str, output: Array, target: Array) -> Array:
    """The nudging cost ``C(s_L, y)`` summed over the batch: ``"squared"``: ``1/2 ||s_L -
    y||^2``; ``"cross_entropy"``: the softmax cross-entropy of ``s_L`` read as logits."""
    t = ep_targets(target, output)
    if cost == "squared":
        return 0.5 * jnp.sum((output - t) ** 2)
    return -jnp.sum(t * jax.nn.log_softmax(output, axis=-1))


def require_hopfield(network: Any, rule: str = "equilibrium_propagation") -> EnergyNetwork:
    """Returns ``network`` if it is an energy-based network (`EnergyNetwork`: a
    `HopfieldNetwork` or a ``ConvHopfieldNetwork``), else raises a `TypeError` naming ``rule``
    and the networks it needs."""
    if not isinstance(network, EnergyNetwork):
        raise TypeError(f"rule {rule!r} needs an energy-based Hopfield network "
                        f"(fbalign.models.hopfield(sizes, ...) or "
                        f"fbalign.models.conv_hopfield(input_shape, ...)), got "
                        f"{type(network).__name__}")
    return network


def require_readout_cost(network: EnergyNetwork, cost: str,
                         rule: str = "equilibrium_propagation") -> None:
    """Raises a `ValueError` for a readout network (``readout=True``) nudged with a cost other
    than ``"cross_entropy"``: Laborieux et al.'s readout exists for the cross-entropy loss (their
    code has no squared-error variant of it)."""
    if network.readout and cost != "cross_entropy":
        raise ValueError(f"{rule}: a network with readout=True (Laborieux et al.'s softmax "
                         f"readout) is nudged by the cross-entropy of its logits, got "
                         f"cost={cost!r}; use cost='cross_entropy', or a network built with "
                         f"readout=False for cost={cost!r}")


def energy_param_grads(net: EnergyNetwork, params: Params, x: Array,
                       states: list[Array]) -> Params:
    """``dE/dtheta`` at fixed ``states``, averaged over the batch: the local terms ``-rho(s_{l-1})^T
    rho(s_l) / B`` for ``W_l`` and ``-mean rho(s_l)`` for ``b_l``."""
    states = jax.lax.stop_gradient(states)
    g = jax.grad(lambda p: net.energy(p, x, states))(params)
    return jax.tree.map(lambda a: a / x.shape[0], g)


def total_param_grads(net: EnergyNetwork, params: Params, x: Array, y: Array,
                      states: list[Array], strength: Array, cost: str) -> Params:
    """``dF/dtheta`` of the total energy ``F = E + strength * C(output, y)`` at fixed
    ``states``, averaged over the batch. Without a readout ``C`` does not depend on the params
    (`energy_param_grads`); with one, the readout's entry is ``strength * dC/dtheta_out``."""
    g = energy_param_grads(net, params, x, states)
    if not net.readout:
        return g
    states = jax.lax.stop_gradient(states)
    gc = jax.grad(lambda p: ep_cost(cost, net.output(p, states), y))(params)
    return jax.tree.map(lambda a, c: a + strength * c / x.shape[0], g, gc)


def _validate_persistent(persistent: bool, num_examples: int | None) -> None:
    if not isinstance(persistent, bool):
        raise TypeError(f"equilibrium_propagation: persistent must be True or False, got "
                        f"{persistent!r}")
    check_count("equilibrium_propagation", "num_examples", num_examples,
                "the training set's size")


def _validate(beta: float, nudged_steps: int, nudging: str, cost: str) -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta == 0 \
            or beta != beta:
        raise ValueError(f"equilibrium_propagation: beta must be a non-zero number (the update "
                         f"divides by it), got {beta!r}")
    if isinstance(nudged_steps, bool) or not isinstance(nudged_steps, int) or nudged_steps < 1:
        raise ValueError(f"equilibrium_propagation: nudged_steps must be a positive int, got "
                         f"{nudged_steps!r}")
    check_choice("equilibrium_propagation", "nudging", nudging, NUDGINGS)
    check_choice("equilibrium_propagation", "cost", cost, COSTS)


def equilibrium_propagation(
    beta: float = 0.5,
    nudged_steps: int = 20,
    free_steps: int | None = None,
    step_size: float | None = None,
    nudging: Literal["one_sided", "symmetric"] = "one_sided",
    random_sign: bool = False,
    cost: Literal["squared", "cross_entropy"] = "squared",
    tol: float | None = None,
    persistent: bool = False,
    num_examples: int | None = None,
) -> LearningRule:
    r"""Equilibrium propagation (Scellier & Bengio 2017) on a `HopfieldNetwork` or a
    convolutional ``ConvHopfieldNetwork`` (Laborieux et al. 2021).

    1. Free phase: relax the energy ``E`` from ``s = 0`` (`relax`, ``free_steps`` steps of
       ``step_size``) to the fixed point ``s*``; its output ``s*_L`` (with a readout: the
       readout's logits at ``s*``) is the prediction.
    2. Nudged phase: from ``s*``, relax the total energy ``F = E + beta C(s_L, y)`` to
       ``s^beta`` (``nudged_steps`` steps), ``C = 1/2 ||s_L - y||^2`` (``cost="squared"``).
    3. Update, with the gradient's sign (optax descends it), averaged over the batch:

       .. math:: \Delta\theta = \frac{1}{\beta}\Big(\frac{\partial E}{\partial\theta}(s^\beta)
                 - \frac{\partial E}{\partial\theta}(s^*)\Big)
                 \xrightarrow{\beta\to0} \frac{d}{d\theta} C(s^*(\theta), y),

       i.e. ``dW_l = -(rho(s^b_{l-1})^T rho(s^b_l) - rho(s*_{l-1})^T rho(s*_l)) / (beta B)``:
       local and contrastive. Its bias is ``O(beta)``. ``nudging="symmetric"`` (Laborieux et al.
       2021) relaxes two nudged phases at ``+beta`` and ``-beta`` and uses
       ``(dE/dtheta(s^{+beta}) - dE/dtheta(s^{-beta})) / (2 beta)``, whose bias is
       ``O(beta^2)``. ``random_sign=True`` draws beta's sign per step from the step key
       (Laborieux et al.'s remedy for one-sided nudging's systematic bias).

    ``cost="cross_entropy"`` on a network without readout reads ``s_L`` as logits and nudges
    with the softmax cross-entropy (its force on ``s_L`` is ``y - softmax(s_L)``); with the
    hard sigmoid ``s_L`` lies in ``[0, 1]``, so the logits are soft.

    Readout (``readout=True`` networks, Laborieux et al.'s cross-entropy setting, their
    ``softmax=True``): the logits ``o = rho(s_last) W_out + b_out`` lie outside the energy
    and the nudged phases relax ``F = E + beta CE(o(s), y)``, whose force reaches ``s_last``
    through ``W_out``. The update is the same contrast applied to ``F``, whose readout term
    depends on ``theta_out``: the energy layers get the contrastive update above, and the
    readout ``dC/dtheta_out`` at the nudged state(s), exactly as Laborieux et al.'s code
    (``compute_syn_grads``): one-sided ``dC/dtheta_out(s^beta)``; symmetric the mean of
    ``dC/dtheta_out`` at ``s^{+beta}`` and ``s^{-beta}``. As ``beta -> 0`` this is the loss's
    gradient at the free equilibrium, ``dC/dtheta_out(s*)``, which is the exact gradient there
    (``s*`` does not depend on ``theta_out``), with the bias orders above. The readout needs
    ``cost="cross_entropy"`` (their code pairs it with that loss only): ``"squared"`` is
    refused.

    Args:
      beta: the nudging strength (non-zero; negative nudges away from the target).
      nudged_steps: the nudged phase's steps (with ``tol``: the most steps).
      free_steps: the free phase's steps; None uses the network's ``free_steps``.
      step_size: the relaxations' step size; None uses the network's.
      nudging: ``"one_sided"`` or ``"symmetric"``.
      random_sign: flip beta's sign at random each step.
      cost: ``"squared"`` or ``"cross_entropy"`` (see above).
      tol: stop each relaxation once ``max |dF/ds| < tol`` (None: the network's ``tol`` for
        the free phase, fixed step counts for the nudged ones).
      persistent: Scellier & Bengio's (2017) persistent particles: each training example's free
        phase starts from its own last free fixed point (stored in the rule state,
        `PersistentParticles`, and read at ``Batch.index``), so a few free steps a visit suffice
        once the weights change slowly; unseen examples start from zero. Predictions on other
        data still run the network's free phase from zero (``apply``; give it enough steps).
        Not under data parallelism.
      num_examples: the training set's size (rows of the stored states); required with
        ``persistent`` (checked at ``init``; ``fbalign train`` sets it). Memory: ``num_examples
        * sum(state sizes)`` numbers.

    Returns:
      A `LearningRule` (name ``"equilibrium_propagation"``; state `EmptyState`, or
      `PersistentParticles` with ``persistent``). Its metrics:
      ``ep_energy_free`` (free energy per example), ``ep_steps_free``, ``ep_steps_nudged``
      (summed over the nudged phases) and ``ep_diverged`` (1 when a relaxation diverged).
    """
    _validate(beta, nudged_steps, nudging, cost)
    _validate_persistent(persistent, num_examples)

    def init_fn(key: PRNGKey, params: Params,
                network: Any = None) -> EmptyState | PersistentParticles:
        del key
        if network is not None:
            require_readout_cost(require_hopfield(network), cost)
        if not persistent:
            return EmptyState()
        if network is None or num_examples is None:
            raise ValueError("equilibrium_propagation(persistent=True) needs num_examples (the "
                             "training set's size: one stored state per example; fbalign train "
                             "sets it) and the network at init (rule.init(key, params, "
                             "network)), to shape the stored states")
        return _particles(require_hopfield(network), params, num_examples)

    def step_fn(params: Params, state: Any, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, Any, StepOutput]:
        net = require_hopfield(context.network)
        require_readout_cost(net, cost)
        x, y = batch.x, batch.y
        index = _check_persistent(batch, context) if persistent else None
        start = None if index is None else _particle_start(state, index)
        free = net.free_phase(params, x, init=start, steps=free_steps, step_size=step_size,
                              tol=tol)
        s_star = jax.lax.stop_gradient(free.state)
        if index is not None:
            state = _particle_store(state, index, s_star)
        dtype = s_star[-1].dtype
        b = jnp.asarray(beta, dtype)
        if random_sign:
            b = b * jax.random.rademacher(key, (), dtype)

        def nudged(strength: Array) -> RelaxResult:
            total = lambda s: (net.energy(params, x, s)
                               + strength * ep_cost(cost, net.output(params, s), y))
            return net.relax_states(total, s_star, steps=nudged_steps, step_size=step_size,
                                    tol=tol)

        g = lambda s, strength: total_param_grads(net, params, x, y, s, strength, cost)
        plus = nudged(b)
        if nudging == "symmetric":
            minus = nudged(-b)
            low, scale, phases = g(minus.state, -b), 1 / (2 * b), (plus, minus)
        else:
            low, scale, phases = g(s_star, jnp.zeros_like(b)), 1 / b, (plus,)
        updates = jax.tree.map(lambda hi, lo: scale * (hi - lo), g(plus.state, b), low)
        out = net.output(params, s_star)
        diverged = free.diverged
        for p in phases:
            diverged = diverged | p.diverged
        metrics = {"ep_energy_free": free.energy / x.shape[0],
                   "ep_steps_free": free.steps.astype(dtype),
                   "ep_steps_nudged": sum(p.steps for p in phases).astype(dtype),
                   "ep_diverged": diverged.astype(dtype)}
        return updates, state, StepOutput(context.loss(out, y), out, metrics)

    return LearningRule(init_fn, step_fn, (), "equilibrium_propagation")
