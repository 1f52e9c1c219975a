r"""Target propagation: every layer regresses onto a *target* activity that learned feedback
maps (approximate inverses) carry down from an output target; no error is backpropagated.

Five rules share one machinery (`tp`, `dtp`, `drl`, `ddtp`, `ldrl`):

* Bengio (2014), "How auto-encoders could provide credit assignment in deep networks via
  target propagation", arXiv:1407.7906 (TP);
* Lee, Zhang, Fischer & Bengio (2015), "Difference target propagation", ECML-PKDD (DTP);
* Meulemans, Carzaniga, Suykens, Sacramento & Grewe (2020), "A theoretical framework for target
  propagation", NeurIPS (the difference reconstruction loss DRL, and direct DTP, DDTP);
* Ernoult, Normandin, Moudgil, Spinney, Belilovsky, Rish, Richards & Bengio (2022), "Towards
  scaling difference target propagation by learning backprop targets", ICML (L-DRL).

Notation (1-based, as in the papers). A dense `fbalign.models.mlp` with ``L`` layers computes
``h_0 = x``, ``a_l = h_{l-1} W_l + b_l``, ``h_l = f_l(a_l)``; ``h_L`` is the output, ``N`` the
batch size and ``\ell_n`` example ``n``'s loss (the harness's loss is the batch mean
``\mathcal L = \frac1N \sum_n \ell_n``). ``e = \partial \ell_n / \partial h_L = N\,
\partial\mathcal L/\partial h_L`` is the per-example output error, so targets do not depend on
the batch size.

**Output target** (every rule): ``t_L = h_L - \eta\, e`` (``\eta`` = ``target_lr``).

**Forward updates** (every rule). Layer ``l`` descends the local loss

.. math:: \mathcal L_l = \frac{1}{\eta}\,\frac1N \sum_n \tfrac12
          \| f_l(h_{l-1} W_l + b_l) - \mathrm{sg}(t_l) \|^2

at the feedforward input ``h_{l-1}``: the returned ``updates`` are ``\partial \mathcal L_l /
\partial (W_l, b_l)`` (gradient sign; ``\mathrm{sg}`` = stop-gradient), i.e. ``W_l``:
``h_{l-1}^\top \delta_l``, ``b_l``: ``\sum_n \delta_l`` with ``\delta_l = (h_l - t_l) \odot
f_l'(a_l) / (\eta N)``. The ``1/\eta`` makes the output layer's update exactly backprop's
gradient of ``\mathcal L`` and every layer's update backprop's whenever ``t_l - h_l = -\eta N
\partial\mathcal L/\partial h_l`` (e.g. DTP with transposed feedback on a linear network), so
the optimiser's learning rate means what it means for backprop.

**Feedback maps** ``g`` live in the rule state (`TargetPropState`) with their own optax state
(``feedback_optimizer`` ``"adam"`` or ``"sgd"`` at ``feedback_lr``). Every step first runs
``feedback_steps`` descent steps of the rule's feedback loss on the batch's activities (fresh
noise each iteration; `feedback_noise`), then computes the targets with the updated maps, then
the forward updates. A layer map is ``g(h) = \phi(h V + c)`` with ``\phi`` =
``inverse_activation`` (default: the network's hidden activation); DDTP-linear's is ``g(h) = h
Q``.

**Metrics** (`StepOutput.metrics`): ``recon_l``, layer ``l``'s feedback loss (the loss that
trains the map ``g_l``, evaluated at the last inner iteration, before its update; with
``feedback_steps=0`` evaluated once at the state's maps); ``angle_l`` for every hidden layer
``l``: the angle in degrees between the target displacement ``t_l - h_l`` and backprop's
``-\partial\mathcal L/\partial h_l`` (flattened over the batch; backprop's gradient is computed
for this diagnostic only); ``targets_finite``: 1.0 when every target is finite, else 0.0, and
``target_finite_l`` the same for layer ``l``'s target (the harness's ``on_nonfinite`` policy
stops on the non-finite updates that diverging targets cause, and its message names these
flags: the highest layer is where the divergence began, as targets flow down).
``diagnostics=False`` drops ``angle_l`` (and the extra ``recon_l`` evaluation at
``feedback_steps=0``) to save the backward pass.

**Conv chains.** ``tp``, ``dtp``, ``drl`` and ``ldrl`` also train `fbalign.models.sequential`
chains of Conv and Dense layers with MaxPool, AvgPool and Flatten between them, and
`fbalign.models.lenet5` (`fbalign._src.rules.target_propagation_conv`). There layer ``l`` is a
*block*, its weight layer with its activation and the pooling after it (the Flatten before a
dense layer belongs to that layer's block, so targets are reshaped at the boundary), and the
map ``g_l`` inverts the block as Ernoult et al.'s (2022) code does: ``g_l(y) =
\mathrm{reshape}(T_{V_l}(\phi_l(U_l(y))) + c_l)``, ``U_l`` un-pooling (max pooling: to the
forward pass's maxima), ``\phi_l`` the block's own activation (or ``inverse_activation``),
``T_V`` the transpose of the block's convolution (a transposed convolution) or dense map with
``V_l`` (``W_l``'s shape) in ``W_l``'s place. Targets, losses and updates are the equations
above with these blocks and maps (the squared norms summed over every axis of an example);
the updates are ``\partial\mathcal L_l/\partial(W_l, b_l)`` through the block, pooling
included. ``ddtp``'s direct maps stay dense-only. Residual networks are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbalign._src.activations import ACTIVATIONS, derivative, get_activation
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
from fbalign._src.models import MLP, require_mlp
from fbalign._src.rules.target_propagation_conv import (
    Chain,
    block_forward,
    block_vjp,
    chain_activity_grads,
    chain_forward,
    chain_forward_from,
    chain_inverse,
    chain_ldrl_loss,
    chain_reconstruction_loss,
    chain_updates,
    conv_chain,
    init_chain_inverse,
    sqnorm_mean,
)

Activation = Callable[[Array], Array]
InverseFn = Callable[[int, Array], Array]

FEEDBACK_OPTIMIZERS = ("adam", "sgd")
DDTP_FEEDBACK = ("nonlinear", "linear", "rhl")
_WHY_DDTP = ("its direct maps run from the output to every hidden layer as dense matrices; on "
             "fbalign.models.sequential chains and lenet5 use dtp, drl, ldrl or tp, whose maps "
             "invert one block at a time")


class TargetPropState(NamedTuple):
    """The target-propagation rules' state.

    Attributes:
      inverses: one dict per feedback map, ``{"w": V, "b": c}`` (``{"w": Q}`` for DDTP-linear).
        For ``tp``/``dtp``/``drl``/``ldrl`` entry ``j`` is ``g_{j+2}``, mapping ``h_{j+2}`` to
        ``h_{j+1}`` (``V`` of shape ``(n_{j+2}, n_{j+1})``); for ``ddtp`` it maps the output
        ``h_L`` to hidden layer ``j+1`` (``(n_L, n_{j+1})``). On a conv chain ``V`` has the
        shape of the block's kernel ``W_{j+2}`` (HWIO, or ``(d_in, d_out)``) and ``c`` one
        entry per input channel (unit) of that block.
      opt_state: the feedback optimiser's state, one per map.
      random_layer: DDTP-RHL only: the fixed random feedback layer ``{"w": R, "b": r}``
        (``R``: ``(n_L, D)``) shared by the direct maps; None otherwise.
    """

    inverses: tuple[dict[str, Array], ...]
    opt_state: tuple[Any, ...]
    random_layer: dict[str, Array] | None = None


# --------------------------------------------------------------------------------------------
# Pure pieces (public: tests and users compose them)
# --------------------------------------------------------------------------------------------


def _dense(layer: dict[str, Array], h: Array) -> Array:
    a = h @ layer["w"]
    return a + layer["b"] if "b" in layer else a


def feedforward(params: Params, acts: Sequence[Activation],
                x: Array) -> tuple[list[Array], list[Array]]:
    """``([h_0 = x, h_1, ..., h_L], [a_1, ..., a_L])``: activities and pre-activations."""
    hs, pre = [x], []
    for layer, f in zip(params, acts, strict=True):
        pre.append(_dense(layer, hs[-1]))
        hs.append(f(pre[-1]))
    return hs, pre


def forward_from(params: Params, acts: Sequence[Activation], h: Array, m: int) -> Array:
    """Runs layers ``m+1..L`` from an activity ``h`` standing for ``h_m``: ``f_{L}\\circ\\dots
    \\circ f_{m+1}(h)``."""
    for layer, f in zip(params[m:], acts[m:], strict=True):
        h = f(_dense(layer, h))
    return h


def apply_inverse(g: dict[str, Array], h: Array, act: Activation) -> Array:
    """A feedback map ``g(h) = \\phi(h V + c)`` (``\\phi`` = ``act``; no ``c`` when absent)."""
    return act(_dense(g, h))


def layer_targets(method: str, hs: Sequence[Array], t_out: Array, inverse: InverseFn,
                  t_last_hidden: Array | None = None) -> list[Array]:
    r"""The targets ``[t_1, ..., t_L]`` (``t_L = t_out``) from activities ``hs = [h_0, ...,
    h_L]`` and feedback maps ``inverse(l, h)``:

    * ``"tp"`` (Bengio 2014): ``t_{l-1} = g_l(t_l)``, ``l = L, ..., 2``;
    * ``"dtp"`` (Lee et al. 2015): ``t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)``;
    * ``"ddtp"`` (Meulemans et al. 2020): ``t_l = h_l + g_l(t_L) - g_l(h_L)``, ``l = 1, ...,
      L-1`` (``g_l`` maps the output to layer ``l``).

    ``t_last_hidden``: for ``"tp"``/``"dtp"``, the last hidden layer's target given directly
    (Lee et al. 2015 compute it by a gradient step); the maps then start below it.
    """
    if method not in ("tp", "dtp", "ddtp"):
        raise ValueError(f"layer_targets: method must be 'tp', 'dtp' or 'ddtp', got {method!r}")
    n = len(hs) - 1
    ts: list[Array | None] = [None] * (n + 1)
    ts[n] = t_out
    if method == "ddtp":
        g_out = inverse
        for ll in range(1, n):
            ts[ll] = hs[ll] + g_out(ll, t_out) - g_out(ll, hs[n])
        return ts[1:]  # type: ignore[return-value]
    top = n
    if t_last_hidden is not None and n >= 2:
        ts[n - 1] = t_last_hidden
        top = n - 1
    for ll in range(top, 1, -1):
        if method == "tp":
            ts[ll - 1] = inverse(ll, ts[ll])
        else:
            ts[ll - 1] = hs[ll - 1] + inverse(ll, ts[ll]) - inverse(ll, hs[ll])
    return ts[1:]  # type: ignore[return-value]


def feedback_noise(key: PRNGKey, iteration: Array | int, layer: int, shape: tuple[int, ...],
                   dtype: Any, draw: int = 0) -> Array:
    """The standard-normal noise feedback iteration ``iteration`` draws for map ``g_layer``
    (``layer`` 1-based as in the metric names; ``draw`` 0 for the input corruption ``\\epsilon``,
    1 for the second sample ``\\eta`` of DRL's damping term and of L-DRL): a pure function of the
    step key, so a run is reproducible and tests can redraw it."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), layer), draw)
    return jax.random.normal(k, shape, dtype)


def _sqnorm_mean(d: Array) -> Array:
    """Batch mean of the per-example squared norm."""
    return jnp.mean(jnp.sum(d * d, axis=-1))


def reconstruction_loss(g: dict[str, Array], phi: Activation, f_layer: Callable[[Array], Array],
                        h_prev: Array, eps: Array, sigma: float) -> Array:
    r"""TP/DTP's inverse loss (Lee et al. 2015): ``\frac1N\sum_n \|g_l(f_l(\tilde h)) -
    \tilde h\|^2`` with ``\tilde h = h_{l-1} + \sigma\epsilon`` (no gradient into ``f_l``)."""
    ht = h_prev + sigma * eps
    z = jax.lax.stop_gradient(f_layer(ht))
    return _sqnorm_mean(apply_inverse(g, z, phi) - ht)


def ldrl_loss(g: dict[str, Array], phi: Activation, f_layer: Callable[[Array], Array],
              h_prev: Array, h: Array, eps: Array, eta: Array, sigma: float) -> Array:
    r"""L-DRL, the local difference reconstruction loss of Ernoult et al. (2022):

    .. math:: \frac1N\sum_n \big[-2\, \delta x^\top\big(g(f(x + \delta x)) - g(f(x))\big)
              + \|g(y + \delta y) - g(y)\|^2\big],

    ``x = h_{l-1}``, ``y = h_l = f_l(x)``, ``\delta x = \sigma\epsilon``, ``\delta y = \sigma
    \eta``. Its expectation is ``\sigma^2(-2\,\mathrm{tr}(J_g J_f) + \|J_g\|_F^2) + O(\sigma^4)``,
    minimal at ``J_g = J_f^\top``: the map learns backprop's transpose Jacobian, not an inverse.
    """
    dx = sigma * eps
    yn = jax.lax.stop_gradient(f_layer(h_prev + dx))
    r = apply_inverse(g, h, phi)
    dr = apply_inverse(g, yn, phi) - r
    dry = apply_inverse(g, h + sigma * eta, phi) - r
    return (-2.0 * jnp.mean(jnp.sum(dx * dr, axis=-1))) + _sqnorm_mean(dry)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_common(rule: str, target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive: bool) -> None:
    if not (_is_number(target_lr) and target_lr > 0):
        raise ValueError(f"{rule}: target_lr (eta, the output target's step) must be a positive "
                         f"number, got {target_lr!r}")
    if not (_is_number(feedback_lr) and feedback_lr >= 0):
        raise ValueError(f"{rule}: feedback_lr must be a number >= 0, got {feedback_lr!r}")
    steps = feedback_steps if isinstance(feedback_steps, (tuple, list)) else [feedback_steps]
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                            for s in steps):
        raise ValueError(f"{rule}: feedback_steps must be an integer >= 0 or a sequence of them "
                         f"(one per feedback map), got {feedback_steps!r}")
    sig = noise if isinstance(noise, (tuple, list)) else [noise]
    ok = all(_is_number(s) and (s > 0 if noise_positive else s >= 0) for s in sig) and sig
    if not ok:
        need = "> 0 (the loss divides by or differences over it)" if noise_positive else ">= 0"
        raise ValueError(f"{rule}: noise (sigma) must be a number {need} or a sequence of them "
                         f"(one per feedback map), got {noise!r}")
    if feedback_optimizer not in FEEDBACK_OPTIMIZERS:
        raise ValueError(f"{rule}: feedback_optimizer must be one of "
                         f"{', '.join(FEEDBACK_OPTIMIZERS)}, got {feedback_optimizer!r}")
    if inverse_activation is not None and inverse_activation not in ACTIVATIONS:
        raise ValueError(f"{rule}: inverse_activation must be None (the network's hidden "
                         f"activation) or one of {', '.join(ACTIVATIONS)}, got "
                         f"{inverse_activation!r}")
    if not isinstance(diagnostics, bool):
        raise ValueError(f"{rule}: diagnostics must be True or False, got {diagnostics!r}")


def _per_map(value: Any, n: int, rule: str, option: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(f"{rule}: {option} has {len(value)} entries but the network has "
                             f"{n} feedback maps (one per hidden layer); pass one value or {n}")
        return tuple(value)
    return (value,) * n


# --------------------------------------------------------------------------------------------
# The shared rule
# --------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    """A rule's options, closed over by its ``init`` and ``step``."""

    name: str
    targets: str
    feedback_loss: str
    eta: float
    tx: Any
    feedback_steps: Any
    noise: Any
    inverse_activation: str | None
    diagnostics: bool
    last_hidden_by_gradient: bool
    drl_lambda: float
    linear_feedback: bool
    rhl: tuple[int, str] | None = None  # DDTP-RHL: (D, the random layer's activation)


def _maps_of(cfg: _Config, network: Any) -> tuple[int, tuple[int, ...], tuple[float, ...],
                                                   Chain | None]:
    """``(L, feedback steps per map, noise per map, chain)``; ``chain`` is None for an MLP."""
    chain = None
    if isinstance(network, MLP):
        n_layers, got = network.num_layers, f"sizes {network.sizes}"
    elif cfg.targets == "ddtp":
        require_mlp(network, cfg.name, _WHY_DDTP)  # raises: not an MLP
    else:
        chain = conv_chain(network, cfg.name)
        n_layers, got = chain.num_layers, f"kernel shapes {[b.w_shape for b in chain.blocks]}"
    if n_layers < 2:
        raise ValueError(f"rule {cfg.name!r} needs at least one hidden layer (targets are "
                         f"propagated to hidden layers); got {got}")
    steps = _per_map(cfg.feedback_steps, n_layers - 1, cfg.name, "feedback_steps")
    sig = tuple(float(s) for s in _per_map(cfg.noise, n_layers - 1, cfg.name, "noise"))
    return n_layers, steps, sig, chain


LossJ = Callable[[int, dict[str, Array], Sequence[dict[str, Array]], Array], Array]


def _train_maps(loss_j: LossJ, inverses: Sequence[dict[str, Array]], opts: Sequence[Any],
                steps: Sequence[int], tx: Any, dtype: Any
                ) -> tuple[list[dict[str, Array]], list[Any], list[Array | None]]:
    """``steps[j]`` descent steps of ``loss_j(j, g_j, inverses, iteration)`` for every map,
    maps grouped by their number of iterations (one loop per group); returns the new maps,
    optimiser states and each map's loss at its last iteration (None without iterations)."""
    inverses, opts = list(inverses), list(opts)
    recon: list[Array | None] = [None] * len(inverses)
    for count in sorted(set(steps)):
        group = [j for j in range(len(inverses)) if steps[j] == count]
        if count == 0:
            continue

        def body(it, carry, group=group):
            gs, os, _ = carry

            def total(gs_):
                cur = list(inverses)
                for j, g in zip(group, gs_, strict=True):
                    cur[j] = g
                vals = [loss_j(j, g, cur, it) for j, g in zip(group, gs_, strict=True)]
                return sum(vals), jnp.stack(vals)

            grads, vals = jax.grad(total, has_aux=True)(gs)
            new_g, new_o = [], []
            for g, o, d in zip(gs, os, grads, strict=True):
                u, o = tx.update(d, o, g)
                new_g.append(optax.apply_updates(g, u))
                new_o.append(o)
            return tuple(new_g), tuple(new_o), vals

        init = (tuple(inverses[j] for j in group), tuple(opts[j] for j in group),
                jnp.zeros((len(group),), dtype))
        if count == 1:  # no loop to compile (and eager calls run op by op)
            gs, os, vals = body(jnp.asarray(0), init)
        else:
            gs, os, vals = jax.lax.fori_loop(0, count, body, init)
        for i, j in enumerate(group):
            inverses[j], opts[j], recon[j] = gs[i], os[i], vals[i]
    return inverses, opts, recon


def _target_metrics(ts: Sequence[Array], hs: Sequence[Array], recon: Sequence[Array | None],
                    map_numbers: Sequence[int], grads_h: Sequence[Array] | None,
                    dtype: Any) -> dict[str, Array]:
    """The step's metrics (module docstring): target flags, ``recon_l``, ``angle_l``."""
    metrics: dict[str, Array] = {}
    finite_l = [jnp.all(jnp.isfinite(t)) for t in ts]
    metrics["targets_finite"] = jnp.all(jnp.stack(finite_l)).astype(dtype)
    for ll, ok in enumerate(finite_l, start=1):  # targets flow down: the highest 0 is first
        metrics[f"target_finite_{ll}"] = ok.astype(dtype)
    for j, value in enumerate(recon):
        if value is not None:
            metrics[f"recon_{map_numbers[j]}"] = value
    if grads_h is not None:
        for ll in range(1, len(ts)):
            metrics[f"angle_{ll}"] = angle_degrees(ts[ll - 1] - hs[ll], -grads_h[ll - 1])
    return metrics


def _target_rule(name: str, *, targets: str, feedback_loss: str, target_lr: float,
                 feedback_lr: float, feedback_steps: int | Sequence[int],
                 noise: float | Sequence[float], feedback_optimizer: str,
                 inverse_activation: str | None, diagnostics: bool,
                 last_hidden_by_gradient: bool = False, drl_lambda: float = 0.0,
                 linear_feedback: bool = False, rhl: tuple[int, str] | None = None
                 ) -> LearningRule:
    tx = (optax.adam(feedback_lr) if feedback_optimizer == "adam"
          else optax.sgd(feedback_lr))
    cfg = _Config(name, targets, feedback_loss, float(target_lr), tx, feedback_steps, noise,
                  inverse_activation, diagnostics, last_hidden_by_gradient, drl_lambda,
                  linear_feedback, rhl)

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> TargetPropState:
        _, _, _, chain = _maps_of(cfg, network)
        if chain is not None:
            return _chain_init(cfg, chain, key, params)
        return _mlp_init(cfg, network, key, params)

    def step_fn(params: Params, state: TargetPropState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, TargetPropState, StepOutput]:
        _, steps, sigmas, chain = _maps_of(cfg, context.network)
        if chain is not None:
            return _chain_step(cfg, chain, steps, sigmas, params, state, batch, key, context)
        return _mlp_step(cfg, steps, sigmas, params, state, batch, key, context)

    return LearningRule(init_fn, step_fn, (), name)


# --------------------------------------------------------------------------------------------
# Dense MLPs
# --------------------------------------------------------------------------------------------


def _map_number(cfg: _Config, j: int) -> int:
    """1-based layer number of map ``j``: the layer it inverts (DTP family) or the hidden
    layer it feeds (DDTP)."""
    return j + 1 if cfg.targets == "ddtp" else j + 2


def _mlp_init(cfg: _Config, network: Any, key: PRNGKey, params: Params) -> TargetPropState:
    direct = cfg.targets == "ddtp"
    n_layers, sizes = network.num_layers, network.sizes
    dtype = params[0]["w"].dtype
    keys = jax.random.split(key, n_layers)
    random_layer = None
    if cfg.rhl is not None:  # PyTorch nn.Linear's default draw, as in the authors' code
        lim = 1.0 / jnp.sqrt(jnp.asarray(sizes[-1], dtype))
        k_w, k_b = jax.random.split(keys[-1])
        random_layer = {"w": jax.random.uniform(k_w, (sizes[-1], cfg.rhl[0]), dtype, -lim, lim),
                        "b": jax.random.uniform(k_b, (cfg.rhl[0],), dtype, -lim, lim)}
    inverses = []
    for j in range(n_layers - 1):
        ll = _map_number(cfg, j)
        d_in, d_out = (sizes[-1], sizes[ll]) if direct else (sizes[ll], sizes[ll - 1])
        if random_layer and ll < n_layers - 1:
            d_in = cfg.rhl[0]
        g = {"w": jax.random.normal(keys[j], (d_in, d_out), dtype) / jnp.sqrt(
            jnp.asarray(d_in, dtype))}
        if not cfg.linear_feedback:
            g["b"] = jnp.zeros((d_out,), dtype)
        inverses.append(g)
    inverses_t = tuple(inverses)
    return TargetPropState(inverses_t, tuple(cfg.tx.init(g) for g in inverses_t), random_layer)


def random_feedback_layer(layer: dict[str, Array] | None, activation: str, n_layers: int
                          ) -> Callable[[int, Array], Array]:
    r"""``lift(l, y)``: what DDTP's direct map to hidden layer ``l`` reads of an output-space
    ``y``. DDTP-RHL (Meulemans et al. 2020; ``layer`` = ``{"w": R, "b": r}``): the fixed random
    hidden feedback layer ``z = \rho(y R + r)`` for ``l < L-1``, and ``y`` itself for the last
    hidden layer (a linear map, like the Gauss-Newton target there, as in the authors' code);
    ``y`` itself for every layer without a random layer."""
    rho = get_activation(activation)

    def lift(ll: int, y: Array) -> Array:
        if layer is None or ll >= n_layers - 1:
            return y
        return rho(_dense(layer, y))

    return lift


def _mlp_loss_fn(cfg: _Config, params: Params, acts: Sequence[Activation], phi: Activation,
                 hs: Sequence[Array], sigmas: Sequence[float], key: PRNGKey,
                 lift: Callable[[int, Array], Array]) -> LossJ:
    """``loss_j(j, g, inverses, it)``: map ``j``'s feedback loss on an MLP's activities."""
    sg = jax.lax.stop_gradient
    hs_sg = [sg(h) for h in hs]
    n_layers, out, dtype = len(params), hs[-1], hs[0].dtype
    direct, drl_lambda = cfg.targets == "ddtp", cfg.drl_lambda
    f_layer = {ll: (lambda h, ll=ll: acts[ll - 1](_dense(sg(params[ll - 1]), h)))
               for ll in range(1, n_layers + 1)}  # f_layer[l] is layer l (1-based)

    def loss_j(j: int, g: dict[str, Array], inverses: Sequence[dict[str, Array]],
               it: Array) -> Array:
        ll, sigma = _map_number(cfg, j), sigmas[j]
        shape = hs[ll].shape if direct else hs[ll - 1].shape
        eps = feedback_noise(key, it, ll, shape, dtype)
        if cfg.feedback_loss == "recon":
            return reconstruction_loss(g, phi, f_layer[ll], hs_sg[ll - 1], eps, sigma)
        if cfg.feedback_loss == "ldrl":
            eta_n = feedback_noise(key, it, ll, hs[ll].shape, dtype, draw=1)
            return ldrl_loss(g, phi, f_layer[ll], hs_sg[ll - 1], hs_sg[ll], eps, eta_n,
                             sigma)
        psg = [sg(p) for p in params]
        fixed = [sg(q) for q in inverses]
        if cfg.feedback_loss == "drl_direct":
            ht = hs_sg[ll] + sigma * eps
            y_n = forward_from(psg, acts, ht, ll)
            g_out = apply_inverse(g, lift(ll, hs_sg[-1]), phi)
            rec = hs_sg[ll] + apply_inverse(g, lift(ll, y_n), phi) - g_out
            value = _sqnorm_mean(rec - ht) / sigma**2
            if drl_lambda > 0:
                eta_n = feedback_noise(key, it, ll, out.shape, dtype, draw=1)
                d = apply_inverse(g, lift(ll, hs_sg[-1] + sigma * eta_n), phi) - g_out
                value = value + drl_lambda * _sqnorm_mean(d) / sigma**2
            return value
        # "drl": corrupt h_{l-1}, run it to the output, bring it back down with the
        # (fixed) difference maps above, then through g_l.
        ht = hs_sg[ll - 1] + sigma * eps

        def down(r: Array) -> Array:
            for k in range(n_layers, ll, -1):
                r = hs_sg[k - 1] + (apply_inverse(fixed[k - 2], r, phi)
                                    - apply_inverse(fixed[k - 2], hs_sg[k], phi))
            return hs_sg[ll - 1] + apply_inverse(g, r, phi) - apply_inverse(g, hs_sg[ll], phi)

        value = _sqnorm_mean(down(forward_from(psg, acts, ht, ll - 1)) - ht) / sigma**2
        if drl_lambda > 0:
            eta_n = feedback_noise(key, it, ll, out.shape, dtype, draw=1)
            value = value + drl_lambda * _sqnorm_mean(
                down(hs_sg[-1] + sigma * eta_n) - hs_sg[ll - 1]) / sigma**2
        return value

    return loss_j


def _mlp_step(cfg: _Config, steps: Sequence[int], sigmas: Sequence[float], params: Params,
              state: TargetPropState, batch: Batch, key: PRNGKey, context: StepContext
              ) -> tuple[Updates, TargetPropState, StepOutput]:
    network = context.network
    n_layers = network.num_layers
    direct, eta = cfg.targets == "ddtp", cfg.eta
    acts = network.activations()
    phi = ((lambda h: h) if cfg.linear_feedback
           else get_activation(cfg.inverse_activation or network.activation))
    x, y = batch.x, batch.y
    n = x.shape[0]
    hs, pre = feedforward(params, acts, x)
    out = hs[-1]
    loss_val, e_mean = jax.value_and_grad(lambda o: context.loss(o, y))(out)
    e = n * e_mean  # per-example output error
    lift = random_feedback_layer(state.random_layer, cfg.rhl[1] if cfg.rhl else "linear",
                                 n_layers)
    loss_j = _mlp_loss_fn(cfg, params, acts, phi, hs, sigmas, key, lift)

    # ---- feedback training, then the targets with the updated maps ----
    inverses, opts, recon = _train_maps(loss_j, state.inverses, state.opt_state, steps, cfg.tx,
                                        x.dtype)
    if cfg.diagnostics:
        for j in range(n_layers - 1):
            if recon[j] is None:
                recon[j] = loss_j(j, inverses[j], inverses, jnp.asarray(0))
    inv_fn = lambda ll, h: (apply_inverse(inverses[ll - 1], lift(ll, h), phi)  # noqa: E731
                            if direct else apply_inverse(inverses[ll - 2], h, phi))
    t_last = None
    if cfg.last_hidden_by_gradient:
        d_out = e * derivative(acts[-1], pre[-1])
        t_last = hs[-2] - eta * (d_out @ params[-1]["w"].T)
    sg = jax.lax.stop_gradient
    ts = [sg(t) for t in layer_targets(cfg.targets, hs, out - eta * e, inv_fn, t_last)]

    # ---- forward updates ----
    updates = []
    for ll in range(1, n_layers + 1):
        delta = (hs[ll] - ts[ll - 1]) * derivative(acts[ll - 1], pre[ll - 1]) / (eta * n)
        u = {"w": hs[ll - 1].T @ delta}
        if "b" in params[ll - 1]:
            u["b"] = jnp.sum(delta, axis=0)
        updates.append(u)

    grads_h = backprop_activity_grads(params, acts, pre, e_mean) if cfg.diagnostics else None
    metrics = _target_metrics(ts, hs, recon, [_map_number(cfg, j) for j in range(n_layers - 1)],
                              grads_h, x.dtype)
    new_state = TargetPropState(tuple(inverses), tuple(opts), state.random_layer)
    return updates, new_state, StepOutput(loss_val, out, metrics)


# --------------------------------------------------------------------------------------------
# Conv chains (`fbalign.models.sequential`, `fbalign.models.lenet5`)
# --------------------------------------------------------------------------------------------


def _chain_init(cfg: _Config, chain: Chain, key: PRNGKey, params: Params) -> TargetPropState:
    shapes = [tuple(p["w"].shape) for p in params]
    if shapes != [b.w_shape for b in chain.blocks]:
        raise ValueError(f"rule {cfg.name!r}: params have kernel shapes {shapes}, the network "
                         f"{[b.w_shape for b in chain.blocks]}")
    dtype = params[0]["w"].dtype
    keys = jax.random.split(key, chain.num_layers - 1)
    inverses = tuple(init_chain_inverse(k, b, dtype)
                     for k, b in zip(keys, chain.blocks[1:], strict=True))
    return TargetPropState(inverses, tuple(cfg.tx.init(g) for g in inverses))


def _chain_phis(cfg: _Config, chain: Chain) -> list[Activation]:
    if cfg.inverse_activation is not None:
        return [get_activation(cfg.inverse_activation)] * chain.num_layers
    return [b.activation for b in chain.blocks]


def _chain_loss_fn(cfg: _Config, chain: Chain, params: Params, hs: Sequence[Array],
                   routes: Sequence[Any], sigmas: Sequence[float], key: PRNGKey) -> LossJ:
    """``loss_j(j, g, inverses, it)``: map ``g_{j+2}``'s feedback loss on a chain."""
    sg = jax.lax.stop_gradient
    hs, params = [sg(h) for h in hs], [sg(p) for p in params]
    phis, n_layers, dtype = _chain_phis(cfg, chain), chain.num_layers, hs[0].dtype

    def inv(ll: int, g: dict[str, Array]) -> Callable[[Array, Any], Array]:
        return lambda y, r: chain_inverse(chain.blocks[ll - 1], g, y, r, phis[ll - 1])

    def f_block(ll: int) -> Callable[[Array], Any]:
        return lambda h: block_forward(chain.blocks[ll - 1], params[ll - 1], h)

    def loss_j(j: int, g: dict[str, Array], inverses: Sequence[dict[str, Array]],
               it: Array) -> Array:
        ll, sigma = j + 2, sigmas[j]
        eps = feedback_noise(key, it, ll, hs[ll - 1].shape, dtype)
        if cfg.feedback_loss == "recon":
            return chain_reconstruction_loss(inv(ll, g), f_block(ll), hs[ll - 1], eps, sigma)
        if cfg.feedback_loss == "ldrl":
            eta_n = feedback_noise(key, it, ll, hs[ll].shape, dtype, draw=1)
            return chain_ldrl_loss(inv(ll, g), f_block(ll), hs[ll - 1], hs[ll], routes[ll - 1],
                                   eps, eta_n, sigma)
        fixed = [sg(q) for q in inverses]

        def down(r: Array) -> Array:  # DRL: the difference maps above (fixed), then g_l
            for k in range(n_layers, ll - 1, -1):
                gk = inv(k, g if k == ll else fixed[k - 2])
                r = hs[k - 1] + gk(r, routes[k - 1]) - gk(hs[k], routes[k - 1])
            return r

        ht = hs[ll - 1] + sigma * eps
        value = sqnorm_mean(down(chain_forward_from(chain, params, ht, ll - 1)) - ht) / sigma**2
        if cfg.drl_lambda > 0:
            eta_n = feedback_noise(key, it, ll, hs[-1].shape, dtype, draw=1)
            value = value + cfg.drl_lambda * sqnorm_mean(
                down(hs[-1] + sigma * eta_n) - hs[ll - 1]) / sigma**2
        return value

    return loss_j


def _chain_step(cfg: _Config, chain: Chain, steps: Sequence[int], sigmas: Sequence[float],
                params: Params, state: TargetPropState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, TargetPropState, StepOutput]:
    hs, routes = chain_forward(chain, params, batch.x)
    n, out, n_maps = hs[0].shape[0], hs[-1], chain.num_layers - 1
    loss_val, e_mean = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
    e = n * e_mean  # per-example output error
    loss_j = _chain_loss_fn(cfg, chain, params, hs, routes, sigmas, key)
    inverses, opts, recon = _train_maps(loss_j, state.inverses, state.opt_state, steps, cfg.tx,
                                        out.dtype)
    if cfg.diagnostics:
        for j in range(n_maps):
            if recon[j] is None:
                recon[j] = loss_j(j, inverses[j], inverses, jnp.asarray(0))
    phis = _chain_phis(cfg, chain)
    inv_fn = lambda ll, h: chain_inverse(  # noqa: E731
        chain.blocks[ll - 1], inverses[ll - 2], h, routes[ll - 1], phis[ll - 1])
    t_last = None
    if cfg.last_hidden_by_gradient:
        t_last = hs[-2] - cfg.eta * block_vjp(chain.blocks[-1], params[-1], hs[-2], e)
    sg = jax.lax.stop_gradient
    ts = [sg(t) for t in layer_targets(cfg.targets, hs, out - cfg.eta * e, inv_fn, t_last)]
    updates = chain_updates(chain, params, hs, ts, cfg.eta)
    grads_h = chain_activity_grads(chain, params, hs, e_mean) if cfg.diagnostics else None
    metrics = _target_metrics(ts, hs, recon, [j + 2 for j in range(n_maps)], grads_h,
                              out.dtype)
    new_state = TargetPropState(tuple(inverses), tuple(opts))
    return updates, new_state, StepOutput(loss_val, out, metrics)


def backprop_activity_grads(params: Params, acts: Sequence[Activation], pre: Sequence[Array],
                            e_mean: Array) -> list[Array]:
    """Backprop's ``[\\partial\\mathcal L/\\partial h_1, ..., \\partial\\mathcal L/\\partial
    h_{L-1}]`` from ``e_mean = \\partial\\mathcal L/\\partial h_L`` (a diagnostic)."""
    n_layers = len(params)
    grads: list[Array] = [None] * (n_layers - 1)  # type: ignore[list-item]
    g = e_mean
    for ll in range(n_layers, 1, -1):
        g = (g * derivative(acts[ll - 1], pre[ll - 1])) @ params[ll - 1]["w"].T
        grads[ll - 2] = g
    return grads


def angle_degrees(a: Array, b: Array) -> Array:
    """The angle in degrees between ``a`` and ``b`` flattened (90 when either is zero)."""
    a, b = jnp.ravel(a), jnp.ravel(b)
    tiny = jnp.finfo(a.dtype).tiny
    cos = jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), tiny)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------

_COMMON_ARGS = """\
      target_lr: ``\\eta``, the output target's step along ``-e`` (> 0).
      feedback_lr: the feedback optimiser's learning rate (>= 0; 0 freezes the maps).
      feedback_steps: feedback iterations per training step, one value or one per map.
      noise: ``\\sigma``, the corruption's standard deviation, one value or one per map.
      feedback_optimizer: ``"adam"`` or ``"sgd"`` (``optax.adam``/``optax.sgd`` at
        ``feedback_lr``).
      inverse_activation: ``\\phi`` of the maps ``g(h) = \\phi(hV + c)``; None: the network's
        hidden activation (a name from ``fbalign.models.ACTIVATIONS``). On a conv chain
        ``\\phi`` comes before the map's linear part, ``g(y) = T_V(\\phi(U(y))) + c``, and None
        means each block's own activation.
      diagnostics: report ``angle_l`` (costs one backward pass) and ``recon_l`` at
        ``feedback_steps=0``.
"""

_RETURNS = """
    Returns:
      A `LearningRule` with `TargetPropState`; it trains dense `fbalign.models.mlp` networks
      and (all but ``ddtp``) `fbalign.models.sequential` conv chains and
      `fbalign.models.lenet5` (module docstring), with at least one hidden layer; any other
      network (a residual one, say) raises a `TypeError` at ``init`` naming the reason.
"""


def _doc(fn: Callable) -> Callable:
    doc = (fn.__doc__ or "").replace("    {common}\n", _COMMON_ARGS)
    fn.__doc__ = doc.rstrip() + "\n" + _RETURNS
    return fn


@_doc
def tp(target_lr: float = 0.1, feedback_lr: float = 1e-3,
       feedback_steps: int | Sequence[int] = 1,
       noise: float | Sequence[float] = 0.1, feedback_optimizer: str = "adam",
       inverse_activation: str | None = None, diagnostics: bool = True) -> LearningRule:
    r"""Target propagation (Bengio 2014, "How auto-encoders could provide credit assignment in
    deep networks via target propagation"; as run by Lee et al. 2015).

    Targets ``t_L = h_L - \eta e``, ``t_{l-1} = g_l(t_l)`` (`layer_targets` ``"tp"``); the
    inverses ``g_l`` (``l = 2..L``) descend the noise-corrupted reconstruction loss
    (`reconstruction_loss`) ``\frac1N\sum_n\|g_l(f_l(h_{l-1} + \sigma\epsilon)) - (h_{l-1} +
    \sigma\epsilon)\|^2``; forward layers descend ``\frac{1}{\eta N}\sum_n \tfrac12\|h_l -
    t_l\|^2`` (module docstring). An imperfect inverse adds its reconstruction error ``g_l(h_l)
    - h_{l-1}`` to every target, which DTP removes.

    Args:
    {common}
    """
    _check_common("tp", target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive=False)
    return _target_rule("tp", targets="tp", feedback_loss="recon", target_lr=target_lr,
                        feedback_lr=feedback_lr, feedback_steps=feedback_steps, noise=noise,
                        feedback_optimizer=feedback_optimizer,
                        inverse_activation=inverse_activation, diagnostics=diagnostics)


def _check_bool(rule: str, option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{rule}: {option} must be True or False, got {value!r}")


@_doc
def dtp(target_lr: float = 0.1, feedback_lr: float = 1e-3,
        feedback_steps: int | Sequence[int] = 1,
        noise: float | Sequence[float] = 0.1, feedback_optimizer: str = "adam",
        inverse_activation: str | None = None, diagnostics: bool = True,
        last_hidden_by_gradient: bool = False) -> LearningRule:
    r"""Difference target propagation (Lee, Zhang, Fischer & Bengio 2015, "Difference target
    propagation").

    Targets ``t_L = h_L - \eta e`` and the difference correction

    .. math:: t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l), \quad l = L, \dots, 2,

    which cancels the inverse's reconstruction error (``t_l = h_l`` gives ``t_{l-1} =
    h_{l-1}``). With ``last_hidden_by_gradient`` the last hidden layer's target is a gradient
    step, ``t_{L-1} = h_{L-1} - \eta N \partial\mathcal L/\partial h_{L-1}``, as in the paper's
    experiments. Inverses descend the noise-corrupted reconstruction loss (as `tp`).

    Args:
    {common}
      last_hidden_by_gradient: compute ``t_{L-1}`` by the gradient step above.
    """
    _check_common("dtp", target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive=False)
    _check_bool("dtp", "last_hidden_by_gradient", last_hidden_by_gradient)
    return _target_rule("dtp", targets="dtp", feedback_loss="recon", target_lr=target_lr,
                        feedback_lr=feedback_lr, feedback_steps=feedback_steps, noise=noise,
                        feedback_optimizer=feedback_optimizer,
                        inverse_activation=inverse_activation, diagnostics=diagnostics,
                        last_hidden_by_gradient=last_hidden_by_gradient)


def _check_lambda(rule: str, drl_lambda: Any) -> None:
    if not (_is_number(drl_lambda) and drl_lambda >= 0):
        raise ValueError(f"{rule}: drl_lambda (the damping term's weight) must be a number >= 0, "
                         f"got {drl_lambda!r}")


@_doc
def drl(target_lr: float = 0.1, feedback_lr: float = 1e-3,
        feedback_steps: int | Sequence[int] = 1,
        noise: float | Sequence[float] = 0.1, feedback_optimizer: str = "adam",
        inverse_activation: str | None = None, diagnostics: bool = True,
        drl_lambda: float = 0.0, last_hidden_by_gradient: bool = False) -> LearningRule:
    r"""DTP with the difference reconstruction loss (Meulemans, Carzaniga, Suykens, Sacramento
    & Grewe 2020, "A theoretical framework for target propagation"; "DTPDRL").

    Targets as `dtp`. The map ``g_l`` (``l = 2..L``) descends the DRL: corrupt ``\tilde h =
    h_{l-1} + \sigma\epsilon``, run it to the output ``\tilde y = f_{L}\circ\dots\circ
    f_l(\tilde h)``, bring it back down with the difference maps above (held fixed),
    ``r_L = \tilde y``, ``r_{k-1} = h_{k-1} + g_k(r_k) - g_k(h_k)`` for ``k = L..l+1``, and

    .. math:: \mathcal L^{rec}_l = \frac{1}{\sigma^2}\frac1N\sum_n
              \| h_{l-1} + g_l(r_l) - g_l(h_l) - \tilde h \|^2
              + \frac{\lambda}{\sigma^2}\frac1N\sum_n \| g^{diff}_{L\to l-1}(h_L + \sigma\eta)
              - h_{l-1}\|^2 .

    The first term trains the whole difference path from the output to layer ``l-1`` to invert
    the forward path (for small ``\sigma`` its Jacobian approaches the pseudo-inverse of the
    forward Jacobian, so the targets approach Gauss-Newton targets even for non-invertible
    networks); the second (``drl_lambda`` ``\lambda``, default 0 as in the authors' DTPDRL
    code) damps it towards ``J^\top(JJ^\top + \lambda I)^{-1}``. The squared norm is summed over
    units (the authors' code takes the mean over units: a constant factor).

    Args:
    {common}
      drl_lambda: ``\lambda`` >= 0.
      last_hidden_by_gradient: as in `dtp`.
    """
    _check_common("drl", target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive=True)
    _check_lambda("drl", drl_lambda)
    _check_bool("drl", "last_hidden_by_gradient", last_hidden_by_gradient)
    return _target_rule("drl", targets="dtp", feedback_loss="drl", target_lr=target_lr,
                        feedback_lr=feedback_lr, feedback_steps=feedback_steps, noise=noise,
                        feedback_optimizer=feedback_optimizer,
                        inverse_activation=inverse_activation, diagnostics=diagnostics,
                        last_hidden_by_gradient=last_hidden_by_gradient,
                        drl_lambda=float(drl_lambda))


@_doc
def ddtp(target_lr: float = 0.1, feedback_lr: float = 1e-3,
         feedback_steps: int | Sequence[int] = 1,
         noise: float | Sequence[float] = 0.1, feedback_optimizer: str = "adam",
         inverse_activation: str | None = None, diagnostics: bool = True,
         feedback: str = "linear", drl_lambda: float = 0.0,
         hidden_feedback_dimension: int = 1024,
         hidden_feedback_activation: str = "tanh") -> LearningRule:
    r"""Direct difference target propagation (Meulemans et al. 2020, "A theoretical framework
    for target propagation"; DDTP-linear with ``feedback="linear"``).

    Feedback maps run from the output straight to each hidden layer ``l = 1..L-1``:

    .. math:: t_l = h_l + g_l(t_L) - g_l(h_L),

    ``g_l(y) = y Q_l`` (``"linear"``: DDTP-linear), ``\phi(y Q_l + c_l)`` (``"nonlinear"``) or
    (``"rhl"``: DDTP-RHL) ``g_l(y) = \rho(y R + r)\, Q_l`` through a fixed random hidden
    feedback layer ``R`` ``(n_L, D)``, ``r`` (PyTorch ``nn.Linear``'s uniform draw, never
    trained; `TargetPropState.random_layer`) shared by all the layers, which blows the output's
    few dimensions up to ``D``; the last hidden layer keeps the linear ``y Q_{L-1}`` (the
    authors' code: its Gauss-Newton target is a linear map of the output's).
    ``g_l`` descends the direct DRL: corrupt ``\tilde h = h_l + \sigma\epsilon``, run it to the
    output ``\tilde y = f_L\circ\dots\circ f_{l+1}(\tilde h)``, and

    .. math:: \mathcal L^{rec}_l = \frac{1}{\sigma^2}\frac1N\sum_n
              \| h_l + g_l(\tilde y) - g_l(h_L) - \tilde h\|^2
              + \frac{\lambda}{\sigma^2}\frac1N\sum_n \| g_l(h_L + \sigma\eta) - g_l(h_L)\|^2 .

    For DDTP-linear and small ``\sigma`` the minimiser is ``Q_l = J^\top(JJ^\top +
    \lambda I)^{-1}`` averaged over the batch (``J`` the Jacobian of the output wrt ``h_l``):
    with ``\lambda = 0`` Gauss-Newton targets (Meulemans et al.'s analysis). Dense MLPs only:
    on a conv chain use `dtp`, `drl` or `ldrl`, whose maps invert one block at a time.

    Args:
    {common}
      feedback: ``"linear"`` (DDTP-linear, the default), ``"nonlinear"`` or ``"rhl"``
        (DDTP-RHL).
      drl_lambda: ``\lambda`` >= 0.
      hidden_feedback_dimension: ``D``, the random layer's width (``"rhl"``; the paper: 1024).
      hidden_feedback_activation: ``\rho`` (``"rhl"``; the authors' default ``"tanh"``).
    """
    _check_common("ddtp", target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive=True)
    if feedback not in DDTP_FEEDBACK:
        raise ValueError(f"ddtp: feedback must be one of {', '.join(DDTP_FEEDBACK)}, got "
                         f"{feedback!r}")
    _check_lambda("ddtp", drl_lambda)
    rhl = None
    if feedback == "rhl":
        if (isinstance(hidden_feedback_dimension, bool)
                or not isinstance(hidden_feedback_dimension, int)
                or hidden_feedback_dimension < 1):
            raise ValueError("ddtp: hidden_feedback_dimension (the random feedback layer's width "
                             f"D) must be a positive int, got {hidden_feedback_dimension!r}")
        try:
            get_activation(hidden_feedback_activation)
        except ValueError as err:
            raise ValueError(f"ddtp: hidden_feedback_activation: {err}") from None
        rhl = (hidden_feedback_dimension, hidden_feedback_activation)
    return _target_rule("ddtp", targets="ddtp", feedback_loss="drl_direct", target_lr=target_lr,
                        feedback_lr=feedback_lr, feedback_steps=feedback_steps, noise=noise,
                        feedback_optimizer=feedback_optimizer,
                        inverse_activation=inverse_activation, diagnostics=diagnostics,
                        drl_lambda=float(drl_lambda),
                        linear_feedback=feedback in ("linear", "rhl"), rhl=rhl)


@_doc
def ldrl(target_lr: float = 0.1, feedback_lr: float = 1e-3,
         feedback_steps: int | Sequence[int] = 1, noise: float | Sequence[float] = 0.1,
         feedback_optimizer: str = "adam", inverse_activation: str | None = None,
         diagnostics: bool = True, last_hidden_by_gradient: bool = False) -> LearningRule:
    r"""DTP with the local difference reconstruction loss L-DRL (Ernoult et al. 2022, "Towards
    scaling difference target propagation by learning backprop targets").

    Targets as `dtp`, ``t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)``. Each map ``g_l`` descends
    `ldrl_loss`,

    .. math:: \frac1N\sum_n\big[-2\,\delta x^\top(g_l(f_l(h_{l-1} + \delta x)) - g_l(h_l))
              + \|g_l(h_l + \delta y) - g_l(h_l)\|^2\big], \quad \delta x, \delta y \sim
              \mathcal N(0, \sigma^2 I),

    whose minimum is ``J_{g_l} = J_{f_l}^\top`` (to ``O(\sigma^2)``): the difference targets
    then become backprop's, ``t_l - h_l \approx -\eta N \partial\mathcal L/\partial h_l``. As in
    the paper every layer can have its own number of feedback iterations and noise scale
    (``feedback_steps``/``noise`` as a sequence, lowest map first); layers are trained
    independently (the loss is local). The paper's loss is not divided by ``\sigma^2``, so its
    size scales with ``\sigma^2``.

    Args:
    {common}
      last_hidden_by_gradient: as in `dtp`.
    """
    _check_common("ldrl", target_lr, feedback_lr, feedback_steps, noise, feedback_optimizer,
                  inverse_activation, diagnostics, noise_positive=True)
    _check_bool("ldrl", "last_hidden_by_gradient", last_hidden_by_gradient)
    return _target_rule("ldrl", targets="dtp", feedback_loss="ldrl", target_lr=target_lr,
                        feedback_lr=feedback_lr, feedback_steps=feedback_steps, noise=noise,
                        feedback_optimizer=feedback_optimizer,
                        inverse_activation=inverse_activation, diagnostics=diagnostics,
                        last_hidden_by_gradient=last_hidden_by_gradient)
