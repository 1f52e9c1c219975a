r"""ADMM training: weights, pre-activations and activations are separate variables coupled by
quadratic penalties, each solved globally in closed form, with a Bregman (Lagrange multiplier)
update on the output layer; no gradient steps.

Taylor, Burmeister, Xu, Singh, Patel & Goldstein (2016), "Training neural networks without
gradients: a scalable ADMM approach", ICML (PMLR 48:2722-2731).
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
from fbalign._src.checks import check_choice, check_count
from fbalign._src.linalg import pinv, solve_spd
from fbalign._src.losses import binary_hinge, cross_entropy, squared_error
from fbalign._src.models import require_mlp

OUTPUT_LOSSES = ("squared_error", "hinge")

_WHY = "its closed-form solves are stated for dense layers z_l = a_{l-1} W_l (+ b_l)"


class ADMMState(NamedTuple):
    """Per-example auxiliary variables of `admm`, rows indexed by the example's position in the
    training set (``Batch.index``).

    Attributes:
      z: ``(z_1, ..., z_L)``, each ``(num_examples, width_l)``: the pre-activations (``z_L``,
        the output).
      a: ``(a_1, ..., a_{L-1})``, each ``(num_examples, width_l)``: the hidden activations.
      lam: ``(num_examples, n_out)``, the Lagrange multiplier (Bregman variable) ``lambda``.
      seen: ``(num_examples,)`` bool, whether the example has been visited; an unseen example's
        ``z``, ``a`` start at the forward pass of the current weights and ``lambda`` at 0.
      step: the number of steps taken (int32 scalar; for ``warm_start``).
    """

    z: tuple[Array, ...]
    a: tuple[Array, ...]
    lam: Array
    seen: Array
    step: Array


def _regression_targets(output: Array, target: Array) -> Array:
    if jnp.issubdtype(target.dtype, jnp.integer) and target.ndim == output.ndim - 1:
        return jax.nn.one_hot(target, output.shape[-1], dtype=output.dtype)
    return target.astype(output.dtype)


def _augment(u: Array, has_bias: bool) -> Array:
    return jnp.concatenate([u, jnp.ones((u.shape[0], 1), u.dtype)], axis=1) if has_bias else u


def _linear(layer: dict[str, Array], x: Array) -> Array:
    a = x @ layer["w"]
    return a + layer["b"] if "b" in layer else a


WEIGHT_SOLVES = ("pinv", "cholesky")
CHOLESKY_RIDGE = 1e-6  # relative: the ridge is this times the mean diagonal of A^T A


def solve_weights(a_prev: Array, z: Array, has_bias: bool, method: str = "pinv",
                  ) -> dict[str, Array]:
    r"""The weight block: ``W_l \leftarrow \arg\min_W \|z_l - a_{l-1} W - b\|^2``.

    * ``"pinv"``: the pseudo-inverse, ``[W; b] = A^\dagger z_l`` with ``A = [a_{l-1}, 1]`` (the
      paper's ``W_l \leftarrow z_l a_{l-1}^\dagger`` in row layout; the minimum-norm solution when
      rank-deficient). An SVD.
    * ``"cholesky"``: the normal equations with a small ridge, ``[W; b] = (A^\top A + r I)^{-1}
      A^\top z_l``, ``r = 10^{-6} \operatorname{tr}(A^\top A) / d``, by a Cholesky solve. The
      ridge keeps the factor defined where columns of ``A`` are constant or dependent (pixels
      that never change, silent ReLU units); as ``r \to 0`` this tends to the pseudo-inverse's
      solution. Several times faster than the SVD (``benchmarks/aux_epoch_time.py``).

    Both are safe under `jax.vmap` on the CPU (`fbalign._src.linalg`)."""
    a = _augment(a_prev, has_bias)
    if method == "pinv":
        w_aug = pinv(a) @ z
    else:
        g = a.T @ a
        ridge = CHOLESKY_RIDGE * jnp.trace(g) / g.shape[0]
        w_aug = solve_spd(g + ridge * jnp.eye(g.shape[0], dtype=g.dtype), a.T @ z)
    return {"w": w_aug[:-1], "b": w_aug[-1]} if has_bias else {"w": w_aug}


def solve_activations(z_next: Array, layer_next: dict[str, Array], h: Array, beta: float,
                      gamma: float) -> Array:
    r"""The activation block: ``a_l \leftarrow \arg\min_a \beta \|z_{l+1} - a W_{l+1} -
    b_{l+1}\|^2 + \gamma \|a - h_l(z_l)\|^2``, i.e.

    .. math:: a_l = \big(\beta (z_{l+1} - b_{l+1}) W_{l+1}^\top + \gamma h_l(z_l)\big)
                    (\beta W_{l+1} W_{l+1}^\top + \gamma I)^{-1}.

    ``h`` is ``h_l(z_l)``."""
    w = layer_next["w"]
    rhs = beta * ((z_next - layer_next["b"]) if "b" in layer_next else z_next) @ w.T
    rhs = rhs + gamma * h
    m = beta * (w @ w.T) + gamma * jnp.eye(w.shape[0], dtype=w.dtype)
    return solve_spd(m, rhs.T).T  # m is symmetric positive definite


def solve_relu_preacts(a: Array, m: Array, beta: float, gamma: float) -> Array:
    r"""The hidden pre-activation block for ReLU, entrywise (the paper's two-case solve):
    ``z \leftarrow \arg\min_z \gamma (a - \max(z, 0))^2 + \beta (z - m)^2``, with ``m =
    a_{l-1} W_l + b_l``. On ``z \ge 0`` the minimiser is ``\max((\gamma a + \beta m) / (\gamma
    + \beta), 0)``; on ``z \le 0`` it is ``\min(m, 0)``; the one with the lower objective
    wins."""
    def obj(z):
        return gamma * (a - jnp.maximum(z, 0)) ** 2 + beta * (z - m) ** 2

    z_pos = jnp.maximum((gamma * a + beta * m) / (gamma + beta), 0)
    z_neg = jnp.minimum(m, 0)
    return jnp.where(obj(z_pos) <= obj(z_neg), z_pos, z_neg)


def solve_output(m: Array, lam: Array, y: Array, beta: float, output_loss: str) -> Array:
    r"""The output block: ``z_L \leftarrow \arg\min_z \ell(z, y) + \langle z, \lambda\rangle +
    \beta \|z - m\|^2``, ``m = a_{L-1} W_L + b_L``, per example.

    * ``"squared_error"``, ``\ell = \tfrac12 \|z - y\|^2`` (`fbalign` 's squared error per
      example): ``z = (y - \lambda + 2\beta m) / (1 + 2\beta)``.
    * ``"hinge"``, the paper's binary hinge (`binary_hinge`), entrywise and convex: the
      minimiser of the smooth piece on each side of the kink, else the kink (``z = 1`` for
      ``y = 1``, ``z = 0`` for ``y = 0``).

    Integer class indices become one-hot targets."""
    if output_loss == "squared_error":
        t = _regression_targets(m, y)
        return (t - lam + 2 * beta * m) / (1 + 2 * beta)
    t = _regression_targets(m, y)  # one-hot for class indices
    # y = 1: l = max(1 - z, 0): slope -1 left of z = 1, 0 right of it.
    left1, right1 = m + (1 - lam) / (2 * beta), m - lam / (2 * beta)
    z1 = jnp.where(right1 >= 1, right1, jnp.where(left1 <= 1, left1, 1.0))
    # y = 0: l = max(z, 0): slope 0 left of z = 0, +1 right of it.
    left0, right0 = m - lam / (2 * beta), m - (1 + lam) / (2 * beta)
    z0 = jnp.where(right0 >= 0, right0, jnp.where(left0 <= 0, left0, 0.0))
    return jnp.where(t > 0.5, z1, z0).astype(m.dtype)


def admm_iteration(params: Params, z: list[Array], a: list[Array], lam: Array, x: Array,
                   y: Array, *, beta: float, gamma: float, output_loss: str,
                   update_multiplier: Array | bool = True, weight_solve: str = "pinv",
                   ) -> tuple[Params, list[Array], list[Array], Array]:
    r"""One pass of the paper's Algorithm 1 on a batch (rows of ``x``, ``z``, ``a``, ``lam``):

    .. math::
        \text{for } l = 1..L-1:\ & W_l \leftarrow \text{solve\_weights}(a_{l-1}, z_l),\
            a_l \leftarrow \text{solve\_activations}(z_{l+1}, W_{l+1}, h(z_l)),\
            z_l \leftarrow \text{solve\_relu\_preacts}(a_l, a_{l-1} W_l + b_l); \\
        & W_L \leftarrow \text{solve\_weights}(a_{L-1}, z_L),\
            z_L \leftarrow \text{solve\_output}(a_{L-1} W_L + b_L, \lambda); \\
        & \lambda \leftarrow \lambda + \beta (z_L - a_{L-1} W_L - b_L),

    with ``a_0 = x``, ``h`` = ReLU and ``W_{l+1}`` in the ``a_l`` solve still the old one (it
    is solved later in the sweep). ``update_multiplier`` False skips the last line (warm
    start); ``weight_solve`` picks `solve_weights`' method. Returns the solved params and
    the new ``z``, ``a``, ``lambda``.
    """
    num = len(params)
    z, a = list(z), list(a)
    new_params = list(params)
    a_prev = x
    for i in range(num - 1):
        has_bias = "b" in params[i]
        new_params[i] = solve_weights(a_prev, z[i], has_bias, weight_solve)
        a[i] = solve_activations(z[i + 1], params[i + 1], jax.nn.relu(z[i]), beta, gamma)
        z[i] = solve_relu_preacts(a[i], _linear(new_params[i], a_prev), beta, gamma)
        a_prev = a[i]
    last = num - 1
    new_params[last] = solve_weights(a_prev, z[last], "b" in params[last], weight_solve)
    m = _linear(new_params[last], a_prev)
    z[last] = solve_output(m, lam, y, beta, output_loss)
    lam = jnp.where(update_multiplier, lam + beta * (z[last] - m), lam)
    return new_params, z, a, lam


def _check_options(beta: float, gamma: float, num_examples: int, output_loss: str,
                   warm_start: int, weight_solve: str) -> None:
    for opt, v in (("beta", beta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"admm: {opt} must be a positive number, got {v!r}")
    check_count("admm", "num_examples", num_examples,
                "the training set's size: the per-example variables have that many rows")
    check_choice("admm", "output_loss", output_loss, OUTPUT_LOSSES)
    check_choice("admm", "weight_solve", weight_solve, WEIGHT_SOLVES)
    if isinstance(warm_start, bool) or not isinstance(warm_start, int) or warm_start < 0:
        raise ValueError(f"admm: warm_start must be an integer >= 0 (steps without multiplier "
                         f"updates), got {warm_start!r}")


_LOSS_OF = {"squared_error": squared_error, "hinge": binary_hinge}


def _check_loss(loss: Any, output_loss: str) -> None:
    """The training loss must be the one the output block is solved for (a user's own loss
    function is taken as given)."""
    if loss is _LOSS_OF[output_loss]:
        return
    if loss is cross_entropy or loss in _LOSS_OF.values():
        name = "cross-entropy" if loss is cross_entropy else loss.__name__
        raise ValueError(f"admm solves the output block for output_loss={output_loss!r}, but the "
                         f"training loss is {name}: train with loss='squared_error' and "
                         "output_loss='squared_error', or loss='hinge' (fbalign.losses."
                         "binary_hinge; --loss hinge) and output_loss='hinge'")


def _require_relu_mlp(network: Any, name: str) -> None:
    require_mlp(network, name, _WHY)
    if network.num_layers > 1 and network.activation != "relu":
        raise ValueError(f"rule {name!r} solves the hidden pre-activations in closed form for "
                         f"ReLU only; the network has activation={network.activation!r}: build "
                         f"it with fbalign.mlp(sizes, activation='relu')")
    if network.output_activation != "linear":
        raise ValueError(f"rule {name!r} needs a linear output layer (the loss sees z_L); the "
                         f"network has output_activation={network.output_activation!r}: build "
                         f"it with output_activation='linear'")


def admm(beta: float = 1.0, gamma: float = 10.0, num_examples: int | None = None, *,
         output_loss: str = "squared_error", warm_start: int = 0,
         weight_solve: str = "pinv") -> LearningRule:
    r"""ADMM / Bregman training of a ReLU `fbalign.models.mlp` without gradients (Taylor et al.
    2016, "Training neural networks without gradients: a scalable ADMM approach").

    With pre-activations ``z_l``, activations ``a_l = h(z_l)`` (ReLU) and ``a_0 = x``, the
    paper relaxes the network's constraints into the objective

    .. math:: \ell(z_L, y) + \langle z_L, \lambda \rangle + \beta \|z_L - a_{L-1} W_L\|^2
              + \textstyle\sum_{l=1}^{L-1} \big(\gamma \|a_l - h(z_l)\|^2
              + \beta \|z_l - a_{l-1} W_l\|^2\big)

    (here with biases, ``a W + b``, when the network has them), summed over examples, and
    minimises it block by block, each block globally in closed form (`admm_iteration`:
    `solve_weights`, `solve_activations`, `solve_relu_preacts`, `solve_output`), followed by
    the Bregman update ``\lambda \leftarrow \lambda + \beta (z_L - a_{L-1} W_L)``.

    The per-example variables ``z``, ``a``, ``\lambda`` live in the rule state
    (`ADMMState`, ``num_examples`` rows) and are gathered at ``batch.index`` (the examples'
    positions, which `fbalign.train.fit` passes) at the start of a step and written back
    there at its end; an example's first visit starts its variables at the forward pass and
    ``\lambda = 0``. With the whole training set as the batch this is the paper's algorithm; a
    mini-batch solves the weight blocks on the batch's rows only (a well-posed solve wants at
    least ``width + 1`` examples per batch).

    **Updates.** The solved weights are returned as ``updates = params - W_solved``, so that
    ``optax.sgd(1.0)`` sets the params to the solution exactly; use that optimizer (another
    one applies a damped or distorted step). The reported loss is the batch loss of the
    current params' forward pass.

    Args:
      beta: ``\beta``, the weight of the ``z_l = a_{l-1} W_l`` penalties and of the multiplier
        step.
      gamma: ``\gamma``, the weight of the ``a_l = h(z_l)`` penalties.
      num_examples: the training set's size (rows of the per-example state). Required: None
        builds the rule but its ``init`` raises.
      output_loss: the loss ``\ell`` the output block is solved for: ``"squared_error"``
        (train with ``loss="squared_error"``) or ``"hinge"`` (the paper's binary hinge; train
        with ``loss="hinge"``, `fbalign.losses.binary_hinge`).
      warm_start: steps without multiplier updates at the start (0: Algorithm 1 as written).
        Measured here: from a random network, multiplier updates from step 0 anchor the
        output variables halfway between the initial outputs and the targets (the weight
        solve ignores lambda), and training stalls; a few warm-start steps avoid that.
      weight_solve: how the weight blocks are solved (`solve_weights`): ``"pinv"`` (the paper's
        pseudo-inverse, an SVD) or ``"cholesky"`` (ridge-regularised normal equations, faster).

    Returns:
      A `LearningRule` with an `ADMMState`. Metrics: ``admm_constraint`` (per example, ``\|z_L
      - a_{L-1} W_L - b_L\|^2`` after the step) and ``admm_output_loss`` (``\ell(z_L, y)`` at the
      new ``z_L``).

    Raises:
      ValueError: at construction for bad options; at ``init`` without ``num_examples``, or
        for a network that is not a ReLU MLP with a linear output; at the first step when
        ``batch.index`` is None, or when the training loss is cross-entropy (no closed-form
        output block).
      NotImplementedError: under data parallelism (``axis_name``).

    Example:
      >>> rule = fbalign.rules.admm(beta=1.0, gamma=10.0, num_examples=len(data.x_train))
      >>> fbalign.train.fit(fbalign.mlp((30, 64, 10), activation="relu"), rule,
      ...                   optax.sgd(1.0), data, loss="squared_error", batch_size=500)
    """
    _check_options(beta, gamma, num_examples, output_loss, warm_start, weight_solve)
    name = "admm"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> ADMMState:
        del key
        if num_examples is None:
            raise ValueError("admm: num_examples is required (the training set's size, e.g. "
                             "len(data.x_train)): the per-example variables live in the rule "
                             "state, one row per training example")
        _require_relu_mlp(network, name)
        dtype = params[0]["w"].dtype
        widths = [layer["w"].shape[1] for layer in params]
        z = tuple(jnp.zeros((num_examples, w), dtype) for w in widths)
        a = tuple(jnp.zeros((num_examples, w), dtype) for w in widths[:-1])
        return ADMMState(z, a, jnp.zeros((num_examples, widths[-1]), dtype),
                         jnp.zeros((num_examples,), bool), jnp.zeros((), jnp.int32))

    def step_fn(params: Params, state: ADMMState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, ADMMState, StepOutput]:
        del key
        _require_relu_mlp(context.network, name)
        if batch.index is None:
            raise ValueError("admm keeps per-example variables and needs batch.index (the "
                             "examples' positions in the training set): fbalign.train.fit "
                             "passes it; with make_train_step call step(state, x, y, index), "
                             "or pass Batch(x, y, index) to rule.step")
        if context.axis_name is not None:
            raise NotImplementedError(
                f"admm under data parallelism (axis_name={context.axis_name!r}) is not "
                "supported: its weight solve and per-example state need the whole batch on one "
                "device; train without devices=/axis_name")
        _check_loss(context.loss, output_loss)
        x, y, idx = batch.x, batch.y, batch.index
        # the forward pass: the reported loss, and the start of unseen examples' variables
        fz, fa, h = [], [], x
        for i, layer in enumerate(params):
            fz.append(_linear(layer, h))
            if i < len(params) - 1:
                h = jax.nn.relu(fz[-1])
                fa.append(h)
        out = fz[-1]
        seen = state.seen[idx][:, None]
        z = [jnp.where(seen, s[idx], f) for s, f in zip(state.z, fz, strict=True)]
        a = [jnp.where(seen, s[idx], f) for s, f in zip(state.a, fa, strict=True)]
        lam = jnp.where(seen, state.lam[idx], 0)
        solved, z, a, lam = admm_iteration(
            params, z, a, lam, x, y, beta=beta, gamma=gamma, output_loss=output_loss,
            update_multiplier=state.step >= warm_start, weight_solve=weight_solve)
        updates = jax.tree.map(lambda p, s: p - s, params, solved)
        new_state = ADMMState(
            tuple(s.at[idx].set(v) for s, v in zip(state.z, z, strict=True)),
            tuple(s.at[idx].set(v) for s, v in zip(state.a, a, strict=True)),
            state.lam.at[idx].set(lam), state.seen.at[idx].set(True), state.step + 1)
        m = _linear(solved[-1], a[-1] if a else x)
        if output_loss == "squared_error":
            t = _regression_targets(z[-1], y)
            out_loss = 0.5 * jnp.mean(jnp.sum((z[-1] - t) ** 2, axis=-1))
        else:
            out_loss = binary_hinge(z[-1], y)
        metrics = {"admm_constraint": jnp.mean(jnp.sum((z[-1] - m) ** 2, axis=-1)),
                   "admm_output_loss": out_loss}
        return updates, new_state, StepOutput(context.loss(out, y), out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
