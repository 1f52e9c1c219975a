"""ADMM training without gradients (Taylor et al. 2016): every block update is the argmin of its
block objective (scipy / grid search), one step follows the paper's Algorithm 1 written in NumPy
(multiplier update included), the per-example state is written back at batch.index only, the
rule jits and vmaps over seeds, and fit() with optax.sgd(1.0) lowers the loss."""

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
from fbalign._src.rules.admm import (
    admm,
    binary_hinge,
    solve_activations,
    solve_output,
    solve_relu_preacts,
    solve_weights,
)

RNG = np.random.default_rng(0)


def test_weight_block_is_the_least_squares_argmin():
    a, z = RNG.normal(size=(9, 4)), RNG.normal(size=(9, 3))
    with jax.enable_x64(True):
        got = solve_weights(jnp.asarray(a), jnp.asarray(z), True)
    w_aug = np.concatenate([np.asarray(got["w"]), np.asarray(got["b"])[None]], 0)

    def obj(v):
        return np.sum((z - a @ v[:12].reshape(4, 3) - v[12:]) ** 2)

    ref = scipy.optimize.minimize(obj, np.zeros(15), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(w_aug.ravel(), np.concatenate([ref[:12], ref[12:]]), atol=1e-6)
    # rank-deficient (fewer examples than inputs): a minimiser of minimum norm
    a2, z2 = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 2))
    with jax.enable_x64(True):
        w2 = np.asarray(solve_weights(jnp.asarray(a2), jnp.asarray(z2), False)["w"])
    np.testing.assert_allclose(a2 @ w2, z2, atol=1e-10)
    np.testing.assert_allclose(w2, np.linalg.lstsq(a2, z2, rcond=None)[0], atol=1e-10)


def test_activation_block_is_the_argmin_of_its_quadratic():
    beta, gamma = 1.3, 0.7
    z_next, h = RNG.normal(size=(5, 3)), np.maximum(RNG.normal(size=(5, 4)), 0)
    w, b = RNG.normal(size=(4, 3)), RNG.normal(size=3)
    with jax.enable_x64(True):
        got = np.asarray(solve_activations(jnp.asarray(z_next), {"w": jnp.asarray(w),
                                                                 "b": jnp.asarray(b)},
                                           jnp.asarray(h), beta, gamma))

    def obj(v):
        a = v.reshape(h.shape)
        return beta * np.sum((z_next - a @ w - b) ** 2) + gamma * np.sum((a - h) ** 2)

    ref = scipy.optimize.minimize(obj, np.zeros(h.size), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(got, ref.reshape(h.shape), atol=1e-6)


def _grid_argmin(obj, lo=-6.0, hi=6.0, n=240001):
    """Entrywise argmin of a 1-D objective by a dense grid (non-convex problems included)."""
    grid = np.linspace(lo, hi, n)
    return grid[np.argmin(obj(grid))]


def test_relu_preactivation_block_is_the_entrywise_global_argmin():
    beta, gamma = 1.0, 10.0
    # entries chosen to hit both cases and the boundary between them
    a = np.concatenate([RNG.normal(size=40), [0.0, 0.5, 2.0, 0.05]])
    m = np.concatenate([RNG.normal(size=40) * 2, [-1.0, -0.3, 1.0, -0.01]])
    with jax.enable_x64(True):
        got = np.asarray(solve_relu_preacts(jnp.asarray(a), jnp.asarray(m), beta, gamma))
    for ai, mi, zi in zip(a, m, got, strict=True):
        def obj(z, ai=ai, mi=mi):
            return gamma * (ai - np.maximum(z, 0)) ** 2 + beta * (z - mi) ** 2
        ref = _grid_argmin(obj)
        assert obj(zi) <= obj(ref) + 1e-12, (ai, mi, zi, ref)
        assert abs(zi - ref) < 1e-4, (ai, mi, zi, ref)
    assert np.any(got < 0) and np.any(got > 0)


def test_output_block_squared_error_is_the_argmin():
    beta = 0.8
    m, lam, y = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    with jax.enable_x64(True):
        got = np.asarray(solve_output(jnp.asarray(m), jnp.asarray(lam), jnp.asarray(y), beta,
                                      "squared_error"))

    def obj(v):  # l(z, y) = 1/2 ||z - y||^2 per example (fbalign's squared error, summed)
        z = v.reshape(m.shape)
        return 0.5 * np.sum((z - y) ** 2) + np.sum(z * lam) + beta * np.sum((z - m) ** 2)

    ref = scipy.optimize.minimize(obj, np.zeros(m.size), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(got, ref.reshape(m.shape), atol=1e-6)


def test_output_block_binary_hinge_is_the_entrywise_argmin():
    beta = 0.6
    m = np.concatenate([RNG.normal(size=30) * 2, [1.0, 0.0, 0.9]])[:, None]
    lam = np.concatenate([RNG.normal(size=30), [0.0, 0.0, 0.1]])[:, None]
    y = np.concatenate([RNG.integers(0, 2, size=30), [1, 0, 1]]).astype(float)[:, None]
    with jax.enable_x64(True):
        got = np.asarray(solve_output(jnp.asarray(m), jnp.asarray(lam), jnp.asarray(y), beta,
                                      "hinge"))
    for mi, li, yi, zi in zip(m[:, 0], lam[:, 0], y[:, 0], got[:, 0], strict=True):
        def obj(z, mi=mi, li=li, yi=yi):
            hinge = np.maximum(1 - z, 0) if yi == 1 else np.maximum(z, 0)
            return hinge + li * z + beta * (z - mi) ** 2
        ref = _grid_argmin(obj)
        assert abs(zi - ref) < 1e-4, (mi, li, yi, zi, ref)
    # the loss the block is solved for is the loss fit() is told to use
    out = jnp.asarray([[2.0], [0.3], [-0.5], [0.4]])
    tgt = jnp.asarray([[1.0], [1.0], [0.0], [0.0]])
    np.testing.assert_allclose(binary_hinge(out, tgt), (0 + 0.7 + 0 + 0.4) / 4, rtol=1e-6)
    np.testing.assert_allclose(binary_hinge(jnp.asarray([[2.0, -1.0]]), jnp.asarray([0])),
                               0.0 + 0.0, atol=0)


def _reference_iteration(params, z, a, lam, x, y, beta, gamma):
    """Taylor et al. 2016, Algorithm 1, in NumPy (row layout, with biases)."""
    def ls(u, t):
        ua = np.concatenate([u, np.ones((len(u), 1))], 1)
        sol = np.linalg.lstsq(ua, t, rcond=None)[0]
        return {"w": sol[:-1], "b": sol[-1]}

    p = [dict(q) for q in params]
    z, a = list(z), list(a)
    num = len(p)
    prev = x
    for i in range(num - 1):
        new = ls(prev, z[i])
        w1, b1 = params[i + 1]["w"], params[i + 1]["b"]  # not yet solved in this sweep
        lhs = beta * w1 @ w1.T + gamma * np.eye(len(w1))
        rhs = beta * (z[i + 1] - b1) @ w1.T + gamma * np.maximum(z[i], 0)
        a[i] = np.linalg.solve(lhs, rhs.T).T
        mm = prev @ new["w"] + new["b"]
        zp = np.maximum((gamma * a[i] + beta * mm) / (gamma + beta), 0)
        zn = np.minimum(mm, 0)
        ai = a[i]
        obj_p = gamma * (ai - np.maximum(zp, 0)) ** 2 + beta * (zp - mm) ** 2
        obj_n = gamma * (ai - np.maximum(zn, 0)) ** 2 + beta * (zn - mm) ** 2
        z[i] = np.where(obj_p <= obj_n, zp, zn)
        p[i] = new
        prev = a[i]
    p[-1] = ls(prev, z[-1])
    mm = prev @ p[-1]["w"] + p[-1]["b"]
    z[-1] = (y - lam + 2 * beta * mm) / (1 + 2 * beta)
    lam = lam + beta * (z[-1] - mm)
    return p, z, a, lam


def _np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


@functools.cache
def _jitted(rule):
    return jax.jit(rule.step, static_argnums=4)


def _setup(n_total=10, sizes=(3, 5, 4, 2), seed=0, dtype=jnp.float64):
    model = fb.mlp(sizes, activation="relu")
    params = model.init(jax.random.PRNGKey(seed), dtype)
    params = [{"w": q["w"], "b": 0.1 * jnp.ones_like(q["b"])} for q in params]
    xs = jax.random.normal(jax.random.PRNGKey(seed + 1), (n_total, sizes[0]), dtype)
    ys = jax.random.normal(jax.random.PRNGKey(seed + 2), (n_total, sizes[-1]), dtype)
    return model, params, xs, ys


def test_two_steps_follow_algorithm_1_and_write_back_only_the_batch_rows():
    beta, gamma = 1.0, 10.0
    with jax.enable_x64(True):
        model, params, xs, ys = _setup()
        rule = admm(beta, gamma, num_examples=10)
        state = rule.init(None, params, model)
        ctx = StepContext(model, squared_error)
        idx = jnp.asarray([7, 2, 5, 0, 9, 4])
        step = _jitted(rule)
        upd, s1, out = step(params, state, Batch(xs[idx], ys[idx], idx), None, ctx)
        params1 = optax.apply_updates(params, jax.tree.map(lambda u: -u, upd))  # sgd(1.0)
        # a second step, overlapping rows: gathered state is reused, the rest initialised
        idx2 = jnp.asarray([2, 3, 7, 8, 9, 1])
        upd2, s2, _ = step(params1, s1, Batch(xs[idx2], ys[idx2], idx2), None, ctx)
        fwd = np.asarray(model.apply(params, xs[idx]))
    p0, x, y = _np(params), np.asarray(xs), np.asarray(ys)
    np.testing.assert_allclose(out.loss, 0.5 * np.mean(np.sum((fwd - y[idx]) ** 2, 1)))
    # step 1: every example is new, its variables start at the forward pass, lambda at 0
    zf, af, h = [], [], x[idx]
    for i, q in enumerate(p0):
        zf.append(h @ q["w"] + q["b"])
        if i < len(p0) - 1:
            h = np.maximum(zf[-1], 0)
            af.append(h)
    ref_p, ref_z, ref_a, ref_lam = _reference_iteration(
        p0, zf, af, np.zeros_like(zf[-1]), x[idx], y[idx], beta, gamma)
    for got, r, q in zip(upd, ref_p, p0, strict=True):
        for k in ("w", "b"):
            np.testing.assert_allclose(np.asarray(got[k]), q[k] - r[k], atol=1e-9)
    # the multiplier: lambda <- lambda + beta (z_L - W_L a_{L-1} - b_L), at the new values
    m_l = ref_a[-1] @ ref_p[-1]["w"] + ref_p[-1]["b"]
    np.testing.assert_allclose(np.asarray(s1.lam)[idx], beta * (ref_z[-1] - m_l), atol=1e-9)
    assert np.abs(np.asarray(s1.lam)[idx]).max() > 1e-3
    rows, others = np.asarray(idx), np.setdiff1d(np.arange(10), np.asarray(idx))
    for got, r in zip(s1.z, ref_z, strict=True):
        np.testing.assert_allclose(np.asarray(got)[rows], r, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(got)[others], 0.0)
    for got, r in zip(s1.a, ref_a, strict=True):
        np.testing.assert_allclose(np.asarray(got)[rows], r, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(got)[others], 0.0)
    np.testing.assert_array_equal(np.asarray(s1.lam)[others], 0.0)
    np.testing.assert_array_equal(np.asarray(s1.seen), np.isin(np.arange(10), rows))
    # step 2: rows seen before (2, 7, 9) start from the state, the others from the forward pass
    p1 = _np(params1)
    i2 = np.asarray(idx2)
    old = np.isin(i2, rows)[:, None]
    zf2, af2, h = [], [], x[i2]
    for i, q in enumerate(p1):
        zf2.append(np.where(old, np.asarray(s1.z[i])[i2], h @ q["w"] + q["b"]))
        if i < len(p1) - 1:
            h = np.maximum(h @ q["w"] + q["b"], 0)
            af2.append(np.where(old, np.asarray(s1.a[i])[i2], h))
    lam2 = np.where(old, np.asarray(s1.lam)[i2], 0.0)
    ref_p2, ref_z2, _, ref_lam2 = _reference_iteration(p1, zf2, af2, lam2, x[i2], y[i2], beta,
                                                       gamma)
    for got, r, q in zip(upd2, ref_p2, p1, strict=True):
        np.testing.assert_allclose(np.asarray(got["w"]), q["w"] - r["w"], atol=1e-8)
    np.testing.assert_allclose(np.asarray(s2.lam)[i2], ref_lam2, atol=1e-8)
    untouched = np.setdiff1d(rows, i2)  # rows of step 1 only: unchanged by step 2
    for a1, a2 in zip(s1.z + s1.a + (s1.lam,), s2.z + s2.a + (s2.lam,), strict=True):
        np.testing.assert_array_equal(np.asarray(a2)[untouched], np.asarray(a1)[untouched])
    assert int(s2.step) == 2


def test_warm_start_holds_the_multiplier_at_zero():
    with jax.enable_x64(True):
        model, params, xs, ys = _setup()
        rule = admm(num_examples=10, warm_start=2)
        state = rule.init(None, params, model)
        idx = jnp.arange(10)
        step = _jitted(rule)
        lams = []
        for _ in range(3):
            upd, state, _ = step(params, state, Batch(xs, ys, idx), None,
                                 StepContext(model, squared_error))
            params = jax.tree.map(lambda p, u: p - u, params, upd)
            lams.append(float(jnp.abs(state.lam).max()))
    assert lams[0] == 0.0 and lams[1] == 0.0 and lams[2] > 1e-4, lams


def test_jit_and_vmap_over_seeds_match_the_eager_step():
    model = fb.mlp((3, 6, 2), activation="relu")
    rule, opt = admm(num_examples=12), optax.sgd(1.0)
    x = jax.random.normal(jax.random.PRNGKey(3), (12, 3))
    y = jax.random.normal(jax.random.PRNGKey(4), (12, 2))
    idx = jnp.arange(12)[::-1]
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    init = lambda k: fb.train.init_train_state(model, rule, opt, k)  # noqa: E731
    states = jax.vmap(init)(keys)
    shapes = jax.eval_shape(init, keys[0])
    one = jax.tree.map(lambda v: v[0], states)
    assert jax.tree.structure(shapes) == jax.tree.structure(one)
    step = fb.train.make_train_step(model, rule, opt, "squared_error", jit=False)
    eager, _ = jax.jit(step)(one, x[idx], y[idx], idx)
    new, m = jax.jit(jax.vmap(step, in_axes=(0, None, None, None)))(states, x[idx], y[idx], idx)
    for g, w in zip(jax.tree.leaves(jax.tree.map(lambda v: v[0], new.params)),
                    jax.tree.leaves(eager.params), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(new.params[0]["w"][0]), np.asarray(new.params[0]["w"][1]))
    assert new.rule_state.z[0].shape == (2, 12, 6)


def test_fit_with_sgd_one_lowers_the_loss():
    data = load_teacher(n_train=256, n_test=128, input_dim=6, hidden=12, output_dim=2,
                        task="regression")
    model, opt = fb.mlp((6, 24, 2), activation="relu"), optax.sgd(1.0)
    rule = admm(beta=1.0, gamma=10.0, num_examples=256, warm_start=5)
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    before = float(squared_error(model.apply(state.params, data.x_train), data.y_train))
    res = fb.train.fit(model, rule, opt, data, loss="squared_error", epochs=12, batch_size=256,
                       progress=False, log_every=4, state=state)
    after = res.history[-1]["train_loss"]
    mean_predictor = 0.5 * np.sum(np.var(data.y_train, 0))
    assert after < 0.1 * before and after < 0.5 * mean_predictor, (before, after,
                                                                   mean_predictor)


def test_missing_index_raises():
    model, params, xs, ys = _setup(dtype=jnp.float32)
    rule = admm(num_examples=10)
    with pytest.raises(ValueError, match="batch.index"):
        rule.step(params, rule.init(None, params, model), Batch(xs, ys), None,
                  StepContext(model, squared_error))


def test_wrong_loss_network_or_parallelism_raise():
    model, params, xs, ys = _setup(dtype=jnp.float32)
    rule = admm(num_examples=10)
    state = rule.init(None, params, model)
    idx = jnp.arange(10)
    with pytest.raises(ValueError, match="cross-entropy"):
        rule.step(params, state, Batch(xs, ys, idx), None, StepContext(model, cross_entropy))
    with pytest.raises(ValueError, match="training loss is binary_hinge"):
        rule.step(params, state, Batch(xs, ys, idx), None, StepContext(model, binary_hinge))
    hinge = admm(num_examples=10, output_loss="hinge")
    with pytest.raises(ValueError, match="output_loss='hinge', but the training loss is "
                                         "squared_error"):
        hinge.step(params, hinge.init(None, params, model), Batch(xs, ys, idx), None,
                   StepContext(model, squared_error))
    with pytest.raises(NotImplementedError, match="data parallelism"):
        rule.step(params, state, Batch(xs, ys, idx), None,
                  StepContext(model, squared_error, "data"))
    tanh = fb.mlp((3, 5, 2), activation="tanh")
    with pytest.raises(ValueError, match="activation='relu'"):
        rule.init(None, tanh.init(jax.random.PRNGKey(0)), tanh)
    sig = fb.mlp((3, 5, 2), activation="relu", output_activation="sigmoid")
    with pytest.raises(ValueError, match="output_activation='linear'"):
        rule.init(None, sig.init(jax.random.PRNGKey(0)), sig)
    with pytest.raises(ValueError, match="num_examples is required"):
        admm().init(None, params, model)


@pytest.mark.parametrize("kwargs,match", [
    ({"beta": 0.0}, "beta"), ({"gamma": -1.0}, "gamma"), ({"num_examples": 0}, "num_examples"),
    ({"num_examples": 3.5}, "num_examples"), ({"output_loss": "ce"}, "output_loss"),
    ({"warm_start": -1}, "warm_start"),
])
def test_bad_options_raise_naming_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        admm(**{"num_examples": 4, **kwargs})
