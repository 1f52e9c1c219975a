r"""Activation relaxation: after the feedforward pass, activities relax to backprop's adjoints
under local leaky dynamics; weights then learn from the relaxed activities.

Millidge, Tschantz, Seth & Buckley (2020), "Activation relaxation: a local dynamical
approximation to backpropagation in the brain" (arXiv:2009.05359); Millidge, Tschantz, Seth &
Buckley (2020), "Investigating the scalability and biological plausibility of the activation
relaxation algorithm" (arXiv:2010.06219).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbalign._src.activations import derivative as f_prime
from fbalign._src.activations import get_activation
from fbalign._src.base import (
    Array,
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Tape,
    Updates,
)
from fbalign._src.models import matmul
from fbalign._src.relax import relax

Activation = Callable[[Array], Array]



class ActivationRelaxationState(NamedTuple):
    """``feedback[l]``: the learned backward weights ``B_l`` of layer ``l``, shaped like ``W_l``
    (``(din, dout)`` for a dense layer: the activity travels down as ``x @ B_l.T``, so ``B_l =
    W_l`` is the paper's ``B = W^T``; an HWIO kernel for a conv layer, the activity travelling
    down by the transposed convolution with ``B_l``). ``feedback[0]`` is None unless
    ``frozen_forward=False`` (then the input units relax too, through ``B_0``). Without
    ``learn_backward`` the tuple is empty and ``W_l`` itself carries the relaxation."""

    feedback: tuple[Array | None, ...] = ()


def relaxation_targets(xs: Sequence[Array], top: Array, derivs: Sequence[Array],
                       backward: Sequence[Array]) -> list[Array]:
    r"""The fixed-point map of the dynamics on a dense chain: ``T_l(x) = (x_{l+1} \odot
    f'(a_{l+1})) B_{l+1}^\top`` for every hidden layer (``x_L = top``, the clamped output
    error), with ``B = W`` for the paper's rule. ``xs[j]`` is hidden layer ``j``'s activity
    (layer ``j+1`` counting the input as 0), ``derivs[j]`` and ``backward[j]`` belong to weight
    layer ``j``."""
    above = [*xs, top]
    return [(above[j + 1] * derivs[j + 1]) @ backward[j + 1].T for j in range(len(xs))]


def _half_squared(xs: Sequence[Array], targets: Sequence[Array], dtype: Any) -> Array:
    sg = jax.lax.stop_gradient
    return sum((0.5 * jnp.sum((x - sg(t)) ** 2) for x, t in zip(xs, targets, strict=True)),
               jnp.zeros((), dtype))


def relaxation_energy(xs: Sequence[Array], top: Array, derivs: Sequence[Array],
                      backward: Sequence[Array]) -> Array:
    r"""``E(x) = \sum_l \tfrac12 \|x_l - \mathrm{sg}(T_l(x))\|^2`` (``sg``: stop-gradient).

    The paper's dynamics ``dx_l/dt = -x_l + T_l(x)`` are not a gradient flow (layer ``l``
    feels layer ``l+1``, not the reverse: the Jacobian is block triangular), so no energy has
    them as its exact gradient. This one does by construction: ``\partial E / \partial x_l =
    x_l - T_l(x) = -dx_l/dt``, so descent with step ``\eta`` is the paper's Euler step, and its
    value is half the squared residual (zero exactly at the fixed point).
    """
    return _half_squared(xs, relaxation_targets(xs, top, derivs, backward), top.dtype)


def _angle(a: Array, b: Array) -> Array:
    a, b = jnp.ravel(a), jnp.ravel(b)
    cos = jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def _check_options(steps: int, step_size: float, tol: float | None, backward_lr: float,
                   backward_decay: float, derivative: bool, frozen_forward: bool) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"activation_relaxation: steps must be a positive integer (the "
                         f"relaxation steps), got {steps!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or step_size <= 0:
        raise ValueError(f"activation_relaxation: step_size must be a positive number, got "
                         f"{step_size!r}")
    if step_size >= 2:
        raise ValueError(f"activation_relaxation: step_size must be below 2 (the relaxation "
                         f"contracts by |1 - step_size| per step), got {step_size!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"activation_relaxation: tol must be positive or None, got {tol!r}")
    if not backward_lr > 0 or not backward_decay >= 0:
        raise ValueError(f"activation_relaxation: backward_lr must be positive and "
                         f"backward_decay non-negative, got {backward_lr!r}, {backward_decay!r}")
    for option, value in (("derivative", derivative), ("frozen_forward", frozen_forward)):
        if not isinstance(value, bool):
            raise TypeError(f"activation_relaxation: {option} must be True or False, got "
                            f"{value!r}")
    if not frozen_forward and not derivative:
        raise ValueError("activation_relaxation: frozen_forward=False re-evaluates f' at the "
                         "relaxing activities, derivative=False drops f' altogether: together "
                         "frozen_forward has nothing to unfreeze; pass derivative=False alone")


_CHAINS = ("fbalign.models.mlp, fbalign.models.lenet5, or fbalign.models.sequential of Dense, "
           "Conv, MaxPool, AvgPool and Flatten layers")


def require_chain(network: Any, rule: str = "activation_relaxation") -> None:
    """Raises a `TypeError` naming ``rule`` unless ``network`` is a layered fbalign network
    whose ``forward`` records a chain `Tape` (MLP, LeNet-5, a `sequential` chain): AR's
    dynamics relax each layer's input towards what the layer above sends down through it."""
    forward = getattr(network, "forward", None)
    if getattr(network, "layer_structure", False) is True and callable(forward):
        return
    if getattr(network, "residual", False) is True:
        raise TypeError(
            f"rule {rule!r} needs a chain of layers that records a Tape; this residual "
            f"{type(network).__name__} records none: its skip paths (h = f(x + F(x))) send "
            "activity around the layers, while AR relaxes each layer's input towards what the "
            f"single layer above sends down. Use a chain ({_CHAINS}), or train the residual "
            "network with a rule that has a jax.grad form (bp, fa, dfa, kp, ...)")
    raise TypeError(
        f"rule {rule!r} needs a layered fbalign network whose forward records a chain Tape "
        f"({_CHAINS}): its dynamics are stated layer by layer on op(x, W) + b; got "
        f"{type(network).__name__}, which records none")


def _layer_activations(network: Any, n: int) -> list[Activation]:
    """Each weight layer's activation ``f_l`` (the tape records ``f'(a_l)``, not ``f``), which
    ``frozen_forward=False`` evaluates anew at the relaxing activities."""
    acts = getattr(network, "activations", None)
    if callable(acts):  # the MLP
        fs = list(acts())
    elif isinstance(getattr(network, "layers", None), tuple):  # a sequential chain
        fs = [get_activation(layer.activation) for layer in network.layers
              if hasattr(layer, "features")]
    elif isinstance(getattr(network, "activation", None), str):  # LeNet-5: linear logits
        fs = [get_activation(network.activation)] * (n - 1) + [get_activation("linear")]
    else:
        fs = []
    if len(fs) != n:
        raise TypeError(f"activation_relaxation(frozen_forward=False) needs each layer's "
                        f"activation function and cannot read {n} from "
                        f"{type(network).__name__}; use {_CHAINS}")
    return fs


def _first(vjp_fn: Callable) -> Callable[[Array], Array]:
    return lambda v: vjp_fn(v)[0]


def _identity(x: Array) -> Array:
    return x


def _chain_maps(tape: Tape, back: Sequence[Array | None], lo: int
                ) -> tuple[list[Callable | None], list[Callable]]:
    """``down[i](delta)``: layer ``i``'s ``delta`` sent to its input ``x_i`` through
    ``back[i]`` (``delta @ back[i].T`` on a dense chain, else the transpose of ``op_i(., back[i])``,
    the transposed convolution for a conv layer); ``route[i](x)``: the error at ``h_i`` from
    layer ``i+1``'s relaxed input ``x`` (the VJP of the pooling/flattening between them at
    the feedforward ``h_i``: max pooling routes to each window's maximum)."""
    n = tape.num_layers
    if tape.links is None:
        down = [None if i < lo else (lambda d, m=back[i]: d @ m.T) for i in range(n)]
        return down, [_identity] * (n - 1)
    down = [None] * lo
    for i in range(lo, n):
        op = tape.links.ops[i]
        down.append(_first(jax.vjp(lambda x, op=op, m=back[i]: op(x, m), tape.inputs[i])[1]))
    route = []
    for i in range(n - 1):
        g = tape.links.between[i + 1]
        route.append(_identity if g is None else _first(jax.vjp(g, tape.activity(i))[1]))
    return down, route


class _Relaxation(NamedTuple):
    """What one step's dynamics need: the relaxing layers ``lo..n-1``, the maps between them,
    and ``derivs(full)``: each layer's ``f'`` given the layer inputs ``full`` (None below
    ``lo``: the data)."""

    lo: int
    top: Array
    down: list
    route: list
    derivs: Callable[[list], list]

    def full(self, xs: Sequence[Array]) -> list:
        return [None] * self.lo + list(xs)

    def errors(self, full: Sequence[Array]) -> list[Array]:
        """``e_i``: the error at layer ``i``'s output ``h_i`` (the clamped ``top`` for the
        last layer)."""
        return [r(full[i + 1]) for i, r in enumerate(self.route)] + [self.top]

    def targets(self, xs: Sequence[Array]) -> list[Array]:
        full = self.full(xs)
        e, d = self.errors(full), self.derivs(full)
        return [self.down[i](e[i] * d[i]) for i in range(self.lo, len(e))]

    def energy(self, xs: Sequence[Array]) -> Array:
        """`relaxation_energy` on this chain; its targets are computed from stopped states,
        so that ``jax.grad`` traces no derivative of them (the same values and gradient
        ``x - T(x)``, a smaller program: with ``frozen_forward=False`` the targets hold the
        layers' forward ops)."""
        return _half_squared(xs, self.targets([jax.lax.stop_gradient(x) for x in xs]),
                             self.top.dtype)


def _make_relaxation(network: Any, tape: Tape, params: Params, top: Array,
                     back: Sequence[Array | None], use_derivative: bool, frozen: bool
                     ) -> _Relaxation:
    n, lo = tape.num_layers, 1 if frozen else 0
    down, route = _chain_maps(tape, back, lo)
    if not use_derivative:
        ones = [jnp.ones_like(d) for d in tape.derivs]
        return _Relaxation(lo, top, down, route, lambda full: ones)
    if frozen:
        return _Relaxation(lo, top, down, route, lambda full: list(tape.derivs))
    acts = _layer_activations(network, n)
    ops = tape.links.ops if tape.links is not None else (matmul,) * n

    def unfrozen(full):  # f'(op_l(x_l(t), W_l) + b_l) at the current inputs
        out = []
        for x, p, f, op in zip(full, params, acts, ops, strict=True):
            a = op(x, p["w"])
            out.append(f_prime(f, a + p["b"] if "b" in p else a))
        return out

    return _Relaxation(lo, top, down, route, unfrozen)


def _init_feedback(key: PRNGKey, params: Params, lo: int) -> ActivationRelaxationState:
    """``B_l ~ N(0, 1/fan_in)`` shaped like ``W_l`` (fan-in ``din``, or ``kh kw cin`` for a
    conv kernel) for the layers that send activity down (``l >= lo``)."""
    keys = jax.random.split(key, len(params))
    fb = [None] * lo + [
        jax.random.normal(k, p["w"].shape, p["w"].dtype)
        / jnp.sqrt(math.prod(p["w"].shape[:-1])).astype(p["w"].dtype)
        for k, p in zip(keys[lo:], params[lo:], strict=True)]
    return ActivationRelaxationState(tuple(fb))


def activation_relaxation(steps: int = 100, step_size: float = 0.1, tol: float | None = None, *,
                          derivative: bool = True, learn_backward: bool = False,
                          backward_lr: float = 0.01, backward_decay: float = 0.0,
                          frozen_forward: bool = True) -> LearningRule:
    r"""Activation relaxation (AR; Millidge et al. 2020) on any chain of layers that records a
    `Tape`: `fbalign.models.mlp`, `fbalign.models.lenet5`, `fbalign.models.sequential` chains.

    Layer ``l`` computes ``a_l = op_l(x_l, W_l) + b_l``, ``h_l = f_l(a_l)`` and the next input
    ``x_{l+1} = g_{l+1}(h_l)`` (``op``: ``x @ W`` or a convolution; ``g``: pooling,
    flattening, or the identity on a dense chain). After the feedforward pass (``\bar x_l``,
    ``\bar a_l`` stored), the output error is clamped, ``e_L = \partial\mathcal{L}/\partial
    h_L``, and the inputs of the hidden layers, starting from ``x_l = \bar x_l``, follow

    .. math:: dx_l/dt = -x_l + \mathrm{op}_l^\top\big(e_l \odot f_l'(\bar a_l);\ W_l\big),
              \qquad e_l = g_{l+1}'^\top(x_{l+1}),

    where ``\mathrm{op}^\top(\delta; W)`` is the transpose of ``op(., W)`` at ``\delta``
    (``\delta W^\top`` on a dense layer, the transposed convolution on a conv layer) and
    ``g'^\top`` the transpose of the pooling's Jacobian at ``\bar h_l`` (max pooling routes to
    each window's maximum, as in the authors' CNN code): on a dense chain ``dx_l/dt = -x_l +
    (x_{l+1} \odot f'(\bar a_{l+1})) W_{l+1}^\top`` with the indices of the paper. Euler steps
    of size ``\eta`` (`relax` on ``\sum_l \frac12 \|x_l - \mathrm{sg}(T_l(x))\|^2``, whose
    gradient is exactly ``-dx/dt``). The fixed point is backprop's adjoint ``x_l^* =
    \partial\mathcal{L}/\partial x_l``; the error of the top layer decays as ``(1-\eta)^t``, of
    layer ``L-1-k`` as ``O(t^k (1-\eta)^{t-k})``, and ``\eta = 1`` is exact after ``L-1``
    steps. The updates (gradient sign) are ``\Delta W_l = \mathrm{op}_l(\bar x_l, .)^\top
    (\delta_l)`` with ``\delta_l = e_l \odot f_l'(\bar a_l)`` (``\bar x_l^\top \delta_l`` on a
    dense layer; `Tape.weight_grads`), ``\Delta b_l = \sum \delta_l``: ``jax.grad`` of the
    loss once relaxed (``\mathcal{L}`` is the batch mean, so ``x`` carries the ``1/N``).

    Args:
      steps: relaxation steps (the most, with ``tol``).
      step_size: ``\eta``, in ``(0, 2)``.
      tol: stop once ``max |dx/dt| < tol``; None runs exactly ``steps`` steps.
      derivative: False drops every ``f'`` (relaxation and update; the "removing the
        nonlinear derivative" simplification of arXiv:2009.05359, tested on CNNs in
        arXiv:2010.06219): no longer backprop, still learns.
      learn_backward: relax through learned backward weights ``B_l`` (rule state, drawn ``N(0,
        1/\mathrm{fan_{in}})``, shaped like ``W_l``: kernels on conv layers) in place of
        ``W_l`` (the "learnable backwards weights" of both papers). ``B_l`` gets the forward
        weight's own update (the authors' rule, Kolen-Pollack-like): ``B_l \leftarrow (1 -
        \alpha\lambda) B_l - \alpha \Delta W_l`` with ``\alpha = `` ``backward_lr``, ``\lambda
        = `` ``backward_decay``. With ``optax.sgd(alpha)`` and the same decay on ``W``
        (``optax.add_decayed_weights``), ``W_l - B_l`` shrinks by ``1 - \alpha\lambda`` per
        step; without decay the shared updates still turn ``B_l`` towards ``W_l``.
      frozen_forward: False relaxes the "frozen feedforward pass" (arXiv:2010.06219; as in the
        authors' code, ``use_fderiv_x_update`` with ``use_fderiv_weight_update``): no unit
        keeps a stored copy of its feedforward drive, so every ``f_l'`` is evaluated at the
        current activities, ``f_l'(a_l(t))`` with ``a_l(t) = \mathrm{op}_l(x_l(t), W_l) +
        b_l``, in the dynamics and (at the relaxed state) in the update, and the input units
        relax too (``x_0``, through ``W_0`` or ``B_0``), since layer 0's ``f'`` reads them:

        .. math:: dx_l/dt = -x_l + \mathrm{op}_l^\top\big(e_l \odot f_l'(\mathrm{op}_l(x_l,
                  W_l) + b_l);\ W_l\big), \quad l = 0, \dots, L-1.

        At ``t = 0`` this is the frozen rule; at the fixed point ``x`` holds adjoints, which
        scale with the output error, so as the error shrinks ``f'(a_l(t)) \to f'(b_l)``: with
        zero biases and ``tanh`` (``f'(0) = 1``) the rule tends to ``derivative=False`` (tested;
        why it still learns). The presynaptic ``\bar x_l`` of ``\Delta W_l`` stays the
        feedforward input (the authors' separate ``use_current_x_weights`` condition, which
        multiplies two adjoints, is not offered).

    Returns:
      A `LearningRule` with an `ActivationRelaxationState`. Metrics: ``ar_steps``,
      ``ar_residual`` (``max |dx/dt|`` after relaxation) and, with ``learn_backward``,
      ``ar_backward_angle`` (degrees between ``B_l`` and ``W_l``, i.e. the paper's ``B`` and
      ``W^T``, averaged over layers).

    Raises:
      TypeError: at ``init``/``step``, for a network that records no chain `Tape` (residual
        `sequential` networks, wrapped Flax/Equinox models, plain functions, the RNN).
    """
    _check_options(steps, step_size, tol, backward_lr, backward_decay, derivative,
                   frozen_forward)
    name = "activation_relaxation"
    lo = 1 if frozen_forward else 0

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> ActivationRelaxationState:
        require_chain(network, name)
        if not learn_backward:
            return ActivationRelaxationState()
        return _init_feedback(key, params, lo)

    def step_fn(params: Params, state: ActivationRelaxationState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, ActivationRelaxationState, StepOutput]:
        del key
        require_chain(context.network, name)
        out, tape = context.network.forward(params, batch.x)
        loss_val, top = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
        back = list(state.feedback) if learn_backward else [p["w"] for p in params]
        dyn = _make_relaxation(context.network, tape, params, top, back, derivative,
                               frozen_forward)
        res = relax(dyn.energy, list(tape.inputs[lo:]), steps=steps, step_size=step_size,
                    tol=tol)
        full = dyn.full(res.state)
        deltas = [e * d for e, d in zip(dyn.errors(full), dyn.derivs(full), strict=True)]
        updates = [tape.weight_grads(i, delta, p["w"], "b" in p)
                   for i, (delta, p) in enumerate(zip(deltas, params, strict=True))]
        metrics = {"ar_steps": res.steps.astype(out.dtype), "ar_residual": res.grad_norm}
        if learn_backward:
            metrics["ar_backward_angle"] = jnp.mean(jnp.stack(
                [_angle(b, p["w"]) for b, p in zip(back[lo:], params[lo:], strict=True)]
                or [jnp.zeros((), out.dtype)]))
            state = ActivationRelaxationState(tuple(
                None if b is None else (1 - backward_lr * backward_decay) * b
                - backward_lr * u["w"] for b, u in zip(back, updates, strict=True)))
        return updates, state, StepOutput(loss_val, out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
