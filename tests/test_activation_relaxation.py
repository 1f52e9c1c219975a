"""Activation relaxation (Millidge et al. 2020): the relaxed activities reach backprop's adjoints
at the rate the dynamics contract, one step matches a NumPy reference of the paper's Euler
step, learned backward weights align with W, dropping f' still learns, and the harness trains
with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.rules.activation_relaxation import activation_relaxation


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _problem(sizes=(5, 7, 6, 3), batch=8, dtype=jnp.float32, seed=0):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(seed), dtype)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]), dtype)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _run(rule, model, params, x, y, loss=cross_entropy, state=None):
    if state is None:
        state = rule.init(jax.random.PRNGKey(9), params, model)
    return rule.step(params, state, Batch(x, y), jax.random.PRNGKey(10), StepContext(model, loss))


def _backprop(model, params, x, y, loss=cross_entropy):
    return jax.grad(lambda p: loss(model.apply(p, x), y))(params)


@pytest.mark.parametrize("steps,eta", [(1, 1.0), (5, 0.5), (20, 0.3), (60, 0.1)])
def test_one_hidden_layer_error_decays_exactly_as_one_minus_eta_to_the_t(steps, eta):
    # One hidden layer: x_1(t) - x_1* = (1-eta)^t (h_1 - x_1*) exactly (the target is fixed), so
    # the W_1 update's error is (1-eta)^t times its error at t = 0, the bound the tolerance of
    # the fixed-point test below derives from.
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 9, 3), dtype=jnp.float64)
        bp = _backprop(model, params, x, y)
        u0 = _run(activation_relaxation(steps=1, step_size=1e-300), model, params, x, y)[0]
        u, _, out = _run(activation_relaxation(steps=steps, step_size=eta), model, params, x, y)
        e0 = _flat(u0[0]) - _flat(bp[0])
        np.testing.assert_allclose(_flat(u[0]) - _flat(bp[0]), (1 - eta) ** steps * e0,
                                   atol=1e-14)
        np.testing.assert_allclose(_flat(u[1]), _flat(bp[1]), atol=1e-14)  # the clamped layer
        assert float(out.metrics["ar_steps"]) == steps


@pytest.mark.parametrize("loss", [cross_entropy, squared_error])
def test_fixed_point_is_backprops_adjoint(loss):
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 8, 7, 6, 3), dtype=jnp.float64)
        if loss is squared_error:
            y = jax.random.normal(jax.random.PRNGKey(5), (8, 3), jnp.float64)
        bp = _flat(_backprop(model, params, x, y, loss))
        u, _, out = _run(activation_relaxation(steps=300, step_size=0.2), model, params, x, y,
                         loss)
        # error of layer L-1-k: O(t^k (1 - eta)^(t - k)) times the initial error (O(1)):
        # 300^2 * 0.8^298 ~ 1e-24, far below float64's rounding
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-12)
        assert float(out.metrics["ar_residual"]) < 1e-14
        # eta = 1 is exact after L - 1 = 3 steps
        u, _, _ = _run(activation_relaxation(steps=3, step_size=1.0), model, params, x, y, loss)
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-14)
        # too few steps is not: the lowest layer still remembers its feedforward start
        u, _, out = _run(activation_relaxation(steps=2, step_size=1.0), model, params, x, y,
                         loss)
        assert np.abs(_flat(u) - bp).max() > 1e-3
        assert float(out.metrics["ar_residual"]) > 1e-3


def test_float32_default_converges_within_its_contraction_bound():
    model, params, x, y = _problem((5, 7, 6, 3))
    bp = _flat(_backprop(model, params, x, y))
    u, _, out = _run(activation_relaxation(), model, params, x, y)  # 100 steps, eta = 0.1
    bound = 100 * 0.9**99 * 10  # t^k (1-eta)^(t-k) with k = 1, times |h - x*| <= ~10
    assert np.abs(_flat(u) - bp).max() < bound
    assert float(out.metrics["ar_residual"]) < bound


def test_one_step_matches_a_numpy_reference_of_the_papers_dynamics():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 7, 6, 3), dtype=jnp.float64)
        eta = 0.3
        u, _, _ = _run(activation_relaxation(steps=1, step_size=eta), model, params, x, y)
        ws = [np.asarray(p["w"]) for p in params]
        bs = [np.asarray(p["b"]) for p in params]
        xn = np.asarray(x)
        a1 = xn @ ws[0] + bs[0]
        h1 = np.tanh(a1)
        a2 = h1 @ ws[1] + bs[1]
        h2 = np.tanh(a2)
        a3 = h2 @ ws[2] + bs[2]
        p = np.exp(a3 - a3.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = (p - np.eye(3)[np.asarray(y)]) / len(xn)  # dL/dy of the batch-mean CE
        d1, d2 = 1 - h1**2, 1 - h2**2
        # dx_l/dt = -x_l + (x_{l+1} * f'(a_{l+1})) W_{l+1}^T, Euler step, x(0) = h
        x2 = h2 + eta * (-h2 + top @ ws[2].T)
        x1 = h1 + eta * (-h1 + (h2 * d2) @ ws[1].T)
        want = [{"b": (x1 * d1).sum(0), "w": xn.T @ (x1 * d1)},
                {"b": (x2 * d2).sum(0), "w": h1.T @ (x2 * d2)},
                {"b": top.sum(0), "w": h2.T @ top}]
        np.testing.assert_allclose(_flat(u), _flat(want), rtol=1e-10, atol=1e-14)


def test_learned_backward_weights_align_over_training():
    model = fb.mlp((6, 16, 16, 3))
    lr, decay = 0.1, 0.05
    rule = activation_relaxation(steps=30, step_size=0.3, learn_backward=True, backward_lr=lr,
                                 backward_decay=decay)
    opt = optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr))
    step = fb.train.make_train_step(model, rule, opt, loss="cross_entropy")
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
    y = jnp.argmax(x[:, :3], axis=1)
    angles = []
    for _ in range(300):
        state, metrics = step(state, x, y)
        angles.append(float(metrics["ar_backward_angle"]))
    assert angles[0] > 70.0  # random B starts near orthogonal to W
    assert angles[-1] < 0.5 * angles[0], (angles[0], angles[-1])
    assert np.all(np.diff(angles[::50]) < 0), angles[::50]


def test_learned_backward_weights_equal_to_w_give_backprop():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 7, 6, 3), dtype=jnp.float64)
        rule = activation_relaxation(steps=3, step_size=1.0, learn_backward=True)
        state = rule.init(jax.random.PRNGKey(0), params, model)
        assert state.feedback[0] is None
        assert [b.shape for b in state.feedback[1:]] == [p["w"].shape for p in params[1:]]
        state = type(state)((None, *(p["w"] for p in params[1:])))
        u, new, out = _run(rule, model, params, x, y, state=state)
        np.testing.assert_allclose(_flat(u), _flat(_backprop(model, params, x, y)), atol=1e-14)
        assert float(out.metrics["ar_backward_angle"]) < 1e-5
        np.testing.assert_allclose(new.feedback[1], params[1]["w"] - 0.01 * u[1]["w"])


def test_without_the_derivative_it_differs_from_backprop_but_learns():
    model, params, x, y = _problem((6, 16, 3), batch=64)
    bp = _flat(_backprop(model, params, x, y))
    u, _, _ = _run(activation_relaxation(steps=100, step_size=0.3, derivative=False), model,
                   params, x, y)
    cos = _flat(u) @ bp / (np.linalg.norm(_flat(u)) * np.linalg.norm(bp))
    assert np.abs(_flat(u) - bp).max() > 1e-3
    assert cos > 0.3  # still a descent direction
    data = fb.data.load_dataset("digits")
    res = fb.train.fit(fb.mlp((64, 32, 10)), activation_relaxation(steps=30, step_size=0.3,
                                                                   derivative=False),
                       optax.adam(1e-2), data, epochs=1, progress=False)
    assert res.history[-1]["test_error"] < 40.0  # chance: 90 %


def test_jit_equals_eager_and_vmap_over_seeds():
    model, _, x, y = _problem()
    rule = activation_relaxation(steps=20, learn_backward=True)
    ctx = StepContext(model, cross_entropy)

    def run(key):
        p = model.init(key)
        return rule.step(p, rule.init(key, p, model), Batch(x, y), key, ctx)

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    eager = run(keys[0])
    for g, w in zip(jax.tree.leaves(jax.jit(run)(keys[0])), jax.tree.leaves(eager),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    batched = jax.vmap(run)(keys)
    for i in range(3):
        for g, w in zip(jax.tree.leaves(batched), jax.tree.leaves(run(keys[i])), strict=True):
            np.testing.assert_allclose(g[i], w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"tol": 1e-5}, {"derivative": False}])
def test_runs_in_the_harness_train_step(kwargs):
    model = fb.mlp((6, 8, 3))
    rule = activation_relaxation(steps=50, step_size=0.3, **kwargs)
    step = fb.train.make_train_step(model, rule, optax.sgd(0.1), loss="cross_entropy")
    state = fb.train.init_train_state(model, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 3)
    first = None
    for _ in range(30):
        state, metrics = step(state, x, y)
        first = float(metrics["loss"]) if first is None else first
    assert {"ar_steps", "ar_residual"} <= set(metrics)
    assert float(metrics["loss"]) < 0.8 * first
    if "tol" in kwargs:
        assert float(metrics["ar_steps"]) < 50


@pytest.mark.parametrize("kwargs,match", [
    ({"step_size": 0.0}, "step_size must be a positive"),
    ({"step_size": -1.0}, "step_size must be a positive"),
    ({"step_size": 2.0}, "below 2"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"tol": 0.0}, "tol must be positive"),
    ({"backward_lr": 0.0}, "backward_lr"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        activation_relaxation(**kwargs)


def test_non_mlp_network_is_refused_naming_the_rule():
    net = fb.models.from_function(lambda p, x: x @ p, lambda key: jnp.ones((3, 2)))
    rule = activation_relaxation()
    with pytest.raises(TypeError, match="activation_relaxation.*fbalign.models.mlp"):
        rule.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), net)
    with pytest.raises(TypeError, match="activation_relaxation.*fbalign.models.mlp"):
        rule.step(jnp.ones((3, 2)), None, Batch(jnp.ones((4, 3)), jnp.zeros(4, int)),
                  jax.random.PRNGKey(0), StepContext(net, cross_entropy))
