"""Phaseless alignment learning (Max et al. 2024): one update against a NumPy float64 reference
of the paper's discrete-time dynamics, B's alignment with W (and its fixed point), the two forms
against each other, jit/vmap over seeds, and the options that cannot work."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.lift import explicit, through_primitives
from fbalign._src.rules.pal import PALState, pal_increments, phaseless_alignment
from fbalign.rules import Batch, FeedbackShapeError, StepContext

SIZES = (4, 6, 5, 3)


@functools.cache
def _maker(sizes, batch, dtype):
    net = fb.mlp(sizes)
    labels = jnp.arange(batch) % sizes[-1]

    def make(key):  # one compiled program instead of a dozen eager ones
        params = net.init(key, dtype)
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, sizes[0]), dtype)
        y, tape = net.forward(params, x)
        err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
        return params, x, tape, err

    return net, labels, jax.jit(make)


def _setup(seed=0, sizes=SIZES, batch=7, dtype=jnp.float32):
    net, labels, make = _maker(sizes, batch, jnp.dtype(dtype).name)
    params, x, tape, err = make(jax.random.PRNGKey(seed))
    return net, params, x, labels, tape, err


def _np_reference(params, x, err, state, incs, *, dt, tau_xi, tau_hp, sigma, eta, alpha):
    """FA updates through the old B, then the paper's discrete dynamics (Euler steps of dt):
    OU noise in every hidden soma, its instantaneous linear response, the high-pass filter of
    the response, and dB = dt eta (xi_{l-1}^T r_hat_l / n - alpha B), all in float64."""
    f64 = lambda a: None if a is None else np.array(a, np.float64)  # noqa: E731
    ws = [f64(p["w"]) for p in params]
    bs = [f64(b) for b in state.feedback]
    n_layers = len(ws)
    # forward (tanh hidden, linear output) and FA deltas through the old B
    hs, acts = [f64(x)], []
    for i, p in enumerate(params):
        a = hs[-1] @ ws[i] + f64(p["b"])
        acts.append(a)
        hs.append(np.tanh(a) if i < n_layers - 1 else a)
    delta, want_w = f64(err), [None] * n_layers
    for i in reversed(range(n_layers)):
        want_w[i] = hs[i].T @ delta
        if i > 0:
            delta = (delta @ bs[i].T) * (1 - np.tanh(acts[i - 1]) ** 2)
    # the B dynamics
    cx, ch = dt / tau_xi, dt / tau_hp
    xi, resp, hp = ([f64(a) for a in field] for field in state[1:])
    incs = [f64(w) for w in incs]
    for t in range(incs[0].shape[0]):
        for k in range(n_layers - 1):
            xi[k] = (1 - cx) * xi[k] + np.sqrt(cx) * sigma * incs[k][t]
        r = xi[0]
        for j in range(1, n_layers):
            r = r @ ws[j] + (xi[j] if j < n_layers - 1 else 0.0)
            hp[j] = (1 - ch) * hp[j] + (r - resp[j])
            resp[j] = r
            bs[j] = bs[j] + dt * eta * (xi[j - 1].T @ hp[j] / r.shape[0] - alpha * bs[j])
    return want_w, PALState(tuple(bs), tuple(xi), tuple(resp), tuple(hp))


def test_one_update_matches_numpy_float64_reference():
    opts = dict(dt=0.5, tau_xi=2.0, tau_hp=1.5, noise_std=0.7, learning_rate=0.3, alpha=0.2)
    with jax.enable_x64(True):
        _, params, x, _, tape, err = _setup(dtype=jnp.float64)
        rule = phaseless_alignment(steps=4, batch_size=3, **opts)
        state = rule.init(jax.random.PRNGKey(3), params)
        # start the filters mid-run (the dynamics carry over from update to update)
        rng = np.random.default_rng(9)
        state = PALState(state.feedback, *jax.tree.map(
            lambda a: jnp.asarray(rng.normal(size=a.shape)), state[1:]))
        key = jax.random.PRNGKey(4)
        updates, new = jax.jit(rule.update)(params, state, tape, err, key=key)
        incs = pal_increments(key, state, 4)
        assert [None if w is None else w.shape for w in incs] == [(4, 3, 6), (4, 3, 5), None]
        want_w, want = _np_reference(params, x, err, state, incs, sigma=opts["noise_std"],
                                     eta=opts["learning_rate"], **{k: opts[k] for k in (
                                         "dt", "tau_xi", "tau_hp", "alpha")})
    for u, w in zip(updates, want_w, strict=True):
        np.testing.assert_allclose(u["w"], w, rtol=1e-10, atol=1e-12)
    assert_trees_close(new, want, rtol=1e-10, atol=1e-12)
    for i in (1, 2):  # the step moved B
        assert not np.allclose(new.feedback[i], state.feedback[i], atol=1e-3)


def _angle(a, b):
    cos = jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def test_feedback_aligns_with_w_and_settles_at_w():
    """W frozen, default options: B_l's angle to W_l falls from about 90 deg to under 10 deg
    within 300 updates and its norm settles at ||W_l|| (alpha=None: the fixed point is W).
    Measured (2-core CPU, layers 1/2): start 94/100 deg; after 30 updates 47/64, after 100
    8.4/8.8, after 300 7.4/5.1 deg; ||B||/||W|| over the last 100 updates 1.00/1.00."""
    net, params, _, _, tape, err = _setup(0, (8, 16, 12, 4), 16)
    rule = phaseless_alignment()
    state = rule.init(jax.random.PRNGKey(2), params)

    def body(s, k):
        _, s = rule.update(params, s, tape, err, key=k)
        return s, jnp.stack([_angle(s.feedback[i], params[i]["w"]) for i in (1, 2)]
                            + [jnp.linalg.norm(s.feedback[i]) / jnp.linalg.norm(params[i]["w"])
                               for i in (1, 2)])

    start = [float(_angle(state.feedback[i], params[i]["w"])) for i in (1, 2)]
    _, trace = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(
        jax.random.PRNGKey(3), 300)))(state)
    trace = np.asarray(trace)
    assert min(start) > 80.0, start
    assert trace[-1, :2].max() < 20.0, trace[-1]
    assert trace[-100:, :2].mean() < 15.0, trace[-100:].mean(0)
    ratio = trace[-100:, 2:].mean(0)
    assert np.all((ratio > 0.85) & (ratio < 1.15)), ratio


def test_feedback_aligns_while_w_learns():
    """W learning by FA through the current B on a toy task: B follows W and the loss falls.
    Measured: angles 93/99 deg after the first update, 22/26 after 50, 6.2/7.6 after 200; loss
    1.27 -> 0.05."""
    net, params, _, _, _, _ = _setup(0, (8, 16, 12, 4), 16)
    x = jax.random.normal(jax.random.PRNGKey(5), (32, 8))
    labels = jnp.argmax(x[:, :4], 1)
    rule = phaseless_alignment()
    state = rule.init(jax.random.PRNGKey(2), params)
    opt = optax.sgd(0.1)

    def body(carry, k):
        p, s, o = carry
        y, tape = net.forward(p, x)
        loss, e = jax.value_and_grad(lambda q: fb.cross_entropy(q, labels))(y)
        u, s = rule.update(p, s, tape, e, key=k)
        up, o = opt.update(u, o, p)
        return (optax.apply_updates(p, up), s, o), loss

    (p, s, _), losses = jax.jit(lambda c: jax.lax.scan(body, c, jax.random.split(
        jax.random.PRNGKey(6), 200)))((params, state, opt.init(params)))
    end = [float(_angle(s.feedback[i], p[i]["w"])) for i in (1, 2)]
    assert max(end) < 20.0, end
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_explicit_form_equals_grad_form():
    """Two steps of each lifted form (the second on the carried filters and the moved B): same
    updates, same state. The grad form's forward updates come from jax.grad through
    LinearFeedback(B), its B dynamics from `advance`."""
    net, params, x, labels, _, _ = _setup(1)
    rule = phaseless_alignment(steps=3, batch_size=5, learning_rate=0.2)
    ctx, batch = StepContext(net, fb.cross_entropy), Batch(x, labels)
    out = []
    for lift in (explicit, through_primitives):
        lr = lift(rule)
        state = start = lr.init(jax.random.PRNGKey(2), params, net)
        step = jax.jit(lambda p, s, k, lr=lr: lr.step(p, s, batch, k, ctx)[:2])
        u1, state = step(params, state, jax.random.PRNGKey(4))
        u2, state = step(params, state, jax.random.PRNGKey(5))
        out.append((u1, u2, state))
    assert_trees_close(out[1], out[0], rtol=1e-5, atol=1e-6)
    # not trivially equal: B and the filters moved, and the second step saw the moved ones
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(out[0][2]), strict=True):
        assert not np.allclose(a, b, atol=1e-4)
    assert not np.allclose(out[0][0][0]["w"], out[0][1][0]["w"], atol=1e-6)


def test_jit_and_vmap_over_seeds():
    _, params, _, _, tape, err = _setup(2)
    rule = phaseless_alignment(steps=2, batch_size=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    # a jitted train step donates the state: init must not put one buffer in it twice
    ptrs = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(rule.init(keys[0], params))]
    assert len(set(ptrs)) == len(ptrs)
    states = jax.vmap(rule.init, in_axes=(0, None))(keys, params)
    step_keys = jax.random.split(jax.random.PRNGKey(1), 2)
    update = jax.jit(lambda s, k: rule.update(params, s, tape, err, key=k))
    ups, news = jax.jit(jax.vmap(update))(states, step_keys)
    for i in range(2):  # each seed's slice is that seed's own update
        want = update(jax.tree.map(lambda a, i=i: a[i], states), step_keys[i])
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], (ups, news)), want, 1e-5, 1e-6)
    assert not np.allclose(news.feedback[1][0], news.feedback[1][1])
    assert not np.allclose(news.noise[0][0], news.noise[0][1])


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"noise_std": 0.0}, "noise_std must be > 0"),
    ({"dt": 0.0}, "dt must be > 0"),
    ({"tau_xi": -1.0}, "tau_xi must be > 0"),
    ({"tau_hp": 0.0}, "tau_hp must be > 0"),
    ({"tau_xi": 0.5}, "tau_xi=0.5 is shorter than the time step"),
    ({"tau_hp": 0.5}, "tau_hp=0.5 is shorter than the time step"),
    ({"alpha": -0.1}, "alpha must be >= 0"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ({"learning_rate": 5.0, "alpha": 0.5}, "dt \\* learning_rate \\* alpha = 2.5 > 1"),
    ({"learning_rate": 4.0}, "alpha is the stationary gain"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        phaseless_alignment(**kwargs)


def test_zero_alpha_warns():
    with pytest.warns(UserWarning, match="alpha=0 leaves B without a fixed point"):
        phaseless_alignment(alpha=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phaseless_alignment()  # the defaults do not warn
        phaseless_alignment(alpha=1e-3)


def test_bad_calls_raise():
    net, params, x, labels, tape, err = _setup(4)
    rule = phaseless_alignment(steps=2, batch_size=3)
    state = rule.init(jax.random.PRNGKey(0), params)
    with pytest.raises(ValueError, match="pass key"):
        rule.update(params, state, tape, err)
    with pytest.raises(ValueError, match="pass key"):
        rule.advance(params, state, params, state.feedback, layers=net.layer_ops())
    # a state built for another noise batch or network
    other = phaseless_alignment(steps=2, batch_size=4).init(jax.random.PRNGKey(0), params)
    with pytest.raises(ValueError, match=r"state.noise has.*batch_size=3"):
        rule.update(params, other, tape, err, key=jax.random.PRNGKey(1))
    bad = list(state.feedback)
    bad[2] = bad[2].T
    with pytest.raises(FeedbackShapeError, match="transposed"):
        rule.update(params, state._replace(feedback=tuple(bad)), tape, err,
                    key=jax.random.PRNGKey(1))


def test_conv_nets_are_refused_naming_what_to_use():
    lenet = fb.LeNet5(conv_features=(2, 3), dense_features=(8, 6), num_classes=3)
    params = jax.eval_shape(lenet.init, jax.random.PRNGKey(0))  # shapes suffice: no compiling
    tape = jax.eval_shape(lambda p: lenet.forward(p, jnp.zeros((2, 784)))[1], params)
    rule = phaseless_alignment(steps=2, batch_size=3)
    with pytest.raises(ValueError, match="not a dense.*'wm'.*'kp'"):
        rule.init(jax.random.PRNGKey(1), params)
    _, dense_params, _, _, _, _ = _setup(4)
    state = rule.init(jax.random.PRNGKey(1), dense_params)
    with pytest.raises(NotImplementedError, match="stated for dense layers.*'wm'"):
        rule.update(params, state, tape, None, key=jax.random.PRNGKey(2))
    with pytest.raises(ValueError, match="layer 0 takes inputs of shape.*'wm'"):
        rule.advance(dense_params, state, dense_params, state.feedback,
                     key=jax.random.PRNGKey(2), layers=lenet.layer_ops())
