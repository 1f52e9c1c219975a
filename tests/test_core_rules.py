"""Backprop, feedback alignment and DFA: NumPy references, identities, both forms, jit/vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.rules import FeedbackShapeError

ACT_NP = {
    "tanh": (np.tanh, lambda a: 1 - np.tanh(a) ** 2),
    "relu": (lambda a: np.maximum(a, 0), lambda a: (a > 0).astype(a.dtype)),
    "sigmoid": (lambda a: 1 / (1 + np.exp(-a)), lambda a: np.exp(-a) / (1 + np.exp(-a)) ** 2),
    "leaky_relu": (lambda a: np.where(a > 0, a, 0.01 * a), lambda a: np.where(a > 0, 1.0, 0.01)),
    "linear": (lambda a: a, lambda a: np.ones_like(a)),
}


def np_softmax_xent_grad(y, labels):
    """dL/dy for mean softmax cross-entropy, written out by hand."""
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(y.shape[1])[labels]
    return (p - onehot) / y.shape[0]


def np_forward(params, x, act):
    f, df = ACT_NP[act]
    xs, ds, h = [], [], x
    for i, layer in enumerate(params):
        xs.append(h)
        a = h @ layer["w"] + layer["b"]
        last = i == len(params) - 1
        ds.append(np.ones_like(a) if last else df(a))
        h = a if last else f(a)
    return h, xs, ds


def np_fa(params, feedback, x, labels, act):
    """Lillicrap et al. 2016: delta_{l-1} = (delta_l B_l^T) * f'(a_{l-1}), dW_l = x_l^T delta_l."""
    y, xs, ds = np_forward(params, x, act)
    delta = np_softmax_xent_grad(y, labels) * ds[-1]
    out = [None] * len(params)
    for i in reversed(range(len(params))):
        out[i] = {"w": xs[i].T @ delta, "b": delta.sum(0)}
        if i:
            delta = (delta @ feedback[i].T) * ds[i - 1]
    return out


def np_dfa(params, feedback, x, labels, act):
    """Nokland 2016: delta_l = (e B_l) * f'(a_l) for hidden l, e the output error."""
    y, xs, ds = np_forward(params, x, act)
    e = np_softmax_xent_grad(y, labels)
    out = []
    for i in range(len(params)):
        delta = e if i == len(params) - 1 else (e @ feedback[i]) * ds[i]
        out.append({"w": xs[i].T @ delta, "b": delta.sum(0)})
    return out


def setup(sizes, act, batch, seed=0):
    model = fb.mlp(sizes, act)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(k1)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k3, p.shape), params)
    x = jax.random.normal(k2, (batch, sizes[0]))
    labels = jnp.arange(batch) % sizes[-1]
    return model, params, x, labels


def explicit(model, rule, params, state, x, labels):
    """The explicit form on one batch (jitted: one compile beats dozens of eager op compiles)."""

    @jax.jit
    def run(params, state, x, labels):
        y, tape = model.forward(params, x)
        err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
        return rule.update(params, state, tape, err)[0]

    return run(params, state, x, labels)


def to_np(tree):
    return jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), tree)


CASES = [((6, 5, 3), "tanh", 4), ((7, 9, 8, 4), "relu", 1), ((5, 6, 6, 6, 3), "sigmoid", 3),
         ((4, 8, 5, 3), "leaky_relu", 2), ((6, 7, 5, 4), "linear", 5)]


@pytest.mark.parametrize("sizes,act,batch", CASES)
def test_fa_matches_numpy_reference(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.feedback_alignment()
    state = rule.init(jax.random.PRNGKey(1), params)
    got = explicit(model, rule, params, state, x, labels)
    want = np_fa(to_np(params), to_np(state.feedback), np.asarray(x, np.float64),
                 np.asarray(labels), act)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sizes,act,batch", CASES)
def test_dfa_matches_numpy_reference(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.direct_feedback_alignment()
    state = rule.init(jax.random.PRNGKey(1), params)
    got = explicit(model, rule, params, state, x, labels)
    want = np_dfa(to_np(params), to_np(state.feedback), np.asarray(x, np.float64),
                  np.asarray(labels), act)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sizes,act,batch", CASES)
def test_backprop_rule_equals_jax_grad(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.backprop()
    got = explicit(model, rule, params, rule.init(None, params), x, labels)
    want = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels))(params)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sizes,act,batch", CASES[:3])
def test_fa_with_b_equal_w_is_backprop(sizes, act, batch):
    model, params, x, labels = setup(sizes, act, batch)
    rule = fb.feedback_alignment()
    state = fb.FeedbackAlignmentState(
        tuple(None if i == 0 else p["w"] for i, p in enumerate(params)))
    bp = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels))(params)
    assert_trees_close(explicit(model, rule, params, state, x, labels), bp, 1e-5, 1e-7)
    grad_form = jax.grad(
        lambda p: fb.cross_entropy(model.apply(p, x, state.feedback, "fa"), labels))(params)
    assert_trees_close(grad_form, bp, 1e-5, 1e-7)


def test_dfa_one_hidden_layer_with_b_equal_w_out_is_backprop():
    model, params, x, labels = setup((6, 9, 4), "tanh", 5)
    rule = fb.direct_feedback_alignment()
    state = fb.DirectFeedbackAlignmentState((params[1]["w"].T, None))
    bp = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels))(params)
    assert_trees_close(explicit(model, rule, params, state, x, labels), bp, 1e-5, 1e-7)
    grad_form = jax.grad(
        lambda p: fb.cross_entropy(model.apply(p, x, state.feedback, "dfa"), labels))(params)
    assert_trees_close(grad_form, bp, 1e-5, 1e-7)


def test_fa_differs_from_backprop_with_random_feedback():
    # The identities above would pass trivially if FA ignored B; this one fails if it did.
    model, params, x, labels = setup((6, 8, 8, 4), "tanh", 5)
    rule = fb.feedback_alignment()
    fa = explicit(model, rule, params, rule.init(jax.random.PRNGKey(3), params), x, labels)
    bp = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels))(params)
    assert not np.allclose(fa[0]["w"], bp[0]["w"], atol=1e-4)
    np.testing.assert_allclose(fa[-1]["w"], bp[-1]["w"], rtol=1e-5)  # top layer is exact


@pytest.mark.parametrize("name", ["bp", "fa", "dfa"])
@pytest.mark.parametrize("sizes,act", [((6, 7, 5, 4), "tanh"), ((5, 9, 3), "relu")])
def test_explicit_form_equals_grad_through_primitives(name, sizes, act):
    model, params, x, labels = setup(sizes, act, 3)
    spec = fb.RULES[name]
    rule = spec.make()
    state = rule.init(jax.random.PRNGKey(2), params)
    fbk = getattr(state, "feedback", None)
    got = explicit(model, rule, params, state, x, labels)
    want = jax.grad(lambda p: fb.cross_entropy(
        model.apply(p, x, backward=rule.backward(fbk, labels)), labels))(params)
    assert_trees_close(got, want, 1e-5, 1e-7)


def test_orientation_of_b_is_documented_and_checked():
    """A transposed B must fail, even when it happens to be square."""
    model, params, x, labels = setup((5, 6, 6, 3), "tanh", 2)
    rule = fb.feedback_alignment()
    state = rule.init(jax.random.PRNGKey(0), params)
    assert state.feedback[0] is None
    assert [b.shape for b in state.feedback[1:]] == [p["w"].shape for p in params[1:]]
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    # Square layer (6x6): using B.T instead of B changes the update (orientation matters).
    sq = list(state.feedback)
    sq[1] = sq[1].T
    u1 = rule.update(params, state, tape, err)[0]
    u2 = rule.update(params, fb.FeedbackAlignmentState(tuple(sq)), tape, err)[0]
    assert not np.allclose(u1[0]["w"], u2[0]["w"], atol=1e-6)
    # Non-square transposed B is refused with a message naming layer and shapes.
    bad = list(state.feedback)
    bad[2] = bad[2].T
    with pytest.raises(FeedbackShapeError, match=r"layer 2 has shape \(3, 6\), expected \(6, 3\)"):
        rule.update(params, fb.FeedbackAlignmentState(tuple(bad)), tape, err)
    d = fb.direct_feedback_alignment()
    ds = d.init(jax.random.PRNGKey(0), params)
    assert [b.shape for b in ds.feedback[:-1]] == [(3, 6), (3, 6)] and ds.feedback[-1] is None
    wrong = (jnp.zeros((6, 3)),) + ds.feedback[1:]
    with pytest.raises(FeedbackShapeError, match="layer 0.*expected \\(3, 6\\).*transposed"):
        d.update(params, fb.DirectFeedbackAlignmentState(wrong), tape, err)


def test_fa_matmul_rejects_wrong_feedback_shape():
    with pytest.raises(ValueError, match="shape of w"):
        fb.fa_matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4, 3)))


@pytest.mark.parametrize("init", ["gaussian", "uniform", "orthogonal"])
def test_feedback_initialisers_and_scale(init):
    params = fb.mlp((10, 400, 300, 200)).init(jax.random.PRNGKey(0))
    s = fb.feedback_alignment(init=init, scale=0.5).init(jax.random.PRNGKey(1), params)
    b = np.asarray(s.feedback[1])
    if init == "gaussian":
        assert abs(b.std() - 0.5) < 0.01
    elif init == "uniform":
        assert b.max() <= 0.5 and b.min() >= -0.5 and abs(b.max() - 0.5) < 0.01
    else:
        sv = np.linalg.svd(b, compute_uv=False)
        np.testing.assert_allclose(sv, 0.5, rtol=1e-4)
    auto = fb.feedback_alignment(init=init).init(jax.random.PRNGKey(1), params)
    # Default scaling keeps ||delta B^T|| comparable to ||delta||: variance ~ 1/dout.
    if init != "orthogonal":
        assert abs(np.asarray(auto.feedback[1]).var() * 300 - 1) < 0.1
    with pytest.raises(ValueError, match="unknown feedback init 'cauchy'"):
        fb.feedback_alignment(init="cauchy").init(jax.random.PRNGKey(0), params)


def test_hash_uniform_is_uniform_reproducible_and_vmap_safe():
    from fbalign._src.feedback_init import hash_uniform

    draw = jax.jit(hash_uniform, static_argnums=(1, 2, 3, 4))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    u = np.asarray(draw(keys[0], (300, 400), jnp.float32, -2.0, 3.0), np.float64)
    assert u.min() >= -2.0 and u.max() < 3.0
    # Moments of U[-2, 3) and a flat histogram (10 bins of 12,000 expected counts each).
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 25 / 12) < 0.02
    counts, _ = np.histogram(u, bins=10, range=(-2, 3))
    assert np.all(np.abs(counts - 12_000) < 600)
    # Neighbouring entries (along both axes) are uncorrelated.
    for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    # Same key, same draw; another key, an unrelated draw; vmap equals separate calls.
    np.testing.assert_array_equal(draw(keys[0], (300, 400), jnp.float32, -2.0, 3.0), u)
    other = np.asarray(draw(keys[1], (300, 400), jnp.float32, -2.0, 3.0))
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.01
    batched = jax.vmap(lambda k: hash_uniform(k, (5, 7)))(keys)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], hash_uniform(keys[i], (5, 7)))
    assert hash_uniform(keys[0], (4,), jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_sign_symmetry_magnitudes_have_the_documented_law(distribution):
    """frSF/brSF magnitudes are |R| with R of std s: uniform |R| ~ U[0, sqrt(3) s)
    (BioTorch's Xavier-uniform draw), normal |R| ~ half-normal (mean s sqrt(2/pi))."""
    params = fb.mlp((10, 400, 300)).init(jax.random.PRNGKey(0))
    s = 0.2
    rule = fb.brsf(scale=s, distribution=distribution)
    draw = jax.jit(lambda k: fb.rules.rule_feedback(rule, params, rule.init(k, params)))
    m = np.asarray(draw(jax.random.PRNGKey(1))[1], np.float64)
    assert m.min() >= 0 and np.sqrt(np.mean(m**2)) == pytest.approx(s, rel=0.02)
    if distribution == "uniform":
        assert m.max() < np.sqrt(3) * s and m.max() > 0.99 * np.sqrt(3) * s
        assert m.mean() == pytest.approx(np.sqrt(3) * s / 2, rel=0.02)
    else:
        assert m.mean() == pytest.approx(s * np.sqrt(2 / np.pi), rel=0.02)
        assert m.max() > 3.5 * s  # a half-normal tail, beyond any uniform's reach
    with pytest.raises(ValueError, match="unknown distribution 'cauchy'"):
        fb.brsf(distribution="cauchy")


@pytest.mark.parametrize("name", ["bp", "fa", "dfa"])
def test_jit_equals_eager_and_vmap_over_seeds(name):
    model, params, x, labels = setup((6, 7, 7, 4), "tanh", 4)
    rule = fb.get_rule(name)

    def run(key):
        state = rule.init(key, params)
        return explicit(model, rule, params, state, x, labels)

    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    eager = [run(k) for k in keys]
    jitted = jax.jit(run)(keys[0])
    assert_trees_close(jitted, eager[0], 1e-5, 1e-7)
    batched = jax.vmap(run)(keys)
    for i in range(3):
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], batched), eager[i], 1e-5, 1e-7)
    if name != "bp":  # different feedback draws per seed give different hidden updates
        assert not np.allclose(batched[0]["w"][0], batched[0]["w"][1], atol=1e-5)


@pytest.mark.parametrize("name", ["bp", "fa", "dfa"])
def test_train_step_compiles_once(name):
    from fbalign.train import init_train_state, make_train_step

    model = fb.mlp((6, 8, 4))
    opt = optax.sgd(0.1)
    state = init_train_state(model, name, opt, jax.random.PRNGKey(0))
    inner = make_train_step(model, name, opt, jit=False)
    traces = []

    def counted(state, x, y):
        traces.append(1)
        return inner(state, x, y)

    step = jax.jit(counted, donate_argnums=0)
    x = jnp.ones((3, 6))
    y = jnp.array([0, 1, 2])
    for _ in range(4):
        state, m = step(state, x, y)
    assert len(traces) == 1
    assert int(state.step) == 4 and np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("name", ["fa", "dfa"])
def test_feedback_untouched_by_optimizer_and_weight_decay(name):
    from fbalign.train import init_train_state, make_train_step

    model = fb.mlp((6, 8, 8, 4))
    opt = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1))
    state = init_train_state(model, name, opt, jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, state.rule_state)
    assert all(b is None or b.shape != () for b in before.feedback)
    step = make_train_step(model, name, opt)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    y = jnp.arange(5) % 4
    p0 = jax.tree.map(np.array, state.params)
    for _ in range(3):
        state, _ = step(state, x, y)
    assert_trees_close(state.rule_state, before, 0, 0)
    # ...while the params did move (decay + updates), so the test can fail.
    assert not np.allclose(state.params[0]["w"], p0[0]["w"])
    # The optimizer's view is params only: its state has no leaf shaped like a DFA B.
    leaves = {tuple(np.shape(a)) for a in jax.tree.leaves(state.opt_state)}
    for b in before.feedback:
        if b is not None and name == "dfa":
            assert tuple(b.shape) not in leaves


@pytest.mark.parametrize("name", ["bp", "fa", "dfa"])
def test_every_rule_reduces_teacher_loss(name):
    from fbalign.data import load_teacher
    from fbalign.train import fit

    data = load_teacher(seed=0, n_train=512, n_test=256, input_dim=10, output_dim=4)
    res = fit(fb.mlp((10, 32, 32, 4)), name, optax.sgd(0.1), data, epochs=8, batch_size=32,
              progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert res.history[-1]["test_error"] < 40.0


def test_shallow_mode_trains_only_the_last_layer():
    model, params, x, labels = setup((5, 6, 3), "tanh", 4)
    g = jax.grad(lambda p: fb.cross_entropy(model.apply(p, x, mode="shallow"), labels))(params)
    assert not np.any(np.asarray(g[0]["w"])) and np.any(np.asarray(g[1]["w"]))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid: tanh"):
        fb.mlp((3, 4), "swish")
    with pytest.raises(ValueError, match="positive integers"):
        fb.mlp((3, 0, 2))
    with pytest.raises(ValueError, match="unknown rule 'xfa'; valid: bp, fa, dfa"):
        fb.get_rule("xfa")
    model = fb.mlp((4, 3))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 4\)"):
        model.forward(model.init(jax.random.PRNGKey(0)), jnp.ones((2, 5)))


@pytest.mark.parametrize("b_shape", [(10, 7), (10, 3, 4, 2), (3,), (20, 5)])
def test_project_error_equals_tensordot_in_every_impl(b_shape):
    rng = np.random.default_rng(0)
    e = rng.standard_normal((6, b_shape[0])).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    ref = np.tensordot(e.astype(np.float64), b.astype(np.float64), axes=1)
    for impl in ("auto", "dot", "sum"):
        got = jax.jit(lambda e, b, impl=impl: fb.ops.project_error(e, b, impl=impl))(e, b)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5, err_msg=impl)
    # under vmap (an ensemble of feedback matrices), the small-contraction form batches too
    bs = np.stack([b, 2 * b])
    got = jax.vmap(lambda bb: fb.ops.project_error(e, bb, impl="sum"))(bs)
    np.testing.assert_allclose(np.asarray(got[1]), 2 * ref, rtol=1e-5, atol=1e-5)


def test_project_error_rejects_mismatched_shapes_and_unknown_impl():
    with pytest.raises(ValueError, match=r"e has 4 entries .* b has 5"):
        fb.ops.project_error(jnp.ones((2, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="impl must be"):
        fb.ops.project_error(jnp.ones((2, 4)), jnp.ones((4, 3)), impl="einsum")
