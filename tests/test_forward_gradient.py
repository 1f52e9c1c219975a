"""Forward gradient (Baydin et al. 2022) through the `LearningRule` step protocol: unbiased with
the variance the estimator's algebra gives, equal to a finite-difference reference, and trained
by the harness like any other rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.rules import Batch, StepContext, forward_gradient, sample_tangents


def _problem(sizes=(4, 5, 3), batch=8):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _step(rule, model, params, x, y, key):
    ctx = StepContext(model, fb.cross_entropy)
    return rule.step(params, rule.init(key, params, model), Batch(x, y), key, ctx)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_monte_carlo_mean_equals_grad_within_the_estimators_standard_error(distribution):
    model, params, x, y = _problem()
    g = _flat(jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), y))(params))
    k = 5_000
    updates, _, out = _step(forward_gradient(k, distribution), model, params, x, y,
                            jax.random.PRNGKey(5))
    est = _flat(updates)
    # Var[g_i] of one tangent: ||g||^2 + g_i^2 (normal: E v^4 = 3), ||g||^2 - g_i^2 (Rademacher)
    var1 = g @ g + (g**2 if distribution == "normal" else -(g**2))
    sigma = np.sqrt(np.maximum(var1, 1e-12) / k)
    z = (est - g) / sigma
    assert np.all(np.abs(z) < 5.0), f"max |z| = {np.abs(z).max():.2f}"
    assert 0.3 < np.mean(z**2) < 2.0  # the spread is the predicted one, not much smaller
    np.testing.assert_allclose(float(out.loss), float(fb.cross_entropy(model.apply(params, x),
                                                                       y)), rtol=1e-6)


def test_single_tangent_variance_matches_the_formula():
    model, params, x, y = _problem((3, 4, 2))
    g = _flat(jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), y))(params))
    rule = forward_gradient(1)
    keys = jax.random.split(jax.random.PRNGKey(9), 4000)
    flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])
    samples = np.asarray(jax.vmap(lambda k: flat(_step(rule, model, params, x, y, k)[0]))(keys),
                         np.float64)
    np.testing.assert_allclose(samples.var(0), g @ g + g**2, rtol=0.25)


def test_equals_finite_difference_directional_derivatives_along_the_same_tangents():
    model, params, x, y = _problem()
    key, k = jax.random.PRNGKey(3), 6
    updates, _, _ = _step(forward_gradient(k), model, params, x, y, key)
    tangents = sample_tangents(key, params, k)
    f = lambda p: float(fb.cross_entropy(model.apply(p, x), y))
    eps = 1e-2
    want = jax.tree.map(jnp.zeros_like, params)
    for i in range(k):
        v = jax.tree.map(lambda a, i=i: a[i], tangents)
        d = (f(jax.tree.map(lambda p, t: p + eps * t, params, v))
             - f(jax.tree.map(lambda p, t: p - eps * t, params, v))) / (2 * eps)
        want = jax.tree.map(lambda w, t, d=d: w + d * t / k, want, v)
    assert_trees_close(updates, want, rtol=2e-3, atol=2e-4)
    # and it is a descent direction: g . grad f = mean_k d_k^2 >= 0
    g = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), y))(params)
    assert _flat(updates) @ _flat(g) > 0


def test_tangent_distributions_have_identity_second_moment():
    p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    for dist in ("normal", "rademacher"):
        t = sample_tangents(jax.random.PRNGKey(0), p, 50_000, dist)
        v = np.concatenate([np.asarray(t["b"]), np.asarray(t["w"]).reshape(50_000, -1)], 1)
        np.testing.assert_allclose(v.T @ v / len(v), np.eye(8), atol=0.03)
    assert set(np.unique(np.asarray(sample_tangents(jax.random.PRNGKey(0), p, 4,
                                                    "rademacher")["w"]))) == {-1.0, 1.0}


def test_trains_through_the_harness_and_lowers_the_loss():
    model, params, x, y = _problem((4, 16, 3), batch=32)
    opt = optax.sgd(0.2)
    step = fb.train.make_train_step(model, "fg", opt, rule_kwargs={"num_tangents": 16})
    state = fb.train.TrainState(params, opt.init(params), fb.EmptyState(),
                                jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
    first = None
    for _ in range(60):
        state, m = step(state, x, y)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.8 * first


def test_bad_options_and_forms_are_refused():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_tangents"):
            forward_gradient(bad)
    with pytest.raises(ValueError, match="distribution.*normal, rademacher"):
        forward_gradient(distribution="uniform")
    with pytest.raises(ValueError, match="no jax.grad form"):
        fb.train.make_train_step(fb.mlp((3, 2)), "fg", optax.sgd(0.1), form="grad")
