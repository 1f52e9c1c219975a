"""The HSIC bottleneck (Ma, Lewis & Kleijn 2020): the estimators equal their trace formulas
(NumPy), HSIC behaves as a dependence measure (positive on X vs X, its exact null expectation on
independent samples), each layer's update is jax.grad of its own objective and nothing above it,
the data-parallel step on a fake device axis equals the single-device one, and fit learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.rules.hsic import (
    gaussian_kernel,
    hsic,
    hsic_bottleneck,
    linear_kernel,
    normalized_hsic,
)


def _np_gauss(a, sigma):
    a = np.asarray(a, np.float64)
    d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2 * a.shape[1]))  # the paper's code: width sigma * sqrt(d)


def _np_hsic(kx, ky):
    m = len(kx)
    h = np.eye(m) - np.ones((m, m)) / m
    return np.trace(kx @ h @ ky @ h) / (m - 1) ** 2


def _np_nhsic(kx, ky, eps):
    m = len(kx)
    h = np.eye(m) - np.ones((m, m)) / m
    r = [(h @ k @ h) @ np.linalg.inv(h @ k @ h + eps * m * np.eye(m)) for k in (kx, ky)]
    return np.trace(r[0] @ r[1])


def test_estimators_equal_the_trace_formulas():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, z = rng.normal(size=(12, 5)), rng.normal(size=(12, 3))
        y = np.eye(4)[rng.integers(0, 4, 12)]
        a, b = rng.normal(size=(7, 7)), rng.normal(size=(7, 7))
        kz = _np_gauss(z, 0.7)

        @jax.jit
        def ours(x, kz, y, a, b):
            kx = gaussian_kernel(x, 5.0)
            return (kx, hsic(kx, kz), hsic(a, b), normalized_hsic(kx, kz, 1e-3),
                    hsic(kx, gaussian_kernel(y, 5.0)), hsic(kx, linear_kernel(y)))

        kx, h, h_ab, nh, h_gauss, h_lin = ours(x, kz, y, a, b)
        np.testing.assert_allclose(kx, _np_gauss(x, 5.0), rtol=1e-12)
        np.testing.assert_allclose(float(h), _np_hsic(_np_gauss(x, 5.0), kz), rtol=1e-10)
        # a non-symmetric "kernel" too: the formula is tr(K_X H K_Y H), not a symmetric shortcut
        np.testing.assert_allclose(float(h_ab), _np_hsic(a, b), rtol=1e-10)
        np.testing.assert_allclose(float(nh), _np_nhsic(_np_gauss(x, 5.0), kz, 1e-3), rtol=1e-8)
        # one-hot labels: the Gaussian kernel is a + c [y_i = y_j], so centring leaves c * linear
        c = 1 - np.exp(-1 / (5.0**2 * 4))
        np.testing.assert_allclose(float(h_gauss), c * float(h_lin), rtol=1e-10)


def test_hsic_is_positive_on_dependent_data_and_at_its_null_mean_on_independent_data():
    # Under independence E[K_X] = (1-kx)I + kx 11^T, so E tr(K_X H K_Y H) = tr((1-kx) H E[K_Y])
    # = (1-kx)(1-ky)(m-1): E[HSIC] = (1-kx)(1-ky)/(m-1) exactly, kx, ky the off-diagonal means.
    m, reps, sigma = 64, 200, 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), reps)

    def one(k):
        kx_, ky_ = jax.random.split(k)
        x, y = jax.random.normal(kx_, (m, 2)), jax.random.normal(ky_, (m, 2))
        kx, ky = gaussian_kernel(x, sigma), gaussian_kernel(y, sigma)
        off = lambda a: (jnp.sum(a) - jnp.trace(a)) / (m * (m - 1))
        return (hsic(kx, ky), hsic(kx, kx), hsic(kx, gaussian_kernel(x**2, sigma)), off(kx),
                off(ky))

    ind, same, dep, mx, my = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(one))(keys))
    null = (1 - mx.mean()) * (1 - my.mean()) / (m - 1)
    se = ind.std() / np.sqrt(reps)
    assert abs(ind.mean() - null) < 4 * se, (ind.mean(), null, se)
    assert se < 0.1 * null  # the check above is sharp
    assert np.all(same > 0) and np.all(same > 5 * null)  # HSIC(X, X) > 0, far from the null
    assert np.mean(dep) > 2 * null  # a dependent (uncorrelated!) pair: x vs x^2


def _problem(sizes=(6, 5, 4, 3), batch=16, seed=0, act="tanh"):
    model = fb.mlp(sizes, activation=act)
    params = model.init(jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _step(rule, model, params, x, y, axis_name=None):
    state = rule.init(jax.random.PRNGKey(0), params, model)
    return rule.step(params, state, Batch(x, y), jax.random.PRNGKey(1),
                     StepContext(model, fb.cross_entropy, axis_name))


_STEPS = {}


def _jit_step(normalized, model, beta=7.0, sigma=2.0):
    """The single-device step, jitted once per configuration (one compile, shared by tests,
    instead of one per eager op: what makes tiny tests slow)."""
    key = (normalized, model, beta, sigma)
    if key not in _STEPS:
        rule = hsic_bottleneck(beta=beta, sigma=sigma, normalized=normalized)
        _STEPS[key] = jax.jit(lambda p, x, y: _step(rule, model, p, x, y))
    return _STEPS[key]


def _objective(layer, h_in, x, y_onehot, beta, sigma, normalized, eps=1e-5):
    """The paper's layer objective, written here with explicit H and inverses."""
    m = x.shape[0]
    h = jnp.eye(m) - jnp.ones((m, m)) / m

    def kern(a):
        d2 = jnp.sum((a[:, None, :] - a[None, :, :]) ** 2, -1)
        return jnp.exp(-d2 / (2 * sigma**2 * a.shape[1]))

    def est(ka, kb):
        if not normalized:
            return jnp.trace(ka @ h @ kb @ h) / (m - 1) ** 2
        ra, rb = ((h @ k @ h) @ jnp.linalg.inv(h @ k @ h + eps * m * jnp.eye(m)) for k in (ka, kb))
        return jnp.trace(ra @ rb)

    kz = kern(jnp.tanh(jax.lax.stop_gradient(h_in) @ layer["w"] + layer["b"]))
    return est(kz, kern(x)) - beta * est(kz, kern(y_onehot))


@pytest.mark.parametrize("normalized", [False, True])
def test_layer_update_is_grad_of_its_own_objective_and_nothing_above(normalized):
    model, params, x, y = _problem()
    beta, sigma = 7.0, 2.0
    step = _jit_step(normalized, model, beta, sigma)
    updates, _, out = step(params, x, y)

    @jax.jit
    def reference(params):
        y1 = jax.nn.one_hot(y, 3)
        h1 = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
        h2 = jnp.tanh(h1 @ params[1]["w"] + params[1]["b"])
        hidden = [jax.grad(_objective)(params[i], h_in, x, y1, beta, sigma, normalized)
                  for i, h_in in ((0, x), (1, h1))]
        # the output ("format") layer: the loss's gradient with its input stopped
        top = jax.grad(lambda p: fb.cross_entropy(h2 @ p["w"] + p["b"], y))(params[2])
        return hidden + [top], h2 @ params[2]["w"] + params[2]["b"]

    want, output = reference(params)
    for i in (0, 1):
        assert_trees_close(updates[i], want[i], rtol=2e-3, atol=1e-6 * (1 + 1e3 * normalized))
    assert_trees_close(updates[2], want[2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.output, output, rtol=1e-5, atol=1e-6)
    # locality: changing every layer above layer 0 leaves its update unchanged ...
    moved = [params[0]] + [jax.tree.map(lambda a: 3 * a + 1, p) for p in params[1:]]
    moved_updates = step(moved, x, y)[0]
    assert_trees_close(moved_updates[0], updates[0], rtol=0, atol=0)
    # ... while layer 1's update does change (it is not constant)
    assert not np.allclose(moved_updates[1]["w"], updates[1]["w"])


def test_data_parallel_step_on_a_fake_device_axis_equals_the_global_batch_step():
    # float64, so that the comparison is sharp (nHSIC's solves lose digits in float32); the
    # normalised estimator (the plain one is a special case: the gathering and scaling do not
    # depend on the estimator, and a factor of the axis size would show in either)
    with jax.enable_x64(True):
        model, params, x, y = _problem(batch=16)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x = x.astype(jnp.float64)
        rule = hsic_bottleneck(beta=7.0, sigma=2.0, normalized=True)

        def shard(xs, ys):  # what the harness does on every device: the rule, then pmean
            updates, _, o = _step(rule, model, params, xs, ys, axis_name="d")
            return jax.lax.pmean((updates, o.metrics), "d")

        @jax.jit
        def both(x, y):
            return (_step(rule, model, params, x, y),
                    jax.vmap(shard, axis_name="d")(x.reshape(4, 4, -1), y.reshape(4, 4)))

        (want, _, out), (got, metrics) = both(x, y)
    got = jax.tree.map(lambda a: a[0], got)
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)
    for k in ("hsic_zx", "hsic_zy"):
        np.testing.assert_allclose(metrics[k], float(out.metrics[k]), rtol=1e-9)


def test_fit_lowers_the_loss_and_the_layer_objectives():
    full = fb.data.load_dataset("digits")
    data = full._replace(x_train=full.x_train[:320], y_train=full.y_train[:320],
                         x_test=full.x_test[:100], y_test=full.y_test[:100])
    res = fb.train.fit(fb.mlp((64, 24, 10), activation="relu"), hsic_bottleneck(beta=50.0),
                       optax.adam(3e-2), data, epochs=4, batch_size=64, progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]  # epoch means, 5 steps each
    objective = lambda r: r["train_hsic_zx"] - 50.0 * r["train_hsic_zy"]
    assert objective(last) < objective(first)
    assert last["test_error"] < 50.0  # chance: 90 %


def test_bad_options_and_networks_are_refused():
    for kwargs, match in [({"beta": -1.0}, "beta"), ({"sigma": 0.0}, "sigma"),
                          ({"sigma": True}, "sigma"), ({"label_kernel": "rbf"},
                                                      "label_kernel.*gaussian, linear"),
                          ({"normalized": "yes"}, "normalized"), ({"epsilon": 0}, "epsilon")]:
        with pytest.raises(ValueError, match=match):
            hsic_bottleneck(**kwargs)
    rule = hsic_bottleneck()
    one_layer = fb.mlp((4, 3))
    with pytest.raises(ValueError, match="hidden layer"):
        rule.init(jax.random.PRNGKey(0), one_layer.init(jax.random.PRNGKey(0)), one_layer)
    with pytest.raises(TypeError, match="dense fbalign.models.mlp"):
        rule.init(jax.random.PRNGKey(0), [], object())
