r"""Kickback: a scalar global error and a one-step "kick-back" through the outgoing weights.

Balduzzi, Vanchinathan & Buhmann (2015), "Kickback cuts backprop's red-tape: biologically
plausible credit assignment in neural networks", AAAI (arXiv:1411.6191).
"""

from __future__ import annotations

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
    dense_grads,
)
from fbalign._src.models import require_mlp

_NAME = "kickback"
_WHY = "the kick-back signal is a sum over the outgoing weights of rectifier units"


def check_kickback_network(network: Any) -> None:
    """Raises naming what is wrong unless ``network`` is a dense ReLU `fbalign.models.mlp` with
    one output (the paper's setting: rectifier units, a scalar global error)."""
    require_mlp(network, _NAME, _WHY)
    if network.activation != "relu":
        raise ValueError(f"rule 'kickback' needs rectifier hidden units (its gate is the "
                         f"rectifier's 0/1 derivative), got activation={network.activation!r}; "
                         f"build the network with fbalign.models.mlp(sizes, activation='relu')")
    if network.sizes[-1] != 1:
        raise ValueError(f"rule 'kickback' needs a network with a single output (its global "
                         f"error is a scalar per example), got sizes={network.sizes} with "
                         f"{network.sizes[-1]} outputs; use sizes ending in 1 (regression on "
                         f"one target), or a rule with vector errors (bp, fa, dfa)")


def kickback_signals(params: Params, tape: Any, global_error: Array) -> list[Array]:
    r"""The error each layer's pre-activation receives under Kickback, ``[\delta_1, ...,
    \delta_L]`` (each ``(batch, width)``), from the output's ``\delta_L = e`` (``(batch, 1)``):

    .. math:: \delta_l = e \cdot \tau_l \odot \mathbb 1_l, \qquad
              \tau_{l,j} = \sum_k W_{l+1}[j, k]\, \mathbb 1_{l+1, k}

    (``\mathbb 1_{L} = 1`` for the output unit, whose error is already in ``e``).
    """
    num = len(params)
    deltas: list[Array] = [global_error]
    for t in range(num - 2, -1, -1):
        gate_above = jnp.ones_like(global_error) if t + 1 == num - 1 else tape.derivs[t + 1]
        tau = gate_above @ params[t + 1]["w"].T
        deltas.insert(0, global_error * tau * tape.derivs[t])
    return deltas


def kickback() -> LearningRule:
    r"""Kickback (Balduzzi, Vanchinathan & Buhmann 2015, "Kickback cuts backprop's red-tape:
    biologically plausible credit assignment in neural networks", AAAI) on a ReLU
    `fbalign.models.mlp` with one output.

    Backprop's error at a rectifier unit ``j`` factorises as ``\delta_j = e \cdot \pi_j \cdot
    \mathbb 1_j``: the scalar global error ``e = \partial \ell / \partial a_{out}`` (``\hat y -
    y`` for squared error and a linear output) times the unit's influence on the output ``\pi_j =
    \sum_k W_{jk} \mathbb 1_k \pi_k`` (a sum over active paths). Kickback truncates the
    influence after one step: unit ``j`` receives the global error and the **kick-back** of the
    units it feeds,

    .. math:: \tau_j = \sum_{k \in j\to} W_{jk}\, \mathbb 1_k, \qquad
        \Delta W_{ij} \propto x_i \cdot e \cdot \tau_j \cdot \mathbb 1_j,

    with ``\mathbb 1_k = [a_k > 0]`` the rectifier's gate (1 for the output unit). The output
    layer learns by the delta rule (``\delta_{out} = e``). Returned updates are batch means
    with the gradient's sign: ``W_l \mathrel{-}= \eta\, x_{l}^\top (e\, \tau_l \odot
    \mathbb 1_l) / N``, biases likewise, so any optax optimizer applies them.

    **Equal to backprop** for the output layer and the last hidden layer (there ``\tau_j =
    W_{j,out} = \pi_j``): with one hidden layer Kickback *is* backprop (tested).

    **Coherence** (the paper's sufficient condition for Kickback to follow the gradient). With
    every connection between units non-decreasing the receiving unit's output (here: all
    weights above the first layer ``\ge 0``; the paper also has negative units ``-\rho(a)``,
    for which the condition flips sign), every influence ``\pi_j`` and every kick-back
    ``\tau_j`` is ``\ge 0``, so per example each Kickback update has the sign of backprop's and
    their inner product is ``\ge 0``: for small enough steps Kickback lowers the error (tested
    elementwise; a non-coherent network breaks it).

    The paper states Kickback for regression with squared error; here ``e`` is the loss's
    derivative at the output's pre-activation, so any loss of a scalar output works.

    Returns:
      A `LearningRule` (`EmptyState`). Metric ``kickback_error``: the batch mean of ``|e|``.
    """

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key, params
        check_kickback_network(network)
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        del key
        check_kickback_network(context.network)
        out, tape = context.network.forward(params, batch.x)
        loss_val, dout = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
        error = dout * tape.derivs[-1]  # (batch, 1): dL/da_out, already divided by N
        deltas = kickback_signals(params, tape, error)
        updates = [dense_grads(x, d, "b" in layer)
                   for x, d, layer in zip(tape.inputs, deltas, params, strict=True)]
        n = batch.x.shape[0]
        metrics = {"kickback_error": jnp.mean(jnp.abs(error)) * n}
        return updates, state, StepOutput(loss_val, out, metrics)

    return LearningRule(init_fn, step_fn, (), _NAME)
