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
from fbalign.checkpoint import load_checkpoint, save_checkpoint
from fbalign.rules import Batch, FeedbackShapeError, StepContext

SIZES = (4, 6, 5, 3)


@functools.cache
def _maker(sizes, batch, dtype, out="linear"):
    net = fb.mlp(sizes, output_activation=out)
    labels = jnp.arange(batch) % sizes[-1]

    def make(key):  # one compiled program instead of a dozen eager ones
        params = net.init(key, dtype)
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, sizes[0]), dtype)
        y, tape = net.forward(params, x)
        err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
        return params, x, tape, err

    return net, labels, jax.jit(make)


def _setup(seed=0, sizes=SIZES, batch=7, dtype=jnp.float32, out="linear"):
    net, labels, make = _maker(sizes, batch, jnp.dtype(dtype).name, out)
    params, x, tape, err = make(jax.random.PRNGKey(seed))
    return net, params, x, labels, tape, err


def _np_forward(params, x, out):
    """tanh hidden layers, a linear or sigmoid output: the activities and each layer's slope
    f'(a), in float64."""
    hs, acts, slopes = [x], [], []
    for i, p in enumerate(params):
        a = hs[-1] @ p["w"] + p["b"]
        acts.append(a)
        if i < len(params) - 1:
            h, s = np.tanh(a), 1 - np.tanh(a) ** 2
        elif out == "sigmoid":
            h = 1 / (1 + np.exp(-a))
            s = h * (1 - h)
        else:
            h, s = a, np.ones_like(a)
        hs.append(h)
        slopes.append(s)
    return hs, slopes


def _np_reference(params, x, err, state, incs, *, dt, tau_xi, tau_hp, sigma, eta, alpha,
                  activity=False, out="linear"):
    """FA updates through the old B, then the paper's discrete dynamics (Euler steps of dt):
    OU noise in every hidden soma, its instantaneous linear response (slope 1, or with
    ``activity`` the slope f'(a) of the example each noise copy sits at: copy r at example
    r mod batch), the high-pass filter of the response, and dB = dt eta (xi_{l-1}^T r_hat_l / n
    - alpha B), all in float64."""
    f64 = lambda a: None if a is None else np.array(a, np.float64)  # noqa: E731
    params = [{k: f64(v) for k, v in p.items()} for p in params]
    ws = [p["w"] for p in params]
    bs = [f64(b) for b in state.feedback]
    n_layers = len(ws)
    hs, slopes = _np_forward(params, f64(x), out)
    delta, want_w = f64(err) * slopes[-1], [None] * n_layers  # FA deltas through the old B
    for i in reversed(range(n_layers)):
        want_w[i] = hs[i].T @ delta
        if i > 0:
            delta = (delta @ bs[i].T) * slopes[i - 1]
    # the B dynamics
    cx, ch = dt / tau_xi, dt / tau_hp
    xi, resp, hp = ([f64(a) for a in field] for field in state[1:4])
    incs = [f64(w) for w in incs]
    n = xi[0].shape[0]
    s = [sl[np.arange(n) % len(x)] if activity else np.ones((n, sl.shape[1])) for sl in slopes]
    for t in range(incs[0].shape[0]):
        for k in range(n_layers - 1):
            xi[k] = (1 - cx) * xi[k] + np.sqrt(cx) * sigma * incs[k][t]
        r = s[0] * xi[0]
        for j in range(1, n_layers):
            r = s[j] * (r @ ws[j] + (xi[j] if j < n_layers - 1 else 0.0))
            hp[j] = (1 - ch) * hp[j] + (r - resp[j])
            resp[j] = r
            bs[j] = bs[j] + dt * eta * (xi[j - 1].T @ hp[j] / r.shape[0] - alpha * bs[j])
    return want_w, PALState(tuple(bs), tuple(xi), tuple(resp), tuple(hp))


@pytest.mark.parametrize("slope,out,noise,data", [
    ("unit", "linear", 3, 7),
    ("activity", "sigmoid", 5, 3),  # more noise copies than examples: copies 3, 4 at 0, 1
])
def test_one_update_matches_numpy_float64_reference(slope, out, noise, data):
    opts = dict(dt=0.5, tau_xi=2.0, tau_hp=1.5, noise_std=0.7, learning_rate=0.3, alpha=0.2)
    with jax.enable_x64(True):
        _, params, x, _, tape, err = _setup(dtype=jnp.float64, batch=data, out=out)
        rule = phaseless_alignment(steps=4, batch_size=noise, slope=slope, **opts)
        state = rule.init(jax.random.PRNGKey(3), params)
        # start the filters mid-run (the dynamics carry over from update to update)
        rng = np.random.default_rng(9)
        state = PALState(state.feedback, *jax.tree.map(
            lambda a: jnp.asarray(rng.normal(size=a.shape)), state[1:]))
        key = jax.random.PRNGKey(4)
        updates, new = jax.jit(rule.update)(params, state, tape, err, key=key)
        incs = pal_increments(key, state, 4)
        assert [None if w is None else w.shape for w in incs] == [(4, noise, 6), (4, noise, 5),
                                                                   None]
        want_w, want = _np_reference(params, x, err, state, incs, sigma=opts["noise_std"],
                                     eta=opts["learning_rate"], activity=slope == "activity",
                                     out=out, **{k: opts[k] for k in (
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


def test_activity_slopes_align_b_with_the_slope_weighted_w():
    """slope='activity', W and the batch frozen, default options: B_l settles at T_l = <s_{l-1}
    (x) s_l> (.) W_l (the paper's B ~ phi' W^T phi'; s = tanh'(a) of the example each noise
    copy sits at, <> their mean), not at W_l. Inputs x3 saturate the tanh units so that T_l
    and W_l differ (25.5/7.2 deg, ||W_l||/||T_l|| 4.55/1.47). Measured (2-core CPU, B averaged
    over updates 151-300, layers 1/2; it starts at 92/99 deg): 10.5/3.6 deg to T, 27.4/7.4 to
    W, ||B||/||T|| 1.01/1.00. slope='unit' on the same setup: 26.1/7.9 deg to T, 4.3/3.2 to W,
    ||B||/||T|| 4.53/1.47. Four other seeds and inputs (B averaged over updates 201-300): layer
    1 11.5-14.3 deg from T, 8-12 deg nearer T than W. Averaged over updates 2001-3000: 5.0/1.6
    deg to T (the rest is the estimate's variance, which shrinks with more noise copies)."""
    net = fb.mlp((8, 16, 12, 4))

    @jax.jit
    def make(key):
        params = net.init(key)
        y, tape = net.forward(params, 3.0 * jax.random.normal(jax.random.fold_in(key, 1), (16, 8)))
        return params, tape, jax.grad(lambda o: fb.cross_entropy(o, jnp.arange(16) % 4))(y)

    params, tape, err = make(jax.random.PRNGKey(0))
    rule = phaseless_alignment(slope="activity")  # 32 noise copies: each example twice
    state = rule.init(jax.random.PRNGKey(2), params)

    def body(s, k):
        _, s = rule.update(params, s, tape, err, key=k)
        return s, (s.feedback[1], s.feedback[2])

    _, bs = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(
        jax.random.PRNGKey(3), 300)))(state)
    d = [np.asarray(a, np.float64) for a in tape.derivs]  # tanh'(a), (16, n_l)
    for i, b in zip((1, 2), bs, strict=True):
        w = np.asarray(params[i]["w"], np.float64)
        target = (d[i - 1].T @ d[i]) / len(d[0]) * w
        assert np.linalg.norm(w) / np.linalg.norm(target) > 1.4  # the setup tells them apart
        assert float(_angle(target, w)) > (20.0 if i == 1 else 5.0)
        mean = np.asarray(b[-150:], np.float64).mean(0)
        to_t, to_w = float(_angle(mean, target)), float(_angle(mean, w))
        assert to_t < (20.0 if i == 1 else 6.0), (i, to_t, to_w)
        assert to_w > to_t + (5.0 if i == 1 else 2.0), (i, to_t, to_w)
        ratio = np.linalg.norm(mean) / np.linalg.norm(target)
        assert 0.9 < ratio < 1.1, (i, ratio)


def _np_low_pass(trace, u, dt, tau_lo, steps):
    """The authors' Euler filter u_LO += dt/tau_LO (u - u_LO), one step per time step with the
    update held over the presentation; the weights move by the mean of the traces."""
    total = np.zeros_like(u)
    for _ in range(steps):
        trace = trace + dt / tau_lo * (u - trace)
        total = total + trace
    return total / steps, trace


def test_low_pass_matches_numpy_filter_over_updates():
    """Three updates on three batches from a random trace: the filtered updates and the trace
    against the authors' per-time-step filter of the unfiltered rule's updates (same B: the
    filter does not touch the feedback), in float64; tau_lo = dt returns them unfiltered."""
    opts = dict(dt=0.5, steps=3, batch_size=4, learning_rate=0.2)
    rules = [phaseless_alignment(tau_lo=tau, **opts) for tau in (None, 2.0, 0.5)]
    with jax.enable_x64(True):
        net, params, _, labels, _, _ = _setup(5, dtype=jnp.float64)
        rng = np.random.default_rng(0)
        start = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
        states = [r.init(jax.random.PRNGKey(1), params) for r in rules]
        states[1:] = [s._replace(low_pass=start) for s in states[1:]]

        @jax.jit
        def step(states, n):  # the three rules on batch n (one compiled program)
            y, tape = net.forward(params, jax.random.normal(jax.random.fold_in(
                jax.random.PRNGKey(7), n), (7, 4), jnp.float64))
            err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
            outs = [r.update(params, s, tape, err, key=jax.random.fold_in(
                jax.random.PRNGKey(8), n)) for r, s in zip(rules, states, strict=True)]
            return [u for u, _ in outs], [s for _, s in outs]

        trace = jax.tree.map(np.asarray, start)
        for n in range(3):
            (u, got, same), states = step(states, n)
            want = jax.tree.map(lambda v, m: _np_low_pass(m, np.asarray(v), 0.5, 2.0, 3), u,
                                trace)
            trace = jax.tree.map(lambda pair: pair[1], want, is_leaf=lambda x: isinstance(
                x, tuple))
            want = jax.tree.map(lambda pair: pair[0], want, is_leaf=lambda x: isinstance(
                x, tuple))
            assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
            assert_trees_close(same, u, rtol=1e-12, atol=1e-14)  # tau_lo = dt: unfiltered
            assert not np.allclose(got[1]["w"], u[1]["w"], atol=1e-3)
    assert_trees_close(states[1].low_pass, trace, rtol=1e-10, atol=1e-12)
    assert_trees_close(states[2].low_pass, u, rtol=1e-12, atol=1e-14)
    assert_trees_close(states[1].feedback, states[0].feedback, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tau_lo", [None, 2.0])
def test_explicit_form_equals_grad_form(tau_lo):
    """Two steps of each lifted form (the second on the carried filters and the moved B): same
    updates, same state. The grad form's forward updates come from jax.grad through
    LinearFeedback(B), its B dynamics and low-pass filter from `advance`."""
    net, params, x, labels, _, _ = _setup(1)
    rule = phaseless_alignment(steps=3, batch_size=5, learning_rate=0.2, tau_lo=tau_lo)
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


def test_jit_and_vmap_over_seeds(tmp_path):
    """With both options on (the low-pass trace is state): vmap over seeds is each seed's own
    update, and the state survives a checkpoint."""
    _, params, _, _, tape, err = _setup(2)
    rule = phaseless_alignment(steps=2, batch_size=4, slope="activity", tau_lo=3.0)
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
    assert not np.allclose(news.low_pass[0]["w"][0], news.low_pass[0]["w"][1])
    save_checkpoint(tmp_path, news, {"step": 1})
    assert_trees_close(load_checkpoint(tmp_path, target=news).state, news, 0, 0)


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
    ({"slope": "phi"}, "unknown slope 'phi'; valid: unit, activity"),
    ({"tau_lo": 0.0}, "tau_lo must be > 0"),
    ({"tau_lo": 0.5}, "tau_lo=0.5 is shorter than the time step"),
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
    # the jax.grad form's advance sees no activity: slope='activity' is refused there
    activity = phaseless_alignment(steps=2, batch_size=3, slope="activity")
    with pytest.raises(ValueError, match="slope='activity'.*form='explicit'.*slope='unit'"):
        activity.advance(params, state, params, state.feedback, key=jax.random.PRNGKey(3),
                         layers=net.layer_ops())
    filtered = phaseless_alignment(steps=2, batch_size=3, tau_lo=2.0)
    with pytest.raises(ValueError, match=r"state.low_pass has .* None.*tau_lo is set"):
        filtered.update(params, state, tape, err, key=jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match=r"state.low_pass .*expected None.*tau_lo is None"):
        rule.update(params, filtered.init(jax.random.PRNGKey(0), params), tape, err,
                    key=jax.random.PRNGKey(1))
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
