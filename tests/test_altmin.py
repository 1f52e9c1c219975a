"""Online alternating minimisation (Choromanska et al. 2019): the code step reaches the closed-form
minimiser of each layer's subproblem (linear layers) and a numerical argmin (tanh), the weight
updates are the local least-squares gradients at the codes, the running statistics follow their
recursion, and fit() trains with it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.data import load_teacher
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.rules.altmin import alternating_minimization, update_codes


def _problem(sizes, activation, loss_name, batch=6, dtype=jnp.float64, seed=0):
    model = fb.mlp(sizes, activation=activation)
    params = model.init(jax.random.PRNGKey(seed), dtype)
    params = [{"w": p["w"], "b": 0.1 * jnp.arange(p["b"].size, dtype=dtype)} for p in params]
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]), dtype)
    if loss_name == "squared_error":
        y = jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, sizes[-1]), dtype)
    else:
        y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _closed_form_codes(params, x, y, mu):
    """Linear network, squared error: the paper's subproblems, solved top-down in NumPy.

    Top (per example): (1/mu) 1/2 ||y - c W - b||^2 + ||c - c0||^2
        => c (W W^T / mu + 2 I) = (y - b) W^T / mu + 2 c0.
    Below: ||c_above - c W - b||^2 + ||c - c0||^2  =>  c (W W^T + I) = (c_above - b) W^T + c0.
    """
    p = _np(params)
    c0, h = [], np.asarray(x, np.float64)
    for layer in p[:-1]:
        c0.append(h @ layer["w"] + layer["b"])
        h = c0[-1]
    codes = list(c0)
    top = len(codes) - 1
    for j in range(top, -1, -1):
        w, b = p[j + 1]["w"], p[j + 1]["b"]
        if j == top:
            lhs = w @ w.T / mu + 2 * np.eye(w.shape[0])
            rhs = (np.asarray(y) - b) @ w.T / mu + 2 * c0[j]
        else:
            lhs = w @ w.T + np.eye(w.shape[0])
            rhs = (codes[j + 1] - b) @ w.T + c0[j]
        codes[j] = np.linalg.solve(lhs, rhs.T).T
    return codes


def test_code_step_reaches_the_closed_form_minimiser_on_a_linear_network():
    # Nesterov momentum here; plain descent reaches it too (the step test below)
    mu = 0.5
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 4, 5, 2), "linear", "squared_error")
        codes = _codes(model, params, x, y, squared_error, mu, steps=300, step_size=0.05,
                       momentum=0.5)
        want = _closed_form_codes(params, x, y, mu)
    for got, w in zip(codes, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=1e-10)
    # the codes really moved from the forward pass
    fwd = _closed_form_codes(params, x, y, 1e12)
    assert min(np.abs(w - f).max() for w, f in zip(want, fwd, strict=True)) > 1e-2


def test_code_step_reaches_a_numerical_argmin_on_a_tanh_network():
    mu = 0.3
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 5, 4, 3), "tanh", "cross_entropy", batch=4)
        codes = _codes(model, params, x, y, cross_entropy, mu, steps=3000, step_size=0.05)
    p, xn, yn = _np(params), np.asarray(x, np.float64), np.asarray(y)
    n = len(xn)
    c1_0 = xn @ p[0]["w"] + p[0]["b"]
    c2_0 = np.tanh(c1_0) @ p[1]["w"] + p[1]["b"]

    def top(v):  # (1/mu) sum_n CE(softmax(tanh(c) W3 + b3), y) + ||c - c2_0||^2
        c = v.reshape(c2_0.shape)
        logits = np.tanh(c) @ p[2]["w"] + p[2]["b"]
        logz = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
        ce = np.sum(logz - logits[np.arange(n), yn])
        return ce / mu + np.sum((c - c2_0) ** 2)

    c2 = scipy.optimize.minimize(top, c2_0.ravel(), method="BFGS", tol=1e-12).x
    c2 = c2.reshape(c2_0.shape)

    def below(v):  # ||c2 - tanh(c) W2 - b2||^2 + ||c - c1_0||^2
        c = v.reshape(c1_0.shape)
        return np.sum((c2 - np.tanh(c) @ p[1]["w"] - p[1]["b"]) ** 2) + np.sum((c - c1_0) ** 2)

    c1 = scipy.optimize.minimize(below, c1_0.ravel(), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(np.asarray(codes[1]), c2, atol=2e-5)
    np.testing.assert_allclose(np.asarray(codes[0]), c1.reshape(c1_0.shape), atol=2e-5)
    assert np.abs(c2 - c2_0).max() > 1e-2


def _step(rule, model, params, x, y, loss, state=None):
    """The rule's step, jitted (one compile per rule), from its initial state by default."""
    if state is None:
        state = rule.init(jax.random.PRNGKey(0), params, model)
    ctx = StepContext(model, loss)
    return _jitted(rule)(params, state, Batch(x, y), jax.random.PRNGKey(1), ctx)


@functools.cache
def _jitted(rule):
    return jax.jit(rule.step, static_argnums=4)


@functools.cache
def _jitted_codes(model, loss, mu, steps, step_size, momentum):
    acts = model.activations()
    return jax.jit(lambda p, x, y: update_codes(p, acts, x, y, loss, mu, steps=steps,
                                                step_size=step_size, momentum=momentum))


def _codes(model, params, x, y, loss, mu, *, steps, step_size, momentum=0.0):
    return _jitted_codes(model, loss, mu, steps, step_size, momentum)(params, x, y)


def test_weight_updates_are_the_local_least_squares_gradients_at_the_codes():
    mu = 0.5
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 4, 5, 2), "linear", "squared_error")
        rule = alternating_minimization(mu=mu, code_steps=600, code_lr=0.05)
        updates, _, out = _step(rule, model, params, x, y, squared_error)
        codes = _closed_form_codes(params, x, y, mu)
        fwd = np.asarray(model.apply(params, x))
    p, xn, yn = _np(params), np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(xn)
    ins = [xn, *codes]  # linear f: f(c) = c
    for layer, u, c, got in zip(p[:-1], ins[:-1], codes, updates[:-1], strict=True):
        r = c - u @ layer["w"] - layer["b"]  # d/dW 1/(2N) sum ||r||^2 = -u^T r / N
        np.testing.assert_allclose(np.asarray(got["w"]), -u.T @ r / n, atol=1e-10)
        np.testing.assert_allclose(np.asarray(got["b"]), -r.sum(0) / n, atol=1e-10)
    r = yn - ins[-1] @ p[-1]["w"] - p[-1]["b"]  # squared error: 1/(2N) sum ||y - out||^2
    np.testing.assert_allclose(np.asarray(updates[-1]["w"]), -ins[-1].T @ r / n, atol=1e-10)
    np.testing.assert_allclose(np.asarray(updates[-1]["b"]), -r.sum(0) / n, atol=1e-10)
    np.testing.assert_allclose(out.loss, 0.5 * np.mean(np.sum((fwd - yn) ** 2, 1)), rtol=1e-12)


def test_weight_updates_on_tanh_equal_jax_grad_of_the_local_losses_with_codes_fixed():
    with jax.enable_x64(True):
        # the codes of the scipy test above (same problem: one compile of update_codes)
        model, params, x, y = _problem((3, 5, 4, 3), "tanh", "cross_entropy", batch=4)
        rule = alternating_minimization(mu=0.3, code_steps=3000, code_lr=0.05)
        updates, _, out = _step(rule, model, params, x, y, cross_entropy)
        codes = _codes(model, params, x, y, cross_entropy, 0.3, steps=3000, step_size=0.05)
        h = [x, jnp.tanh(codes[0]), jnp.tanh(codes[1])]

        def total(p):
            ls = sum(0.5 * jnp.mean(jnp.sum((c - u @ q["w"] - q["b"]) ** 2, 1))
                     for q, u, c in zip(p[:2], h[:2], codes, strict=True))
            return ls + cross_entropy(h[2] @ p[2]["w"] + p[2]["b"], y)

        want = jax.grad(total)(params)
        bp = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
    for g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-12)
    # the hidden layers learn (codes moved), and not as backprop does
    assert np.abs(np.asarray(updates[0]["w"])).max() > 1e-4
    assert not np.allclose(np.asarray(updates[0]["w"]), np.asarray(bp[0]["w"]), atol=1e-6)
    assert set(out.metrics) == {"altmin_mu", "altmin_code_loss", "altmin_penalty"}
    assert float(out.metrics["altmin_code_loss"]) < float(out.loss)


def test_memory_keeps_running_statistics_and_descends_their_surrogate():
    eta = 0.3  # not 0.5, where eta and 1 - eta coincide
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 5, 4, 3), "tanh", "cross_entropy", batch=5)
        x2 = jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype)
        rule = alternating_minimization(mu=0.2, memory=eta)
        _, state, _ = _step(rule, model, params, x, y, cross_entropy)
        upd, state, _ = _step(rule, model, params, x2, y, cross_entropy, state)
        a_ref, b_ref = None, None
        for xb in (x, x2):
            codes = [np.asarray(c) for c in _codes(model, params, xb, y, cross_entropy, 0.2,
                                                   steps=5, step_size=0.1)]
            u = np.concatenate([np.asarray(xb), np.ones((len(xb), 1))], 1)
            stats = (u.T @ u / len(xb), u.T @ codes[0] / len(xb))
            if a_ref is None:
                a_ref, b_ref = eta * stats[0], eta * stats[1]
            else:
                a_ref = (1 - eta) * a_ref + eta * stats[0]
                b_ref = (1 - eta) * b_ref + eta * stats[1]
    np.testing.assert_allclose(np.asarray(state.memory_a[0]), a_ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.memory_b[0]), b_ref, atol=1e-12)
    w_aug = np.concatenate([np.asarray(params[0]["w"]), np.asarray(params[0]["b"])[None]], 0)
    grad = a_ref @ w_aug - b_ref
    np.testing.assert_allclose(np.asarray(upd[0]["w"]), grad[:-1], atol=1e-12)
    np.testing.assert_allclose(np.asarray(upd[0]["b"]), grad[-1], atol=1e-12)


def test_mu_schedule_grows_by_its_increment_up_to_its_cap():
    model, params, x, y = _problem((3, 4, 2), "tanh", "cross_entropy", dtype=jnp.float32)
    rule = alternating_minimization(mu=0.1, code_steps=0, mu_increment=0.04, mu_max=0.2)
    state = rule.init(None, params, model)
    step = _jitted(rule)
    seen = []
    for _ in range(5):
        _, state, out = step(params, state, Batch(x, y), None, StepContext(model, cross_entropy))
        seen.append(float(out.metrics["altmin_mu"]))
    np.testing.assert_allclose(seen, [0.1, 0.14, 0.18, 0.2, 0.2], rtol=1e-6)
    assert int(state.step) == 5


def test_fit_lowers_the_loss_and_trains_the_hidden_layer():
    data = load_teacher(n_train=256, n_test=128, input_dim=8, hidden=16, output_dim=3)
    model, rule, opt = fb.mlp((8, 16, 3)), alternating_minimization(mu=0.1), optax.adam(1e-2)
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    start = jax.tree.map(np.asarray, state.params)
    before = float(cross_entropy(model.apply(start, data.x_train), data.y_train))
    res = fb.train.fit(model, rule, opt, data, epochs=6, batch_size=64, progress=False,
                       log_every=4, state=state)
    after = res.history[-1]["train_loss"]
    assert after < 0.5 * before, (before, after)
    assert res.history[-1]["test_accuracy"] > 0.7
    assert np.abs(np.asarray(res.state.params[0]["w"] - start[0]["w"])).max() > 1e-2


@pytest.mark.parametrize("kwargs,match", [
    ({"mu": 0.0}, "mu"), ({"mu": -1.0}, "mu"), ({"code_steps": -1}, "code_steps"),
    ({"code_steps": 2.5}, "code_steps"), ({"code_lr": 0.0}, "code_lr"),
    ({"code_momentum": 1.0}, "code_momentum"), ({"memory": 0.0}, "memory"),
    ({"memory": 1.5}, "memory"), ({"mu_increment": -0.1}, "mu_increment"),
    ({"mu": 0.5, "mu_max": 0.1}, "mu_max"),
])
def test_bad_options_raise_naming_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alternating_minimization(**kwargs)


def test_a_network_without_dense_layers_is_refused():
    net = fb.models.from_function(lambda p, x: x @ p, lambda k: jnp.zeros((3, 2)))
    with pytest.raises(TypeError, match="alternating_minimization.*fbalign.models.mlp"):
        alternating_minimization().init(None, jnp.zeros((3, 2)), net)
