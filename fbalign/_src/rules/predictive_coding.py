r"""Predictive coding: inference on latent activities by descent of a prediction-error energy,
then local (Hebbian) weight updates at the relaxed activities.

Whittington & Bogacz (2017), "An approximation of the error backpropagation algorithm in a
predictive coding network with local Hebbian synaptic plasticity", Neural Computation 29(5);
Millidge, Tschantz & Buckley (2022), "Predictive coding approximates backprop along arbitrary
computation graphs", Neural Computation 34(6); Song, Lukasiewicz, Xu & Bogacz (2020), "Can the
brain do backpropagation? Exact implementation of backpropagation in predictive coding
networks", NeurIPS; Millidge, Tschantz, Seth & Buckley (2020), "Relaxing the constraints on
predictive coding models" (arXiv:2010.01047): learned or random backward weights, no backward
nonlinear derivatives, dense (learned) value-to-error connections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbalign._src.activations import derivative
from fbalign._src.base import (
    Array,
    Batch,
    EmptyState,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
    dense_grads,
)
from fbalign._src.checks import check_choice, check_number
from fbalign._src.models import require_mlp
from fbalign._src.relax import relax

Activation = Callable[[Array], Array]


_WHY = "its energy is stated layer by layer on x @ W + b"


def _preact(layer: dict[str, Array], x: Array) -> Array:
    a = x @ layer["w"]
    return a + layer["b"] if "b" in layer else a


def feedforward(params: Params, acts: Sequence[Activation],
                x: Array) -> tuple[list[Array], list[Array]]:
    """The ordinary forward pass: ``([a_1, ..., a_L], [h_1, ..., h_L])``, ``h_L`` the output."""
    preacts, outs = [], []
    for layer, f in zip(params, acts, strict=True):
        preacts.append(_preact(layer, x))
        x = f(preacts[-1])
        outs.append(x)
    return preacts, outs


def pc_energy(params: Params, acts: Sequence[Activation], inputs: Sequence[Array],
              latents: Sequence[Array], target: Array,
              loss: Callable[[Array, Array], Array], gamma: float = 1.0) -> Array:
    r"""The predictive-coding energy, summed over the batch:

    .. math:: E = \sum_{l=1}^{L-1} \tfrac12 \|z_l - f_l(u_{l-1} W_l + b_l)\|^2
                  + \gamma\, N\, \mathcal{L}(f_L(u_{L-1} W_L + b_L), y)

    where ``u = inputs`` are the presynaptic activities (``(x, z_1, ..., z_{L-1})`` for
    standard PC), ``z = latents`` the layers' activities, ``N`` the batch size and
    ``\mathcal{L}`` the batch-mean loss (so the output term is the per-example loss summed over
    the batch: ``\tfrac12 \|y - \mu_L\|^2`` summed for squared error, the classic clamped output).
    """
    n = inputs[0].shape[0]
    energy = jnp.zeros((), inputs[0].dtype)
    last = len(params) - 1
    for i, (layer, f, u) in enumerate(zip(params, acts, inputs, strict=True)):
        mu = f(_preact(layer, u))
        if i < last:
            energy = energy + 0.5 * jnp.sum((latents[i] - mu) ** 2)
        else:
            energy = energy + gamma * n * loss(mu, target)
    return energy


def fixed_prediction_energy(params: Params, acts: Sequence[Activation], preacts: Sequence[Array],
                            outs: Sequence[Array], latents: Sequence[Array], target: Array,
                            loss: Callable[[Array, Array], Array], gamma: float = 1.0) -> Array:
    r"""The energy of inference under the fixed-prediction assumption (Millidge et al. 2022).

    Its value is `pc_energy` with every prediction frozen at its feedforward value ``\mu_l =
    h_l``: ``\sum_l \tfrac12 \|z_l - h_l\|^2 + \gamma N \mathcal{L}(h_L, y)``. Its gradient is
    the fixed-prediction inference dynamics,

    .. math:: \partial E / \partial z_l = \epsilon_l + g_{l+1} W_{l+1}^\top, \quad
        g_{l+1} = -\epsilon_{l+1} \odot f'(a_{l+1}) \ (l+1 < L), \quad
        g_L = \gamma N\, \partial\mathcal{L}/\partial h_L \odot f'(a_L),

    with ``\epsilon_l = z_l - h_l`` and ``a`` the feedforward pre-activations. These dynamics are
    not a gradient flow (layer ``l`` feels layer ``l+1``'s error, not the reverse), so the
    coupling enters as ``c - stop_gradient(c)`` with ``c = \sum_l \langle z_l,
    stop\_gradient(g_{l+1}) W_{l+1}^\top \rangle``: zero in value, the dynamics in gradient.
    """
    n = outs[0].shape[0]
    sg = jax.lax.stop_gradient
    errs = [z - h for z, h in zip(latents, outs[:-1], strict=True)]
    out_grad = jax.grad(lambda o: loss(o, target))(outs[-1])
    value = gamma * n * loss(outs[-1], target)
    coupling = jnp.zeros((), value.dtype)
    for j, e in enumerate(errs):
        value = value + 0.5 * jnp.sum(e**2)
        above = j + 1
        if above == len(params) - 1:
            g = gamma * n * out_grad
        else:
            g = -errs[above]
        g = sg(g * derivative(acts[above], preacts[above]))
        coupling = coupling + jnp.sum(latents[j] * (g @ params[above]["w"].T))
    return value + coupling - sg(coupling)


BACKWARDS = ("weights", "learned", "fixed")
ERROR_CONNECTIONS = ("one_to_one", "learned", "fixed")
ERROR_INITS = ("positive", "normal", "identity")


class PredictiveCodingState(NamedTuple):
    r"""The extra matrices of the relaxed variants (Millidge et al. 2020), drawn by ``init``.

    Attributes:
      feedback: ``B_l``, the backward weights of weight layer ``l``, shaped like ``W_l``
        ``(din, dout)``: the error travels down as ``d_l B_l^\top`` (``B_l = W_l`` is the
        paper's ``\psi = \theta^\top``, i.e. standard PC); ``feedback[0]`` is None (nothing
        below the input). Empty with ``backward="weights"``.
      error_weights: ``\Phi_j``, ``(n_j, n_j)`` for every hidden layer ``j``: its error
        units see ``\epsilon_j = z_j - \mu_j \Phi_j`` (``\Phi_j = I`` is the one-to-one
        wiring of standard PC). Empty with ``error_connections="one_to_one"``.
    """

    feedback: tuple[Array | None, ...] = ()
    error_weights: tuple[Array, ...] = ()


class PCTerms(NamedTuple):
    """What `relaxed_terms` computes at the latents: pre-activations ``a_l``, predictions
    ``mu_l`` (before ``Phi``), the hidden errors ``eps_j``, ``top = gamma N dL/dmu_L`` and the
    energy ``sum_j ||eps_j||^2 / 2 + gamma N L(mu_L, y)``."""

    preacts: list[Array]
    preds: list[Array]
    errors: list[Array]
    top: Array
    energy: Array


def relaxed_terms(params: Params, acts: Sequence[Activation], inputs: Sequence[Array],
                  latents: Sequence[Array], target: Array,
                  loss: Callable[[Array, Array], Array], gamma: float = 1.0, *,
                  error_weights: Sequence[Array] | None = None,
                  frozen: tuple[Sequence[Array], Sequence[Array]] | None = None) -> PCTerms:
    r"""Predictions, errors and energy of PC with (optionally) dense error connections:

    .. math:: \mu_l = f_l(u_{l-1} W_l + b_l), \quad \epsilon_j = z_j - \mu_j \Phi_j, \quad
        E = \sum_j \tfrac12 \|\epsilon_j\|^2 + \gamma N \mathcal{L}(\mu_L, y)

    (``\Phi_j = I`` when ``error_weights`` is None: `pc_energy`'s errors). ``frozen =
    (preacts, outs)`` freezes ``a`` and ``\mu`` at their feedforward values (fixed prediction);
    then only ``inputs[0]`` (for the batch size) is read of ``inputs``.
    """
    n = inputs[0].shape[0]
    if frozen is None:
        preacts = [_preact(p, u) for p, u in zip(params, inputs, strict=True)]
        preds = [f(a) for f, a in zip(acts, preacts, strict=True)]
    else:
        preacts, preds = list(frozen[0]), list(frozen[1])
    errors = [z - (preds[j] if error_weights is None else preds[j] @ error_weights[j])
              for j, z in enumerate(latents)]
    out_loss, dout = jax.value_and_grad(lambda o: loss(o, target))(preds[-1])
    energy = gamma * n * out_loss
    for e in errors:
        energy = energy + 0.5 * jnp.sum(e**2)
    return PCTerms(preacts, preds, errors, gamma * n * dout, energy)


def layer_deltas(acts: Sequence[Activation], terms: PCTerms,
                 use_derivative: bool = True) -> list[Array]:
    r"""What each weight layer's error is, with the gradient's sign: ``d_j = -\epsilon_j \odot
    f'(a_j)`` for a hidden layer, ``d_L = \gamma N \partial\mathcal{L}/\partial\mu_L \odot
    f'(a_L)`` for the output (``f' \to 1`` without ``use_derivative``). ``\partial E /
    \partial W_l = u_{l-1}^\top d_l`` and ``z_{l-1}`` feels ``d_l W_l^\top``."""
    signals = [-e for e in terms.errors] + [terms.top]
    if not use_derivative:
        return signals
    return [s * derivative(f, a) for s, f, a in zip(signals, acts, terms.preacts, strict=True)]


def relaxed_dynamics(params: Params, acts: Sequence[Activation], terms: PCTerms,
                     feedback: Sequence[Array | None] | None = None,
                     use_derivative: bool = True) -> list[Array]:
    r"""``-dz_j/dt`` of the relaxed inference (Millidge et al. 2020, their eq. for the value
    nodes with the backward weights ``B`` and without the backward nonlinearity):

    .. math:: -\frac{dz_j}{dt} = \epsilon_j + d_{j+1} B_{j+1}^\top

    with `layer_deltas` ``d`` (``f'`` kept iff ``use_derivative``) and ``B = W`` when
    ``feedback`` is None: then this is exactly ``\partial E / \partial z_j`` of standard PC.
    With dense error connections the error ``\epsilon_{j+1}`` itself (not ``\epsilon_{j+1}
    \Phi_{j+1}^\top``) travels down, as in the paper, so it is not an energy's gradient.
    """
    d = layer_deltas(acts, terms, use_derivative)
    back = [p["w"] for p in params] if feedback is None else feedback
    return [e + d[j + 1] @ back[j + 1].T for j, e in enumerate(terms.errors)]


def relaxed_energy(params: Params, acts: Sequence[Activation], x: Array,
                   latents: Sequence[Array], target: Array,
                   loss: Callable[[Array, Array], Array], gamma: float = 1.0, *,
                   feedback: Sequence[Array | None] | None = None,
                   error_weights: Sequence[Array] | None = None, use_derivative: bool = True,
                   frozen: tuple[Sequence[Array], Sequence[Array]] | None = None) -> Array:
    r"""A function for `relax` whose value is the energy of `relaxed_terms` and whose gradient
    in ``z`` is `relaxed_dynamics`: ``\mathrm{sg}(E) + c - \mathrm{sg}(c)`` with ``c = \sum_j
    \langle z_j, \mathrm{sg}(-dz_j/dt) \rangle`` (``sg``: stop-gradient). With learned
    backward weights or dense error connections the dynamics descend no energy, so this is
    how `relax`'s loop, ``tol`` (on ``max |dz/dt|``) and diagnostics run them: one `relax`
    step is the paper's Euler step ``z \leftarrow z + \eta\, dz/dt``."""
    sg = jax.lax.stop_gradient
    terms = relaxed_terms(params, acts, [x, *latents], latents, target, loss, gamma,
                          error_weights=error_weights, frozen=frozen)
    flow = relaxed_dynamics(params, acts, terms, feedback, use_derivative)
    c = jnp.zeros((), terms.energy.dtype)
    for z, g in zip(latents, flow, strict=True):
        c = c + jnp.sum(z * sg(g))
    return sg(terms.energy) + c - sg(c)


def relaxed_updates(params: Params, acts: Sequence[Activation], pre: Sequence[Array],
                    terms: PCTerms, gamma: float = 1.0,
                    use_derivative: bool = True) -> list[dict[str, Array]]:
    r"""The weight updates (gradient sign, batch-mean scale): ``\Delta W_l = u_{l-1}^\top d_l
    / (\gamma N)``, ``\Delta b_l = \sum_n d_l / (\gamma N)`` with `layer_deltas` ``d``
    (``f'`` kept iff ``use_derivative``) and presynaptic activities ``u = pre``."""
    n = pre[0].shape[0]
    d = layer_deltas(acts, terms, use_derivative)
    return [dense_grads(u, dl / (gamma * n), "b" in p)
            for u, dl, p in zip(pre, d, params, strict=True)]


def _angle(a: Array, b: Array) -> Array:
    """Degrees between ``a`` and ``b`` as flat vectors (``2 atan2(|u-v|, |u+v|)``, units)."""
    u = jnp.ravel(a) / jnp.linalg.norm(a)
    v = jnp.ravel(b) / jnp.linalg.norm(b)
    return jnp.degrees(2.0 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v)))


def backward_angle(params: Params, feedback: Sequence[Array | None]) -> Array:
    """The angle (degrees) between ``B_l`` and ``W_l`` (the paper's ``\\psi_l`` and
    ``\\theta_l^\\top``), averaged over the layers that send an error down (``l >= 1``)."""
    angles = [_angle(b, p["w"]) for b, p in zip(feedback, params, strict=True) if b is not None]
    if not angles:
        return jnp.zeros((), params[0]["w"].dtype)
    return jnp.mean(jnp.stack(angles))


def draw_relaxed_state(key: PRNGKey, params: Params, backward: str = "learned",
                       error_connections: str = "one_to_one", *,
                       backward_std: float | None = None, error_init: str = "positive",
                       error_std: float = 0.05) -> PredictiveCodingState:
    r"""The initial `PredictiveCodingState`: ``B_l \sim N(0, \sigma^2)`` with ``\sigma = ``
    ``backward_std`` (default ``1/\sqrt{din}``), and ``\Phi_j`` ``"positive"``: ``|N(0,
    s^2)|`` (the authors' code: random positive error connections, ``s = `` ``error_std``),
    ``"normal"``: ``N(0, s^2)``, or ``"identity"``: ``I`` (standard PC's wiring, to learn from)."""
    kb, ke = jax.random.split(key)
    feedback: tuple[Array | None, ...] = ()
    if backward != "weights":
        keys = jax.random.split(kb, len(params))
        draws: list[Array | None] = [None]
        for k, p in zip(keys[1:], params[1:], strict=True):
            w = p["w"]
            std = backward_std if backward_std is not None else 1.0 / w.shape[0] ** 0.5
            draws.append(std * jax.random.normal(k, w.shape, w.dtype))
        feedback = tuple(draws)
    error_weights: tuple[Array, ...] = ()
    if error_connections != "one_to_one":
        sizes = [p["w"].shape[1] for p in params[:-1]]
        dtype = params[0]["w"].dtype
        keys = jax.random.split(ke, max(len(sizes), 1))
        mats = []
        for k, m in zip(keys, sizes, strict=False):
            if error_init == "identity":
                mats.append(jnp.eye(m, dtype=dtype))
            else:
                r = error_std * jax.random.normal(k, (m, m), dtype)
                mats.append(jnp.abs(r) if error_init == "positive" else r)
        error_weights = tuple(mats)
    return PredictiveCodingState(feedback, error_weights)


def advance_relaxed_state(state: PredictiveCodingState, updates: Sequence[dict[str, Array]],
                          terms: PCTerms, gamma: float, *, learn_backward: bool,
                          backward_lr: float, backward_decay: float, learn_errors: bool,
                          error_lr: float) -> PredictiveCodingState:
    r"""The paper's Hebbian updates of the extra matrices, after the weight updates:

    .. math:: B_l \leftarrow (1 - \alpha\lambda) B_l - \alpha\, \Delta W_l, \qquad
        \Phi_j \leftarrow \Phi_j - \alpha_\Phi\, \mu_j^\top \epsilon_j / (\gamma N)

    ``\Delta W_l = u_{l-1}^\top d_l / (\gamma N)`` is the forward weights' own update (gradient
    sign): ``B`` learns by the transpose of the forward rule (``\Delta\psi_l \propto
    (\epsilon_l f'(a_l))^\top u_{l-1}`` in the paper's orientation), Kolen-Pollack-like. The
    ``\Phi`` rule is the authors' code's (prediction times error, no clamp here)."""
    feedback = state.feedback
    if learn_backward:
        keep = 1.0 - backward_lr * backward_decay
        feedback = tuple(None if b is None else keep * b - backward_lr * u["w"]
                         for b, u in zip(feedback, updates, strict=True))
    error_weights = state.error_weights
    if learn_errors:
        n = terms.errors[0].shape[0]
        error_weights = tuple(
            phi - error_lr * (mu.T @ e) / (gamma * n)
            for phi, mu, e in zip(error_weights, terms.preds[:-1], terms.errors, strict=True))
    return PredictiveCodingState(feedback, error_weights)


def _check_options(steps: int | None, step_size: float | None, tol: float | None, gamma: float,
                   inference_optimizer: Any) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"predictive_coding: steps must be a positive integer (the inference "
                         f"steps T), got {steps!r}")
    if step_size is not None and not (isinstance(step_size, (int, float))
                                      and not isinstance(step_size, bool) and step_size > 0):
        raise ValueError(f"predictive_coding: step_size must be a positive number, got "
                         f"{step_size!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"predictive_coding: tol must be positive or None, got {tol!r}")
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"predictive_coding: gamma (the output clamp's weight) must be "
                         f"positive, got {gamma!r}")
    if inference_optimizer is not None and not hasattr(inference_optimizer, "update"):
        raise TypeError(f"predictive_coding: inference_optimizer must be an optax "
                        f"GradientTransformation or None, got {type(inference_optimizer)}")


def _check_relaxed(backward: str, derivative: bool, update_derivative: bool,
                    error_connections: str, backward_lr: float, backward_decay: float,
                    backward_std: float | None, error_lr: float, error_init: str,
                    error_std: float) -> None:
    name = "predictive_coding"
    check_choice(name, "backward", backward, BACKWARDS)
    check_choice(name, "error_connections", error_connections, ERROR_CONNECTIONS)
    check_choice(name, "error_init", error_init, ERROR_INITS)
    for option, value in (("derivative", derivative), ("update_derivative", update_derivative)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {option} must be True or False, got {value!r}")
    check_number(name, "backward_lr", backward_lr, low=0, low_open=True)
    check_number(name, "backward_decay", backward_decay, low=0)
    check_number(name, "backward_std", backward_std, low=0, low_open=True, optional=True)
    check_number(name, "error_lr", error_lr, low=0, low_open=True)
    check_number(name, "error_std", error_std, low=0, low_open=True)


class _Relaxed(NamedTuple):
    """The relaxed variant's options, as `predictive_coding` took them."""

    backward: str
    derivative: bool
    update_derivative: bool
    error_connections: str
    backward_lr: float
    backward_decay: float
    error_lr: float


def _standard_step(params: Params, acts: Sequence[Activation], batch: Batch,
                   loss: Callable[[Array, Array], Array], fixed_prediction: bool, gamma: float,
                   steps: int, eta: float, optimizer: Any, tol: float | None,
                   ) -> tuple[Updates, StepOutput]:
    """Standard PC (``fixed_prediction``: Z-IL): descent of the energy, autodiff updates."""
    x, y = batch.x, batch.y
    preacts, outs = feedforward(params, acts, x)
    if fixed_prediction:
        energy = lambda z: fixed_prediction_energy(params, acts, preacts, outs, z, y, loss,
                                                   gamma)
    elif len(params) > 1:
        # the first layer's prediction f(x W_1 + b_1) reads only the clamped input: it is the
        # feedforward h_1, computed once instead of at every inference step
        def energy(z):
            rest = pc_energy(params[1:], acts[1:], list(z), z[1:], y, loss, gamma)
            return rest + 0.5 * jnp.sum((z[0] - outs[0]) ** 2)
    else:
        energy = lambda z: pc_energy(params, acts, [x, *z], z, y, loss, gamma)
    start = list(outs[:-1])
    res = relax(energy, start, steps=steps, step_size=eta, optimizer=optimizer, tol=tol)
    z = list(res.state)
    pre = [x, *(outs[:-1] if fixed_prediction else z)]
    n = x.shape[0]
    # the energy after inference comes with the weight gradient (pc_energy at the relaxed z
    # equals the inference energy, under fixed prediction too), so relax's own evaluation of
    # the final state is unused and XLA drops it: one energy gradient fewer per training step
    e_end, grads = jax.value_and_grad(
        lambda p: pc_energy(p, acts, pre, z, y, loss, gamma))(params)
    updates = jax.tree.map(lambda g: g / (gamma * n), grads)
    # at the feedforward start every hidden error is zero, so the start's energy is the output
    # term alone, gamma N L(h_L, y): no forward pass of its own
    out_loss = loss(outs[-1], y)
    metrics = {"pc_energy": e_end / n, "pc_energy_start": gamma * out_loss,
               "pc_steps": res.steps.astype(e_end.dtype)}
    return updates, StepOutput(out_loss, outs[-1], metrics)


def _relaxed_step(params: Params, state: PredictiveCodingState, acts: Sequence[Activation],
                  batch: Batch, loss: Callable[[Array, Array], Array], fixed_prediction: bool,
                  gamma: float, steps: int, eta: float, optimizer: Any, tol: float | None,
                  opts: _Relaxed) -> tuple[Updates, PredictiveCodingState, StepOutput]:
    """The relaxed variants: `relax` on `relaxed_energy`, explicit updates, state update."""
    x, y = batch.x, batch.y
    preacts, outs = feedforward(params, acts, x)
    frozen = (preacts, outs) if fixed_prediction else None
    feedback = state.feedback if opts.backward != "weights" else None
    phis = state.error_weights if opts.error_connections != "one_to_one" else None

    def energy(z):
        return relaxed_energy(params, acts, x, z, y, loss, gamma, feedback=feedback,
                              error_weights=phis, use_derivative=opts.derivative,
                              frozen=frozen)

    start = list(outs[:-1])
    res = relax(energy, start, steps=steps, step_size=eta, optimizer=optimizer, tol=tol)
    z = list(res.state)
    terms = relaxed_terms(params, acts, [x, *z], z, y, loss, gamma, error_weights=phis,
                          frozen=frozen)
    pre = [x, *(outs[:-1] if fixed_prediction else z)]
    updates = relaxed_updates(params, acts, pre, terms, gamma, opts.update_derivative)
    n = x.shape[0]
    metrics = {"pc_energy": res.energy / n, "pc_energy_start": energy(start) / n,
               "pc_steps": res.steps.astype(res.energy.dtype), "pc_residual": res.grad_norm}
    if feedback is not None:
        metrics["pc_backward_angle"] = backward_angle(params, feedback)
    state = advance_relaxed_state(
        state, updates, terms, gamma, learn_backward=opts.backward == "learned",
        backward_lr=opts.backward_lr, backward_decay=opts.backward_decay,
        learn_errors=opts.error_connections == "learned", error_lr=opts.error_lr)
    return updates, state, StepOutput(loss(outs[-1], y), outs[-1], metrics)


def predictive_coding(steps: int | None = None, step_size: float | None = None,
                      tol: float | None = None, *, fixed_prediction: bool = False,
                      gamma: float = 1.0,
                      inference_optimizer: optax.GradientTransformation | None = None,
                      backward: str = "weights", derivative: bool = True,
                      update_derivative: bool = True, error_connections: str = "one_to_one",
                      backward_lr: float = 0.01, backward_decay: float = 0.0,
                      backward_std: float | None = None, error_lr: float = 0.01,
                      error_init: str = "positive", error_std: float = 0.05,
                      ) -> LearningRule:
    r"""Predictive coding (PC) on a dense `fbalign.models.mlp` (Whittington & Bogacz 2017).

    Activities ``z_0 = x`` (clamped), ``z_1..z_{L-1}`` (free); predictions ``\mu_l =
    f_l(z_{l-1} W_l + b_l)``; the energy (`pc_energy`, summed over the batch of ``N``)

    .. math:: E(z, \theta) = \sum_{l=1}^{L-1} \tfrac12 \|z_l - \mu_l\|^2
                             + \gamma N \mathcal{L}(\mu_L, y)

    clamps the output through the loss: for squared error it is ``\tfrac12\|y - \mu_L\|^2``
    per example, the classic PC network with the output fixed to the target; for cross-entropy
    the output unit's "error" is the loss gradient. **Inference** (`fbalign._src.relax.relax`)
    descends ``E`` over ``z_1..z_{L-1}`` from the feedforward values ``z_l = h_l``: ``T =
    steps`` steps of size ``step_size`` per example (the energy is a sum over examples, so the
    step size does not depend on the batch size), or until ``max |dE/dz| < tol``. **Learning**:
    the updates are ``(1 / \gamma N)\, \partial E / \partial \theta`` at the relaxed ``z``
    (``jax.grad`` with ``z`` held fixed): ``-z_{l-1}^\top (\epsilon_l \odot f'(a_l)) /
    (\gamma N)``, local and Hebbian, with the gradient's sign and the batch-mean loss's scale.

    **Limit.** At equilibrium ``\epsilon_l = -\gamma\, \partial \mathcal{L}_n / \partial h_l +
    O(\gamma^2)`` (errors of a weak output clamp propagate as backprop's adjoints), so the
    updates equal backprop's gradient up to ``O(\gamma)``: the gap shrinks linearly as the
    clamp ``\gamma \to 0`` (Whittington & Bogacz's small-error limit; tested). With ``\gamma =
    1`` PC differs from backprop by an amount that grows with the output error.

    **Fixed prediction** (``fixed_prediction=True``; Millidge et al. 2022's fixed-prediction
    assumption, Song et al. 2020's zero-divergence inference learning Z-IL): predictions are
    frozen at their feedforward values during inference (`fixed_prediction_energy`) and the
    weight updates use the feedforward presynaptic activities. Errors then obey ``\epsilon_l
    \leftarrow (1-\eta)\epsilon_l - \eta\, g_{l+1} W_{l+1}^\top``: with ``\eta = 1`` (the
    default here) the backward wave reaches layer ``L-1-k`` after ``k+1`` steps and never
    changes after, so ``T = L-1`` steps (the default) give exactly backprop's gradient (Z-IL);
    any ``0 < \eta \le 1`` converges to it geometrically.

    **Relaxed constraints** (Millidge, Tschantz, Seth & Buckley 2020, "Relaxing the constraints
    on predictive coding models", arXiv:2010.01047; equations checked against the authors'
    code, github.com/BerenMillidge/RelaxedPredictiveCoding). Inference becomes the Euler step
    of (`relaxed_dynamics`; `relaxed_energy` lets `relax` run it)

    .. math:: \frac{dz_j}{dt} = -\epsilon_j - d_{j+1} B_{j+1}^\top, \quad
        \epsilon_j = z_j - \mu_j \Phi_j, \quad d_{j+1} = -\epsilon_{j+1} \odot f'(a_{j+1})
        \ (\gamma N \partial\mathcal{L}/\partial\mu_L \odot f'(a_L) \text{ at the output}),

    and the weights learn ``\Delta W_l = u_{l-1}^\top d_l / (\gamma N)`` (`relaxed_updates`).
    ``B = W``, ``\Phi = I`` and ``f'`` everywhere is standard PC (tested equal). The three
    relaxations, combinable with each other and with ``fixed_prediction``:

    * ``backward="learned"`` (weight transport): the error goes down through backward weights
      ``B_l`` (rule state, drawn ``N(0, \sigma^2)``) that learn by the transpose of the forward
      rule, ``B_l \leftarrow (1-\alpha\lambda) B_l - \alpha \Delta W_l``: the paper's
      ``d\psi_l/dt \propto (\epsilon_l \odot f'(a_l))^\top u_{l-1}``, Kolen-Pollack-like. ``W_l
      - B_l`` changes only by the optimizer's difference from this step (with ``optax.sgd
      (\alpha)`` and the same decay on ``W``, it shrinks by ``1 - \alpha\lambda`` a step; the
      authors' code has no decay), so ``B_l`` turns towards ``W_l`` as the shared updates
      accumulate (metric ``pc_backward_angle``). ``"fixed"``: random ``B`` that never learn
      (feedback alignment in PC, the paper's control).
    * ``derivative=False`` (backward nonlinearities): ``f' \to 1`` in the inference dynamics
      only, as in the paper (the weight update keeps its postsynaptic, local ``f'``);
      ``update_derivative=False`` drops it from the weight updates as well.
    * ``error_connections="learned"`` (1-1 error connectivity): every value unit of layer ``j``
      reaches every error unit through ``\Phi_j`` (``n_j \times n_j``, rule state, random
      positive ``|N(0, s^2)|`` as the authors draw them, or ``error_init``), learned by the
      authors' Hebbian rule ``\Phi_j \leftarrow \Phi_j - \alpha_\Phi \mu_j^\top \epsilon_j /
      (\gamma N)``; ``"fixed"`` keeps them random. ``\Phi`` converges to nothing in particular:
      with fixed predictions the equilibrium errors ``\epsilon_j = -d_{j+1} B_{j+1}^\top`` do
      not depend on ``\Phi`` at all (only the values ``z_j = \mu_j\Phi_j + \epsilon_j`` do), so
      it leaves learning unharmed, the paper's claim; with ``\eta = 1`` and ``T = L-1``
      fixed-prediction steps the updates are backprop's whatever ``\Phi`` (tested). The paper
      ran all three with fixed predictions; in standard PC ``z_j`` feeds the next prediction,
      so random ``\Phi`` disturbs the predictions above it.

    Args:
      steps: inference steps ``T`` (the most, with ``tol``). Default: 100, or ``L - 1`` with
        ``fixed_prediction``.
      step_size: ``\eta``. Default 0.1 (the energy then decreases monotonically on
        LeCun-initialised tanh networks), or 1.0 with ``fixed_prediction``.
      tol: stop inference once ``max |dE/dz| < tol`` (a ``while_loop``; not reverse-mode
        differentiable). None: exactly ``steps`` steps.
      fixed_prediction: the exact fixed-prediction/Z-IL variant above.
      gamma: ``\gamma``, the output clamp's weight (1: the classic clamped output).
      inference_optimizer: an optax transformation for inference in place of plain descent.
      backward: ``"weights"`` (``W^\top``, standard), ``"learned"`` or ``"fixed"`` backward
        weights ``B``.
      derivative: keep ``f'`` in the inference dynamics (False: the paper's "no backward
        nonlinearities").
      update_derivative: keep ``f'`` in the weight updates.
      error_connections: ``"one_to_one"`` (standard), ``"learned"`` or ``"fixed"`` dense
        value-to-error connections ``\Phi``.
      backward_lr: ``\alpha``, the learning rate of ``B`` (match the optimizer's).
      backward_decay: ``\lambda``, the weight decay of ``B``.
      backward_std: ``\sigma`` of the initial ``B_l``; None: ``1/\sqrt{din}``.
      error_lr: ``\alpha_\Phi``, the learning rate of ``\Phi``.
      error_init: ``"positive"`` (``|N(0, s^2)|``, the authors'), ``"normal"`` or
        ``"identity"`` initial ``\Phi``.
      error_std: ``s``.

    Returns:
      A `LearningRule`: `EmptyState` for standard PC, else a `PredictiveCodingState` (the
      ``B`` and ``\Phi`` the options ask for). Metrics: ``pc_energy`` (the energy after
      inference, per example: ``E / N``), ``pc_energy_start`` (before inference) and
      ``pc_steps``; with any relaxation also ``pc_residual`` (``max |dz/dt|`` after inference)
      and, with ``B``, ``pc_backward_angle`` (degrees between ``B_l`` and ``W_l``, the
      paper's ``\psi`` and ``\theta^\top``, averaged over layers, before this step's update).
    """
    _check_options(steps, step_size, tol, gamma, inference_optimizer)
    _check_relaxed(backward, derivative, update_derivative, error_connections, backward_lr,
                   backward_decay, backward_std, error_lr, error_init, error_std)
    eta = step_size if step_size is not None else (1.0 if fixed_prediction else 0.1)
    name = "predictive_coding"
    opts = _Relaxed(backward, derivative, update_derivative, error_connections, backward_lr,
                    backward_decay, error_lr)
    relaxed = opts != _Relaxed("weights", True, True, "one_to_one", backward_lr,
                               backward_decay, error_lr)

    def init_fn(key: PRNGKey, params: Params, network: Any = None
                ) -> EmptyState | PredictiveCodingState:
        require_mlp(network, name, _WHY)
        if not relaxed:
            return EmptyState()
        return draw_relaxed_state(key, params, backward, error_connections,
                                  backward_std=backward_std, error_init=error_init,
                                  error_std=error_std)

    def step_fn(params: Params, state: Any, batch: Batch, key: PRNGKey, context: StepContext
                ) -> tuple[Updates, Any, StepOutput]:
        del key
        require_mlp(context.network, name, _WHY)
        acts = context.network.activations()
        t = steps if steps is not None else (len(params) - 1 if fixed_prediction else 100)
        if relaxed:
            return _relaxed_step(params, state, acts, batch, context.loss, fixed_prediction,
                                 gamma, t, eta, inference_optimizer, tol, opts)
        updates, out = _standard_step(params, acts, batch, context.loss, fixed_prediction,
                                      gamma, t, eta, inference_optimizer, tol)
        return updates, state, out

    return LearningRule(init_fn, step_fn, (), name)
