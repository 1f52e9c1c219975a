r"""PEPITA: two forward passes, the second on an input modulated by the output error; every layer
learns from the difference between its two activities. No backward pass, no weight transport.

Dellaferrera & Kreiman (2022), "Error-driven input modulation: solving the credit assignment
problem without a backward pass", ICML.
"""

from __future__ import annotations

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
)
from fbalign._src.models import require_mlp

_WHY = "its updates pair each dense layer's activities in two forward passes"


class PepitaState(NamedTuple):
    """``feedback``: the fixed projection ``F`` of shape ``(input_dim, output_dim)`` that maps the
    output error to the input space (``x + e F^T``); it never changes."""

    feedback: Array


def pepita_forward(params: Params, acts: list, x: Array) -> list[Array]:
    """``[h_0 = x, h_1, ..., h_L]``: the activities of a dense chain ``h_l = f_l(h_{l-1} W_l +
    b_l)`` (``h_L`` is the output)."""
    hs = [x]
    for layer, f in zip(params, acts, strict=True):
        a = hs[-1] @ layer["w"]
        if "b" in layer:
            a = a + layer["b"]
        hs.append(f(a))
    return hs


def _output_error(params: Params, acts: list, hs: list[Array], y: Array, loss) -> Array:
    """``e = N dL/da_L``: the per-example error at the output pre-activation (``softmax(a) -
    onehot(y)`` for softmax cross-entropy, ``y - t`` for squared error on a linear output)."""
    last = params[-1]
    a = hs[-2] @ last["w"] + (last["b"] if "b" in last else 0)
    return hs[0].shape[0] * jax.grad(lambda a_: loss(acts[-1](a_), y))(a)


def pepita(feedback_scale: float = 0.05) -> LearningRule:
    r"""PEPITA (Dellaferrera & Kreiman 2022, Algorithm 1) on a dense `fbalign.models.mlp`.

    Per batch (``N`` examples, layers ``l = 1..L``):

    1. standard pass: ``h_0 = x``, ``h_l = f_l(h_{l-1} W_l + b_l)``;
    2. error ``e = N \partial\mathcal{L}/\partial a_L`` (per example; the paper's ``e = y -
       target`` with a softmax output: ``softmax(a_L) - onehot`` for cross-entropy on logits);
    3. modulated pass from ``h_0^{mod} = x + e F^T`` (the paper's ``x + F e``, as in the
       authors' code: ``mod_inputs = inputs + error @ B.T``), giving ``h_l^{mod}`` and
       ``e^{mod}``;
    4. updates, in the gradient's sign (``optax.sgd(eta)`` applies the paper's
       ``W \leftarrow W - \eta \Delta W``), batch means:

    .. math:: \Delta W_l = \tfrac1N (h_{l-1}^{mod})^\top (h_l - h_l^{mod}) \quad (l < L),
              \qquad \Delta W_L = \tfrac1N (h_{L-1}^{mod})^\top e^{mod},

    and for biases (the paper's nets have none; the same rule with a constant input 1)
    ``\Delta b_l = \mathrm{mean}(h_l - h_l^{mod})``, ``\Delta b_L = \mathrm{mean}(e^{mod})``.

    ``F`` is drawn once, ``F \sim U[-1, 1] \cdot`` ``feedback_scale`` ``\cdot \sqrt{6 /
    d_{in}}`` (the paper's ``0.05 \cdot \sqrt{6/d_{in}}``, He-uniform times 0.05), and stays
    fixed. Dropout (the paper's keep rate 0.9, one mask shared by both passes) is left to the
    user: the harness has none.

    Args:
      feedback_scale: the factor on ``F``'s He-uniform bound (paper: 0.05).

    Returns:
      A `LearningRule` with a `PepitaState`. Metric: ``pepita_input_change``, the mean
      ``||e F^T|| / ||x||`` per example.

    Example:
      >>> rule = fbalign.rules.pepita()
      >>> fbalign.train.fit(fbalign.mlp((784, 1024, 10), activation="relu"), rule,
      ...                   optax.sgd(0.01, momentum=0.9), data, batch_size=64)
    """
    if (isinstance(feedback_scale, bool) or not isinstance(feedback_scale, (int, float))
            or not feedback_scale > 0):
        raise ValueError(f"pepita: feedback_scale must be a positive number (the paper uses "
                         f"0.05), got {feedback_scale!r}")
    name = "pepita"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> PepitaState:
        require_mlp(network, name, _WHY)
        d_in, d_out = network.sizes[0], network.sizes[-1]
        dtype = params[0]["w"].dtype
        bound = feedback_scale * (6.0 / d_in) ** 0.5
        f = jax.random.uniform(key, (d_in, d_out), dtype, -bound, bound)
        return PepitaState(f)

    def step_fn(params: Params, state: PepitaState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, PepitaState, StepOutput]:
        del key
        require_mlp(context.network, name, _WHY)
        acts = context.network.activations()
        x, y, loss = batch.x, batch.y, context.loss
        hs = pepita_forward(params, acts, x)
        e = _output_error(params, acts, hs, y, loss)
        shift = e @ state.feedback.T
        hs_mod = pepita_forward(params, acts, x + shift)
        e_mod = _output_error(params, acts, hs_mod, y, loss)
        n = x.shape[0]
        updates = []
        for i, layer in enumerate(params):
            delta = e_mod if i == len(params) - 1 else hs[i + 1] - hs_mod[i + 1]
            u = {"w": hs_mod[i].T @ delta / n}
            if "b" in layer:
                u["b"] = jnp.mean(delta, axis=0)
            updates.append(u)
        change = jnp.mean(jnp.linalg.norm(shift, axis=1)
                          / jnp.maximum(jnp.linalg.norm(x, axis=1), jnp.finfo(x.dtype).tiny))
        return updates, state, StepOutput(loss(hs[-1], y), hs[-1],
                                          {"pepita_input_change": change})

    return LearningRule(init_fn, step_fn, (), name)
