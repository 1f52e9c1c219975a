r"""Recurrent DNI: truncated BPTT whose gradient past each window boundary is synthetic.

A sequence is cut into windows of ``T`` steps. Plain truncated BPTT drops every gradient that
would flow from one window into the state that entered it. Recurrent DNI (Jaderberg et al.
2017, Sec. 3.2) instead adds, at the last state ``s_T`` of a window, the synthesizer's
prediction ``delta_T = M(s_T)`` of the gradient that the *future* loss would send back:

.. math::
    \nabla_\theta \Big( \sum_{t<T} L_t \Big) + \Big(\frac{\partial s_T}{\partial \theta}\Big)^\top
    \hat\delta_T, \qquad \hat\delta_T = M(s_T).

The synthesizer is trained on bootstrapped targets: the gradient of that same window objective
with respect to the state that entered the window, ``dL_window/ds_0 + (ds_T/ds_0)^T delta_T``,
is the target for ``M(s_0)`` (for every window but the first, whose entering state is the
initial state, where the synthesizer is never used). Everything runs under `jax.lax.scan`
(windows outside, time steps inside) and is jit- and vmap-able.

Layout: sequences are time-major, ``xs`` of shape ``(time, batch, features)``. Losses are
``mean over batch of sum over time`` of a per-step, per-example loss; synthesizers work in
per-example units (targets ``batch * dL/ds``), as in `fbalign.rules.synthetic_gradients`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbalign._src.base import Array, Params, PRNGKey
from fbalign._src.linalg import orthogonal
from fbalign._src.rules.synthetic_gradients import (
    Synthesizer,
    linear_synthesizer,
    synthesizer_loss,
)

Carry = Any
StepLoss = Callable[[Array, Array], Array]

# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


class Cell(NamedTuple):
    """A recurrent cell as pure functions.

    Attributes:
      init: ``init(key, in_features, dtype) -> params``.
      step: ``step(params, carry, x) -> (carry, h)``, ``x`` of shape ``(batch, in_features)``,
        ``h`` the ``(batch, hidden_size)`` output read by the readout.
      initial_carry: ``initial_carry(batch, dtype) -> carry`` (zeros).
      hidden_size: width of ``h``.
      state_size: width of the flattened carry (what the synthesizer sees and predicts).
    """

    init: Callable[..., Params]
    step: Callable[[Params, Carry, Array], tuple[Carry, Array]]
    initial_carry: Callable[..., Carry]
    hidden_size: int
    state_size: int


def rnn_cell(hidden_size: int, activation: Callable[[Array], Array] = jnp.tanh) -> Cell:
    """Vanilla RNN ``h' = f(x W_x + h W_h + b)``; carry ``h``.

    ``W_x`` is LeCun-normal, ``W_h`` orthogonal, ``b`` zero. Params ``{"wx", "wh", "b"}``.
    """
    hidden_size = int(hidden_size)

    def init(key, in_features, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return {
            "wx": jax.nn.initializers.lecun_normal()(k1, (in_features, hidden_size), dtype),
            "wh": orthogonal()(k2, (hidden_size, hidden_size), dtype),
            "b": jnp.zeros((hidden_size,), dtype),
        }

    def step(params, h, x):
        h = activation(x @ params["wx"] + h @ params["wh"] + params["b"])
        return h, h

    def initial_carry(batch, dtype=jnp.float32):
        return jnp.zeros((batch, hidden_size), dtype)

    return Cell(init, step, initial_carry, hidden_size, hidden_size)


def lstm_cell(hidden_size: int, forget_bias: float = 1.0) -> Cell:
    """LSTM with gates ``[i, f, g, o]`` from ``x W_x + h W_h + b``; carry ``(h, c)``.

    ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h' = sigmoid(o) tanh(c')``. The forget-gate
    bias starts at ``forget_bias``. Params ``{"wx": (din, 4H), "wh": (H, 4H), "b": (4H,)}``; the
    synthesizer sees ``[h, c]`` (``state_size = 2H``).
    """
    hidden_size = int(hidden_size)
    H = hidden_size

    def init(key, in_features, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        wh = jnp.concatenate(
            [orthogonal()(k, (H, H), dtype) for k in jax.random.split(k2, 4)],
            axis=1,
        )
        b = jnp.zeros((4 * H,), dtype).at[H:2 * H].set(forget_bias)
        return {
            "wx": jax.nn.initializers.lecun_normal()(k1, (in_features, 4 * H), dtype),
            "wh": wh,
            "b": b,
        }

    def step(params, carry, x):
        h, c = carry
        z = x @ params["wx"] + h @ params["wh"] + params["b"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    def initial_carry(batch, dtype=jnp.float32):
        return (jnp.zeros((batch, H), dtype), jnp.zeros((batch, H), dtype))

    return Cell(init, step, initial_carry, H, 2 * H)


def carry_to_vector(carry: Carry) -> Array:
    """Concatenates a carry's leaves along the feature axis: ``(batch, state_size)``."""
    return jnp.concatenate(jax.tree.leaves(carry), axis=-1)


def vector_to_carry(vec: Array, like: Carry) -> Carry:
    """Inverse of `carry_to_vector`, splitting ``vec`` into ``like``'s structure."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [leaf.shape[-1] for leaf in leaves]
    cuts, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        cuts.append(acc)
    return jax.tree.unflatten(treedef, jnp.split(vec, cuts, axis=-1))


def unroll(cell: Cell, cell_params: Params, carry: Carry, xs: Array) -> tuple[Carry, Array]:
    """Runs ``cell`` over ``xs`` ``(time, batch, in)`` with `jax.lax.scan`: ``(carry, hs)``."""
    return jax.lax.scan(lambda c, x: cell.step(cell_params, c, x), carry, xs)


# --------------------------------------------------------------------------------------------
# Per-step losses: (batch, out) x (batch, ...) -> (batch,)
# --------------------------------------------------------------------------------------------


def sigmoid_bce(logits: Array, targets: Array) -> Array:
    """Binary cross-entropy (nats) summed over features: ``(batch,)``."""
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


def softmax_ce(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy per example; ``labels`` integer ``(batch,)`` or one-hot."""
    if labels.ndim == logits.ndim - 1:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optax.softmax_cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------
# Recurrent DNI
# --------------------------------------------------------------------------------------------


class RecurrentDNIState(NamedTuple):
    """Synthesizer params and optimizer state, and the number of windows trained so far."""

    synth_params: Params
    opt_state: Any
    step: Array


class WindowMetrics(NamedTuple):
    """Per-window quantities (per sequence call: stacked over windows, shape ``(K,)``)."""

    loss: Array  # task loss of the window (mean over batch, sum over steps)
    synth_loss: Array  # synthesizer regression error at the window's entering state
    aux_loss: Array  # DNI + Aux prediction error (0 without aux)


class RecurrentDNI(NamedTuple):
    """The pure functions of recurrent DNI; build with `recurrent_dni`.

    Attributes:
      init: ``init(key, in_features, dtype=float32) -> (params, state)``: model params
        ``{"cell", "readout"[, "aux"]}`` and the `RecurrentDNIState`.
      apply: ``apply(params, xs, carry=None) -> (ys, carry)``: the model's outputs over time.
      window_grads: ``window_grads(params, carry, xs, targets, mask, boundary) -> (grads,
        carry_grad, carry_out, loss)``: truncated BPTT on one window with ``boundary`` (mean-loss
        units, ``(batch, state_size)``) added as the gradient at the window's last state.
      sequence_grads: ``sequence_grads(params, state, xs, targets, mask=None, valid=None) ->
        (grads, state, metrics)``: windows of ``truncation`` steps, synthesizer updated after
        each window, model gradients summed over windows (params fixed during the call).
      run: ``run(params, state, xs, targets, mask, valid, optimizer, opt_state) -> (params,
        opt_state, state, metrics)``: the same with the model updated after every window
        (online truncated BPTT, the paper's schedule).
      truncation: ``T``.
      cell: the `Cell`.
    """

    init: Callable[..., tuple[Params, RecurrentDNIState]]
    apply: Callable[..., tuple[Array, Carry]]
    window_grads: Callable[..., tuple[Params, Carry, Carry, Array]]
    sequence_grads: Callable[..., tuple[Params, RecurrentDNIState, WindowMetrics]]
    run: Callable[..., tuple[Params, Any, RecurrentDNIState, WindowMetrics]]
    truncation: int
    cell: Cell


def recurrent_dni(
    cell: Cell,
    out_features: int,
    truncation: int,
    loss: StepLoss = sigmoid_bce,
    synthesizer: Synthesizer | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    synthetic: bool = True,
    aux: bool = False,
    aux_weight: float = 1.0,
    scale: float = 1.0,
) -> RecurrentDNI:
    r"""Recurrent DNI: truncated BPTT with a synthetic gradient at every window boundary.

    Within window ``k`` (steps ``kT .. kT+T-1``, entering state ``s_0``, leaving state
    ``s_T``) the model's gradient is that of

    .. math::
        J_k(\theta, s_0) = \tfrac1B \sum_b \sum_{t} m_{t,b}\, \ell(y_{t,b}, z_{t,b})
          + \tfrac1B \sum_b \langle \mathrm{sg}(\hat\delta_{T,b}),\, s_{T,b} \rangle,
        \qquad \hat\delta_T = \text{scale} \cdot M(s_T)\, v_T,

    where ``v_T`` is 1 where the episode continues past the boundary (0 after the last window:
    there is no future loss). The synthesizer regresses ``M(s_0)`` onto the bootstrapped
    target ``sg(B dJ_k/ds_0)`` for windows ``k >= 1`` (window 0 enters from the initial state,
    where the synthesizer is never queried). ``synthetic=False`` is plain truncated BPTT;
    ``truncation`` equal to the sequence length is full BPTT.

    DNI + Aux (``aux=True``): a linear head on the first state computed inside the window
    regresses the synthetic gradient at the window's end, ``T`` steps after the window's
    entering state, with weight ``aux_weight``; its gradient trains the head and the core (not
    the synthesizer target). This is our reading of the paper's "predict the synthetic
    gradient T steps ahead" auxiliary task, restricted to what one window can compute.

    Args:
      cell: `rnn_cell` or `lstm_cell` (or any `Cell`).
      out_features: width of the linear readout ``y_t = h_t W + b``.
      truncation: ``T``, the window length.
      loss: per-step loss ``loss(y_t, z_t) -> (batch,)``; default `sigmoid_bce`.
      synthesizer: gradient model of the state; default zero-initialised `linear_synthesizer`.
      optimizer: optax transform for the synthesizer; default ``optax.adam(learning_rate)``.
      learning_rate: the default synthesizer optimizer's step size.
      synthetic: use the synthesizer at boundaries (False: truncated BPTT).
      aux: add the DNI + Aux auxiliary task (needs ``synthetic``).
      aux_weight: weight of the auxiliary loss.
      scale: multiplies the synthetic gradient where it is used.

    Returns:
      A `RecurrentDNI` of pure functions.

    References:
      Jaderberg et al. (2017), "Decoupled neural interfaces using synthetic gradients", ICML,
      Sec. 3.2 and Fig. 3.
    """
    if int(truncation) < 1:
        raise ValueError(f"truncation must be >= 1, got {truncation}")
    if aux and not synthetic:
        raise ValueError("aux=True predicts the synthetic gradient; it needs synthetic=True")
    T = int(truncation)
    synth = linear_synthesizer() if synthesizer is None else synthesizer
    tx = optax.adam(learning_rate) if optimizer is None else optimizer
    S = cell.state_size

    def init(key: PRNGKey, in_features: int, dtype=jnp.float32):
        k_cell, k_out, k_syn, k_aux = jax.random.split(key, 4)
        params = {
            "cell": cell.init(k_cell, in_features, dtype),
            "readout": {
                "w": jax.nn.initializers.lecun_normal()(
                    k_out, (cell.hidden_size, out_features), dtype
                ),
                "b": jnp.zeros((out_features,), dtype),
            },
        }
        if aux:
            params["aux"] = {"w": jnp.zeros((S, S), dtype), "b": jnp.zeros((S,), dtype)}
        sp = synth.init(k_syn, S, 0, S, dtype)
        return params, RecurrentDNIState(sp, tx.init(sp), jnp.zeros((), jnp.int32))

    def readout(p, hs):
        return hs @ p["w"] + p["b"]

    def apply(params, xs, carry=None):
        if carry is None:
            carry = cell.initial_carry(xs.shape[1], xs.dtype)
        carry, hs = unroll(cell, params["cell"], carry, xs)
        return readout(params["readout"], hs), carry

    def task_loss(params, carry0, xs, targets, mask):
        carry, hs = unroll(cell, params["cell"], carry0, xs)
        ys = readout(params["readout"], hs)
        per_step = jax.vmap(loss)(ys, targets)  # (T, batch)
        return jnp.sum(jnp.mean(per_step * mask, axis=1)), carry

    def window_grads(params, carry, xs, targets, mask, boundary):
        """Truncated BPTT on one window with an explicit gradient at its last state."""

        def objective(p, c0):
            loss_val, cT = task_loss(p, c0, xs, targets, mask)
            sT = carry_to_vector(cT)
            return loss_val + jnp.sum(jax.lax.stop_gradient(boundary) * sT), (cT, loss_val)

        (gp, gc), (cT, loss_val) = jax.grad(objective, argnums=(0, 1), has_aux=True)(
            params, carry
        )
        return gp, gc, cT, loss_val

    def one_window(params, sp, carry, xw, tw, mw, v_start, v_next, w_synth):
        batch = xw.shape[1]

        def objective(p, c0):
            loss_val, cT = task_loss(p, c0, xw, tw, mw)
            total = loss_val
            aux_val = jnp.zeros((), loss_val.dtype)
            if synthetic:
                sT = carry_to_vector(cT)
                g = jax.lax.stop_gradient(scale * synth.apply(sp, sT, None) * v_next[:, None])
                total = total + jnp.sum(g * sT) / batch
                if aux:
                    c1, _ = cell.step(p["cell"], jax.lax.stop_gradient(c0), xw[0])
                    pred = carry_to_vector(c1) @ p["aux"]["w"] + p["aux"]["b"]
                    err = 0.5 * jnp.sum((pred - g) ** 2, axis=-1)
                    aux_val = aux_weight * jnp.sum(err * v_start) / jnp.maximum(
                        jnp.sum(v_start), 1.0)
                    total = total + aux_val
            return total, (cT, loss_val, aux_val)

        (gp, gc), (cT, loss_val, aux_val) = jax.grad(objective, argnums=(0, 1), has_aux=True)(
            params, carry
        )
        if synthetic:
            target = jax.lax.stop_gradient(batch * carry_to_vector(gc))
            s0 = carry_to_vector(carry)
            s_loss, s_grad = jax.value_and_grad(
                lambda q: synthesizer_loss(synth, q, s0, target, None, w_synth)
            )(sp)
        else:
            s_loss, s_grad = jnp.zeros((), loss_val.dtype), None
        return gp, s_grad, cT, WindowMetrics(loss_val, s_loss, aux_val)

    def _prepare(xs, targets, mask, valid):
        n, batch = xs.shape[0], xs.shape[1]
        if n % T:
            raise ValueError(
                f"sequence length {n} is not a multiple of the truncation {T}; pad it and mask "
                "the padding (mask=0, valid=0)"
            )
        dtype = xs.dtype
        mask = jnp.ones((n, batch), dtype) if mask is None else jnp.asarray(mask, dtype)
        valid = jnp.ones((n, batch), dtype) if valid is None else jnp.asarray(valid, dtype)
        K = n // T

        def split(a):
            return a.reshape((K, T) + a.shape[1:])

        v_start = valid[::T]  # (K, batch)
        v_next = jnp.concatenate([valid[T::T], jnp.zeros((1, batch), dtype)], axis=0)
        # The first window enters from the initial state, where the synthesizer is never
        # queried (nothing precedes it): regressing on it would only pull the synthesizer
        # towards an unrelated, often large, target.
        w_synth = v_start.at[0].set(0.0)
        return (split(xs), split(targets), split(mask), v_start, v_next, w_synth), batch

    def _synth_step(state, s_grad):
        if not synthetic:
            return RecurrentDNIState(state.synth_params, state.opt_state, state.step + 1)
        upd, os_ = tx.update(s_grad, state.opt_state, state.synth_params)
        return RecurrentDNIState(optax.apply_updates(state.synth_params, upd), os_,
                                 state.step + 1)

    def sequence_grads(params, state, xs, targets, mask=None, valid=None):
        windows, batch = _prepare(xs, targets, mask, valid)

        def body(c, w):
            carry, st, acc = c
            gp, s_grad, cT, metrics = one_window(params, st.synth_params, carry, *w)
            acc = jax.tree.map(jnp.add, acc, gp)
            return (cT, _synth_step(st, s_grad), acc), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        carry0 = cell.initial_carry(batch, xs.dtype)
        (_, state, grads), metrics = jax.lax.scan(body, (carry0, state, zeros), windows)
        return grads, state, metrics

    def run(params, state, xs, targets, mask, valid, optimizer, opt_state):
        windows, batch = _prepare(xs, targets, mask, valid)

        def body(c, w):
            carry, st, p, os_ = c
            gp, s_grad, cT, metrics = one_window(p, st.synth_params, carry, *w)
            upd, os_ = optimizer.update(gp, os_, p)
            p = optax.apply_updates(p, upd)
            return (cT, _synth_step(st, s_grad), p, os_), metrics

        carry0 = cell.initial_carry(batch, xs.dtype)
        (_, state, params, opt_state), metrics = jax.lax.scan(
            body, (carry0, state, params, opt_state), windows
        )
        return params, opt_state, state, metrics

    return RecurrentDNI(init, apply, window_grads, sequence_grads, run, T, cell)


def make_train_step(
    model: RecurrentDNI, optimizer: optax.GradientTransformation, per_window: bool = True
) -> Callable[..., tuple[Params, Any, RecurrentDNIState, WindowMetrics]]:
    """A jitted ``step(params, opt_state, state, xs, targets, mask=None, valid=None)``.

    Args:
      model: a `RecurrentDNI`.
      optimizer: the model's optax optimizer.
      per_window: update the model after every window (online truncated BPTT, the paper's
        schedule) or once per sequence with the gradients summed over windows.

    Returns:
      ``step -> (params, opt_state, state, metrics)`` with `WindowMetrics` stacked over windows.
    """

    @jax.jit
    def step(params, opt_state, state, xs, targets, mask=None, valid=None):
        if per_window:
            return model.run(params, state, xs, targets, mask, valid, optimizer, opt_state)
        grads, state, metrics = model.sequence_grads(params, state, xs, targets, mask, valid)
        upd, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, state, metrics

    return step
