"""Flax adapters: same updates as the core ops, feedback kept away from optimizers, convert."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from flax import linen as nn
from flax import nnx
from flax.errors import InvalidRngError

import fbalign as fb
import fbalign.flax as ff
from fbalign import ops
from fbalign._src.backward import Backward, LinearFeedback, SignFeedback
from fbalign._src.rules.sign_symmetry import draw_magnitude


def _rand(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _key(seed):
    # "rbg" keys compile several times faster than threefry on CPU; any random draw will do.
    return jax.random.key(seed, impl="rbg")


def _rngs(seed):
    return nnx.Rngs(_key(seed))


def _glorot(shape):
    rf = int(np.prod(shape[:-2]))
    return np.sqrt(2.0 / (rf * shape[-2] + rf * shape[-1]))


def _expected_b(rule, w, feedback):
    """The backward kernel written out from the papers, independently of the adapter."""
    if rule in ("fa", "kp"):
        return feedback
    if rule in ("sign", "usf"):
        return jnp.sign(w) * _glorot(w.shape)
    if rule == "frsf":
        return jnp.sign(w) * jnp.abs(feedback)
    raise AssertionError(rule)


def test_import_fbalign_does_not_import_flax():
    code = "import sys, fbalign; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class MLP2(nnx.Module):
    def __init__(self, rule, rngs):
        self.l1 = ff.Linear(4, 5, rule=rule, rngs=rngs)
        self.l2 = ff.Linear(5, 3, rule=rule, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "sign", "usf", "frsf"])
def test_nnx_linear_gives_the_core_ops_updates(rule):
    model = MLP2(rule, _rngs(0))
    x, y = _rand(1, (6, 4), (6, 3))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    got = nnx.grad(loss)(model)
    w1, b1, w2, b2 = (model.l1.kernel[...], model.l1.bias[...], model.l2.kernel[...],
                      model.l2.bias[...])
    if rule == "bp":
        back = w2
    else:
        back = _expected_b(rule, w2, None if model.l2.feedback is None else model.l2.feedback[...])

    def core(w1, b1, w2, b2):
        return jnp.mean((fb.fa_matmul(jnp.tanh(x @ w1 + b1), w2, back) + b2 - y) ** 2)

    want = jax.grad(core, (0, 1, 2, 3))(w1, b1, w2, b2)
    assert_trees_close((got["l1"]["kernel"][...], got["l1"]["bias"][...],
                        got["l2"]["kernel"][...], got["l2"]["bias"][...]), want, 1e-5, 1e-7)
    if rule != "bp":  # the rule really changed the lower layer's update
        bp = jax.grad(lambda w1: jnp.mean((jnp.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2))(w1)
        assert not np.allclose(got["l1"]["kernel"][...], bp, atol=1e-5)
    # Feedback never appears among the gradients of nnx.grad's default (Params).
    assert not jax.tree.leaves(nnx.state(got, ff.Feedback))


@pytest.mark.parametrize("rule", ["frsf", "fa"])
def test_frsf_with_w_magnitudes_and_fa_with_b_equal_w_are_backprop(rule):
    model = MLP2(rule, _rngs(2))
    model.l2.feedback[...] = model.l2.kernel[...]
    x, y = _rand(3, (5, 4), (5, 3))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    want = nnx.grad(loss)(ff.convert(model, "bp", _rngs(0)))
    assert_trees_close(nnx.grad(loss)(model), want, 1e-6, 1e-7)


class ConvNet(nnx.Module):
    def __init__(self, rule, rngs):
        self.c1 = ff.Conv(4, 4, (3, 3), rule=rule, rngs=rngs)
        self.c2 = ff.Conv(4, 6, (3, 2), strides=2, padding=((1, 0), (0, 1)),
                          feature_group_count=2, rule=rule, rngs=rngs)

    def __call__(self, x):
        return self.c2(jnp.tanh(self.c1(x)))


@pytest.mark.parametrize("rule", ["fa", "kp", "sign"])
def test_nnx_conv_gives_the_core_ops_updates(rule):
    model = ConvNet(rule, _rngs(4))
    assert model.c2.kernel.shape == (3, 2, 2, 6)
    x, r = _rand(5, (2, 6, 5, 4), (2, 3, 3, 6))

    def loss(m):
        return jnp.sum(m(x) * r)

    got = nnx.grad(loss)(model)
    k1, c1, k2, c2 = (model.c1.kernel[...], model.c1.bias[...], model.c2.kernel[...],
                      model.c2.bias[...])
    fb2 = None if model.c2.feedback is None else model.c2.feedback[...]
    back = _expected_b(rule, k2, fb2)

    def core(k1, c1, k2, c2):
        h = jnp.tanh(ops.conv_op(2, padding="SAME")(x, k1) + c1)
        out = ops.fa_conv(h, k2, back, c2, strides=2, padding=((1, 0), (0, 1)),
                          feature_group_count=2)
        return jnp.sum(out * r)

    want = jax.grad(core, (0, 1, 2, 3))(k1, c1, k2, c2)
    assert_trees_close((got["c1"]["kernel"][...], got["c1"]["bias"][...],
                        got["c2"]["kernel"][...], got["c2"]["bias"][...]), want, 1e-5, 1e-6)


def test_optimizer_with_weight_decay_never_touches_feedback():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c = ff.Conv(1, 2, 3, rule="fa", rngs=rngs)
            self.l = ff.Linear(16, 3, rule="kp", rngs=rngs)
            self.tap = ff.DFATap(3, (16,), rngs=rngs)

        def __call__(self, x):
            h = jnp.tanh(self.c(x)).reshape(x.shape[0], -1)
            h, _ = self.tap(h, ff.dfa_carrier((x.shape[0], 3)))
            return self.l(h)

    model = Net(_rngs(6))
    x = _rand(7, (2, 2, 4, 1))[0]
    y = jnp.array([0, 2])
    before = jax.tree.map(np.array, nnx.state(model, ff.Feedback))
    params0 = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(before)) == 3
    for tx in (optax.adamw(0.1, weight_decay=0.5),
               optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1))):
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for _ in range(3):
            grads = nnx.grad(lambda m: fb.cross_entropy(m(x), y))(model)
            opt.update(model, grads)
        # The optimizer state holds nothing shaped like a feedback-only tensor (the DFA B).
        shapes = {np.shape(a) for a in jax.tree.leaves(nnx.state(opt))}
        assert (3, 16) not in shapes
    assert_trees_close(nnx.state(model, ff.Feedback), before, 0, 0)
    moved = nnx.state(model, nnx.Param)
    assert not np.allclose(moved["c"]["kernel"][...], params0["c"]["kernel"][...])


def test_kp_feedback_path_gives_b_the_weight_update_and_converges():
    model = MLP2("kp", _rngs(8))
    x, y = _rand(9, (8, 4), (8, 3))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    gw = nnx.grad(loss)(model)
    gb = ff.feedback_grads(loss, model)
    for name in ("l1", "l2"):
        np.testing.assert_allclose(gb[name]["feedback"][...], gw[name]["kernel"][...], rtol=1e-6)
    # Fixed-feedback rules get no feedback gradient.
    fa_model = MLP2("fa", _rngs(8))
    assert all(np.all(g == 0) for g in jax.tree.leaves(ff.feedback_grads(loss, fa_model)))

    # Same update and decay for W and B: W - B shrinks by exactly (1 - lr * wd) per step.
    lr, wd, steps = 0.1, 0.3, 5
    d0 = model.l2.kernel[...] - model.l2.feedback[...]
    opt = nnx.Optimizer(model, optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)),
                        wrt=nnx.Param)
    for _ in range(steps):
        gb = ff.feedback_grads(loss, model)
        opt.update(model, nnx.grad(loss)(model))
        ff.update_feedback(model, gb, lr, wd)
    d = model.l2.kernel[...] - model.l2.feedback[...]
    np.testing.assert_allclose(d, (1 - lr * wd) ** steps * d0, rtol=1e-4, atol=1e-6)


def test_nnx_dfa_tap_matches_core_mlp_and_shared_feedback():
    core = fb.mlp((4, 6, 5, 3), "tanh")
    params = core.init(_key(10))
    x = _rand(11, (5, 4))[0]
    labels = jnp.array([0, 1, 2, 0, 1])

    class DFANet(nnx.Module):
        def __init__(self, rngs, shared=None):
            self.l = nnx.List([ff.Linear(a, b, rule="bp", rngs=rngs)
                               for a, b in [(4, 6), (6, 5), (5, 3)]])
            self.taps = nnx.List([ff.DFATap(3, (n,), shared=shared, rngs=rngs) for n in (6, 5)])

        def __call__(self, x):
            carrier = ff.dfa_carrier((x.shape[0], 3))
            h = x
            for layer, tap in zip(self.l[:2], self.taps, strict=True):
                h, carrier = tap(jnp.tanh(layer(h)), carrier)
            return ff.dfa_output(self.l[2](h), carrier)

    for shared in (None, ff.shared_feedback(3, 6, rngs=_rngs(12))):
        model = DFANet(_rngs(13), shared)
        for layer, p in zip(model.l, params, strict=True):
            layer.kernel[...], layer.bias[...] = p["w"], p["b"]
        if shared is None:
            feedback = [t.feedback[...] for t in model.taps] + [None]
        else:
            m = shared[...]
            feedback = [np.sqrt(2 / (3 + n)) * m[:, :n] for n in (6, 5)] + [None]
        got = nnx.grad(lambda mdl: fb.cross_entropy(mdl(x), labels))(model)
        want = jax.grad(lambda p, fbk=feedback: fb.cross_entropy(core.apply(p, x, fbk, "dfa"),
                                                                 labels))(params)
        for i in range(3):
            np.testing.assert_allclose(got["l"][i]["kernel"][...], want[i]["w"], rtol=1e-5,
                                       atol=1e-7)
            np.testing.assert_allclose(got["l"][i]["bias"][...], want[i]["b"], rtol=1e-5,
                                       atol=1e-7)
    # The shared Feedback is one variable: both taps see it, the state stores it once.
    assert len(jax.tree.leaves(nnx.state(model, ff.Feedback))) == 1


def test_linen_layers_keep_feedback_in_its_own_collection_and_match_core_ops():
    class Net(nn.Module):
        rule: str

        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(ff.LinenConv(3, (3, 3), strides=2, rule=self.rule)(x))
            return ff.LinenDense(2, rule=self.rule)(h.reshape(x.shape[0], -1))

    x, r = _rand(14, (2, 5, 5, 2), (2, 2))
    for rule in ("fa", "kp"):
        net = Net(rule)
        variables = net.init(_key(15), x)
        assert set(variables) == {"params", "feedback"}
        p, f = variables["params"], variables["feedback"]
        assert "feedback" not in str(jax.tree_util.tree_structure(p))
        fk_dense = f["LinenDense_0"]["kernel"]
        assert fk_dense.shape == p["LinenDense_0"]["kernel"].shape

        def loss(p, f, net=net):
            return jnp.sum(net.apply({"params": p, "feedback": f}, x) * r)

        gp, gf = jax.grad(loss, (0, 1))(p, f)
        kc, cc = p["LinenConv_0"]["kernel"], p["LinenConv_0"]["bias"]
        kd, cd = p["LinenDense_0"]["kernel"], p["LinenDense_0"]["bias"]

        def core(kc, cc, kd, cd, b=fk_dense):
            h = jnp.tanh(ops.conv_op(2, strides=2, padding="SAME")(x, kc) + cc)
            return jnp.sum((fb.fa_matmul(h.reshape(2, -1), kd, b) + cd) * r)

        want = jax.grad(core, (0, 1, 2, 3))(kc, cc, kd, cd)
        assert_trees_close((gp["LinenConv_0"]["kernel"], gp["LinenConv_0"]["bias"],
                            gp["LinenDense_0"]["kernel"], gp["LinenDense_0"]["bias"]), want,
                           1e-5, 1e-6)
        if rule == "kp":  # B's gradient is W's
            np.testing.assert_allclose(gf["LinenDense_0"]["kernel"], want[2], rtol=1e-5)
        else:
            assert all(np.all(g == 0) for g in jax.tree.leaves(gf))


def test_linen_dfa_tap_matches_core_mlp():
    core = fb.mlp((4, 6, 5, 3), "tanh")
    params = core.init(_key(22))
    x = _rand(23, (5, 4))[0]
    labels = jnp.array([0, 1, 2, 0, 1])

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            carrier = ff.dfa_carrier((x.shape[0], 3))
            h = x
            for n in (6, 5):
                h, carrier = ff.LinenDFATap(3)(jnp.tanh(ff.LinenDense(n, rule="bp")(h)), carrier)
            return ff.dfa_output(ff.LinenDense(3, rule="bp")(h), carrier)

    net = Net()
    variables = net.init(_key(24), x)
    fbk = variables["feedback"]
    assert [fbk[f"LinenDFATap_{i}"]["dfa"].shape for i in (0, 1)] == [(3, 6), (3, 5)]
    p = {f"LinenDense_{i}": {"kernel": params[i]["w"], "bias": params[i]["b"]} for i in range(3)}
    got = jax.grad(lambda p: fb.cross_entropy(net.apply({"params": p, "feedback": fbk}, x),
                                              labels))(p)
    feedback = [fbk["LinenDFATap_0"]["dfa"], fbk["LinenDFATap_1"]["dfa"], None]
    want = jax.grad(lambda p: fb.cross_entropy(core.apply(p, x, feedback, "dfa"), labels))(params)
    want = {f"LinenDense_{i}": {"kernel": want[i]["w"], "bias": want[i]["b"]} for i in range(3)}
    assert_trees_close(got, want, 1e-5, 1e-7)
    bp = jax.grad(lambda p: fb.cross_entropy(core.apply(p, x), labels))(params)
    assert not np.allclose(got["LinenDense_0"]["kernel"], bp[0]["w"], atol=1e-5)


class Original(nnx.Module):
    def __init__(self, rngs):
        self.convs = nnx.List([
            nnx.Conv(2, 4, (3, 3), strides=2, padding=1, rngs=rngs),
            nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", feature_group_count=2, rngs=rngs),
            nnx.Conv(4, 3, (2, 2), padding="VALID", kernel_dilation=2, use_bias=False,
                     rngs=rngs),
        ])
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.head = nnx.Sequential(nnx.Linear(3, 5, rngs=rngs), nnx.relu,
                                   nnx.Linear(5, 2, rngs=rngs))

    def __call__(self, x):
        for c in self.convs:
            x = jnp.tanh(c(x))
        return self.head(self.norm(x.mean(axis=(1, 2))))


@pytest.mark.parametrize("rule", ["fa", "kp", "sign", "frsf"])
def test_convert_keeps_forward_and_weights(rule):
    original = Original(_rngs(16))
    x = _rand(17, (2, 8, 8, 2))[0]
    y0 = original(x)
    converted = ff.convert(original, rule, _rngs(18))
    kinds = [type(m) for _, m in nnx.iter_modules(converted)]
    assert kinds.count(ff.Conv) == 3 and kinds.count(ff.Linear) == 2
    assert nnx.Conv not in kinds and nnx.Linear not in kinds
    assert nnx.LayerNorm in kinds
    np.testing.assert_allclose(converted(x), y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(converted.convs[1].kernel[...], original.convs[1].kernel[...])
    assert converted.convs[2].bias is None
    # The original is untouched (copy=True) ...
    assert type(original.convs[0]) is nnx.Conv
    # ... and the rule is live: with random feedback the lower layers' updates differ.
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    g_new, g_old = nnx.grad(loss)(converted), nnx.grad(loss)(original)
    assert not np.allclose(g_new["convs"][0]["kernel"][...], g_old["convs"][0]["kernel"][...],
                           atol=1e-6)


def test_convert_with_b_equal_w_is_backprop_in_place_and_single_layer():
    original = Original(_rngs(19))
    x = _rand(20, (2, 8, 8, 2))[0]
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    want = nnx.grad(loss)(original)
    ff.convert(original, "fa", _rngs(21), copy=False)
    assert type(original.convs[0]) is ff.Conv
    for _, m in nnx.iter_modules(original):
        if isinstance(m, ff.Conv | ff.Linear):
            m.feedback[...] = m.kernel[...]
    assert_trees_close(nnx.grad(loss)(original), want, 1e-5, 1e-6)

    lin = nnx.Linear(3, 2, rngs=_rngs(0))
    new = ff.convert(lin, "sign", _rngs(1))
    assert isinstance(new, ff.Linear) and new.feedback is None
    np.testing.assert_allclose(new(jnp.ones((1, 3))), lin(jnp.ones((1, 3))), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown rule 'dfa2'"):
        ff.convert(lin, "dfa2", _rngs(1))
    with pytest.raises(ValueError, match="sample_input"):  # DFA traces the model's shapes
        ff.convert(lin, "dfa", _rngs(1))


# ---------------------------------------------------------------------------------------------
# brSF: sign symmetry whose magnitudes are redrawn at every call.


def _magnitudes(key, shape, distribution="uniform"):
    """brSF's magnitudes: the core rule's draw with std the Glorot std of ``shape``."""
    return draw_magnitude(key, shape, jnp.float32, _glorot(shape), distribution)


def _dense_op(x, w, b, c):
    return fb.fa_matmul(x, w, b) + c


def _conv_op(x, w, b, c):
    return ops.fa_conv(x, w, b, c, padding="SAME")


def _core_grads(op, w, c, x, r, m):
    """(kernel, bias, input) gradients of ``sum(op(x) * r)`` sending the error back through
    ``sign(W) * m``: the core primitive path."""
    loss = lambda w, c, x: jnp.sum(op(x, w, jnp.sign(w) * m, c) * r)  # noqa: E731
    return jax.grad(loss, (0, 1, 2))(w, c, x)


def _nnx_grads(layer, x, r, **kw):
    g, gx = nnx.grad(lambda m, x: jnp.sum(m(x, **kw) * r), argnums=(0, 1))(layer, x)
    return g["kernel"][...], g["bias"][...], gx


def test_brsf_nnx_layers_match_core_ops_with_the_magnitudes_they_drew():
    x, r, xc, rc = _rand(30, (3, 4), (3, 5), (2, 5, 5, 2), (2, 5, 5, 3))
    lin = ff.Linear(4, 5, rule="brsf", rngs=_rngs(31))
    conv = ff.Conv(2, 3, (3, 3), rule="brsf", rngs=_rngs(32))
    # A dense layer given a key draws the very magnitudes the core rule draws from it (its
    # `init` draws layer 1's from split(key, 2)[1]), for the default law and the normal one.
    key = _key(33)
    k1 = jax.random.split(key, 2)[1]
    core_params = [{"w": jnp.zeros((2, 4))}, {"w": lin.kernel[...]}]
    def core_magnitudes(rule):
        return fb.rules.rule_feedback(rule, core_params, rule.init(key, core_params))[1]

    np.testing.assert_array_equal(jnp.abs(lin.backward_kernel(k1)), core_magnitudes(fb.brsf()))
    normal = ff.Linear(4, 5, rule="brsf", magnitude_distribution="normal", rngs=_rngs(31))
    np.testing.assert_array_equal(jnp.abs(normal.backward_kernel(k1)),
                                  core_magnitudes(fb.brsf(distribution="normal")))
    np.testing.assert_array_equal(jnp.abs(conv.backward_kernel(k1)),
                                  _magnitudes(k1, conv.kernel.shape))
    for layer, op, xx, rr in ((lin, _dense_op, x, r), (conv, _conv_op, xc, rc)):
        w, c = layer.kernel[...], layer.bias[...]
        m_call = _magnitudes(k1, w.shape)
        assert_trees_close(_nnx_grads(layer, xx, rr, rngs=k1),
                           _core_grads(op, w, c, xx, rr, m_call), 1e-5, 1e-6)
        assert int(layer.rngs.count[...]) == 0  # a per-call key leaves the stream alone
        # Own stream: the magnitudes come from the next key of the layer's RngStream.
        m_own = _magnitudes(nnx.clone(layer.rngs)(), w.shape)
        got = _nnx_grads(layer, xx, rr)
        assert int(layer.rngs.count[...]) == 1
        assert_trees_close(got, _core_grads(op, w, c, xx, rr, m_own), 1e-5, 1e-6)
        # Not sign(W) * |W| (backprop) and not the magnitudes of another draw.
        bp = _core_grads(op, w, c, xx, rr, jnp.abs(w))
        assert not np.allclose(got[2], bp[2], atol=1e-5)
        assert not np.allclose(got[2], _core_grads(op, w, c, xx, rr, m_call)[2], atol=1e-5)
        # Nothing random is a parameter: the stream is RNG state, invisible to nnx.Param.
        assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 2
        assert len(jax.tree.leaves(nnx.state(layer, nnx.RngState))) == 2
    with pytest.raises(ValueError, match="'feedback' stream"):
        ff.Linear(4, 5, rule="brsf", rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="magnitude_distribution"):
        ff.Linear(4, 5, rule="brsf", magnitude_distribution="cauchy", rngs=_rngs(0))


class _FeedbackKey(nn.Module):
    """The first key ``make_rng("feedback")`` gives a top-level Linen module."""

    @nn.compact
    def __call__(self):
        return self.make_rng("feedback")


def test_brsf_linen_layers_match_core_ops_with_the_magnitudes_they_drew():
    x, r, xc, rc = _rand(34, (3, 4), (3, 5), (2, 5, 5, 2), (2, 5, 5, 3))
    key = _key(35)
    # The magnitudes written out from the key Linen hands the layer, independently of it.
    drawn = _FeedbackKey().apply({}, rngs={"feedback": key})
    for layer, op, xx, rr in ((ff.LinenDense(5, rule="brsf"), _dense_op, x, r),
                              (ff.LinenConv(3, (3, 3), rule="brsf"), _conv_op, xc, rc)):
        v = layer.init(_key(36), xx)
        assert set(v) == {"params"}
        w, c = v["params"]["kernel"], v["params"]["bias"]
        m = _magnitudes(drawn, w.shape)

        def loss(p, x, layer=layer, rr=rr):
            y, state = layer.apply({"params": p}, x, rngs={"feedback": key},
                                   mutable=["intermediates"])
            return jnp.sum(y * rr), state["intermediates"]["feedback_magnitudes"][0]

        (gp, gx), sown = jax.grad(loss, (0, 1), has_aux=True)(v["params"], xx)
        np.testing.assert_allclose(sown, m, rtol=1e-6)
        assert_trees_close((gp["kernel"], gp["bias"], gx), _core_grads(op, w, c, xx, rr, m),
                           1e-5, 1e-6)
        bp = _core_grads(op, w, c, xx, rr, jnp.abs(w))
        assert not np.allclose(gx, bp[2], atol=1e-5)
        # Another key, other magnitudes.
        other = jax.grad(lambda x, layer=layer, v=v, rr=rr: jnp.sum(
            layer.apply(v, x, rngs={"feedback": _key(37)}) * rr))(xx)
        assert not np.allclose(other, gx, atol=1e-5)
        with pytest.raises(InvalidRngError, match=r"rngs=\{'feedback': key\}"):
            layer.apply(v, xx)


def test_brsf_redraws_at_every_call_and_with_w_magnitudes_is_backprop(monkeypatch):
    lin = ff.Linear(4, 3, rule="brsf", rngs=_rngs(38))
    x, r = _rand(39, (5, 4), (5, 3))
    grad_x = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * r), argnums=1))
    g1, g2 = grad_x(lin, x), grad_x(lin, x)
    assert int(lin.rngs.count[...]) == 2  # the stream advances under jit
    assert not np.allclose(g1, g2, atol=1e-5)
    # Magnitudes |W| make the feedback sign(W) * |W| = W: exactly backprop, dense and conv.
    from fbalign._src import flax_adapters

    conv = ff.Conv(2, 3, (3, 3), rule="brsf", rngs=_rngs(40))
    xc, rc = _rand(41, (2, 4, 4, 2), (2, 4, 4, 3))
    plain_conv = ops.conv_op(2, padding="SAME")
    for layer, op, xx, rr in ((lin, jnp.matmul, x, r), (conv, plain_conv, xc, rc)):
        w, c = layer.kernel[...], layer.bias[...]
        monkeypatch.setattr(flax_adapters, "_brsf_magnitudes", lambda *args, w=w: jnp.abs(w))
        bp = jax.grad(lambda w, c, x, op=op, rr=rr: jnp.sum((op(x, w) + c) * rr), (0, 1, 2))
        assert_trees_close(_nnx_grads(layer, xx, rr), bp(w, c, xx), 1e-5, 1e-6)


def test_convert_to_brsf_keeps_the_weights_and_trains():
    class Small(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.head = nnx.Linear(48, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

    original = Small(_rngs(42))
    x, v = _rand(43, (8, 4, 4, 2), (32, 1))
    y = x.reshape(8, -1) @ v / np.sqrt(32)
    model = ff.convert(original, "brsf", _rngs(44))
    assert type(model.conv) is ff.Conv and type(model.head) is ff.Linear
    assert model.conv.rule == model.head.rule == "brsf"
    np.testing.assert_array_equal(model.conv.kernel[...], original.conv.kernel[...])
    np.testing.assert_allclose(model(x), original(x), rtol=1e-5, atol=1e-6)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    opt = nnx.Optimizer(model, optax.sgd(0.02, momentum=0.5), wrt=nnx.Param)
    # The optimizer's state mirrors the four parameters only: no RNG key or count in it.
    assert len(jax.tree.leaves(nnx.state(opt.opt_state))) == 4

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    count = int(model.conv.rngs.count[...])  # every call draws, the forward above included
    losses = [float(step(model, opt)) for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.2 * losses[0], losses
    assert int(model.conv.rngs.count[...]) == count + 6


def _hand_backward(rule, b, shape, scale):
    """The `Backward` object of an adapter rule, built by hand from `fbalign._src.backward`."""
    if rule == "bp":
        return Backward()
    if rule in ("fa", "kp"):
        return LinearFeedback(feedback={"w": b}, learn=rule == "kp")
    if rule == "frsf":
        return SignFeedback(feedback={"w": jnp.abs(b)})
    return SignFeedback(feedback={"w": _glorot(shape) if scale is None else scale})


@pytest.mark.parametrize("rule, scale", [("bp", None), ("fa", None), ("kp", None),
                                         ("sign", None), ("usf", 0.25), ("frsf", None)])
def test_layers_run_their_rules_backward_object(rule, scale):
    """Dense and conv layers update as the rule's `Backward` object does on the layer's op
    (kernel, bias, input and feedback gradients); ``sign_scale=None`` is the Glorot std, not
    the plain op."""
    x, r, xc, rc = _rand(50, (3, 4), (3, 5), (2, 5, 5, 2), (2, 5, 5, 3))
    kw = dict(rule=rule, sign_scale=scale)
    for layer, op, xx, rr in ((ff.Linear(4, 5, **kw, rngs=_rngs(51)), jnp.matmul, x, r),
                              (ff.Conv(2, 3, (3, 3), **kw, rngs=_rngs(52)),
                               ops.conv_op(2, padding="SAME"), xc, rc)):
        w, c = layer.kernel[...], layer.bias[...]
        b = w if layer.feedback is None else layer.feedback[...]

        def core(w, c, x, b, op=op, rr=rr):
            y = _hand_backward(rule, b, w.shape, scale).linear("w", op, x, w)
            return jnp.sum((y + c) * rr)

        want = jax.grad(core, (0, 1, 2, 3))(w, c, xx, b)
        assert_trees_close(_nnx_grads(layer, xx, rr), want[:3], 1e-6, 1e-7)
        got_b = ff.feedback_grads(lambda m, x, rr=rr: jnp.sum(m(x) * rr), layer, xx)
        if layer.feedback is None:
            assert not jax.tree.leaves(got_b)
        else:
            assert_trees_close(got_b["feedback"][...], want[3], 1e-6, 1e-7)
        if rule != "bp":  # not the plain op
            bp = jax.grad(lambda x, w=w, op=op, rr=rr: jnp.sum(op(x, w) * rr))(xx)
            assert not np.allclose(want[2], bp, atol=1e-5)


def test_train_step_moves_kolen_pollack_feedback_which_an_optimizer_alone_never_does():
    """Issue 18 item 2: nnx.Optimizer(wrt=nnx.Param) never moves a Feedback, so a kp model
    trained the usual way is silently FA. ff.train_step updates W by the optimizer and B by the
    same backward pass: with plain SGD and the same decay, W - B shrinks by exactly (1 - lr *
    wd) a step (Akrout et al. 2019), as the two-call path feedback_grads + update_feedback
    does. It refuses a kp model without feedback_lr, naming the layers; convert warns."""
    x, y = _rand(9, (8, 4), (8, 3))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    lr, wd, steps = 0.1, 0.3, 5
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    model = MLP2("kp", _rngs(8))
    d0 = model.l2.kernel[...] - model.l2.feedback[...]
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(steps):
        ff.train_step(model, opt, loss, feedback_lr=lr, feedback_weight_decay=wd)
    d = model.l2.kernel[...] - model.l2.feedback[...]
    np.testing.assert_allclose(d, (1 - lr * wd) ** steps * d0, rtol=1e-4, atol=1e-6)
    plain = MLP2("kp", _rngs(8))  # the usual loop: B stays where it was
    b0 = np.array(plain.l2.feedback[...])
    opt = nnx.Optimizer(plain, tx, wrt=nnx.Param)
    for _ in range(steps):
        opt.update(plain, nnx.grad(loss)(plain))
    np.testing.assert_array_equal(plain.l2.feedback[...], b0)
    with pytest.raises(ValueError, match="layers l1, l2 learn their feedback.*feedback_lr"):
        ff.train_step(MLP2("kp", _rngs(8)), opt, loss)
    fa = MLP2("fa", _rngs(8))  # fixed feedback: an ordinary step, no feedback_lr needed
    ff.train_step(fa, nnx.Optimizer(fa, tx, wrt=nnx.Param), loss)
    with pytest.warns(UserWarning, match="feedback learns.*fbalign.flax.train_step"):
        ff.convert(MLP2("bp", _rngs(8)), "kp", _rngs(9))


def test_train_step_moves_learning_direct_feedback():
    """The direct-feedback rules whose B learns (asrbp) get their update from train_step too."""
    x = _rand(3, (8, 4))[0]
    y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.warns(UserWarning, match="feedback learns"):
        model = ff.convert(MLP2("bp", _rngs(4)), "asrbp", _rngs(5), num_outputs=3,
                           sample_input=x)
    assert ff.learning_feedback_layers(model) == ["<model>"]
    before = jax.tree.map(np.array, nnx.state(model, ff.Feedback))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    ff.train_step(model, opt, lambda m: fb.cross_entropy(m(x), y), feedback_lr=0.1)
    after = jax.tree.leaves(nnx.state(model, ff.Feedback))
    assert any(not np.allclose(a, b) for a, b in zip(after, jax.tree.leaves(before),
                                                      strict=True))
