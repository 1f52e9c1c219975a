"""Direct random target projection (DRTP): hidden layers learn from a random projection of the
target, the label-driven relative of direct feedback alignment."""

from __future__ import annotations

from typing import Any, NamedTuple

from jaxtyping import Float

from fbalign._src.backward import TargetProjection
from fbalign._src.base import (
    Array,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
)
from fbalign._src.channel import as_targets
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import (
    DFA_ORIENTATION,
    dfa_feedback_shapes,
    direct_feedback,
    project,
)


class DirectRandomTargetProjectionState(NamedTuple):
    """``feedback[l]`` has shape ``(n_out, n_l)`` for hidden layers; the output layer's is None
    (the orientation of direct feedback alignment)."""

    feedback: tuple[Float[Array, " n_out *map"] | None, ...]


def direct_random_target_projection(
    init: str | Initializer = "gaussian", scale: float | None = None
) -> TapeRule:
    r"""DRTP: every hidden layer receives a fixed random projection of the one-hot target.

    .. math::
        \delta_l = \big(\tfrac{1}{n}\, t\, B_l\big) \odot f'(a_l), \qquad
        \delta_{L-1} = e \odot f'(a_{L-1}), \qquad \Delta W_l = x_l^\top \delta_l

    with ``t`` the ``(n, n_out)`` one-hot targets, ``B_l`` of shape ``(n_out, n_l)`` as in DFA,
    and ``e = dL/dy`` for the output layer only. The target replaces DFA's error ``e`` as the
    modulatory signal, so hidden layers can update during the forward pass (no update locking);
    the ``1/n`` matches the batch-mean scaling of ``e``.

    Args:
      init: ``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"`` or a callable.
      scale: the initialiser's std/limit/gain; None picks ``1/sqrt(n_out)``-style scaling.

    Returns:
      A `TapeRule` with `DirectRandomTargetProjectionState`; ``update`` needs ``labels=``
      (class indices or targets of the output's shape). ``jax.grad`` form:
      ``MLP.apply(..., mode="drtp", labels=labels)``.

    References:
      Frenkel, Lefebvre & Bol (2021), "Learning without feedback: Fixed random learning signals
      allow for feedforward training of deep neural networks", Frontiers in Neuroscience 15.
    """

    def init_fn(key: PRNGKey, params: Params,
                feature_shapes: Any = None) -> DirectRandomTargetProjectionState:
        return DirectRandomTargetProjectionState(
            direct_feedback(key, params, init, scale, feature_shapes))

    def update_fn(
        params: Params,
        state: DirectRandomTargetProjectionState,
        tape: Tape,
        error: Array,
        *,
        labels: Array | None = None,
        **extra: Any,
    ):
        del extra
        check_feedback_shapes(
            state.feedback,
            dfa_feedback_shapes(params, tape, state.feedback),
            "direct_random_target_projection",
            DFA_ORIENTATION,
            dtype=dense_layers(params)[0][0].dtype,
        )
        if labels is None:
            raise ValueError(
                "direct_random_target_projection projects the target: pass labels=... to update"
            )
        fb = state.feedback
        t = as_targets(labels, error.shape[-1], error.dtype) / error.shape[0]
        updates = chain_updates(params, tape, error,
                                lambda i, d: project(tape, i - 1, t, fb[i - 1]))
        return updates, state

    def backward(feedback: Any, labels: Any) -> TargetProjection:
        if labels is None:
            raise ValueError("drtp's jax.grad form reads the targets: pass labels")
        b = next(f for f in feedback if f is not None)  # (n_out, ...)
        targets = as_targets(labels, b.shape[0], b.dtype) / labels.shape[0]
        return TargetProjection(feedback=feedback, targets=targets)

    return TapeRule(init_fn, update_fn, backward=backward)
