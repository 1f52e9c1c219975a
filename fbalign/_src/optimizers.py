"""Sign-based optimizers: RProp, signSGD and Signum as ``optax.GradientTransformation`` s.

They read only the sign of the updates a rule returns, which suits rules whose updates have the
right direction but not the gradient's scale (feedback alignment, sign symmetry, perturbation
estimates). signSGD and Signum are optax's own (``optax.sign_sgd``, ``optax.signum``). RProp is
written here: optax 0.2.8's ``scale_by_rprop`` emits the *previous* step's update (its first
update is zero and every later one lags a step; tested in ``tests/test_optimizers.py``, which
notices when optax fixes it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


def _positive(name: str, fn: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a positive number, got {value!r}")


def _learning_rate(fn: str, learning_rate: Any) -> None:
    if not callable(learning_rate):
        _positive("learning_rate", fn, learning_rate)


class RpropState(NamedTuple):
    """State of `rprop`: the per-parameter step sizes and the previous gradient (zero where the
    previous step saw a sign change)."""

    step_sizes: Params
    prev_grads: Params


def rprop(
    learning_rate: float,
    eta_plus: float = 1.2,
    eta_minus: float = 0.5,
    min_step: float = 1e-6,
    max_step: float = 50.0,
) -> optax.GradientTransformation:
    """Resilient backpropagation (Riedmiller & Braun 1993, "A direct adaptive method for faster
    backpropagation learning: the RPROP algorithm"), in the form of ``torch.optim.Rprop``
    (Igel & Huesken 2000's Rprop without weight-backtracking, "Improving the Rprop learning
    algorithm", iRprop-).

    Each parameter has its own step size ``s``, starting at ``learning_rate``. With the gradient
    ``g_t`` and the stored previous gradient ``g_{t-1}`` (zero at the first step):

    * ``g_t g_{t-1} > 0``: ``s <- min(s * eta_plus, max_step)``;
    * ``g_t g_{t-1} < 0``: ``s <- max(s * eta_minus, min_step)`` and ``g_t <- 0`` (no move this
      step, and the next step counts as having no sign change);
    * ``g_t g_{t-1} = 0``: ``s`` unchanged (clipped to ``[min_step, max_step]``);

    then the update is ``-sign(g_t) * s`` and ``g_t`` (zeroed where the sign flipped) is stored.
    Gradients ``[1, 1, 1, -1, 1]`` with ``learning_rate=0.1`` move by ``0.1, 0.12, 0.144, 0,
    0.072``.

    Written here rather than taken from optax: ``optax.rprop`` (0.2.8) returns the update it
    computed at the previous step (zero at the first).

    Args:
      learning_rate: the initial step size of every parameter.
      eta_plus: step-size growth when the sign is kept (> 1).
      eta_minus: step-size shrink when the sign flips (in (0, 1)).
      min_step, max_step: bounds of the step sizes (``0 < min_step <= max_step``).

    Returns:
      An ``optax.GradientTransformation`` with an `RpropState`; the updates are the steps
      (apply with ``optax.apply_updates``).
    """
    for name, v in (("learning_rate", learning_rate), ("eta_plus", eta_plus),
                    ("eta_minus", eta_minus), ("min_step", min_step), ("max_step", max_step)):
        _positive(name, "rprop", v)
    if not eta_plus > 1:
        raise ValueError(f"rprop: eta_plus must be > 1, got {eta_plus!r}")
    if not eta_minus < 1:
        raise ValueError(f"rprop: eta_minus must be in (0, 1), got {eta_minus!r}")
    if not min_step <= max_step:
        raise ValueError(f"rprop: min_step must be <= max_step, got min_step={min_step!r}, "
                         f"max_step={max_step!r}")

    def init_fn(params: Params) -> RpropState:
        return RpropState(jax.tree.map(lambda p: jnp.full_like(p, learning_rate), params),
                          jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates: Params, state: RpropState,
                  params: Params = None) -> tuple[Params, RpropState]:
        del params

        def new_step(g, prev, s):
            prod = g * prev
            factor = jnp.where(prod > 0, eta_plus, jnp.where(prod < 0, eta_minus, 1.0))
            return jnp.clip(s * factor.astype(s.dtype), min_step, max_step).astype(s.dtype)

        steps = jax.tree.map(new_step, updates, state.prev_grads, state.step_sizes)
        grads = jax.tree.map(lambda g, prev: jnp.where(g * prev < 0, jnp.zeros_like(g), g),
                             updates, state.prev_grads)
        moves = jax.tree.map(lambda g, s: -jnp.sign(g).astype(s.dtype) * s, grads, steps)
        return moves, RpropState(steps, grads)

    return optax.GradientTransformation(init_fn, update_fn)


def signsgd(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """signSGD (Bernstein, Wang, Azizzadenesheli & Anandkumar 2018, "signSGD: compressed
    optimisation for non-convex problems"): ``u_t = -learning_rate * sign(g_t)``
    (``sign(0) = 0``). ``optax.sign_sgd``.

    Args:
      learning_rate: the step, a number or an optax schedule.
    """
    _learning_rate("signsgd", learning_rate)
    return optax.sign_sgd(learning_rate)


def signum(learning_rate: float | optax.Schedule,
           momentum: float = 0.9) -> optax.GradientTransformation:
    """Signum, signSGD with momentum (Bernstein et al. 2018, "signSGD: compressed optimisation
    for non-convex problems", Algorithm 2): ``m_t = momentum * m_{t-1} + (1 - momentum) g_t``
    (``m_0 = 0``), ``u_t = -learning_rate * sign(m_t)``. ``optax.signum``.

    Args:
      learning_rate: the step, a number or an optax schedule.
      momentum: ``beta`` in ``[0, 1)``; 0 is signSGD.
    """
    _learning_rate("signum", learning_rate)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
            0 <= momentum < 1):
        raise ValueError(f"signum: momentum must be in [0, 1), got {momentum!r}")
    return optax.signum(learning_rate, beta=momentum)


def scale_by_layer(scales: tuple[float, ...] | list[float]) -> optax.GradientTransformation:
    r"""Per-layer learning rates: multiplies layer ``l``'s updates by ``scales[l]``.

    Chained after an optimizer, ``optax.chain(opt(lr), scale_by_layer(s))`` trains layer ``l``
    at rate ``lr * s_l`` (the schedule's too): exactly so for SGD, momentum, Adam, RMSProp and
    weight decay added before them, whose updates are proportional to the rate,

    .. math:: \Delta\theta_l = s_l\, u_l(\text{lr}) = u_l(s_l \cdot \text{lr}).

    Scellier & Bengio (2017) train each layer of their Hopfield networks at its own rate (e.g.
    0.4, 0.1, 0.01); Laborieux et al.'s (2021) ``--lrs`` is the same (PyTorch param groups).

    Args:
      scales: one positive factor per layer; the params (and updates) must be a list or tuple
        of that many layers (fbalign's MLPs, LeNet-5 and Hopfield networks are).

    Raises:
      ValueError: at ``init`` (once), naming the number of layers, when the params are not a
        sequence of ``len(scales)`` layers.
    """
    scales = tuple(scales)
    if not scales:
        raise ValueError("scale_by_layer: needs one scale per layer, got none")
    for v in scales:
        _positive("each scale", "scale_by_layer", v)

    def check(tree: Any, what: str) -> None:
        if not isinstance(tree, (list, tuple)) or len(tree) != len(scales):
            got = (f"{len(tree)} layers" if isinstance(tree, (list, tuple))
                   else f"a {type(tree).__name__}")
            raise ValueError(f"scale_by_layer: {len(scales)} scales (one per layer) for {what} "
                             f"of {got}; give one scale per layer of the model")

    def init_fn(params: Params) -> optax.EmptyState:
        check(params, "params")
        return optax.EmptyState()

    def update_fn(updates: Params, state: optax.EmptyState,
                  params: Params = None) -> tuple[Params, optax.EmptyState]:
        del params
        check(updates, "updates")
        scaled = [jax.tree.map(lambda u, f=f: (f * u).astype(u.dtype), layer)
                  for f, layer in zip(scales, updates, strict=True)]
        return type(updates)(scaled), state

    return optax.GradientTransformation(init_fn, update_fn)


LR_SCHEDULES = ("constant", "cosine", "exponential", "step")


def lr_schedule(learning_rate: float, kind: str = "constant", *, steps_per_epoch: int = 1,
                decay: float | None = None, every: int = 1,
                milestones: tuple[int, ...] = (), horizon: int | None = None,
                warmup: int = 0) -> float | optax.Schedule:
    r"""A learning-rate schedule over optimizer steps, with its times given in epochs
    (``steps_per_epoch`` steps each); an optax schedule, or the plain rate for ``"constant"``
    without warm-up.

    * ``"constant"``: ``\eta``.
    * ``"cosine"``: ``\eta \cdot \tfrac12 (1 + \cos(\pi t / T))`` with ``T`` = ``horizon``
      epochs, then 0 (Loshchilov & Hutter 2017, "SGDR", without restarts).
    * ``"exponential"``: ``\eta \cdot decay^{\lfloor t / every \rfloor}``: times ``decay``
      every ``every`` epochs (a per-epoch decay with ``every=1``).
    * ``"step"``: ``\eta \cdot decay^k`` after the ``k``-th of ``milestones`` (epochs).

    ``warmup`` epochs of linear warm-up from 0 come first (the schedule then starts). Options
    that the kind does not use are refused, so none is ignored silently.
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: unknown kind {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
    _positive("learning_rate", "lr_schedule", learning_rate)
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"lr_schedule: steps_per_epoch must be an integer >= 1, got "
                         f"{steps_per_epoch!r}")
    _check_schedule_options(kind, decay, every, milestones, horizon)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"lr_schedule: warmup must be an integer >= 0 (epochs), got {warmup!r}")
    spe = steps_per_epoch
    if kind == "constant":
        sched = optax.constant_schedule(learning_rate)
    elif kind == "cosine":
        sched = optax.cosine_decay_schedule(learning_rate, horizon * spe)
    elif kind == "exponential":
        sched = optax.exponential_decay(learning_rate, every * spe, decay, staircase=True)
    else:
        sched = optax.piecewise_constant_schedule(
            learning_rate, {m * spe: decay for m in milestones})
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup * spe), sched], [warmup * spe])
    return learning_rate if kind == "constant" else sched


def _check_schedule_options(kind: str, decay: Any, every: Any, milestones: Any,
                            horizon: Any) -> None:
    used = {"constant": (), "cosine": ("horizon",), "exponential": ("decay", "every"),
            "step": ("decay", "milestones")}[kind]
    given = {"decay": decay is not None, "every": every != 1, "milestones": bool(milestones),
             "horizon": horizon is not None}
    unused = [k for k, g in given.items() if g and k not in used]
    if unused:
        raise ValueError(f"lr_schedule: {kind!r} does not use {', '.join(unused)}; it takes "
                         f"{', '.join(used) or 'no options'}")
    if "decay" in used and (decay is None or isinstance(decay, bool)
                            or not isinstance(decay, (int, float)) or not 0 < decay <= 1):
        raise ValueError(f"lr_schedule: {kind!r} needs decay, a factor in (0, 1], got {decay!r}")
    if kind == "exponential" and (not isinstance(every, int) or every < 1):
        raise ValueError(f"lr_schedule: every must be an integer >= 1 (epochs), got {every!r}")
    if kind == "step" and (not milestones or any(not isinstance(m, int) or m < 1
                                                 for m in milestones)
                           or list(milestones) != sorted(set(milestones))):
        raise ValueError(f"lr_schedule: 'step' needs milestones, increasing epochs >= 1, got "
                         f"{milestones!r}")
    if kind == "cosine" and (not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"lr_schedule: 'cosine' needs horizon, the epochs to decay over (an "
                         f"integer >= 1), got {horizon!r}")
