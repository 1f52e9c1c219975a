"""Phaseless alignment learning (PAL): feedback weights learned from the network's own noise."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.backward import LinearFeedback
from fbalign._src.base import (
    Array,
    LayerOp,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
)
from fbalign._src.checks import check_number
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import FA_ORIENTATION, draw_feedback, fa_feedback_shapes

RULE = "phaseless_alignment"
CONV_HINT = ("PAL's noise travels through a dense chain h_l = f(h_{l-1} W_l + b_l) "
             "(fbalign.models.mlp); for conv nets use 'wm' (weight_mirror) or 'kp' "
             "(kolen_pollack), whose feedback also learns W's direction")


class PALState(NamedTuple):
    """State of `phaseless_alignment`: the feedback and the filters of its discrete dynamics.

    Attributes:
      feedback: ``B_l`` with ``W_l``'s shape ``(din, dout)`` (the error goes back as ``delta_l
        B_l^T``); ``feedback[0]`` is None.
      noise: ``xi_l``, the Ornstein-Uhlenbeck noise in hidden layer ``l``'s somatic potential,
        ``(batch_size, n_l)``; None for the output layer (it has none).
      response: ``r_l``, layer ``l``'s rate response to the noise at the last time step,
        ``(batch_size, n_l)``; None for layer 0 (no ``B`` reads it).
      high_pass: ``r_hat_l``, the high-pass filtered ``r_l``, same shapes as ``response``.

    The filters run on across updates (always-on dynamics); every float leaf has the params'
    dtype. `phaseless_alignment`'s ``init`` starts them at zero (the noise switches on).
    """

    feedback: tuple[Float[Array, "din dout"] | None, ...]
    noise: tuple[Float[Array, "noise_batch n_l"] | None, ...]
    response: tuple[Float[Array, "noise_batch n_l"] | None, ...]
    high_pass: tuple[Float[Array, "noise_batch n_l"] | None, ...]


class PALConstants(NamedTuple):
    """The per-step factors of PAL's discrete dynamics (`pal_dynamics`), from its options."""

    noise_decay: float  # 1 - dt / tau_xi
    noise_kick: float  # sqrt(dt / tau_xi) * sigma
    hp_decay: float  # 1 - dt / tau_HP
    rate: float  # dt * eta_bw
    alpha: float  # the regulariser


def pal_gain(dt: float, tau_xi: float, tau_hp: float, noise_std: float) -> float:
    r"""``g``, the stationary correlation ``E[\xi_{l-1}^\top \hat r_l] / n`` per unit of ``W_l``.

    With ``c_\xi = dt/\tau_\xi``, ``c_{HP} = dt/\tau_{HP}`` and the discrete filters of
    `phaseless_alignment`, the OU noise has variance ``\sigma^2 / (2 - c_\xi)`` and lag-``k``
    correlation ``(1 - c_\xi)^k``, and the high-pass filter sums the response's increments with
    weights ``(1 - c_{HP})^k``, so

    .. math::
        g = \frac{\sigma^2}{2 - c_\xi} \cdot \frac{c_\xi}{c_\xi + c_{HP} - c_\xi c_{HP}}

    (``\sigma^2`` for white noise, ``\tau_\xi = dt``). B's expected fixed point is
    ``(g / \alpha) W``.
    """
    cx, ch = dt / tau_xi, dt / tau_hp
    return noise_std**2 / (2.0 - cx) * cx / (cx + ch - cx * ch)


def pal_increments(key: PRNGKey, state: PALState, steps: int
                   ) -> tuple[Float[Array, "steps noise_batch n_l"] | None, ...]:
    """The white-noise increments ``w_l[t] ~ N(0, 1)`` that drive the OU noise of every hidden
    layer for ``steps`` time steps: what `phaseless_alignment`'s ``update`` and ``advance``
    draw from their ``key`` (one key per layer, split from ``key``); None for the output."""
    keys = jax.random.split(key, len(state.noise))
    return tuple(None if x is None else jax.random.normal(k, (steps, *x.shape), x.dtype)
                 for k, x in zip(keys, state.noise, strict=True))


def pal_dynamics(
    weights: Sequence[Float[Array, "din dout"]],
    state: PALState,
    increments: Sequence[Float[Array, "steps noise_batch n_l"] | None],
    constants: PALConstants,
) -> PALState:
    r"""Runs PAL's discrete-time noise and plasticity dynamics for the given increments.

    At every time step ``t`` (``lax.scan``), for hidden layers ``k`` (noise) and layers
    ``l >= 1`` (feedback), with ``c_\xi = dt/\tau_\xi``, ``c_{HP} = dt/\tau_{HP}``:

    .. math::
        \xi_k[t] &= (1 - c_\xi)\, \xi_k[t-1] + \sqrt{c_\xi}\, \sigma\, w_k[t] \\
        r_0[t] &= \xi_0[t], \quad r_l[t] = r_{l-1}[t]\, W_l + \xi_l[t]
                  \quad (\xi_{L-1} = 0:\ \text{the output has no noise}) \\
        \hat r_l[t] &= (1 - c_{HP})\, \hat r_l[t-1] + r_l[t] - r_l[t-1] \\
        B_l &\leftarrow B_l + dt\, \eta\, \bigl(\xi_{l-1}[t]^\top \hat r_l[t] / n
              - \alpha B_l\bigr)

    ``r_l`` is the rate response of layer ``l`` to the noise of every layer below it (unit
    slope; the rows are ``n`` independent copies). ``weights`` are ``W_0 ... W_{L-1}``.
    """
    hidden = len(weights) - 1
    if hidden < 1:
        return state
    c = constants

    def one_step(carry, inc):
        fbs, xis, rs, hps = carry
        xis = tuple(None if x is None else c.noise_decay * x + c.noise_kick * w
                    for x, w in zip(xis, inc, strict=True))
        new_fb, new_r, new_hp = [None], [None], [None]
        r = xis[0]
        for i in range(1, hidden + 1):  # layer i responds; B_i reads xi_{i-1}
            r = r @ weights[i] if xis[i] is None else r @ weights[i] + xis[i]
            hp = c.hp_decay * hps[i] + (r - rs[i])
            b = fbs[i]
            corr = xis[i - 1].T @ hp / hp.shape[0]
            new_fb.append(b + c.rate * (corr - c.alpha * b))
            new_r.append(r)
            new_hp.append(hp)
        return (tuple(new_fb), xis, tuple(new_r), tuple(new_hp)), None

    carry = (state.feedback, state.noise, state.response, state.high_pass)
    (fbs, xis, rs, hps), _ = jax.lax.scan(one_step, carry, tuple(increments))
    return PALState(fbs, xis, rs, hps)


def _dense_weights(params: Params) -> list[Array]:
    ws = [w for w, _ in dense_layers(params)]
    for i, w in enumerate(ws):
        if w.ndim != 2:
            raise ValueError(f"{RULE}: layer {i} has a weight of shape {tuple(w.shape)}, not a "
                             f"dense (din, dout) matrix. {CONV_HINT}")
    return ws


def _check_state(params: Params, state: PALState, batch_size: int) -> list[Array]:
    """The dense weights, after checking the state's feedback and filters against them."""
    ws = _dense_weights(params)
    dtype = ws[0].dtype
    check_feedback_shapes(state.feedback, fa_feedback_shapes(params), RULE, FA_ORIENTATION,
                          dtype=dtype)
    n = len(ws)
    want = {
        "noise": [(batch_size, w.shape[1]) if i < n - 1 else None for i, w in enumerate(ws)],
        "response": [(batch_size, w.shape[1]) if i > 0 else None for i, w in enumerate(ws)],
    }
    want["high_pass"] = want["response"]
    for field, shapes in want.items():
        got = getattr(state, field)
        seen = [None if a is None else (tuple(a.shape), jnp.dtype(a.dtype)) for a in got]
        expect = [None if s is None else (s, jnp.dtype(dtype)) for s in shapes]
        if seen != expect:
            raise ValueError(f"{RULE}: state.{field} has (shape, dtype) {seen}, expected "
                             f"{expect} for these params and batch_size={batch_size}; build the "
                             "state with rule.init(key, params) from the same network")
    return ws


def _check_options(learning_rate: float, alpha: float | None, noise_std: float, dt: float,
                   tau_xi: float, tau_hp: float, steps: int, batch_size: int) -> float:
    """Checks `phaseless_alignment`'s options; returns the regulariser alpha to use."""
    check_number(RULE, "learning_rate", learning_rate, low=0, low_open=True)
    check_number(RULE, "noise_std", noise_std, low=0, low_open=True)
    check_number(RULE, "alpha", alpha, low=0, optional=True)
    for name, value in (("dt", dt), ("tau_xi", tau_xi), ("tau_hp", tau_hp)):
        check_number(RULE, name, value, low=0, low_open=True)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{RULE}: {name} must be an integer >= 1, got {value!r}")
    if dt > tau_xi:
        raise ValueError(f"{RULE}: tau_xi={tau_xi!r} is shorter than the time step dt={dt!r}: "
                         "the discrete Ornstein-Uhlenbeck noise needs dt <= tau_xi (tau_xi = dt "
                         "gives white noise)")
    if dt > tau_hp:
        raise ValueError(f"{RULE}: tau_hp={tau_hp!r} is shorter than the time step dt={dt!r}: "
                         "the discrete high-pass filter needs dt <= tau_hp (its trace would "
                         "flip sign every step)")
    a = pal_gain(dt, tau_xi, tau_hp, noise_std) if alpha is None else float(alpha)
    if dt * learning_rate * a > 1:
        raise ValueError(f"{RULE}: dt * learning_rate * alpha = {dt * learning_rate * a:g} > 1: "
                         "the regulariser would overshoot and B oscillate or diverge; lower "
                         "learning_rate (alpha is "
                         f"{'the stationary gain' if alpha is None else 'given'}: {a:g})")
    if a == 0:
        warnings.warn(f"{RULE}: alpha=0 leaves B without a fixed point: its norm grows without "
                      "bound (its direction still aligns); pass alpha > 0 or None", stacklevel=3)
    return a


def phaseless_alignment(
    learning_rate: float = 0.01,
    alpha: float | None = None,
    noise_std: float = 1.0,
    dt: float = 1.0,
    tau_xi: float = 10.0,
    tau_hp: float = 10.0,
    steps: int = 10,
    batch_size: int = 32,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
) -> TapeRule:
    r"""Phaseless alignment learning (PAL): feedback alignment whose B learns W from noise.

    The forward weights learn by feedback alignment through the current ``B_l`` (``W_l``'s
    shape; ``\delta_{l-1} = (\delta_l B_l^\top) \odot f'(a_{l-1})``, ``updates[l]_w =
    x_l^\top \delta_l``). In every ``update``, concurrently, ``B`` runs ``steps`` time steps of
    the paper's always-on dynamics (no separate phase; their state, `PALState`, carries over
    from update to update): each hidden neuron's somatic potential carries Ornstein-Uhlenbeck
    noise ``\xi``, the noise travels up through the forward weights, and each feedback synapse
    correlates the noise of its lower neuron with the high-pass filtered rate of its upper one,
    with a regulariser (`pal_dynamics`; ``c_\xi = dt/\tau_\xi``, ``c_{HP} = dt/\tau_{HP}``):

    .. math::
        \xi_k[t] &= (1 - c_\xi)\, \xi_k[t-1] + \sqrt{c_\xi}\, \sigma\, w_k[t],
            \quad w_k[t] \sim N(0, I) \\
        r_l[t] &= r_{l-1}[t]\, W_l + \xi_l[t], \qquad r_0[t] = \xi_0[t] \\
        \hat r_l[t] &= (1 - c_{HP})\, \hat r_l[t-1] + r_l[t] - r_l[t-1] \\
        B_l &\leftarrow B_l + dt\, \eta_{bw}\, \bigl(\xi_{l-1}[t]^\top \hat r_l[t] / n
            - \alpha B_l\bigr)

    (row-major: the paper's ``B_{\ell}`` is our ``B_{l}^\top``, and ``B_l \propto W_l`` is its
    ``B \propto W^\top``). Noise from layers other than ``l-1`` is independent of
    ``\xi_{l-1}``, so ``E[\Delta B_l] = dt\,\eta_{bw} (g W_l - \alpha B_l)`` with the gain
    ``g`` of `pal_gain`: B aligns with W and settles at ``(g/\alpha) W``.

    The discrete form follows the authors' time-stepped code (GitHub kma-code/Phaseless-
    Alignment-Learning, its GLE layers): Euler steps of ``dt`` for the OU noise, the high-pass
    ``\hat r \mathrel{+}= \Delta r - (dt/\tau_{HP}) \hat r`` and ``\dot B = \eta_{bw} (\xi
    \hat r^\top - \alpha B)``, batch-averaged. Two choices are ours. (1) The rates respond to
    the noise instantly (a rate network's layers are instantaneous maps, as prospective coding
    makes the paper's neurons) and linearly, with unit slope. The network's own activity,
    constant while a batch is presented, adds to this response and is exactly what the
    high-pass filter removes; the paper's rates respond through ``\varphi'(u)``, which
    weights the learned B by the slopes at the operating point (``B \propto \varphi' W^\top
    \varphi'``). With unit slope the dynamics need neither the recorded activity nor the
    activations, so the ``jax.grad`` form (whose ``advance`` sees no activity) runs them
    exactly as the explicit form does. (2) The noise runs in ``batch_size`` independent
    copies of the network (rows), fixed at construction so that the filters' state has a
    fixed shape; the correlation is their mean.

    Args:
      learning_rate: ``\eta_{bw}``, the feedback's learning rate (per unit time). B averages
        its correlation over about ``1/(\eta_{bw} \alpha)`` time; the noise of the layers below
        ``l-1``, amplified by their weights, adds variance to ``B_l``'s estimate, so deep nets
        want a small rate.
      alpha: ``\alpha``, the regulariser. None picks the stationary gain ``g`` (`pal_gain`),
        so that B's expected fixed point is W itself (then PAL tends to backprop).
      noise_std: ``\sigma``, the noise amplitude (stationary std ``\sigma/\sqrt{2 - c_\xi}``).
      dt: the time step.
      tau_xi: ``\tau_\xi``, the noise's correlation time (``>= dt``; ``= dt``: white noise).
      tau_hp: ``\tau_{HP}``, the high-pass filter's time constant (``>= dt``).
      steps: time steps of the B dynamics per ``update`` (a batch's presentation time).
      batch_size: ``n``, independent noise copies of the network.
      init: initialiser of B (``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"``
        or a callable); scale: its std/limit/gain (None: variance-preserving default).

    Returns:
      A `TapeRule` with `PALState`; ``update`` needs ``key=`` (the noise; `pal_increments`).
      ``jax.grad`` form: the network's ``apply`` with ``backward=LinearFeedback(B)`` gives the
      forward updates, and ``advance`` runs the same B dynamics from the same key. Dense
      networks only (a conv net raises a ValueError naming 'wm' and 'kp').

    References:
      Max, Kriener, Pineda Garcia, Nowotny, Jaras, Senn & Petrovici (2024), "Learning
      efficient backprojections across cortical hierarchies in real time", Nature Machine
      Intelligence 6 (arXiv:2212.10249).
    """
    a = _check_options(learning_rate, alpha, noise_std, dt, tau_xi, tau_hp, steps, batch_size)
    constants = PALConstants(1.0 - dt / tau_xi, math.sqrt(dt / tau_xi) * noise_std,
                             1.0 - dt / tau_hp, dt * learning_rate, a)

    def init_fn(key: PRNGKey, params: Params) -> PALState:
        ws = _dense_weights(params)
        n = len(ws)
        zeros = lambda w: jnp.zeros((batch_size, w.shape[1]), w.dtype)  # noqa: E731
        feedback = draw_feedback(key, fa_feedback_shapes(params), init, scale, ws[0].dtype, 1)
        # distinct buffers per field (a train step donates the state: no array twice)
        traces = lambda: tuple(None if i == 0 else zeros(w) for i, w in enumerate(ws))  # noqa: E731
        return PALState(feedback, tuple(zeros(w) if i < n - 1 else None
                                        for i, w in enumerate(ws)), traces(), traces())

    def run(key: PRNGKey | None, params: Params, state: PALState) -> PALState:
        if key is None:
            raise ValueError(f"{RULE} draws the noise that drives its feedback dynamics: pass "
                             "key=... to update")
        ws = _check_state(params, state, batch_size)
        return pal_dynamics(ws, state, pal_increments(key, state, steps), constants)

    def update_fn(params: Params, state: PALState, tape: Tape, error: Array, *,
                  key: PRNGKey | None = None, **extra: Any):
        del extra
        tape.require_dense(RULE, CONV_HINT)
        _check_state(params, state, batch_size)
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        return updates, run(key, params, state)

    def advance_fn(params: Params, state: PALState, updates: Any, feedback_grads: Any, *,
                   key: PRNGKey | None = None, layers: Sequence[LayerOp] | None = None):
        del feedback_grads
        for i, layer in enumerate(layers or ()):
            if len(layer.input_shape) != 1:
                raise ValueError(f"{RULE}: layer {i} takes inputs of shape "
                                 f"{layer.input_shape}, not vectors. {CONV_HINT}")
        return updates, run(key, params, state)

    return TapeRule(init_fn, update_fn, advance_fn,
                    backward=lambda feedback, labels: LinearFeedback(feedback=feedback))
