"""Phaseless alignment learning (PAL): feedback weights learned from the network's own noise."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from fbalign._src.backward import LinearFeedback
from fbalign._src.base import (
    Array,
    LayerOp,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    Updates,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
)
from fbalign._src.checks import check_choice, check_number
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import FA_ORIENTATION, draw_feedback, fa_feedback_shapes

RULE = "phaseless_alignment"
CONV_HINT = ("PAL's noise travels through a dense chain h_l = f(h_{l-1} W_l + b_l) "
             "(fbalign.models.mlp); for conv nets use 'wm' (weight_mirror) or 'kp' "
             "(kolen_pollack), whose feedback also learns W's direction")
SLOPES = ("unit", "activity")  # the noise response's slope: 1, or f'(a) of the recorded activity


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
      low_pass: ``u^{LO}``, the low-pass filtered forward updates (`pal_low_pass`), shaped like
        the params; None when the rule has no ``tau_lo`` (the updates are not filtered).

    The filters run on across updates (always-on dynamics); every float leaf has the params'
    dtype. `phaseless_alignment`'s ``init`` starts them at zero (the noise switches on).
    """

    feedback: tuple[Float[Array, "din dout"] | None, ...]
    noise: tuple[Float[Array, "noise_batch n_l"] | None, ...]
    response: tuple[Float[Array, "noise_batch n_l"] | None, ...]
    high_pass: tuple[Float[Array, "noise_batch n_l"] | None, ...]
    low_pass: Updates | None = None


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
    slopes: Sequence[Float[Array, "noise_batch n_l"]] | None = None,
) -> PALState:
    r"""Runs PAL's discrete-time noise and plasticity dynamics for the given increments.

    At every time step ``t`` (``lax.scan``), for hidden layers ``k`` (noise) and layers
    ``l >= 1`` (feedback), with ``c_\xi = dt/\tau_\xi``, ``c_{HP} = dt/\tau_{HP}``:

    .. math::
        \xi_k[t] &= (1 - c_\xi)\, \xi_k[t-1] + \sqrt{c_\xi}\, \sigma\, w_k[t] \\
        r_0[t] &= s_0 \odot \xi_0[t], \quad
                  r_l[t] = s_l \odot \bigl(r_{l-1}[t]\, W_l + \xi_l[t]\bigr)
                  \quad (\xi_{L-1} = 0:\ \text{the output has no noise}) \\
        \hat r_l[t] &= (1 - c_{HP})\, \hat r_l[t-1] + r_l[t] - r_l[t-1] \\
        B_l &\leftarrow B_l + dt\, \eta\, \bigl(\xi_{l-1}[t]^\top \hat r_l[t] / n
              - \alpha B_l\bigr)

    ``r_l`` is the rate response of layer ``l`` to the noise of every layer below it (the rows
    are ``n`` independent copies), linear with the slopes ``s_l`` (``slopes[l]``, ``(n,
    n_l)``, held over the steps; None: ``s_l = 1``). ``weights`` are ``W_0 ... W_{L-1}``.
    """
    hidden = len(weights) - 1
    if hidden < 1:
        return state
    c = constants
    s = tuple(slopes) if slopes is not None else (None,) * len(weights)

    def sloped(v, i):
        return v if s[i] is None else s[i] * v

    def one_step(carry, inc):
        fbs, xis, rs, hps = carry
        xis = tuple(None if x is None else c.noise_decay * x + c.noise_kick * w
                    for x, w in zip(xis, inc, strict=True))
        new_fb, new_r, new_hp = [None], [None], [None]
        r = sloped(xis[0], 0)
        for i in range(1, hidden + 1):  # layer i responds; B_i reads xi_{i-1}
            r = sloped(r @ weights[i] if xis[i] is None else r @ weights[i] + xis[i], i)
            hp = c.hp_decay * hps[i] + (r - rs[i])
            b = fbs[i]
            corr = xis[i - 1].T @ hp / hp.shape[0]
            new_fb.append(b + c.rate * (corr - c.alpha * b))
            new_r.append(r)
            new_hp.append(hp)
        return (tuple(new_fb), xis, tuple(new_r), tuple(new_hp)), None

    carry = (state.feedback, state.noise, state.response, state.high_pass)
    (fbs, xis, rs, hps), _ = jax.lax.scan(one_step, carry, tuple(increments))
    return state._replace(feedback=fbs, noise=xis, response=rs, high_pass=hps)


def pal_low_pass(trace: Updates, updates: Updates, dt: float, tau_lo: float,
                 steps: int) -> tuple[Updates, Updates]:
    r"""The authors' low-pass filter of the forward-weight updates over one presentation.

    Their code filters the update ``u`` of every time step, ``u^{LO} \mathrel{+}= (dt /
    \tau_{LO}) (u - u^{LO})``, and moves the weights by ``u^{LO}``. Here ``u`` (the update of
    one ``update`` call, `phaseless_alignment`) is held over the presentation's ``S = steps``
    time steps, so with ``\rho = 1 - dt/\tau_{LO}`` the filter's trace after them and the mean
    of the traces the weights moved by are, in closed form,

    .. math::
        u^{LO} &\leftarrow u + \rho^S\, (u^{LO} - u) \\
        u_{applied} &= \frac{1}{S} \sum_{k=1}^{S} \bigl(u + \rho^k (u^{LO} - u)\bigr)
            = u + \frac{\rho\, (1 - \rho^S)}{S\, (1 - \rho)}\, (u^{LO} - u)

    (``u^{LO}`` on the right: the trace before). ``\tau_{LO} = dt`` (``\rho = 0``) returns
    ``u`` unfiltered. Returns ``(u_applied, new trace)``, each shaped like ``updates`` /
    ``trace`` (the same leaves).
    """
    rho = 1.0 - dt / tau_lo
    keep, mean_keep = rho**steps, rho * (1.0 - rho**steps) / (steps * (1.0 - rho))
    u_leaves, treedef = jax.tree.flatten(updates)
    m_leaves, trace_def = jax.tree.flatten(trace)
    applied = [u + mean_keep * (m - u) for u, m in zip(u_leaves, m_leaves, strict=True)]
    kept = [u + keep * (m - u) for u, m in zip(u_leaves, m_leaves, strict=True)]
    return jax.tree.unflatten(treedef, applied), jax.tree.unflatten(trace_def, kept)


def pal_row_slopes(derivs: Sequence[Float[Array, "batch n_l"]], noise_batch: int
                   ) -> tuple[Float[Array, "noise_batch n_l"], ...]:
    """The slopes ``s_l`` of `pal_dynamics` for ``slope="activity"``: noise copy ``r`` of the
    network sits at example ``r mod m`` of the batch (``m`` examples), so row ``r`` of ``s_l``
    is ``f_l'(a_l)`` of that example (``derivs``: the tape's ``f_l'(a_l)``, ``(m, n_l)``)."""
    rows = np.arange(noise_batch) % derivs[0].shape[0]
    return tuple(d[rows] for d in derivs)


def _dense_weights(params: Params) -> list[Array]:
    ws = [w for w, _ in dense_layers(params)]
    for i, w in enumerate(ws):
        if w.ndim != 2:
            raise ValueError(f"{RULE}: layer {i} has a weight of shape {tuple(w.shape)}, not a "
                             f"dense (din, dout) matrix. {CONV_HINT}")
    return ws


def _shapes(leaves: Sequence[Array | None]) -> list[tuple[tuple[int, ...], Any] | None]:
    return [None if a is None else (tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves]


def _check_state(params: Params, state: PALState, batch_size: int, filtered: bool
                 ) -> list[Array]:
    """The dense weights, after checking the state's feedback and filters against them
    (``filtered``: the rule low-pass filters its updates, so ``state.low_pass`` is the params'
    shape)."""
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
        seen = _shapes(getattr(state, field))
        expect = [None if s is None else (s, jnp.dtype(dtype)) for s in shapes]
        if seen != expect:
            raise ValueError(f"{RULE}: state.{field} has (shape, dtype) {seen}, expected "
                             f"{expect} for these params and batch_size={batch_size}; build the "
                             "state with rule.init(key, params) from the same network")
    seen = None if state.low_pass is None else _shapes(jax.tree.leaves(state.low_pass))
    expect = _shapes(jax.tree.leaves(params)) if filtered else None
    if seen != expect:
        raise ValueError(f"{RULE}: state.low_pass has (shape, dtype) {seen}, expected {expect} "
                         f"({'the params: tau_lo is set' if filtered else 'None: tau_lo is None'})"
                         "; build the state with rule.init(key, params) of this rule")
    return ws


def _check_time_constants(dt: float, tau_xi: float, tau_hp: float, tau_lo: float | None) -> None:
    for name, value in (("dt", dt), ("tau_xi", tau_xi), ("tau_hp", tau_hp)):
        check_number(RULE, name, value, low=0, low_open=True)
    check_number(RULE, "tau_lo", tau_lo, low=0, low_open=True, optional=True)
    if dt > tau_xi:
        raise ValueError(f"{RULE}: tau_xi={tau_xi!r} is shorter than the time step dt={dt!r}: "
                         "the discrete Ornstein-Uhlenbeck noise needs dt <= tau_xi (tau_xi = dt "
                         "gives white noise)")
    if dt > tau_hp:
        raise ValueError(f"{RULE}: tau_hp={tau_hp!r} is shorter than the time step dt={dt!r}: "
                         "the discrete high-pass filter needs dt <= tau_hp (its trace would "
                         "flip sign every step)")
    if tau_lo is not None and dt > tau_lo:
        raise ValueError(f"{RULE}: tau_lo={tau_lo!r} is shorter than the time step dt={dt!r}: "
                         "the discrete low-pass filter needs dt <= tau_lo (tau_lo = dt applies "
                         "the updates unfiltered, as tau_lo=None does)")


def _check_options(learning_rate: float, alpha: float | None, noise_std: float, dt: float,
                   tau_xi: float, tau_hp: float, tau_lo: float | None, steps: int,
                   batch_size: int, slope: str) -> float:
    """Checks `phaseless_alignment`'s options; returns the regulariser alpha to use."""
    check_number(RULE, "learning_rate", learning_rate, low=0, low_open=True)
    check_number(RULE, "noise_std", noise_std, low=0, low_open=True)
    check_number(RULE, "alpha", alpha, low=0, optional=True)
    check_choice(RULE, "slope", slope, SLOPES)
    _check_time_constants(dt, tau_xi, tau_hp, tau_lo)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{RULE}: {name} must be an integer >= 1, got {value!r}")
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
    slope: Literal["unit", "activity"] = "unit",
    tau_lo: float | None = None,
) -> TapeRule:
    r"""Phaseless alignment learning (PAL): feedback alignment whose B learns W from noise.

    The forward weights learn by feedback alignment through the current ``B_l`` (``W_l``'s
    shape; ``\delta_{l-1} = (\delta_l B_l^\top) \odot f'(a_{l-1})``, ``u_l = x_l^\top
    \delta_l``), optionally low-pass filtered (``tau_lo``, `pal_low_pass`). In every
    ``update``, concurrently, ``B`` runs ``steps`` time steps of the paper's always-on dynamics
    (no separate phase; their state, `PALState`, carries over from update to update): each
    hidden neuron's somatic potential carries Ornstein-Uhlenbeck noise ``\xi``, the noise
    travels up through the forward weights, and each feedback synapse correlates the noise of
    its lower neuron with the high-pass filtered rate of its upper one, with a regulariser
    (`pal_dynamics`; ``c_\xi = dt/\tau_\xi``, ``c_{HP} = dt/\tau_{HP}``):

    .. math::
        \xi_k[t] &= (1 - c_\xi)\, \xi_k[t-1] + \sqrt{c_\xi}\, \sigma\, w_k[t],
            \quad w_k[t] \sim N(0, I) \\
        r_l[t] &= s_l \odot \bigl(r_{l-1}[t]\, W_l + \xi_l[t]\bigr),
            \qquad r_0[t] = s_0 \odot \xi_0[t] \\
        \hat r_l[t] &= (1 - c_{HP})\, \hat r_l[t-1] + r_l[t] - r_l[t-1] \\
        B_l &\leftarrow B_l + dt\, \eta_{bw}\, \bigl(\xi_{l-1}[t]^\top \hat r_l[t] / n
            - \alpha B_l\bigr)

    with the slopes ``s_l = 1`` (``slope="unit"``) or ``s_l = f_l'(a_l)``, the derivative of
    layer ``l``'s activation at the recorded pre-activation (``slope="activity"``: noise copy
    ``r`` sits at example ``r mod m`` of the batch of ``m``, `pal_row_slopes`). Row-major: the
    paper's ``B_{\ell}`` is our ``B_{l}^\top``. Noise from layers other than ``l-1`` is
    independent of ``\xi_{l-1}``, so ``E[\Delta B_l] = dt\,\eta_{bw} (g\, \langle s_{l-1}
    \otimes s_l \rangle \odot W_l - \alpha B_l)`` with the gain ``g`` of `pal_gain` and
    ``\langle \cdot \rangle`` the mean over the copies: B aligns with W (unit slope) or with
    its slope-weighted ``\langle s_{l-1} \otimes s_l\rangle \odot W_l`` (the paper's ``B
    \propto \varphi' W^\top \varphi'``), settling at ``g/\alpha`` times it.

    The discrete form follows the authors' time-stepped code (GitHub kma-code/Phaseless-
    Alignment-Learning, its GLE layers): Euler steps of ``dt`` for the OU noise, the high-pass
    ``\hat r \mathrel{+}= \Delta r - (dt/\tau_{HP}) \hat r``, ``\dot B = \eta_{bw} (\xi
    \hat r^\top - \alpha B)``, batch-averaged, and the forward updates' low-pass ``u^{LO}
    \mathrel{+}= (dt/\tau_{LO}) (u - u^{LO})``. Choices of ours: (1) the rates respond to the
    noise instantly (a rate network's layers are instantaneous maps, as prospective coding
    makes the paper's neurons) and linearly: ``\varphi(u + \xi) - \varphi(u)`` to first order,
    ``s = \varphi'(u)`` held while a batch is presented (the network's own activity, constant
    meanwhile, is what the high-pass filter removes), or slope 1 (the default). Unit slope
    needs no recorded activity, so the ``jax.grad`` form (whose ``advance`` sees none) runs
    the same dynamics; ``slope="activity"`` is the explicit form's only. (2) The noise runs in
    ``batch_size`` independent copies of the network (rows), fixed at construction so that the
    filters' state has a fixed shape; the correlation is their mean. (3) A forward update is
    one per ``update`` call, held over its ``steps`` time steps for the low-pass filter.

    Args:
      learning_rate: ``\eta_{bw}``, the feedback's learning rate (per unit time). B averages
        its correlation over about ``1/(\eta_{bw} \alpha)`` time; the noise of the layers below
        ``l-1``, amplified by their weights, adds variance to ``B_l``'s estimate, so deep nets
        want a small rate.
      alpha: ``\alpha``, the regulariser. None picks the stationary gain ``g`` (`pal_gain`),
        so that B's expected fixed point is W itself with unit slope (then PAL tends to
        backprop), ``\langle s_{l-1} \otimes s_l\rangle \odot W_l`` with ``"activity"``.
      noise_std: ``\sigma``, the noise amplitude (stationary std ``\sigma/\sqrt{2 - c_\xi}``).
      dt: the time step.
      tau_xi: ``\tau_\xi``, the noise's correlation time (``>= dt``; ``= dt``: white noise).
      tau_hp: ``\tau_{HP}``, the high-pass filter's time constant (``>= dt``).
      steps: time steps of the B dynamics per ``update`` (a batch's presentation time).
      batch_size: ``n``, independent noise copies of the network (``"activity"``: the data
        batch size pairs each copy with one example, as in the paper).
      init: initialiser of B (``"gaussian"``, ``"uniform"``, ``"orthogonal"``, ``"xavier"``
        or a callable); scale: its std/limit/gain (None: variance-preserving default).
      slope: the noise response's slope ``s_l``: ``"unit"`` or ``"activity"`` (above).
      tau_lo: ``\tau_{LO}`` (``>= dt``), the low-pass filter of the forward updates (weights
        and biases; its trace is ``state.low_pass``); None: unfiltered. ``tau_lo = dt`` gives
        the unfiltered updates.

    Returns:
      A `TapeRule` with `PALState`; ``update`` needs ``key=`` (the noise; `pal_increments`).
      ``jax.grad`` form: the network's ``apply`` with ``backward=LinearFeedback(B)`` gives the
      forward updates, and ``advance`` filters them and runs the same B dynamics from the same
      key (``slope="unit"`` only; ``"activity"`` raises a ValueError there). Dense networks
      only (a conv net raises a ValueError naming 'wm' and 'kp').

    References:
      Max, Kriener, Pineda Garcia, Nowotny, Jaras, Senn & Petrovici (2024), "Learning
      efficient backprojections across cortical hierarchies in real time", Nature Machine
      Intelligence 6 (arXiv:2212.10249).
    """
    a = _check_options(learning_rate, alpha, noise_std, dt, tau_xi, tau_hp, tau_lo, steps,
                       batch_size, slope)
    constants = PALConstants(1.0 - dt / tau_xi, math.sqrt(dt / tau_xi) * noise_std,
                             1.0 - dt / tau_hp, dt * learning_rate, a)
    filtered = tau_lo is not None

    def init_fn(key: PRNGKey, params: Params) -> PALState:
        ws = _dense_weights(params)
        n = len(ws)
        zeros = lambda w: jnp.zeros((batch_size, w.shape[1]), w.dtype)  # noqa: E731
        feedback = draw_feedback(key, fa_feedback_shapes(params), init, scale, ws[0].dtype, 1)
        # distinct buffers per field (a train step donates the state: no array twice)
        traces = lambda: tuple(None if i == 0 else zeros(w) for i, w in enumerate(ws))  # noqa: E731
        low_pass = jax.tree.map(jnp.zeros_like, params) if filtered else None
        return PALState(feedback, tuple(zeros(w) if i < n - 1 else None
                                        for i, w in enumerate(ws)), traces(), traces(), low_pass)

    def finish(key: PRNGKey | None, params: Params, state: PALState, updates: Updates,
               slopes: Sequence[Array] | None) -> tuple[Updates, PALState]:
        if key is None:
            raise ValueError(f"{RULE} draws the noise that drives its feedback dynamics: pass "
                             "key=... to update")
        ws = _check_state(params, state, batch_size, filtered)
        state = pal_dynamics(ws, state, pal_increments(key, state, steps), constants, slopes)
        if not filtered:
            return updates, state
        updates, low_pass = pal_low_pass(state.low_pass, updates, dt, tau_lo, steps)
        return updates, state._replace(low_pass=low_pass)

    def update_fn(params: Params, state: PALState, tape: Tape, error: Array, *,
                  key: PRNGKey | None = None, **extra: Any):
        del extra
        tape.require_dense(RULE, CONV_HINT)
        _check_state(params, state, batch_size, filtered)
        fb = state.feedback
        updates = chain_updates(params, tape, error, lambda i, d: tape.send_back(i, d, fb[i]))
        slopes = pal_row_slopes(tape.derivs, batch_size) if slope == "activity" else None
        return finish(key, params, state, updates, slopes)

    def advance_fn(params: Params, state: PALState, updates: Any, feedback_grads: Any, *,
                   key: PRNGKey | None = None, layers: Sequence[LayerOp] | None = None):
        del feedback_grads
        if slope == "activity":
            raise ValueError(
                f"{RULE}: slope='activity' weights the noise response by f'(a) of the activity "
                "that the explicit form records; the jax.grad form sees no activity. Train "
                "with form='explicit' (--form explicit, the default for fbalign.models.mlp), "
                "or use slope='unit' with form='grad'")
        for i, layer in enumerate(layers or ()):
            if len(layer.input_shape) != 1:
                raise ValueError(f"{RULE}: layer {i} takes inputs of shape "
                                 f"{layer.input_shape}, not vectors. {CONV_HINT}")
        return finish(key, params, state, updates, None)

    # slope="activity" has no jax.grad form: without a backward, lifting the rule in form="grad"
    # is refused up front (`fbalign.lift.through_primitives`), before anything is traced
    backward = None if slope == "activity" else (
        lambda feedback, labels: LinearFeedback(feedback=feedback))
    return TapeRule(init_fn, update_fn, advance_fn, backward=backward)
