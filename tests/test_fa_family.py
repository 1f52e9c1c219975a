"""The feedback-alignment family of issue 3 on dense MLPs: sign symmetry (uSF/frSF/brSF), random
backprop variants (RBP, SRBP, ARBP, sparse, k-bit, no derivative), Kolen-Pollack, weight mirrors,
bidirectional FA and DRTP.

Every rule is held against a NumPy reference written here from the paper's equations (never the
library's helpers), against its identities, against its ``jax.grad`` form, and, through the
registry, against the shared conformance checks (jit, vmap, eval_shape, finiteness, one trace).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.rules import RULES, FeedbackShapeError, mirror_step, quantize

# ----------------------------------------------------------------------------------------------
# NumPy references (row-major: a_l = x_l W_l + b_l, W_l of shape (din, dout)).

ACT_NP = {
    "tanh": (np.tanh, lambda a: 1 - np.tanh(a) ** 2),
    "relu": (lambda a: np.maximum(a, 0), lambda a: (a > 0).astype(a.dtype)),
    "sigmoid": (lambda a: 1 / (1 + np.exp(-a)), lambda a: np.exp(-a) / (1 + np.exp(-a)) ** 2),
    "linear": (lambda a: a, lambda a: np.ones_like(a)),
}

# (sizes, hidden activation, batch): no hidden layer, batch 1, a square hidden layer (so that a
# transposed feedback matrix would go unnoticed by shapes alone), several activations.
CONFIGS = [
    ((5, 3), "tanh", 1),
    ((5, 7, 3), "relu", 4),
    ((4, 6, 6, 3), "sigmoid", 1),
]
CONFIG_IDS = ["1layer-b1", "relu-b4", "square-sigmoid-b1"]
BASE = CONFIGS[2]  # the network of the single-configuration tests (eager kernels are shared)


def np_net(sizes, rng):
    """LeCun-normal weights and (non-zero, so that a reference ignoring them would fail) biases."""
    return [{"w": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32),
             "b": jnp.asarray(0.1 * rng.normal(size=o), jnp.float32)}
            for i, o in zip(sizes[:-1], sizes[1:], strict=True)]


def setup(sizes, act, batch, seed=0):
    # test data from NumPy: drawing it with jax.random would compile a kernel per shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, sizes[-1], size=batch), jnp.int32)
    return fb.mlp(sizes, act), np_net(sizes, rng), x, labels


def np_params(params):
    return [{k: np.asarray(v, np.float64) for k, v in p.items()} for p in params]


def npf(a):
    return None if a is None else np.asarray(a, np.float64)


def np_forward(params, x, act):
    """Returns y, the layer inputs x_l, pre-activations a_l and f'(a_l) (1 for the output)."""
    f, df = ACT_NP[act]
    xs, pre, ds, h = [], [], [], np.asarray(x, np.float64)
    for i, p in enumerate(params):
        xs.append(h)
        a = h @ p["w"] + p["b"]
        pre.append(a)
        last = i == len(params) - 1
        ds.append(np.ones_like(a) if last else df(a))
        h = a if last else f(a)
    return h, xs, pre, ds


def np_xent_grad(y, labels):
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p - np.eye(y.shape[1])[np.asarray(labels)]) / y.shape[0]


def np_layerwise(params, x, labels, act, receive, derivative=True):
    """Generic reference: the top layer learns from its error; hidden layer l gets the signal
    ``receive(l, delta_{l+1}, e)`` and ``delta_l = signal * f'(a_l)`` (or ``signal`` without the
    derivative); ``dW_l = x_l^T delta_l``, ``db_l = sum delta_l``."""
    params = np_params(params)
    y, xs, _, ds = np_forward(params, x, act)
    e = np_xent_grad(y, labels)
    delta = e * ds[-1]
    out = [None] * len(params)
    for i in reversed(range(len(params))):
        out[i] = {"w": xs[i].T @ delta, "b": delta.sum(0)}
        if i:
            s = receive(i - 1, delta, e * ds[-1])
            delta = s * ds[i - 1] if derivative else s
    return out


def np_quantize(s, bits):
    """Nearest of the 2^k cell centres m((2j+1)/2^k - 1) of [-m, m], m = max |row| (ties up)."""
    k = 2**bits
    out = np.zeros_like(s)
    for r, row in enumerate(s):
        m = np.abs(row).max()
        if m == 0:
            continue
        levels = m * ((2 * np.arange(k) + 1) / k - 1)
        idx = k - 1 - np.argmin(np.abs(row[:, None] - levels[None, ::-1]), axis=1)
        out[r] = levels[idx]
    return out


def explicit(model, rule, params, state, x, labels, key=None):
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    return rule.update(params, state, tape, err, key=key, labels=labels)


def grad_form(model, params, x, targets, feedback, mode, **kw):
    return jax.grad(
        lambda p: fb.cross_entropy(model.apply(p, x, feedback, mode, **kw), targets))(params)


def backprop_grads(model, params, x, labels):
    return jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels))(params)


def angle(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


TOL = dict(rtol=2e-5, atol=1e-6)

# ----------------------------------------------------------------------------------------------
# Sign symmetry (Liao, Leibo & Poggio 2016; BioTorch names).


@pytest.mark.parametrize("name", ["usf", "frsf", "brsf"])
@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_sign_symmetry_matches_numpy_reference(name, sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = RULES[name].make()
    state = rule.init(jax.random.PRNGKey(3), params)
    mags = fb.rules.rule_feedback(rule, params, state)
    assert mags[0] is None
    for p, m in zip(params[1:], mags[1:], strict=True):
        din, dout = p["w"].shape
        if name == "usf":  # one uniform scale per layer, BioTorch's sqrt(2 / (fan_in + fan_out))
            assert m.shape == () and np.isclose(float(m), np.sqrt(2 / (din + dout)))
        else:
            assert m.shape == (din, dout) and bool(jnp.all(m >= 0))
    W = [npf(p["w"]) for p in params]
    B = [None] + [np.sign(W[i]) * npf(mags[i]) for i in range(1, len(W))]
    want = np_layerwise(params, x, labels, act, lambda j, d, e: d @ B[j + 1].T)
    got, new = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(9))
    assert_trees_close(got, want, **TOL)
    if name == "brsf":  # fresh magnitudes for the next batch, hashed from the step's key
        np.testing.assert_array_equal(new.key, jax.random.PRNGKey(9))
        if len(sizes) > 2:
            assert not np.allclose(fb.rules.rule_feedback(rule, params, new)[1], mags[1])
    else:
        assert_trees_close(new, state, 0, 0)


@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_sign_symmetry_with_abs_w_magnitudes_is_backprop(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    state = fb.SignSymmetryState((None,) + tuple(jnp.abs(p["w"]) for p in params[1:]))
    bp = backprop_grads(model, params, x, labels)
    got, _ = explicit(model, fb.frsf(), params, state, x, labels)
    assert_trees_close(got, bp, **TOL)
    assert_trees_close(grad_form(model, params, x, labels, state.feedback, "sign"), bp, **TOL)
    # ... and a random magnitude (same signs) is not backprop: the magnitudes are really used.
    rnd = fb.frsf().init(jax.random.PRNGKey(0), params)
    other, _ = explicit(model, fb.frsf(), params, rnd, x, labels)
    assert not np.allclose(other[0]["w"], bp[0]["w"], atol=1e-5)


def test_brsf_needs_a_key_and_redraws_per_key():
    model, params, x, labels = setup(*BASE)
    rule = fb.brsf()
    state = rule.init(jax.random.PRNGKey(0), params)
    with pytest.raises(ValueError, match="key"):
        explicit(model, rule, params, state, x, labels, key=None)
    _, s1 = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(1))
    _, s1b = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(1))
    _, s2 = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(2))
    assert_trees_close(s1, s1b, 0, 0)
    m1, m2 = (fb.rules.rule_feedback(rule, params, s) for s in (s1, s2))
    for a, b in zip(m1[1:], m2[1:], strict=True):
        assert not np.allclose(a, b) and bool(jnp.all(a >= 0))
    # the next step uses the redrawn magnitudes: its update differs from this step's
    u1, _ = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(1))
    u2, _ = explicit(model, rule, params, s1, x, labels, key=jax.random.PRNGKey(1))
    assert not np.allclose(u1[0]["w"], u2[0]["w"])


# ----------------------------------------------------------------------------------------------
# Random backprop variants (Baldi, Sadowski & Lu 2018).


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_rbp_is_feedback_alignment(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    k = jax.random.PRNGKey(4)
    rbp, fa = fb.random_backprop(), fb.feedback_alignment()
    s_rbp, s_fa = rbp.init(k, params), fa.init(k, params)
    assert_trees_close(tuple(s_rbp.feedback), tuple(s_fa.feedback), 0, 0)
    C = [npf(b) for b in s_rbp.feedback]
    want = np_layerwise(params, x, labels, act, lambda j, d, e: d @ C[j + 1].T)
    assert_trees_close(explicit(model, rbp, params, s_rbp, x, labels)[0], want, **TOL)


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_srbp_matches_numpy_reference(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.skipped_random_backprop()
    state = rule.init(jax.random.PRNGKey(5), params)
    C = [npf(b) for b in state.feedback]
    assert C[-1] is None
    assert [c.shape for c in C[:-1]] == [(sizes[-1], n) for n in sizes[1:-1]]
    want = np_layerwise(params, x, labels, act, lambda j, d, e: e @ C[j])
    assert_trees_close(explicit(model, rule, params, state, x, labels)[0], want, **TOL)


@pytest.mark.parametrize("skip", [False, True], ids=["rbp", "srbp"])
@pytest.mark.parametrize("density,nonzeros", [(0.5, None), (1e-6, None), (1.0, 2)])
def test_sparse_rbp_has_the_requested_density(skip, density, nonzeros):
    sizes, act, batch = BASE
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.sparse_random_backprop(density, nonzeros=nonzeros, skip=skip)
    state = rule.init(jax.random.PRNGKey(6), params)
    C = [npf(b) for b in state.feedback]
    for c in C:
        if c is None:
            continue
        # a receiving unit is a row of C (din x dout) for RBP, a column of C (n_out x n_l) for SRBP
        per_unit = (c != 0).sum(axis=0 if skip else 1)
        fan = c.shape[0] if skip else c.shape[1]
        k = nonzeros if nonzeros is not None else max(1, round(density * fan))
        np.testing.assert_array_equal(per_unit, k)
        np.testing.assert_allclose((c != 0).mean(), k / fan)
    if density == 1e-6:
        assert all((c != 0).sum(axis=0 if skip else 1).max() == 1 for c in C if c is not None)

    def receive(j, d, e):
        return e @ C[j] if skip else d @ C[j + 1].T

    want = np_layerwise(params, x, labels, act, receive)
    assert_trees_close(explicit(model, rule, params, state, x, labels)[0], want, **TOL)
    # the masks differ from seed to seed
    other = rule.init(jax.random.PRNGKey(7), params).feedback
    assert any(not np.array_equal(c != 0, npf(o) != 0)
               for c, o in zip(C, other, strict=True) if c is not None)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_quantize_has_at_most_2_to_the_k_levels(bits):
    s = np.random.default_rng(bits).normal(size=(5, 40)).astype(np.float32).astype(np.float64)
    s[2] = 0.0  # an all-zero example stays zero
    q = np.asarray(quantize(jnp.asarray(s, jnp.float32), bits), np.float64)
    for row_q, row in zip(q, s, strict=True):
        assert len(np.unique(row_q)) <= 2**bits
        if np.any(row):
            assert len(np.unique(row_q)) > 1
    assert np.all(q[2] == 0)
    np.testing.assert_allclose(q, np_quantize(s, bits), rtol=1e-5, atol=1e-6)
    # symmetric levels, within [-m, m], and the error is at most half a cell
    m = np.abs(s).max(1, keepdims=True)
    assert np.all(np.abs(q) <= m + 1e-6)
    assert np.all(np.abs(q - s) <= m / 2**bits + 1e-6)


@pytest.mark.parametrize("skip", [False, True], ids=["rbp", "srbp"])
@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_kbit_channel_matches_numpy_reference_and_grad_form(skip, sizes, act, batch):
    bits = 2
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.quantized_random_backprop(bits, skip=skip)
    state = rule.init(jax.random.PRNGKey(8), params)
    C = [npf(b) for b in state.feedback]

    def receive(j, d, e):
        s = e @ C[j] if skip else d @ C[j + 1].T
        assert all(len(np.unique(r)) <= 2**bits for r in np_quantize(s, bits))
        return np_quantize(s, bits)

    got, _ = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, np_layerwise(params, x, labels, act, receive), **TOL)
    full, _ = explicit(model, fb.random_backprop(skip=skip), params, state, x, labels)
    assert not np.allclose(got[0]["w"], full[0]["w"], atol=1e-6)  # quantisation is applied
    mode = "dfa" if skip else "fa"
    assert_trees_close(
        grad_form(model, params, x, labels, state.feedback, mode, error_bits=bits), got, **TOL)


@pytest.mark.parametrize("skip", [False, True], ids=["rbp", "srbp"])
@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_no_derivative_variant_matches_numpy_reference(skip, sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.derivative_free_random_backprop(skip=skip)
    state = rule.init(jax.random.PRNGKey(9), params)
    C = [npf(b) for b in state.feedback]

    def receive(j, d, e):
        return e @ C[j] if skip else d @ C[j + 1].T

    got, _ = explicit(model, rule, params, state, x, labels)
    want = np_layerwise(params, x, labels, act, receive, derivative=False)
    assert_trees_close(got, want, **TOL)
    with_deriv = np_layerwise(params, x, labels, act, receive)
    assert not np.allclose(got[0]["w"], with_deriv[0]["w"], atol=1e-6)
    mode = "dfa" if skip else "fa"
    assert_trees_close(
        grad_form(model, params, x, labels, state.feedback, mode, derivative=False), got, **TOL)


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_arbp_channel_learns_with_the_forward_rule(sizes, act, batch):
    lr = 0.3
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.adaptive_random_backprop(lr)
    state = rule.init(jax.random.PRNGKey(10), params)
    C = [npf(b) for b in state.feedback]
    want = np_layerwise(params, x, labels, act, lambda j, d, e: d @ C[j + 1].T)
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, want, **TOL)
    # Baldi et al.: Delta c = eta * (presynaptic activity) x (postsynaptic error), like W
    for i, (c, n) in enumerate(zip(C, new.feedback, strict=True)):
        if c is None:
            assert n is None
        else:
            np.testing.assert_allclose(n, c - lr * want[i]["w"], **TOL)
    # grad form: kp_matmul returns the same local product as the feedback's gradient
    gp, gb = jax.grad(lambda p, b: fb.cross_entropy(model.apply(p, x, b, "kp"), labels),
                      argnums=(0, 1))(params, state.feedback)
    assert_trees_close(gp, got, **TOL)
    for c, n, g in zip(state.feedback, new.feedback, gb, strict=True):
        if c is not None:
            np.testing.assert_allclose(n, c - lr * g, **TOL)


# random_backprop(skip=True, adaptive=True) is ASRBP now (it used to be refused): see
# tests/test_fa_extras.py.


# ----------------------------------------------------------------------------------------------
# Kolen-Pollack and weight mirrors (Akrout et al. 2019).


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_kolen_pollack_matches_numpy_reference(sizes, act, batch):
    lr, wd = 0.2, 0.05
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.kolen_pollack(lr, wd)
    state = rule.init(jax.random.PRNGKey(11), params)
    B = [npf(b) for b in state.feedback]
    W = [npf(p["w"]) for p in params]
    g = np_layerwise(params, x, labels, act, lambda j, d, e: d @ B[j + 1].T)
    want_u = [{"w": gi["w"] + wd * Wi, "b": gi["b"]} for gi, Wi in zip(g, W, strict=True)]
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, want_u, **TOL)
    for i, b in enumerate(B):
        if b is None:
            assert new.feedback[i] is None
        else:  # eqs. 16-17: B gets W's update and W's decay
            np.testing.assert_allclose(new.feedback[i], b - lr * (g[i]["w"] + wd * b), **TOL)
    # grad form: W's gradient, and kp_matmul's gradient for B is the same local product
    gp, gb = jax.grad(lambda p, b: fb.cross_entropy(model.apply(p, x, b, "kp"), labels),
                      argnums=(0, 1))(params, state.feedback)
    assert_trees_close(gp, g, **TOL)
    for b, n, gg in zip(state.feedback, new.feedback, gb, strict=True):
        if b is not None:
            np.testing.assert_allclose(n, b - lr * (gg + wd * b), **TOL)


def _sgd_run(model, rule, params, state, xs, ys, lr, steps, opt=None):
    opt = optax.sgd(lr) if opt is None else opt

    def step(carry, batch):
        p, s, o = carry
        x, y = batch
        out, tape = model.forward(p, x)
        err = jax.grad(lambda q: fb.squared_error(q, y))(out)
        u, s = rule.update(p, s, tape, err, labels=y)
        upd, o = opt.update(u, o, p)
        return (optax.apply_updates(p, upd), s, o), None

    run = jax.jit(lambda c, b: jax.lax.scan(step, c, b, length=steps)[0])
    p, s, _ = run((params, state, opt.init(params)), (xs, ys))
    return p, s


def _teacher_data(sizes, steps, batch, seed=0):
    rng = np.random.default_rng(seed + 50)
    teacher = np_params(np_net(sizes, rng))
    xs = rng.normal(size=(steps, batch, sizes[0]))
    ys = np.stack([np_forward(teacher, x, "tanh")[0] for x in xs])
    return jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)


def test_kolen_pollack_started_at_b_equal_w_stays_backprop():
    sizes, lr, wd, steps = BASE[0], 0.1, 0.02, 20
    model, params, _, _ = setup(sizes, "tanh", 4)
    xs, ys = _teacher_data(sizes, steps, 8)
    kp = fb.kolen_pollack(lr, wd)
    state = fb.KolenPollackState((None,) + tuple(p["w"] for p in params[1:]))
    p_kp, s_kp = _sgd_run(model, kp, params, state, xs, ys, lr, steps)
    # backprop with the same decay on the weights (not the biases)
    mask = [{"w": True, "b": False}] * len(params)
    opt = optax.chain(optax.add_decayed_weights(wd, mask=mask), optax.sgd(lr))
    p, _ = _sgd_run(model, fb.backprop(), params, fb.EmptyState(), xs, ys, lr, steps, opt)
    assert_trees_close(p_kp, p, rtol=1e-4, atol=1e-6)
    for b, q in zip(s_kp.feedback[1:], p_kp[1:], strict=True):
        np.testing.assert_allclose(b, q["w"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(p_kp[0]["w"], params[0]["w"])  # it did learn


def test_kolen_pollack_weight_decay_aligns_b_with_w_on_a_teacher_task():
    sizes, lr, steps = BASE[0], 0.1, 150
    model, params, _, _ = setup(sizes, "tanh", 4)
    xs, ys = _teacher_data(sizes, steps, 16)
    state0 = fb.kolen_pollack().init(jax.random.PRNGKey(12), params)
    start = [angle(b, p["w"]) for b, p in zip(state0.feedback[1:], params[1:], strict=True)]
    assert min(start) > 60  # random B starts far from W
    opt = optax.sgd(lr)

    @jax.jit
    def train(wd):  # one compilation for both decays
        rule = fb.kolen_pollack(lr, wd)

        def step(carry, batch):
            p, s, o = carry
            out, tape = model.forward(p, batch[0])
            err = jax.grad(lambda q: fb.squared_error(q, batch[1]))(out)
            u, s = rule.update(p, s, tape, err)
            upd, o = opt.update(u, o, p)
            return (optax.apply_updates(p, upd), s, o), None

        return jax.lax.scan(step, (params, state0, opt.init(params)), (xs, ys))[0][:2]

    p, s = train(0.1)
    end = [angle(b, q["w"]) for b, q in zip(s.feedback[1:], p[1:], strict=True)]
    for a0, a1 in zip(start, end, strict=True):
        assert a1 < 0.6 * a0, (start, end)
    # without decay, W - B never changes (identical updates), so nothing aligns by decay
    p, s = train(0.0)
    for b0, w0, b, q in zip(state0.feedback[1:], params[1:], s.feedback[1:], p[1:], strict=True):
        np.testing.assert_allclose(q["w"] - b, w0["w"] - b0, atol=2e-5)


def test_mirror_step_matches_numpy_reference():
    rng = np.random.default_rng(13)
    b, w = (jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(2))
    xi = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    got = mirror_step(b, w, xi, 0.3, 0.1)
    B, W, X = npf(b), npf(w), npf(xi)
    Y = X @ W  # the layer's response to noise at its input
    want = B + 0.3 * X.T @ Y / 16 - 0.1 * B
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_weight_mirror_forward_updates_are_fa_with_the_current_b(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.weight_mirror()
    state = rule.init(jax.random.PRNGKey(14), params)
    B = [npf(b) for b in state.feedback]
    want = np_layerwise(params, x, labels, act, lambda j, d, e: d @ B[j + 1].T)
    got, new = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(1))
    assert_trees_close(got, want, **TOL)
    if len(sizes) > 2:
        assert not np.allclose(new.feedback[1], state.feedback[1])
    with pytest.raises(ValueError, match="key"):
        explicit(model, rule, params, state, x, labels, key=None)


def test_weight_mirror_aligns_b_with_w():
    model, params, x, labels = setup(*BASE)
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)

    def run(rule, steps=60):
        state = rule.init(jax.random.PRNGKey(15), params)
        upd = jax.jit(lambda s, k: rule.update(params, s, tape, err, key=k)[1])
        s = state
        for k in jax.random.split(jax.random.PRNGKey(16), steps):
            s = upd(s, k)
        return state, s

    s0, s = run(fb.weight_mirror(learning_rate=0.1))
    for b0, b, p in zip(s0.feedback[1:], s.feedback[1:], params[1:], strict=True):
        a0, a1 = angle(b0, p["w"]), angle(b, p["w"])
        assert a0 > 60 and a1 < 15, (a0, a1)
        # weight_decay=None puts the fixed point at B = W: the scale matches too
        np.testing.assert_allclose(np.linalg.norm(b) / np.linalg.norm(p["w"]), 1.0, atol=0.15)
    # with lambda = 2 eta sigma^2 the fixed point is W / 2
    _, s = run(fb.weight_mirror(learning_rate=0.1, weight_decay=0.2))
    for b, p in zip(s.feedback[1:], params[1:], strict=True):
        np.testing.assert_allclose(np.linalg.norm(b) / np.linalg.norm(p["w"]), 0.5, atol=0.1)


# ----------------------------------------------------------------------------------------------
# Bidirectional feedback alignment (Luo, Fu & Glass 2017).


def np_bfa_feedback_update(params, B, x, labels, n_out, lr, act):
    """Eqs. 23-29: the top-down net maps the one-hot target back to x through B, errors of the
    reconstruction 1/2n ||x_hat - x||^2 travel up through W."""
    f, df = ACT_NP[act]
    W = [npf(p["w"]) for p in params]
    x = npf(x)
    L = len(W)
    g = np.eye(n_out)[np.asarray(labels)]
    gs, ds = [None] * L, [None] * L
    for i in reversed(range(L)):
        gs[i] = g
        r = g @ B[i].T
        if i > 0:
            g, ds[i] = f(r), df(r)
        else:
            g, ds[i] = r, np.ones_like(r)  # linear input reconstruction
    eps = (g - x) * ds[0] / x.shape[0]
    new = []
    for i in range(L):
        if i:
            eps = (eps @ W[i - 1]) * ds[i]
        new.append(B[i] - lr * eps.T @ gs[i])
    return new, 0.5 * np.sum((g - x) ** 2) / x.shape[0]


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_bfa_matches_numpy_reference(sizes, act, batch):
    lr = 0.2
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.bidirectional_feedback_alignment(lr, activation=act)
    state = rule.init(jax.random.PRNGKey(17), params)
    B = [npf(b) for b in state.feedback]
    assert [b.shape for b in B] == [p["w"].shape for p in params]  # B_0 too: it generates x
    want = np_layerwise(params, x, labels, act, lambda j, d, e: d @ B[j + 1].T)
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, want, **TOL)
    want_b, _ = np_bfa_feedback_update(params, B, x, labels, sizes[-1], lr, act)
    for n, wb in zip(new.feedback, want_b, strict=True):
        np.testing.assert_allclose(n, wb, **TOL)
    with pytest.raises(ValueError, match="labels"):
        rule.update(params, state, *model.forward(params, x)[::-1], labels=None)


def test_bfa_feedback_learns_to_reconstruct_the_input():
    sizes, act = BASE[0], "tanh"
    model, params, _, labels = setup(sizes, act, 24)
    # inputs that the target can explain: class prototypes plus a little noise
    rng = np.random.default_rng(30)
    protos = rng.normal(size=(sizes[-1], sizes[0]))
    x = protos[np.asarray(labels)] + 0.1 * rng.normal(size=(24, sizes[0]))
    x = jnp.asarray(x, jnp.float32)
    rule = fb.bidirectional_feedback_alignment(0.1, activation=act)
    state = rule.init(jax.random.PRNGKey(18), params)
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    upd = jax.jit(lambda s: rule.update(params, s, tape, err, labels=labels)[1])

    def recon(s):
        return np_bfa_feedback_update(params, [npf(b) for b in s.feedback], x, labels,
                                      sizes[-1], 0.0, act)[1]

    before, s = recon(state), state
    for _ in range(200):
        s = upd(s)
    assert recon(s) < 0.3 * before, (before, recon(s))


# ----------------------------------------------------------------------------------------------
# Direct random target projection (Frenkel, Lefebvre & Bol 2021).


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_drtp_matches_numpy_reference_and_grad_form(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.direct_random_target_projection()
    state = rule.init(jax.random.PRNGKey(19), params)
    B = [npf(b) for b in state.feedback]
    t = np.eye(sizes[-1])[np.asarray(labels)] / batch
    want = np_layerwise(params, x, labels, act, lambda j, d, e: t @ B[j])
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, want, **TOL)
    assert_trees_close(new, state, 0, 0)
    assert_trees_close(
        grad_form(model, params, x, labels, state.feedback, "drtp", labels=labels), got, **TOL)
    # one-hot targets given as an array work the same as class indices
    onehot = jax.nn.one_hot(labels, sizes[-1])
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    assert_trees_close(rule.update(params, state, tape, err, labels=onehot)[0], got, **TOL)
    if len(sizes) > 2:  # it is not DFA: the hidden signal ignores the error
        dfa, _ = fb.direct_feedback_alignment().update(
            params, fb.DirectFeedbackAlignmentState(state.feedback), tape, err)
        assert not np.allclose(dfa[0]["w"], got[0]["w"], atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        rule.update(params, state, tape, err)


# ----------------------------------------------------------------------------------------------
# Orientation and shape checks of the new states.

FEEDBACK_RULES = ["frsf", "rbp", "srbp", "arbp", "sparse_rbp", "kbit_rbp", "nd_rbp", "kp", "wm",
                  "bfa", "drtp"]


@pytest.mark.parametrize("name", FEEDBACK_RULES)
def test_transposed_feedback_is_refused(name):
    model, params, x, labels = setup(*BASE)
    rule = RULES[name].make()
    state = rule.init(jax.random.PRNGKey(0), params)
    i = max(j for j, b in enumerate(state.feedback) if b is not None and b.shape[0] != b.shape[1])
    bad = list(state.feedback)
    bad[i] = bad[i].T
    with pytest.raises(FeedbackShapeError, match="transposed"):
        explicit(model, rule, params, state._replace(feedback=tuple(bad)), x, labels,
                 key=jax.random.PRNGKey(1))


# ----------------------------------------------------------------------------------------------
# Both forms, for every registered rule that has a jax.grad form.

# KP adds weight decay to the returned weight updates (its documented contract), which no loss
# gradient contains; with weight_decay=0 the two forms must agree exactly.
TWO_FORM_KWARGS = {"kp": {"weight_decay": 0.0}}
GRAD_RULES = sorted(n for n in RULES if isinstance(fb.get_rule(n), fb.TapeRule)
                    and fb.get_rule(n).backward is not None)


@pytest.mark.parametrize("name", GRAD_RULES)
@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:3], ids=CONFIG_IDS[1:3])
def test_explicit_update_equals_grad_through_apply(name, sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    spec = RULES[name]
    kwargs = TWO_FORM_KWARGS.get(name, {})
    rule = spec.make(**kwargs)
    state = rule.init(jax.random.PRNGKey(20), params)
    got, _ = explicit(model, rule, params, state, x, labels, key=jax.random.PRNGKey(21))
    back = rule.backward(fb.rules.rule_feedback(rule, params, state), labels)  # kbit: 2 bits
    want = jax.grad(
        lambda p: fb.cross_entropy(model.apply(p, x, backward=back), labels))(params)
    assert_trees_close(got, want, **TOL)


def test_apply_modes_are_checked():
    model, params, x, labels = setup(*BASE)
    fbk = fb.usf().init(jax.random.PRNGKey(0), params).feedback
    with pytest.raises(ValueError, match="labels"):
        model.apply(params, x, fbk, "drtp")
    with pytest.raises(ValueError, match="feedback"):
        model.apply(params, x, None, "sign")
    with pytest.raises(ValueError, match="unknown backward mode"):
        model.apply(params, x, fbk, "signn")
    # the forward value never depends on the backward mode
    y = model.apply(params, x)
    fa_fbk = fb.feedback_alignment().init(jax.random.PRNGKey(0), params).feedback
    dfa_fbk = fb.direct_feedback_alignment().init(jax.random.PRNGKey(0), params).feedback
    for mode, f, kw in [("sign", fbk, {}), ("fa_noderiv", fa_fbk, {}),
                        ("drtp", dfa_fbk, {"labels": labels}),
                        ("bp", None, {"error_bits": 1, "derivative": False})]:
        np.testing.assert_allclose(model.apply(params, x, f, mode, **kw), y, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conformance over the whole registry.

DETERMINISTIC_INIT = {"bp", "usf"}  # feedback that does not depend on the key
RANDOM_INIT = set(FEEDBACK_RULES) | {"fa", "dfa", "brsf", "ia", "sa", "aa"}


def _conformance_setup():
    model, params, x, labels = setup(*BASE)
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    return model, params, x, labels, tape, err


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


TAPE_RULES = sorted(n for n, spec in RULES.items() if isinstance(spec.make(), fb.TapeRule))


@pytest.mark.parametrize("name", TAPE_RULES)
def test_registry_conformance(name):
    """eval_shape, vmap over seeds, finite updates, and a jitted (vmapped) train step that
    compiles once and whose first step equals the eager update."""
    model, params, x, labels, tape, err = _conformance_setup()
    rule = RULES[name].make()
    key = jax.random.PRNGKey(0)

    # vmap over seeds: different feedback per seed (unless the rule's feedback is not random)
    keys = jax.random.split(key, 2)
    states = jax.vmap(rule.init, in_axes=(0, None))(keys, params)
    leaves = jax.tree.leaves(states)
    if name in RANDOM_INIT:
        assert leaves and all(not np.allclose(leaf[0], leaf[1]) for leaf in leaves)
    if name in DETERMINISTIC_INIT:
        assert all(np.array_equal(leaf[0], leaf[1]) for leaf in leaves)
    state = jax.tree.map(lambda a: a[0], states)

    # eval_shape of init matches init
    shapes = jax.eval_shape(rule.init, key, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(state), strict=True):
        assert s.shape == a.shape and s.dtype == a.dtype

    # the eager update: finite, shaped like params, state structure kept
    k1 = jax.random.PRNGKey(1)
    eager = rule.update(params, state, tape, err, key=k1, labels=labels)
    assert _finite(eager)
    assert jax.tree.structure(eager[0]) == jax.tree.structure(params)
    assert jax.tree.structure(eager[1]) == jax.tree.structure(state)

    # a jitted train step (forward, rule, optimizer), vmapped over the seeds, traces once over
    # several steps; its first step for seed 0 is the eager update (jit equals eager)
    lr = 0.05
    opt = optax.sgd(lr)

    def step(p, s, o, k):
        y, tp = model.forward(p, x)
        e = jax.grad(lambda q: fb.cross_entropy(q, labels))(y)
        u, s = rule.update(p, s, tp, e, key=k, labels=labels)
        up, o = opt.update(u, o, p)
        return optax.apply_updates(p, up), s, o

    chex.clear_trace_counter()
    jstep = jax.jit(jax.vmap(chex.assert_max_traces(step, n=1)))
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)  # noqa: E731
    p, s, o = stack(params), states, stack(opt.init(params))
    p, s, o = jstep(p, s, o, jnp.stack([k1, k1]))
    first = jax.tree.map(lambda a: a[0], (p, s))
    want_p = jax.tree.map(lambda a, u: a - lr * u, params, eager[0])
    assert_trees_close(first, (want_p, eager[1]), rtol=1e-5, atol=1e-6)
    for k in jax.random.split(jax.random.PRNGKey(3), 2):
        p, s, o = jstep(p, s, o, jax.random.split(k, 2))
    assert _finite((p, s))
    assert not np.allclose(p[-1]["w"][0], params[-1]["w"])
