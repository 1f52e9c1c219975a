r"""Online alternating minimisation with auxiliary variables (codes): per mini-batch, the hidden
pre-activations become free variables pulled between the layer below and the layer above, then
every layer fits its weights locally to map the codes below to the codes above.

Choromanska, Cowen, Kumaravel, Luss, Rigotti, Rish, Diachille, Gurev, Kingsbury, Tejwani &
Bouneffouf (2019), "Beyond backprop: online alternating minimization with auxiliary variables",
ICML (PMLR 97:1193-1202).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
from fbalign._src.relax import relax

Activation = Callable[[Array], Array]
Loss = Callable[[Array, Array], Array]

_WHY = "its codes are the pre-activations x @ W + b of dense hidden layers"


class AltMinState(NamedTuple):
    """State of `alternating_minimization`.

    Attributes:
      step: the number of steps taken (int32 scalar; drives the ``mu`` schedule).
      memory_a: with ``memory``, per hidden layer ``l``, the running input covariance ``A_l``
        of shape ``(din_l [+1], din_l [+1])`` (``+1``: the bias column); else empty.
      memory_b: with ``memory``, the running cross-covariance ``B_l`` of the (bias-augmented)
        layer input and the codes, ``(din_l [+1], dout_l)``; else empty.
    """

    step: Array
    memory_a: tuple[Array, ...] = ()
    memory_b: tuple[Array, ...] = ()


def _linear(layer: dict[str, Array], x: Array) -> Array:
    a = x @ layer["w"]
    return a + layer["b"] if "b" in layer else a


def forward_codes(params: Params, acts: Sequence[Activation],
                  x: Array) -> tuple[list[Array], Array]:
    """The forward pass: ``([c_1, ..., c_{L-1}], y_hat)``, with codes ``c_l = f(c_{l-1}) W_l +
    b_l`` the hidden layers' pre-activations (``f(c_0) := x``) and ``y_hat = f_L(f(c_{L-1}) W_L
    + b_L)`` the network output."""
    codes, h = [], x
    for layer, f in zip(params[:-1], acts[:-1], strict=True):
        codes.append(_linear(layer, h))
        h = f(codes[-1])
    return codes, acts[-1](_linear(params[-1], h))


def layer_inputs(x: Array, codes: Sequence[Array], acts: Sequence[Activation]) -> list[Array]:
    """``[x, f_1(c_1), ..., f_{L-1}(c_{L-1})]``: what each weight layer sees given the codes."""
    return [x, *(f(c) for f, c in zip(acts[:-1], codes, strict=True))]


def update_codes(params: Params, acts: Sequence[Activation], x: Array, y: Array, loss: Loss,
                 mu: Array | float, *, steps: int, step_size: float,
                 momentum: float = 0.0) -> list[Array]:
    r"""The code step of online alternating minimisation (Choromanska et al. 2019, Alg. 1).

    Starting from the forward codes ``c^0_l`` (`forward_codes`), sweep from the top hidden
    layer down; each code solves its own subproblem (the paper's objective restricted to
    ``c_l``, divided by ``\mu``; per example, summed over the batch of ``N``):

    .. math::
        c_{L-1} &\leftarrow \arg\min_c\ \tfrac{1}{\mu} \textstyle\sum_n
            \ell\big(f_L(f(c) W_L + b_L), y\big) + \|c - c^0_{L-1}\|^2, \\
        c_l &\leftarrow \arg\min_c\ \|c_{l+1} - f(c) W_{l+1} - b_{l+1}\|^2
            + \|c - c^0_l\|^2 \quad (l = L-2, \dots, 1),

    with ``c_{l+1}`` the code just updated. Each argmin is approximated by ``steps`` steps of
    gradient descent of size ``step_size`` (per example: the step does not depend on the batch
    size), with Nesterov momentum when ``momentum > 0`` (the paper's code uses SGD with
    Nesterov momentum 0.9). With a linear ``f`` the subproblems are quadratic with closed-form
    minimisers, which the descent reaches (tested).

    Args:
      params, acts: the MLP's parameters and activations (`MLP.activations`).
      x, y: the batch; ``loss(output, y)`` is the batch-mean loss.
      mu: the penalty ``\mu`` (a scalar, possibly traced).
      steps, step_size, momentum: the inner descent.

    Returns:
      ``[c_1, ..., c_{L-1}]``, the updated codes.
    """
    codes0, _ = forward_codes(params, acts, x)
    if not codes0:
        return []
    n = x.shape[0]
    opt = (optax.sgd(step_size, momentum=momentum, nesterov=True) if momentum > 0 else None)
    top = len(codes0) - 1
    codes: list[Array] = list(codes0)
    for j in range(top, -1, -1):
        c0, w_next, f = codes0[j], params[j + 1], acts[j]
        if j == top:
            def energy(c, c0=c0, w_next=w_next, f=f):
                out = acts[-1](_linear(w_next, f(c)))
                return n * loss(out, y) / mu + jnp.sum((c - c0) ** 2)
        else:
            above = jax.lax.stop_gradient(codes[j + 1])

            def energy(c, c0=c0, w_next=w_next, f=f, above=above):
                return (jnp.sum((above - _linear(w_next, f(c))) ** 2)
                        + jnp.sum((c - c0) ** 2))
        codes[j] = relax(energy, c0, steps=steps, step_size=step_size, optimizer=opt).state
    return codes


def local_losses(params: Params, acts: Sequence[Activation], x: Array, codes: Sequence[Array],
                 y: Array, loss: Loss) -> list[Array]:
    r"""The layers' local losses at fixed codes (the weight step's objectives):

    .. math:: \mathcal{L}_l(W_l, b_l) = \tfrac{1}{2N} \textstyle\sum_n
                  \|c_l - f(c_{l-1}) W_l - b_l\|^2 \ (l < L), \qquad
              \mathcal{L}_L = \ell\big(f_L(f(c_{L-1}) W_L + b_L), y\big),

    ``f(c_0) := x``. Layer ``l``'s loss depends on ``W_l, b_l`` only, so the gradient of their
    sum is every layer's own local update.
    """
    ins = layer_inputs(x, codes, acts)
    out = [0.5 * jnp.mean(jnp.sum((c - _linear(layer, u)) ** 2, axis=-1))
           for layer, u, c in zip(params[:-1], ins[:-1], codes, strict=True)]
    out.append(loss(acts[-1](_linear(params[-1], ins[-1])), y))
    return out


def _augment(u: Array, has_bias: bool) -> Array:
    return jnp.concatenate([u, jnp.ones((u.shape[0], 1), u.dtype)], axis=1) if has_bias else u


def _split(w_aug: Array, has_bias: bool) -> dict[str, Array]:
    return {"w": w_aug[:-1], "b": w_aug[-1]} if has_bias else {"w": w_aug}


def _check_options(mu: float, code_steps: int, code_lr: float, code_momentum: float,
                   memory: float | None, mu_increment: float, mu_max: float | None) -> None:
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    if not positive(mu):
        raise ValueError(f"alternating_minimization: mu (the code penalty) must be a positive "
                         f"number, got {mu!r}")
    if isinstance(code_steps, bool) or not isinstance(code_steps, int) or code_steps < 0:
        raise ValueError(f"alternating_minimization: code_steps must be an integer >= 0 (0: "
                         f"codes stay at the forward pass), got {code_steps!r}")
    if not positive(code_lr):
        raise ValueError(f"alternating_minimization: code_lr must be a positive number, got "
                         f"{code_lr!r}")
    if not (isinstance(code_momentum, (int, float)) and 0 <= code_momentum < 1):
        raise ValueError(f"alternating_minimization: code_momentum must lie in [0, 1), got "
                         f"{code_momentum!r}")
    if memory is not None and not (isinstance(memory, (int, float))
                                   and not isinstance(memory, bool) and 0 < memory <= 1):
        raise ValueError(f"alternating_minimization: memory must be None (no running "
                         f"statistics) or a forgetting rate in (0, 1], got {memory!r}")
    if not (isinstance(mu_increment, (int, float)) and mu_increment >= 0):
        raise ValueError(f"alternating_minimization: mu_increment must be >= 0, got "
                         f"{mu_increment!r}")
    if mu_max is not None and not (positive(mu_max) and mu_max >= mu):
        raise ValueError(f"alternating_minimization: mu_max must be None or a number >= mu "
                         f"({mu}), got {mu_max!r}")


def alternating_minimization(mu: float = 0.1, code_steps: int = 5, code_lr: float = 0.1, *,
                             code_momentum: float = 0.0, memory: float | None = None,
                             mu_increment: float = 0.0,
                             mu_max: float | None = None) -> LearningRule:
    r"""Online alternating minimisation (AM) on a dense `fbalign.models.mlp` (Choromanska et
    al. 2019, "Beyond backprop: online alternating minimization with auxiliary variables").

    The codes ``c_l`` (``l = 1..L-1``) are the hidden pre-activations, made free variables for
    the current mini-batch; the nonlinearity sits between a code and the next layer. The
    objective, per example, is

    .. math:: \ell\big(f_L(f(c_{L-1}) W_L + b_L), y\big)
              + \mu \textstyle\sum_{l=1}^{L-1} \|c_l - f(c_{l-1}) W_l - b_l\|^2,
              \qquad f(c_0) := x.

    Each step (1) runs the forward pass, ``c_l = f(c_{l-1}) W_l + b_l``; (2) updates the codes
    top-down, each by a few descent steps on its subproblem (`update_codes`); (3) returns the
    weight updates with the gradient's sign, for the optax optimizer: each hidden layer's
    gradient of its local least-squares loss ``\tfrac{1}{2N}\sum_n \|c_l - f(c_{l-1}) W_l -
    b_l\|^2`` at the new codes, the output layer's gradient of the loss ``\ell(f_L(f(c_{L-1})
    W_L + b_L), y)`` (`local_losses`). No error travels through more than one layer.

    **Memory** (``memory=eta``; the paper's AM-mem, after Mairal et al. 2009): hidden layer
    ``l`` keeps running statistics of its (bias-augmented) input ``u = [f(c_{l-1}), 1]`` and
    codes, ``A_l \leftarrow (1-\eta) A_l + \eta\, u^\top u / N`` and ``B_l \leftarrow (1-\eta)
    B_l + \eta\, u^\top c_l / N``, and its update is the gradient of the surrogate
    ``\tfrac12 \mathrm{tr}(\tilde W^\top A_l \tilde W) - \mathrm{tr}(\tilde W^\top B_l)``,
    ``A_l \tilde W_l - B_l`` with ``\tilde W = [W; b]``: the local least-squares loss over the
    recent mini-batches (``\eta = 1``: this batch only, the same as ``memory=None``). The
    paper minimises this surrogate by block-coordinate descent; here the optax optimizer
    descends it. The output layer always uses the loss gradient on the batch.

    **Schedule** (from the paper's code): ``\mu_t = \min(\mu + t\, \Delta\mu, \mu_{max})``.

    Args:
      mu: the penalty ``\mu`` (at step 0). Small ``\mu`` lets the top code move far toward
        lowering the loss; large ``\mu`` keeps codes at the forward pass.
      code_steps: descent steps per code subproblem (0: no code update, then the hidden
        layers' updates are zero).
      code_lr: the code descent's step size (per example).
      code_momentum: Nesterov momentum of the code descent (0: plain descent).
      memory: None, or the forgetting rate ``\eta`` in ``(0, 1]`` of the running statistics.
      mu_increment: ``\Delta\mu``, added to ``\mu`` after every step.
      mu_max: the cap of ``\mu_t`` (None: no cap).

    Returns:
      A `LearningRule` with an `AltMinState`. Metrics: ``altmin_mu`` (``\mu_t``),
      ``altmin_code_loss`` (the loss at the updated codes) and ``altmin_penalty`` (per example,
      ``\sum_l \|c_l - f(c_{l-1}) W_l - b_l\|^2`` at the updated codes).

    Example:
      >>> rule = fbalign.rules.alternating_minimization(mu=0.1, code_steps=5)
      >>> fbalign.train.fit(fbalign.mlp((64, 32, 10)), rule, optax.adam(1e-2), data)
    """
    _check_options(mu, code_steps, code_lr, code_momentum, memory, mu_increment, mu_max)
    name = "alternating_minimization"

    def mu_at(step: Array, dtype: Any) -> Array:
        m = mu + step.astype(dtype) * mu_increment
        return m if mu_max is None else jnp.minimum(m, mu_max)

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> AltMinState:
        del key
        require_mlp(network, name, _WHY)
        step = jnp.zeros((), jnp.int32)
        if memory is None:
            return AltMinState(step)
        mem_a, mem_b = [], []
        for layer in params[:-1]:
            din, dout = layer["w"].shape
            d = din + ("b" in layer)
            mem_a.append(jnp.zeros((d, d), layer["w"].dtype))
            mem_b.append(jnp.zeros((d, dout), layer["w"].dtype))
        return AltMinState(step, tuple(mem_a), tuple(mem_b))

    def step_fn(params: Params, state: AltMinState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, AltMinState, StepOutput]:
        del key
        require_mlp(context.network, name, _WHY)
        acts = context.network.activations()
        x, y, loss = batch.x, batch.y, context.loss
        dtype = params[0]["w"].dtype
        mu_t = mu_at(state.step, dtype)
        _, out = forward_codes(params, acts, x)
        codes = update_codes(params, acts, x, y, loss, mu_t, steps=code_steps,
                             step_size=code_lr, momentum=code_momentum)
        codes = [jax.lax.stop_gradient(c) for c in codes]
        updates = jax.grad(lambda p: sum(local_losses(p, acts, x, codes, y, loss)))(params)
        new_a, new_b = state.memory_a, state.memory_b
        ins = layer_inputs(x, codes, acts)
        if memory is not None:
            n = x.shape[0]
            new_a, new_b, hidden = [], [], []
            for layer, u, c, a_old, b_old in zip(params[:-1], ins[:-1], codes, state.memory_a,
                                                 state.memory_b, strict=True):
                has_bias = "b" in layer
                ua = _augment(u, has_bias)
                a_new = (1 - memory) * a_old + memory * (ua.T @ ua) / n
                b_new = (1 - memory) * b_old + memory * (ua.T @ c) / n
                w_aug = (jnp.concatenate([layer["w"], layer["b"][None]], axis=0) if has_bias
                         else layer["w"])
                hidden.append(_split(a_new @ w_aug - b_new, has_bias))
                new_a.append(a_new)
                new_b.append(b_new)
            updates = [*hidden, updates[-1]]
            new_a, new_b = tuple(new_a), tuple(new_b)
        code_out = acts[-1](_linear(params[-1], ins[-1]))
        penalty = sum((jnp.sum((c - _linear(layer, u)) ** 2) / x.shape[0]
                       for layer, u, c in zip(params[:-1], ins[:-1], codes, strict=True)),
                      jnp.zeros((), dtype))
        metrics = {"altmin_mu": mu_t, "altmin_code_loss": loss(code_out, y),
                   "altmin_penalty": penalty}
        new_state = AltMinState(state.step + 1, new_a, new_b)
        return updates, new_state, StepOutput(loss(out, y), out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
