"""Kunin et al. (2020)'s learned feedback: the regularisation primitives against NumPy, the full
update against a NumPy reference, the "perfect regulariser equals backprop" identity of symmetric
alignment, the alignment of B with W over training, the jax.grad form, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.lift import explicit, through_primitives
from fbalign._src.rules.learned_feedback import (
    LearnedFeedbackState,
    information_alignment,
    learned_feedback,
    primitive,
    regularizer_grad,
    symmetric_alignment,
)
from fbalign.rules import Batch, StepContext

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 4))
W = RNG.normal(size=(4, 3))
B = RNG.normal(size=(4, 3))


def _np_primitives(x, w, b):
    """Value and gradient w.r.t. B of each primitive, from the paper's definitions (row-major:
    r = x W, the paper's B is our B.T; data terms are batch means)."""
    n, r = x.shape[0], x @ w
    return {
        "decay": (0.5 * np.sum(b * b), b),
        "amp": (-np.trace((x @ b).T @ r) / n, -x.T @ r / n),
        "null": (0.5 * np.sum((r @ b.T) ** 2) / n, b @ r.T @ r / n),
        "sparse": (0.5 * np.sum((x @ b) ** 2) / n, x.T @ x @ b / n),
        "self": (-np.trace(w.T @ b), -w),
    }


@pytest.mark.parametrize("name", ["decay", "amp", "null", "sparse", "self"])
def test_primitive_value_and_gradient_match_numpy(name):
    value, grad = _np_primitives(X, W, B)[name]
    x, w, b = (jnp.asarray(a, jnp.float32) for a in (X, W, B))
    np.testing.assert_allclose(primitive(name, x, w, b), value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(regularizer_grad({name: 1.0}, x, w, b), grad, rtol=1e-5,
                               atol=1e-5)
    # the gradient is a descent direction of the primitive: a finite difference agrees
    d = RNG.normal(size=B.shape)
    eps = 0.05  # the primitives are at most quadratic in B: central differences are exact
    fd = (primitive(name, X, W, B + eps * d) - primitive(name, X, W, B - eps * d)) / (2 * eps)
    np.testing.assert_allclose(fd, np.sum(grad * d), rtol=1e-3, atol=1e-4)


def _setup(seed=0, sizes=(4, 6, 5, 3)):
    net = fb.mlp(sizes)
    params = net.init(jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (8, sizes[0]))
    labels = jnp.arange(8) % sizes[-1]
    return net, params, x, labels


def test_information_alignment_update_matches_numpy():
    """FA deltas through B, then B <- B - eta * grad(alpha amp + beta null + gamma decay) at the
    layer's recorded input, all in NumPy from the equations."""
    alpha, beta, gamma, eta = 0.7, 0.3, 0.2, 0.05
    net, params, x, labels = _setup()
    rule = information_alignment(alpha, beta, gamma, learning_rate=eta)
    state = rule.init(jax.random.PRNGKey(3), params)
    y, tape = net.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    updates, new = jax.jit(rule.update)(params, state, tape, err)

    ws = [np.asarray(p["w"], np.float64) for p in params]
    bs = [None] + [np.asarray(b, np.float64) for b in state.feedback[1:]]
    xs, hs = [np.asarray(x, np.float64)], []
    for i, p in enumerate(params):
        a = xs[-1] @ ws[i] + np.asarray(p["b"])
        hs.append(a)
        if i < len(params) - 1:
            xs.append(np.tanh(a))
    delta = np.asarray(err, np.float64)
    want_w, want_b = [None] * 3, [None] * 3
    for i in reversed(range(3)):
        want_w[i] = xs[i].T @ delta
        if i > 0:
            g = {k: v[1] for k, v in _np_primitives(xs[i], ws[i], bs[i]).items()}
            want_b[i] = bs[i] - eta * (alpha * g["amp"] + beta * g["null"] + gamma * g["decay"])
            delta = (delta @ bs[i].T) * (1 - np.tanh(hs[i - 1]) ** 2)
    for i in range(3):
        np.testing.assert_allclose(updates[i]["w"], want_w[i], rtol=1e-4, atol=1e-6)
    for i in (1, 2):
        np.testing.assert_allclose(new.feedback[i], want_b[i], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["information_alignment", "activation_alignment"])
def test_grad_form_equals_explicit(rule):
    net, params, x, labels = _setup(1)
    tape_rule = learned_feedback(rule, learning_rate=0.1)
    ctx, batch = StepContext(net, fb.cross_entropy), Batch(x, labels)
    out = []
    for lift in (explicit, through_primitives):
        lr = lift(tape_rule)
        state = lr.init(jax.random.PRNGKey(2), params, net)
        out.append(jax.jit(lambda p, s, lr=lr: lr.step(p, s, batch, jax.random.PRNGKey(4),
                                                     ctx)[:2])(params, state))
    assert_trees_close(out[1], out[0], rtol=1e-4, atol=1e-6)


def test_symmetric_alignment_at_its_optimum_is_backprop():
    """R_SA = alpha P_self + beta P_decay is minimised by B = (alpha/beta) W. With alpha = beta
    the optimum is B = W: the update there is backprop's gradient and B stays put."""
    net, params, x, labels = _setup(2)
    rule = symmetric_alignment(learning_rate=0.3)
    state = LearnedFeedbackState((None,) + tuple(p["w"] for p in params[1:]))
    y, tape = net.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    updates, new = rule.update(params, state, tape, err)
    want = jax.grad(lambda p: fb.cross_entropy(net.apply(p, x), labels))(params)
    assert_trees_close(updates, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(new.feedback, state.feedback, rtol=0, atol=1e-7)

    # alpha != beta: SA's feedback converges to (alpha/beta) W (closed form), from random B
    rule = symmetric_alignment(alpha=2.0, beta=1.0, learning_rate=0.5)
    state = rule.init(jax.random.PRNGKey(5), params)
    update = jax.jit(rule.update)
    for _ in range(40):
        _, state = update(params, state, tape, err)
    for i in (1, 2):
        np.testing.assert_allclose(state.feedback[i], 2.0 * params[i]["w"], rtol=1e-4,
                                   atol=1e-5)


def _angle(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))))


@pytest.mark.parametrize("rule,end_max", [("information_alignment", 70.0),
                                          ("symmetric_alignment", 5.0)])
def test_feedback_aligns_with_w_over_training(rule, end_max):
    """Measured on 2 cores: B's angle to W starts near 90 deg (random B) and falls to about
    63/47 deg (IA, layers 1/2) and 1/0.6 deg (SA) after 200 steps on a 3-class toy task."""
    net, params, _, _ = _setup(0, (4, 16, 8, 3))
    x = jax.random.normal(jax.random.PRNGKey(2), (32, 4))
    labels = jnp.argmax(x[:, :3], 1)
    tape_rule = learned_feedback(rule, learning_rate=0.05)
    state = tape_rule.init(jax.random.PRNGKey(1), params)
    start = [_angle(state.feedback[i], params[i]["w"]) for i in (1, 2)]
    opt = optax.sgd(0.1)

    def step(carry, _):
        p, s, o = carry
        y, tape = net.forward(p, x)
        e = jax.grad(lambda q: fb.cross_entropy(q, labels))(y)
        u, s = tape_rule.update(p, s, tape, e)
        up, o = opt.update(u, o, p)
        return (optax.apply_updates(p, up), s, o), fb.cross_entropy(y, labels)

    (params, state, _), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))(
        (params, state, opt.init(params)))
    end = [_angle(state.feedback[i], params[i]["w"]) for i in (1, 2)]
    assert min(start) > 75.0
    assert all(e < s - 10.0 for s, e in zip(start, end, strict=True)), (start, end)
    assert max(end) < end_max, end
    assert losses[-1] < 0.5 * losses[0]


def test_noise_source_draws_noise_and_needs_a_key():
    net, params, x, labels = _setup(3)
    rule = learned_feedback("information_alignment", source="noise", noise_std=2.0,
                            learning_rate=0.1)
    state = rule.init(jax.random.PRNGKey(0), params)
    y, tape = net.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    with pytest.raises(ValueError, match="pass key"):
        rule.update(params, state, tape, err)
    _, new = rule.update(params, state, tape, err, key=jax.random.PRNGKey(7))
    # the same update from the noise drawn as the rule draws it (one key per layer)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    for i in (1, 2):
        xi = 2.0 * jax.random.normal(keys[i], tape.inputs[i].shape)
        g = regularizer_grad({"amp": 1.0, "null": 1.0, "decay": 0.1}, xi, params[i]["w"],
                             state.feedback[i])
        np.testing.assert_allclose(new.feedback[i], state.feedback[i] - 0.1 * g, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"rule": "ia"}, "unknown rule 'ia'"),
    ({"source": "data"}, "unknown source 'data'"),
    ({"rule": "symmetric_alignment", "gamma": 1.0}, "gamma must be None"),
    ({"terms": {"mirror": 1.0}}, "unknown primitive 'mirror'"),
    ({"terms": {"amp": 0.0}}, "every coefficient is zero"),
    ({"terms": {"amp": 1.0}, "alpha": 1.0}, "not both"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        learned_feedback(**kwargs)
