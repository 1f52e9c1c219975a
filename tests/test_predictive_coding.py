"""Predictive coding (Whittington & Bogacz 2017; Millidge et al. 2022; Song et al. 2020): the
fixed-prediction/Z-IL variant equals backprop exactly, standard PC approaches backprop linearly
as the output clamp weakens, inference descends the energy, one step matches a NumPy reference
written from the paper's equations, and the harness trains with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.relax import relax
from fbalign._src.rules.predictive_coding import (
    feedforward,
    pc_energy,
    predictive_coding,
)

LOSSES = {"squared_error": squared_error, "cross_entropy": cross_entropy}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _problem(loss_name, sizes=(5, 7, 6, 3), batch=8, dtype=jnp.float32, seed=0):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(seed), dtype)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]), dtype)
    if loss_name == "squared_error":
        y = jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, sizes[-1]), dtype)
    else:
        y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _run(rule, model, params, x, y, loss):
    state = rule.init(jax.random.PRNGKey(9), params, model)
    return rule.step(params, state, Batch(x, y), jax.random.PRNGKey(10), StepContext(model, loss))


def _backprop(model, params, x, y, loss):
    return jax.grad(lambda p: loss(model.apply(p, x), y))(params)


@pytest.mark.parametrize("loss_name", ["squared_error", "cross_entropy"])
@pytest.mark.parametrize("sizes,steps,step_size", [
    ((5, 7, 6, 3), None, None),          # Z-IL schedule: eta = 1, T = L - 1 steps
    ((4, 9, 8, 7, 3), None, None),       # deeper: the wave needs 3 steps
    ((5, 7, 6, 3), 400, 0.3),            # any 0 < eta <= 1 converges to the same point
])
def test_fixed_prediction_equals_backprop_in_float64(loss_name, sizes, steps, step_size):
    loss = LOSSES[loss_name]
    with jax.enable_x64(True):
        model, params, x, y = _problem(loss_name, sizes, dtype=jnp.float64)
        rule = predictive_coding(steps, step_size, fixed_prediction=True)
        updates, _, out = _run(rule, model, params, x, y, loss)
        want = _backprop(model, params, x, y, loss)
        assert _flat(updates).dtype == np.float64
        np.testing.assert_allclose(_flat(updates), _flat(want), rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.loss, loss(model.apply(params, x), y), rtol=1e-12)


def test_fixed_prediction_is_not_exact_before_the_wave_arrives():
    # With one step fewer than L - 1 the lowest layer has not heard the error yet: its update
    # is zero, so the exactness above is the schedule's, not an accident.
    loss = squared_error
    with jax.enable_x64(True):
        model, params, x, y = _problem("squared_error", (4, 9, 8, 7, 3), dtype=jnp.float64)
        updates, _, _ = _run(predictive_coding(2, fixed_prediction=True), model, params, x, y,
                             loss)
        want = _backprop(model, params, x, y, loss)
        np.testing.assert_allclose(_flat(updates[0]), 0.0, atol=1e-14)
        assert np.linalg.norm(_flat(want[0])) > 1e-3
        np.testing.assert_allclose(_flat(updates[1:]), _flat(want[1:]), atol=1e-10)


def _relative_gap(gamma, loss_name):
    loss = LOSSES[loss_name]
    model, params, x, y = _problem(loss_name, dtype=jnp.float64)
    rule = predictive_coding(steps=3000, step_size=0.2, gamma=gamma)
    updates, _, out = _run(rule, model, params, x, y, loss)
    want = _flat(_backprop(model, params, x, y, loss))
    return np.linalg.norm(_flat(updates) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("loss_name", ["squared_error", "cross_entropy"])
def test_standard_pc_approaches_backprop_linearly_as_the_clamp_weakens(loss_name):
    gammas = [0.1, 0.03, 0.01, 0.003, 0.001]
    with jax.enable_x64(True):
        gaps = np.array([_relative_gap(g, loss_name) for g in gammas])
    assert np.all(np.diff(gaps) < 0), gaps
    assert gaps[0] > 0.05, gaps  # the full clamp really differs from backprop
    # O(gamma): gap / gamma settles to a constant (within 15% over the last three strengths)
    slopes = gaps / np.array(gammas)
    assert np.ptp(slopes[2:]) < 0.15 * slopes[-1], slopes
    assert gaps[-1] < 0.01, gaps


@pytest.mark.parametrize("loss_name", ["squared_error", "cross_entropy"])
def test_inference_energy_decreases_monotonically_at_the_default_step_size(loss_name):
    loss = LOSSES[loss_name]
    model, params, x, y = _problem(loss_name, (6, 16, 16, 4), batch=32)
    acts = model.activations()
    _, outs = feedforward(params, acts, x)
    energy = lambda z: pc_energy(params, acts, [x, *z], z, y, loss)
    res = relax(energy, list(outs[:-1]), steps=100, step_size=0.1, record=True)
    traj = np.append(np.asarray(res.trajectory), float(res.energy))
    assert not bool(res.diverged)
    assert np.all(np.diff(traj) <= 1e-6 * traj[0]), np.diff(traj).max()
    assert traj[-1] < 0.9 * traj[0]
    # the rule reports the same numbers (per example) with its defaults
    _, _, out = _run(predictive_coding(), model, params, x, y, loss)
    np.testing.assert_allclose(out.metrics["pc_energy"], traj[-1] / 32, rtol=1e-4)
    np.testing.assert_allclose(out.metrics["pc_energy_start"], traj[0] / 32, rtol=1e-5)
    assert float(out.metrics["pc_steps"]) == 100.0


def _numpy_reference_step(params, x, y, eta):
    """One PC inference step and the weight updates, from Whittington & Bogacz's equations for
    a tanh network with a linear output clamped to the target by squared error (row-major,
    summed over the batch, updates divided by N):
      eps_l = z_l - mu_l,  mu_l = f(z_{l-1} W_l + b_l),  eps_L = y - mu_L
      dz_l = -eps_l + (eps_{l+1} * f'(a_{l+1})) W_{l+1}^T
      dW_l = z_{l-1}^T (eps_l * f'(a_l)) (the update descends -dW_l / N)."""
    ws = [np.asarray(p["w"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, L = len(x), len(ws)
    fs = [np.tanh] * (L - 1) + [lambda a: a]
    dfs = [lambda a: 1 - np.tanh(a) ** 2] * (L - 1) + [np.ones_like]

    def errors(z):
        zs = [x, *z]
        a = [zs[i] @ ws[i] + bs[i] for i in range(L)]
        mu = [fs[i](a[i]) for i in range(L)]
        eps = [zs[i + 1] - mu[i] for i in range(L - 1)] + [y - mu[-1]]
        return zs, a, eps

    z = [np.tanh(x @ ws[0] + bs[0])]
    for i in range(1, L - 1):
        z.append(np.tanh(z[-1] @ ws[i] + bs[i]))
    _, a, eps = errors(z)
    z = [z[j] + eta * (-eps[j] + (eps[j + 1] * dfs[j + 1](a[j + 1])) @ ws[j + 1].T)
         for j in range(L - 1)]
    zs, a, eps = errors(z)
    out = []
    for i in range(L):
        d = eps[i] * dfs[i](a[i])
        out.append({"b": -d.sum(0) / n, "w": -(zs[i].T @ d) / n})
    return out


def test_one_step_matches_a_numpy_reference_of_the_papers_equations():
    with jax.enable_x64(True):
        model, params, x, y = _problem("squared_error", (5, 7, 6, 3), dtype=jnp.float64)
        updates, _, _ = _run(predictive_coding(steps=1, step_size=0.3), model, params, x, y,
                             squared_error)
        want = _numpy_reference_step(params, x, y, 0.3)
        np.testing.assert_allclose(_flat(updates), _flat(want), rtol=1e-10, atol=1e-13)
        # and it is not backprop (one step of standard PC with a full clamp)
        bp = _flat(_backprop(model, params, x, y, squared_error))
        assert np.linalg.norm(_flat(updates) - bp) > 1e-3 * np.linalg.norm(bp)


@pytest.mark.parametrize("fixed", [False, True])
def test_jit_equals_eager_and_vmap_over_seeds(fixed):
    model, params, x, y = _problem("cross_entropy")
    rule = predictive_coding(steps=20, fixed_prediction=fixed)
    ctx = StepContext(model, cross_entropy)

    def run(key):
        p = model.init(key)
        upd, _, out = rule.step(p, rule.init(key, p, model), Batch(x, y), key, ctx)
        return upd, out.loss, out.metrics

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    eager = run(keys[0])
    jrun = jax.jit(run)
    jitted = jrun(keys[0])
    for g, w in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    batched = jax.vmap(run)(keys)
    for i in range(3):  # each seed of the vmapped run is its own (jitted == eager above) run
        single = jrun(keys[i])
        for g, w in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(g[i], w, rtol=1e-4, atol=1e-6)


def test_tol_stops_early_and_inference_optimizer_runs():
    model, params, x, y = _problem("squared_error")
    _, _, out = _run(predictive_coding(steps=500, tol=1e-4), model, params, x, y, squared_error)
    assert 1 < float(out.metrics["pc_steps"]) < 500
    rule = predictive_coding(steps=50, inference_optimizer=optax.sgd(0.1, momentum=0.5))
    _, _, out = _run(rule, model, params, x, y, squared_error)
    assert float(out.metrics["pc_energy"]) < float(out.metrics["pc_energy_start"])


@pytest.mark.parametrize("loss", ["squared_error", "cross_entropy"])
@pytest.mark.parametrize("fixed", [False, True])
def test_runs_in_the_harness_train_step(loss, fixed):
    model = fb.mlp((6, 8, 3))
    step = fb.train.make_train_step(model, predictive_coding(steps=10, fixed_prediction=fixed),
                                    optax.sgd(0.1), loss=loss)
    state = fb.train.init_train_state(model, predictive_coding(fixed_prediction=fixed),
                                      optax.sgd(0.1), jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 3)
    first = None
    for _ in range(30):
        state, metrics = step(state, x, y)
        first = float(metrics["loss"]) if first is None else first
    assert {"pc_energy", "pc_energy_start", "pc_steps"} <= set(metrics)
    assert float(metrics["loss"]) < 0.8 * first


def test_fit_on_digits_learns():
    data = fb.data.load_dataset("digits")
    res = fb.train.fit(fb.mlp((64, 32, 10)), predictive_coding(steps=30), optax.adam(1e-2), data,
                       epochs=1, progress=False)
    assert res.history[-1]["test_error"] < 40.0  # chance: 90 %
    assert res.history[-1]["train_pc_energy"] < res.history[-1]["train_pc_energy_start"]


@pytest.mark.parametrize("kwargs,match", [
    ({"step_size": 0.0}, "step_size must be a positive"),
    ({"step_size": -0.1}, "step_size must be a positive"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"),
    ({"gamma": 0.0}, "gamma"),
    ({"tol": -1.0}, "tol must be positive"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictive_coding(**kwargs)


def test_non_mlp_network_is_refused_naming_the_rule():
    net = fb.models.from_function(lambda p, x: x @ p, lambda key: jnp.ones((3, 2)))
    rule = predictive_coding()
    with pytest.raises(TypeError, match="predictive_coding.*fbalign.models.mlp"):
        rule.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), net)
    with pytest.raises(TypeError, match="predictive_coding.*fbalign.models.mlp"):
        rule.step(jnp.ones((3, 2)), None, Batch(jnp.ones((4, 3)), jnp.zeros(4, int)),
                  jax.random.PRNGKey(0), StepContext(net, cross_entropy))


# --- Relaxed constraints (Millidge, Tschantz, Seth & Buckley 2020, arXiv:2010.01047) ---------

def _numpy_relaxed_step(params, x, y, eta, steps, *, back=None, phis=None, deriv=True,
                        update_deriv=True, fixed=False, gamma=1.0, alpha=0.0, lam=0.0,
                        alpha_phi=0.0):
    """T Euler steps of the relaxed PC dynamics and the Hebbian updates, from the paper's
    equations for a tanh network with a linear output clamped by squared error (row-major,
    batch summed; W, B, Phi updates divided by gamma N), float64:
      eps_j = z_j - mu_j Phi_j (Phi = I: one-to-one),  eps_L = gamma (y - mu_L)
      dz_j/dt = -eps_j + (eps_{j+1} * f'(a_{j+1})) B_{j+1}^T  (f' -> 1 without deriv)
      dW_l = u_{l-1}^T (eps_l * f'(a_l))   (the rule's update is -dW_l / (gamma N))
      B_l <- (1 - alpha lam) B_l + alpha dW_l / (gamma N)   (B = W: no learned weights)
      Phi_j <- Phi_j - alpha_phi mu_j^T eps_j / (gamma N)
    fixed: mu and a stay at their feedforward values, u = the feedforward activities."""
    ws = [np.asarray(p["w"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, L = len(x), len(ws)
    back = ws if back is None else [None] + [np.asarray(b, np.float64) for b in back[1:]]
    phis = ([np.eye(w.shape[1]) for w in ws[:-1]] if phis is None
            else [np.asarray(p, np.float64) for p in phis])
    fs = [np.tanh] * (L - 1) + [lambda a: a]
    dfs = [lambda a: 1 - np.tanh(a) ** 2] * (L - 1) + [np.ones_like]
    h, a_ff = [x], []
    for i in range(L):
        a_ff.append(h[-1] @ ws[i] + bs[i])
        h.append(fs[i](a_ff[-1]))

    def errors(z):
        u = h[:L] if fixed else [x, *z]
        a = a_ff if fixed else [u[i] @ ws[i] + bs[i] for i in range(L)]
        mu = [fs[i](a[i]) for i in range(L)]
        eps = [z[j] - mu[j] @ phis[j] for j in range(L - 1)] + [gamma * (y - mu[-1])]
        return u, a, mu, eps

    z = [hj.copy() for hj in h[1:L]]
    for _ in range(steps):
        _, a, _, eps = errors(z)
        z = [z[j] + eta * (-eps[j] + (eps[j + 1] * (dfs[j + 1](a[j + 1]) if deriv else 1))
                           @ back[j + 1].T) for j in range(L - 1)]
    u, a, mu, eps = errors(z)
    upd = []
    for i in range(L):
        d = eps[i] * (dfs[i](a[i]) if update_deriv else 1)
        upd.append({"b": -d.sum(0) / (gamma * n), "w": -(u[i].T @ d) / (gamma * n)})
    new_back = [None] + [(1 - alpha * lam) * back[i] - alpha * upd[i]["w"] for i in range(1, L)]
    new_phis = [phis[j] - alpha_phi * mu[j].T @ eps[j] / (gamma * n) for j in range(L - 1)]
    return upd, new_back, new_phis


_ALL = {"backward": "learned", "derivative": False, "error_connections": "learned"}
RELAXED = {
    "learned_backward": {"backward": "learned", "backward_lr": 0.1, "backward_decay": 0.5},
    "fixed_backward": {"backward": "fixed", "backward_std": 0.3},
    "no_backward_derivative": {"derivative": False},
    "no_derivative_at_all": {"derivative": False, "update_derivative": False},
    "learned_error_connections": {"error_connections": "learned", "error_lr": 0.2,
                                  "error_init": "normal", "error_std": 0.3},
    "fixed_error_connections": {"error_connections": "fixed"},
    "all_three": {**_ALL, "backward_lr": 0.1, "error_lr": 0.2, "gamma": 0.5},
    "all_three_fixed_prediction": {**_ALL, "backward_lr": 0.1, "error_lr": 0.2,
                                   "fixed_prediction": True, "error_init": "normal",
                                   "error_std": 0.5},
}


@pytest.mark.parametrize("name", list(RELAXED))
def test_relaxed_variant_step_matches_a_numpy_reference_of_the_papers_equations(name):
    kw = RELAXED[name]
    eta = 0.5 if kw.get("fixed_prediction") else 0.3
    with jax.enable_x64(True):
        model, params, x, y = _problem("squared_error", (5, 7, 6, 3), dtype=jnp.float64)
        rule = predictive_coding(steps=3, step_size=eta, **kw)
        state = rule.init(jax.random.PRNGKey(4), params, model)
        updates, new, out = rule.step(params, state, Batch(x, y), jax.random.PRNGKey(5),
                                      StepContext(model, squared_error))
        back = state.feedback or None
        phis = state.error_weights or None
        want, want_back, want_phis = _numpy_relaxed_step(
            params, x, y, eta, 3, back=back, phis=phis, deriv=kw.get("derivative", True),
            update_deriv=kw.get("update_derivative", True),
            fixed=kw.get("fixed_prediction", False), gamma=kw.get("gamma", 1.0),
            alpha=kw.get("backward_lr", 0.01) if kw.get("backward") == "learned" else 0.0,
            lam=kw.get("backward_decay", 0.0),
            alpha_phi=kw.get("error_lr", 0.01) if kw.get("error_connections") == "learned"
            else 0.0)
        np.testing.assert_allclose(_flat(updates), _flat(want), rtol=1e-10, atol=1e-13)
        if back is not None:
            np.testing.assert_allclose(_flat(new.feedback), _flat(want_back[1:]), rtol=1e-10,
                                       atol=1e-13)
        if phis is not None:
            np.testing.assert_allclose(_flat(new.error_weights), _flat(want_phis), rtol=1e-10,
                                       atol=1e-13)
        # each relaxation really changes the step (the reference is not standard PC's)
        std, _, _ = _run(predictive_coding(steps=3, step_size=eta,
                                           fixed_prediction=kw.get("fixed_prediction", False),
                                           gamma=kw.get("gamma", 1.0)),
                         model, params, x, y, squared_error)
        assert np.linalg.norm(_flat(updates) - _flat(std)) > 1e-4 * np.linalg.norm(_flat(std))
        assert float(out.metrics["pc_residual"]) > 0


@pytest.mark.parametrize("fixed,errors", [(False, "one_to_one"), (True, "learned")])
def test_learned_backward_weights_equal_to_w_are_standard_pc(fixed, errors):
    # B = W, f' on and Phi = I (identity init): the relaxed dynamics, run through relax's
    # stop-gradient trick, and the explicit updates are standard PC's autodiff ones
    with jax.enable_x64(True):
        model, params, x, y = _problem("cross_entropy", (5, 7, 6, 3), dtype=jnp.float64)
        want, _, want_out = _run(predictive_coding(steps=7, step_size=0.2,
                                                   fixed_prediction=fixed),
                                 model, params, x, y, cross_entropy)
        rule = predictive_coding(steps=7, step_size=0.2, fixed_prediction=fixed,
                                 backward="learned", error_connections=errors,
                                 error_init="identity")
        state = rule.init(jax.random.PRNGKey(1), params, model)
        state = state._replace(feedback=(None, *(p["w"] for p in params[1:])))
        got, new, out = rule.step(params, state, Batch(x, y), jax.random.PRNGKey(2),
                                  StepContext(model, cross_entropy))
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-14)
        for k in ("pc_energy", "pc_energy_start", "pc_steps"):
            np.testing.assert_allclose(out.metrics[k], want_out.metrics[k], rtol=1e-12)
        assert float(out.metrics["pc_backward_angle"]) < 1e-6
        # B took the forward weights' own step: B - W moves by -backward_lr * update
        np.testing.assert_allclose(_flat(new.feedback), _flat(
            [p["w"] - 0.01 * u["w"] for p, u in zip(params[1:], got[1:], strict=True)]),
            atol=1e-14)


def test_dense_error_connections_leave_z_il_exactly_backprop():
    # with frozen predictions the errors' fixed point does not depend on Phi, and eta = 1,
    # T = L - 1 reach it exactly: the paper's "no harm", measured as equality with backprop
    with jax.enable_x64(True):
        model, params, x, y = _problem("squared_error", (4, 9, 8, 7, 3), dtype=jnp.float64)
        rule = predictive_coding(fixed_prediction=True, error_connections="learned",
                                 error_std=1.0)
        updates, state, _ = _run(rule, model, params, x, y, squared_error)
        want = _backprop(model, params, x, y, squared_error)
        np.testing.assert_allclose(_flat(updates), _flat(want), rtol=0, atol=1e-10)
        # ... and Phi learned from errors it did not shape
        assert not np.allclose(_flat(state.error_weights),
                               _flat(rule.init(jax.random.PRNGKey(9), params, model)))


def _train_relaxed(kw, steps=30, decay=0.0, lr=0.2):
    """Trains a tiny tanh net on a fixed batch with the harness; returns the train state before
    the last step (host copies: the step donates its buffers), after it, and the metrics."""
    model = fb.mlp((6, 12, 12, 3))
    opt = optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr)) if decay else \
        optax.sgd(lr)
    rule = predictive_coding(steps=8, backward_lr=lr, backward_decay=decay, **kw)
    step = fb.train.make_train_step(model, rule, opt, loss="cross_entropy")
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (24, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (24,), 0, 3)
    history = []
    for _ in range(steps):
        before = jax.tree.map(np.array, state)
        state, metrics = step(state, x, y)
        history.append({k: float(v) for k, v in metrics.items()})
    return before, state, history


def test_learned_backward_weights_align_with_the_forward_weights():
    # the paper's rule (B takes W's own update): the angle between B and W falls during
    # training, below what random fixed B reach (feedback alignment turns W towards B too);
    # both learn
    _, _, learned = _train_relaxed({"backward": "learned"})
    _, _, fixed = _train_relaxed({"backward": "fixed"})
    assert learned[0]["pc_backward_angle"] == pytest.approx(fixed[0]["pc_backward_angle"])
    assert learned[0]["pc_backward_angle"] > 80.0
    assert learned[-1]["pc_backward_angle"] < learned[0]["pc_backward_angle"] - 20.0
    assert learned[-1]["pc_backward_angle"] < fixed[-1]["pc_backward_angle"] - 5.0
    for history in (learned, fixed):
        assert history[-1]["loss"] < 0.75 * history[0]["loss"], (history[0], history[-1])


def test_all_three_relaxations_learn_and_b_converges_to_w_with_decay():
    # fixed prediction with learned B, no backward f', learned dense error connections (the
    # paper's combined setting) lowers the loss; with SGD(alpha) and the same decay lambda on W,
    # W - B shrinks by exactly 1 - alpha lambda per step, whatever the updates
    # (Kolen-Pollack): B converges to W
    before, after, history = _train_relaxed({**_ALL, "fixed_prediction": True}, decay=0.1)
    for layer in range(1, 3):
        gap0 = np.asarray(before.params[layer]["w"] - before.rule_state.feedback[layer])
        gap1 = np.asarray(after.params[layer]["w"] - after.rule_state.feedback[layer])
        np.testing.assert_allclose(gap1, (1 - 0.2 * 0.1) * gap0, rtol=1e-4, atol=1e-6)
    assert history[-1]["pc_backward_angle"] < history[0]["pc_backward_angle"] - 15.0
    assert history[-1]["loss"] < 0.75 * history[0]["loss"], (history[0], history[-1])


def test_pc_without_nonlinear_derivatives_learns():
    _, _, history = _train_relaxed({"derivative": False, "update_derivative": False})
    assert history[-1]["loss"] < 0.75 * history[0]["loss"], (history[0], history[-1])


def test_relaxed_variant_vmaps_over_seeds_under_jit():
    model, _, x, y = _problem("cross_entropy")
    rule = predictive_coding(steps=6, **_ALL)
    ctx = StepContext(model, cross_entropy)

    def run(key):
        p = model.init(key)
        upd, state, out = rule.step(p, rule.init(key, p, model), Batch(x, y), key, ctx)
        return upd, state, out.loss, out.metrics

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    batched = jax.jit(jax.vmap(run))(keys)
    single = jax.jit(run)(keys[1])
    for g, w in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(g[1], w, rtol=1e-4, atol=1e-6)
    assert not np.allclose(batched[2][0], batched[2][1])  # the seeds really differ


@pytest.mark.parametrize("kwargs,err,match", [
    ({"backward": "transpose"}, ValueError, "backward 'transpose'; valid: weights, learned"),
    ({"error_connections": "dense"}, ValueError, "error_connections 'dense'"),
    ({"error_init": "eye"}, ValueError, "error_init 'eye'"),
    ({"derivative": "no"}, TypeError, "derivative must be True or False"),
    ({"update_derivative": 0}, TypeError, "update_derivative must be True or False"),
    ({"backward_lr": 0.0}, ValueError, "backward_lr must be > 0"),
    ({"backward_decay": -1.0}, ValueError, "backward_decay must be >= 0"),
    ({"backward_std": 0.0}, ValueError, "backward_std must be > 0"),
    ({"error_lr": -0.1}, ValueError, "error_lr must be > 0"),
    ({"error_std": float("nan")}, ValueError, "error_std"),
])
def test_bad_relaxed_options_are_refused(kwargs, err, match):
    with pytest.raises(err, match=match):
        predictive_coding(**kwargs)
