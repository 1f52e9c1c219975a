"""Backpropagation written as an explicit rule: the reference every other rule is tested against."""

from __future__ import annotations

from typing import Any

from fbalign._src.backward import Backward
from fbalign._src.base import (
    Array,
    EmptyState,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    dense_layers,
)


def backprop() -> TapeRule:
    """Exact backpropagation (Rumelhart, Hinton & Williams 1986) on a dense chain.

    ``delta_{l-1} = (delta_l @ W_l.T) * f'(a_{l-1})``, ``dW_l = x_l.T @ delta_l``. Equals
    ``jax.grad`` of the loss; it exists so that every rule shares one code path and one test bed.

    Returns:
      A `TapeRule` with an empty state.
    """

    def init_fn(key: PRNGKey, params: Params) -> EmptyState:
        del key, params
        return EmptyState()

    def update_fn(params: Params, state: EmptyState, tape: Tape, error: Array, **extra: Any):
        del extra
        layers = dense_layers(params)
        updates = chain_updates(params, tape, error,
                                lambda i, d: tape.send_back(i, d, layers[i][0]))
        return updates, state

    return TapeRule(init_fn, update_fn, backward=lambda feedback, labels: Backward())
