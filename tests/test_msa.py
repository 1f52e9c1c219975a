"""E-MSA (Li, Chen, Tai & E 2018): a NumPy reference of one step of Algorithm 2 on a two-layer
net, the one-inner-step limit (backprop's gradient, against ``jax.grad``), the ascent raising
the extended Hamiltonian, training in `fit`, and option checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.data import Dataset
from fbalign._src.losses import squared_error
from fbalign._src.rules.msa import extended_msa


def _problem(sizes=(3, 4, 2), dtype=jnp.float32, seed=0, n=5, activation="tanh"):
    """A network, its params (LeCun-scaled weights, non-zero biases so that the bias gradients
    are checked too) and a batch, drawn with NumPy (no RNG kernels to compile)."""
    rng = np.random.default_rng(seed)
    params = [{"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype),
               "b": jnp.asarray(0.1 * np.arange(b), dtype)}
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    x = jnp.asarray(rng.normal(size=(n, sizes[0])), dtype)
    y = jnp.asarray(rng.normal(size=(n, sizes[-1])), dtype)
    return fb.mlp(sizes, activation=activation), params, x, y


def _step(rule, model, params, x, y, loss=squared_error):
    state = rule.init(jax.random.PRNGKey(0), params, model)
    ctx = StepContext(model, loss)  # jitted: one compile is cheaper than many eager ops
    return jax.jit(lambda p, x, y: rule.step(p, state, Batch(x, y), jax.random.PRNGKey(0),
                                             ctx))(params, x, y)


def _numpy_emsa(params, x, y, rho, steps, lr, wd):
    """Algorithm 2 of the paper, written out for a tanh hidden layer and a linear output with
    squared error ``Phi = 0.5 ||x_2 - y||^2`` per example, all derivatives by hand."""
    ws = [np.asarray(p["w"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    sig = [np.tanh, lambda a: a]
    dsig = [lambda a: 1 - np.tanh(a) ** 2, np.ones_like]
    ddsig = [lambda a: -2 * np.tanh(a) * (1 - np.tanh(a) ** 2), np.zeros_like]
    # forward states and backward co-states at the current theta
    xs = [x]
    for t in range(2):
        xs.append(sig[t](xs[t] @ ws[t] + bs[t]))
    ps = [None, None, -(xs[2] - y)]
    for t in (1, 0):
        ps[t] = (ps[t + 1] * dsig[t](xs[t] @ ws[t] + bs[t])) @ ws[t].T
    # gradient ascent on each layer's batch-averaged extended Hamiltonian
    new_w, new_b = [w.copy() for w in ws], [b.copy() for b in bs]
    for t in range(2):
        w, b = new_w[t], new_b[t]
        xt, p_next, x_next, q = xs[t], ps[t + 1], xs[t + 1], ps[t]
        for _ in range(steps):
            a = xt @ w + b
            f = sig[t](a)
            u = p_next * dsig[t](a)  # dH/da
            r = u @ w.T  # grad_x H
            c = rho * (q - r)  # d/dr of -rho/2 ||q - r||^2
            g_a = u + rho * (x_next - f) * dsig[t](a) + (c @ w) * p_next * ddsig[t](a)
            gw = (xt.T @ g_a + c.T @ u) / n - wd * w
            gb = g_a.sum(0) / n - wd * b
            w, b = w + lr * gw, b + lr * gb
        new_w[t], new_b[t] = w, b
    return [{"b": bs[t] - new_b[t], "w": ws[t] - new_w[t]} for t in range(2)]


def test_one_step_matches_a_numpy_reference_of_algorithm_2():
    with jax.enable_x64(True):
        model, params, x, y = _problem(dtype=jnp.float64)
        rule = extended_msa(rho=0.5, inner_steps=3, inner_lr=0.3, weight_decay=0.05)
        updates, _, out = _step(rule, model, params, x, y)
        want = _numpy_emsa(params, x, y, rho=0.5, steps=3, lr=0.3, wd=0.05)
        assert_trees_close(updates, want, rtol=1e-10, atol=1e-13)
        assert updates[0]["w"].dtype == jnp.float64
        # the rho terms matter after the first step: rho = 0 gives another answer
        other = _numpy_emsa(params, x, y, rho=0.0, steps=3, lr=0.3, wd=0.05)
        gap = np.abs(np.asarray(updates[0]["w"]) - other[0]["w"]).max()
        assert gap > 1e-6
        # the ascent raised the extended Hamiltonian
        assert float(out.metrics["emsa_hamiltonian"]) > float(out.metrics["emsa_hamiltonian_start"])


@pytest.mark.parametrize("rho,wd", [(0.0, 0.0), (2.0, 0.1)])
def test_one_inner_step_is_lr_times_backprops_gradient(rho, wd):
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 4, 4, 2), dtype=jnp.float64)
        lr = 0.37
        updates, _, out = _step(extended_msa(rho=rho, inner_steps=1, inner_lr=lr,
                                             weight_decay=wd), model, params, x, y)
        grads = jax.jit(jax.grad(lambda p: squared_error(model.apply(p, x), y)))(params)
        want = jax.tree.map(lambda g, p: lr * (g + wd * p), grads, params)
        assert_trees_close(updates, want, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(out.loss, squared_error(model.apply(params, x), y))


def test_cross_entropy_terminal_costate_is_the_per_example_loss_gradient():
    with jax.enable_x64(True):
        model, params, x, _ = _problem((3, 4, 4, 2), dtype=jnp.float64)
        y = jnp.arange(5) % 2
        rule = extended_msa(rho=1.0, inner_steps=1, inner_lr=0.5)
        updates = _step(rule, model, params, x, y, fb.losses.cross_entropy)[0]
        grads = jax.jit(jax.grad(lambda p: fb.losses.cross_entropy(model.apply(p, x), y)))(
            params)
        assert_trees_close(updates, jax.tree.map(lambda g: 0.5 * g, grads), rtol=1e-10,
                           atol=1e-13)


def test_fit_with_sgd_one_lowers_the_loss_on_a_tiny_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    data = Dataset("tiny", x, y, x[:0], y[:0], x[:16], y[:16], 0)
    model = fb.mlp((3, 8, 1))
    rule = extended_msa(rho=0.1, inner_steps=3, inner_lr=0.1)
    start = fb.train.init_train_state(model, rule, optax.sgd(1.0), jax.random.PRNGKey(0))
    before = fb.train.evaluate(model, start.params, x, y, loss="squared_error")["loss"]
    res = fb.train.fit(model, rule, optax.sgd(1.0), data, loss="squared_error", epochs=4,
                       batch_size=16, progress=False, state=start)
    after = fb.train.evaluate(model, res.state.params, x, y, loss="squared_error")["loss"]
    assert after < 0.5 * before
    assert res.history[-1]["train_emsa_hamiltonian"] > res.history[-1][
        "train_emsa_hamiltonian_start"]


@pytest.mark.parametrize("kwargs,match", [
    ({"rho": -0.1}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"inner_lr": 0.0}, "inner_lr"),
    ({"inner_lr": True}, "inner_lr"),
    ({"inner_steps": 0}, "inner_steps must be a positive integer"),
    ({"inner_steps": 2.0}, "inner_steps must be a positive integer"),
    ({"weight_decay": -1.0}, "weight_decay"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extended_msa(**kwargs)


def test_non_mlp_network_is_refused_naming_the_rule():
    net = fb.models.from_function(lambda p, x: x @ p, lambda key: jnp.ones((3, 2)))
    rule = extended_msa()
    with pytest.raises(TypeError, match="emsa.*fbalign.models.mlp"):
        rule.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), net)
    with pytest.raises(TypeError, match="emsa.*fbalign.models.mlp"):
        rule.step(jnp.ones((3, 2)), None, Batch(jnp.ones((4, 3)), jnp.zeros((4, 2))),
                  jax.random.PRNGKey(0), StepContext(net, squared_error))
