"""Shallow learning: only the output layer learns, the baseline of Lillicrap et al. 2016."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.backward import Shallow
from fbalign._src.base import (
    Array,
    EmptyState,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    dense_layers,
)


def shallow() -> TapeRule:
    r"""Shallow learning: the output layer takes its backprop update, every other layer none.

    .. math::
        \Delta W_{L-1} = x_{L-1}^\top (e \odot f'(a_{L-1})), \qquad \Delta W_l = 0 \ (l < L-1)

    The hidden layers keep their random initial weights, so the network learns a linear (or
    generalised linear) readout of fixed random features: the baseline that tells whether
    a rule's hidden-layer updates do anything (Lillicrap et al. 2016, Fig. 2: "shallow"
    learning, 7.2% MNIST test error against FA's 2.1%). The ``jax.grad`` form stops the error
    at the output layer's input (`fbalign._src.backward.Shallow`).

    Returns:
      A `TapeRule` with an empty state.

    References:
      Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback weights support
      error backpropagation for deep learning", Nature Communications 7:13276.
    """

    def init_fn(key: PRNGKey, params: Params) -> EmptyState:
        del key, params
        return EmptyState()

    def update_fn(params: Params, state: EmptyState, tape: Tape, error: Array, **extra: Any):
        del extra
        layers = dense_layers(params)
        if len(layers) != tape.num_layers:
            raise ValueError(f"params have {len(layers)} layers but the tape recorded "
                             f"{tape.num_layers}; was the tape made by the same model?")
        last = len(layers) - 1
        updates = [jax.tree.map(jnp.zeros_like, p) for p in params[:-1]]
        updates.append(tape.weight_grads(last, error * tape.derivs[-1], layers[last][0],
                                         layers[last][1] is not None))
        return updates, state

    return TapeRule(init_fn, update_fn, backward=lambda feedback, labels: Shallow())
