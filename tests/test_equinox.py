"""Equinox adapters: core-rule updates, DFA per example under vmap, feedback kept from optax,
convert (issue 18 item 7)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import assert_trees_close  # noqa: E402

import fbalign as fb  # noqa: E402
import fbalign.equinox as fe  # noqa: E402
from fbalign import ops  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles faster than threefry on CPU


def _rand(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _glorot(shape_hwio):
    rf = int(np.prod(shape_hwio[:-2]))
    return np.sqrt(2.0 / (rf * shape_hwio[-2] + rf * shape_hwio[-1]))


def test_import_fbalign_does_not_import_equinox_and_missing_equinox_errors_clearly():
    code = (
        "import sys, fbalign\n"
        "assert 'equinox' not in sys.modules, 'equinox imported'\n"
        "sys.modules['equinox'] = None\n"
        "try:\n"
        "    import fbalign.equinox\n"
        "except ImportError as e:\n"
        "    assert 'pip install fbalign[equinox]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


class Net(eqx.Module):
    layers: tuple

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def _grad(*losses):
    """``eqx.filter_grad`` of each loss, compiled as one program (eager dispatch is slow)."""
    grads = eqx.filter_jit(lambda m: tuple(eqx.filter_grad(f)(m) for f in losses))
    return grads if len(losses) > 1 else lambda m: grads(m)[0]


def _explicit(core, rule, params, state, x, labels):
    """The core rule's explicit updates (``rule.update`` on the recorded tape)."""
    y, tape = core.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    return rule.update(params, state, tape, err, labels=labels)[0]


def _net_like(core_params, rule, seed):
    layers = []
    for i, p in enumerate(core_params):
        din, dout = p["w"].shape
        layer = fe.Linear(din, dout, rule=rule, key=_key(seed + i))
        layers.append(eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["w"].T, p["b"])))
    return Net(tuple(layers))


def _core_state(rule_name, rule, params, net):
    state = rule.init(_key(0), params)
    if rule_name in ("bp", "usf"):
        return state  # usf: the core's scalar Glorot magnitude, computed by the core
    fbk = [None] + [fe.feedback_array(lyr).T for lyr in net.layers[1:]]
    return state._replace(feedback=tuple(fbk))


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "usf", "frsf"])
def test_linear_updates_equal_the_core_rules_explicit_updates(rule):
    core = fb.mlp((4, 6, 5, 3), "tanh")
    params = core.init(_key(1))
    net = _net_like(params, rule, 2)
    x = _rand(3, (7, 4))[0]
    labels = jnp.array([0, 1, 2, 0, 1, 2, 2])
    core_rule = fb.rules.kolen_pollack(weight_decay=0.0) if rule == "kp" else fb.get_rule(rule)
    state = _core_state(rule, core_rule, params, net)
    @eqx.filter_jit
    def run(net, params, state):  # one program: the adapter's gradients and the core's updates
        grads = [eqx.filter_grad(lambda m, pe=pe: fb.cross_entropy(
            jax.vmap(m)(x) if pe else m(x), labels))(net) for pe in (True, False)]
        return grads, _explicit(core, core_rule, params, state, x, labels)

    (per_example, batched), want = run(net, params, state)
    for got in (per_example, batched):
        for lyr, w in zip(got.layers, want, strict=True):
            np.testing.assert_allclose(lyr.weight, w["w"].T, **TOL)
            np.testing.assert_allclose(lyr.bias, w["b"], **TOL)
    if rule == "kp":  # B's gradient is W's (same update through the optimizer)
        for lyr in batched.layers:
            np.testing.assert_allclose(lyr.feedback, lyr.weight, rtol=1e-6)
    else:  # fixed feedback has no gradient at all
        assert not jax.tree.leaves([lyr.feedback for lyr in batched.layers])


class ConvNet(eqx.Module):
    c1: fe.Conv
    c2: fe.Conv

    def __call__(self, x):
        return self.c2(jnp.tanh(self.c1(x)))


@pytest.mark.parametrize("rule", ["fa", "kp", "usf", "frsf"])
def test_conv_updates_equal_the_core_feedback_conv(rule):
    c1 = fe.Conv2d(4, 4, 3, padding=1, rule=rule, key=_key(4))
    c2 = fe.Conv2d(4, 6, (3, 2), stride=2, padding=((1, 0), (0, 1)), groups=2, rule=rule,
                   key=_key(5))
    assert c2.weight.shape == (6, 2, 3, 2)
    net = ConvNet(c1, c2)
    x, r = _rand(6, (2, 4, 6, 5), (2, 6, 3, 3))

    def loss(m, per_example):
        out = jax.vmap(m)(x) if per_example else m(x)
        return jnp.sum(out * r)

    def hwio(w):
        return jnp.transpose(w, (2, 3, 1, 0))

    k1, k2 = hwio(c1.weight), hwio(c2.weight)
    fb2 = fe.feedback_array(c2)
    back = {"fa": None, "kp": None, "usf": jnp.sign(k2) * _glorot(k2.shape),
            "frsf": None if fb2 is None else jnp.sign(k2) * jnp.abs(hwio(fb2))}[rule]
    if back is None:
        back = hwio(fb2)
    x_nhwc, r_nhwc = jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(r, (0, 2, 3, 1))

    def core(k1, b1, k2, b2):
        h = jnp.tanh(ops.conv_op(2, padding=((1, 1), (1, 1)))(x_nhwc, k1) + b1)
        out = ops.fa_conv(h, k2, back, b2, strides=2, padding=((1, 0), (0, 1)),
                          feature_group_count=2)
        return jnp.sum(out * r_nhwc)

    want = jax.jit(jax.grad(core, (0, 1, 2, 3)))(k1, c1.bias[:, 0, 0], k2, c2.bias[:, 0, 0])
    for g in _grad(lambda m: loss(m, True), lambda m: loss(m, False))(net):
        got = (hwio(g.c1.weight), g.c1.bias[:, 0, 0], hwio(g.c2.weight), g.c2.bias[:, 0, 0])
        assert_trees_close(got, want, 1e-5, 1e-5)


def test_vmapped_dfa_gives_each_example_its_own_error():
    """Per-example vmap == batched call == the core DFA rule's explicit updates, with this
    module's carrier and with the core ops (which batch their carrier like the activations: an
    unbatched carrier would hand every example the batch's summed error)."""
    mlp = eqx.nn.MLP(4, 3, 6, depth=2, activation=jnp.tanh, key=_key(7))
    model = fe.convert(mlp, "dfa", key=_key(8))
    x = _rand(9, (6, 4))[0]
    labels = jnp.array([0, 1, 2, 2, 1, 0])

    def loss(m, per_example):
        return fb.cross_entropy(jax.vmap(m)(x) if per_example else batched_forward(m, x), labels)

    def batched_forward(m, xb, carrier=None):  # the same layers and taps on a whole batch
        carrier = fe.dfa_carrier(xb, 3, batch_ndim=1) if carrier is None else carrier
        for layer, tap in zip(m.mlp.layers[:-1], m.taps, strict=True):
            xb, carrier = tap(jnp.tanh(xb @ layer.weight.T + layer.bias), carrier)
        last = m.mlp.layers[-1]
        return fe.dfa_output(xb @ last.weight.T + last.bias, carrier)

    core = fb.mlp((4, 6, 6, 3), "tanh")
    params = [{"w": lyr.weight.T, "b": lyr.bias} for lyr in mlp.layers]
    rule = fb.rules.direct_feedback_alignment()
    state = rule.init(_key(0), params)._replace(
        feedback=tuple(fe.feedback_array(t) for t in model.taps) + (None,))
    want = jax.jit(lambda p, s: _explicit(core, rule, p, s, x, labels))(params, state)
    for got in _grad(lambda m: loss(m, True), lambda m: loss(m, False))(model):
        for lyr, w in zip(got.mlp.layers, want, strict=True):
            np.testing.assert_allclose(lyr.weight, w["w"].T, **TOL)
            np.testing.assert_allclose(lyr.bias, w["b"], **TOL)
        assert not jax.tree.leaves([t.feedback for t in got.taps])

    def core_ops(m, xe):  # the core ops on one example: they batch the carrier like h and y
        carrier = ops.dfa_carrier((3,))
        for layer, tap in zip(m.mlp.layers[:-1], m.taps, strict=True):
            xe, carrier = ops.dfa_hidden(jnp.tanh(layer(xe)), carrier, fe.feedback_array(tap))
        return ops.dfa_output(m.mlp.layers[-1](xe), carrier)

    same = eqx.filter_jit(eqx.filter_grad(lambda m: fb.cross_entropy(
        jax.vmap(lambda xe: core_ops(m, xe))(x), labels)))(model)
    np.testing.assert_allclose(same.mlp.layers[0].weight, want[0]["w"].T, **TOL)


def test_dfa_tap_on_a_conv_feature_map_per_example_and_batched():
    conv = fe.Conv2d(2, 3, 3, padding=1, rule="bp", key=_key(10))
    lin = fe.Linear(3 * 4 * 4, 5, rule="bp", key=_key(11))
    tap = fe.DFATap(5, (3, 4, 4), key=_key(12))
    x = _rand(13, (4, 2, 4, 4))[0]
    labels = jnp.array([0, 4, 2, 1])

    def fwd(parts, xe, batch_ndim):
        c, t, lnr = parts
        carrier = fe.dfa_carrier(xe, 5, batch_ndim=batch_ndim)
        h, carrier = t(jnp.tanh(c(xe)), carrier)
        return fe.dfa_output(lnr(h.reshape(*h.shape[:batch_ndim], -1)), carrier)

    parts = (conv, tap, lin)
    per_ex, batched = _grad(
        lambda p: fb.cross_entropy(jax.vmap(lambda xe: fwd(p, xe, 0))(x), labels),
        lambda p: fb.cross_entropy(fwd(p, x, 1), labels))(parts)
    # Reference from the equations: e = dL/dy per example, delta = (e B) * (1 - h^2), the conv
    # kernel's update is the VJP of the plain convolution at delta.
    h = jnp.tanh(conv(x))
    y = lin(h.reshape(4, -1))
    e = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    delta = jnp.einsum("nk,kchw->nchw", e, fe.feedback_array(tap)) * (1 - h**2)
    plain = eqx.nn.Conv2d(2, 3, 3, padding=1, key=_key(10))
    gk = jax.vjp(lambda w: jax.vmap(eqx.tree_at(lambda m: m.weight, plain, w))(x),
                 conv.weight)[1](delta)[0]
    for got in (per_ex, batched):
        np.testing.assert_allclose(got[0].weight, gk, **TOL)
        np.testing.assert_allclose(got[2].weight, e.T @ h.reshape(4, -1), **TOL)


@eqx.filter_jit
def _opt_step(model, opt_state, tx, loss):
    """The usual Equinox step: gradients of the inexact arrays, optax, ``apply_updates``."""
    grads = eqx.filter_grad(loss)(model)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def test_optax_adamw_never_touches_fixed_feedback_and_kp_feedback_follows_w():
    class Model(eqx.Module):
        c: fe.Conv
        tap: fe.DFATap
        hid: eqx.nn.Linear
        lin: fe.Linear

        def __call__(self, x):
            h = jnp.tanh(self.c(x)).reshape(x.shape[0], -1)
            h, carrier = self.tap(h, fe.dfa_carrier(x, 3, batch_ndim=1))
            return fe.dfa_output(self.lin(self.hid(h)), carrier)

    model = Model(fe.Conv2d(1, 2, 3, rule="frsf", key=_key(14)), fe.DFATap(3, (8,), key=_key(15)),
                  fe.Linear(8, 5, rule="bp", key=_key(16)),
                  fe.Linear(5, 3, rule="fa", key=_key(16)))
    x = _rand(17, (2, 1, 4, 4))[0]
    labels = jnp.array([0, 2])
    params = eqx.filter(model, eqx.is_inexact_array)
    assert all(p is None for p in (params.c.feedback.bits, params.tap.feedback.bits,
                                   params.lin.feedback.bits))
    before = [np.array(fe.feedback_array(m)) for m in (model.c, model.tap, model.lin)]
    w0 = np.array(model.c.weight)
    tx = optax.adamw(0.1, weight_decay=0.5)
    opt_state = tx.init(params)
    assert (3, 8) not in {np.shape(a) for a in jax.tree.leaves(opt_state)}
    for _ in range(3):
        model, opt_state = _opt_step(model, opt_state, tx, lambda m: fb.cross_entropy(m(x), labels))
    after = [np.array(fe.feedback_array(m)) for m in (model.c, model.tap, model.lin)]
    for b0, b1 in zip(before, after, strict=True):
        np.testing.assert_array_equal(b0, b1)
    assert not np.allclose(model.c.weight, w0)

    # Kolen-Pollack: B is trainable on purpose and gets W's update and decay, so W - B shrinks
    # by exactly (1 - lr * wd) per SGD step (Akrout et al. 2019).
    net = Net((fe.Linear(4, 5, rule="kp", key=_key(18)), fe.Linear(5, 3, rule="kp", key=_key(19))))
    xs = _rand(20, (8, 4))[0]
    lr, wd, steps = 0.1, 0.3, 4
    d0 = net.layers[1].weight - net.layers[1].feedback
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    opt_state = tx.init(eqx.filter(net, eqx.is_inexact_array))
    for _ in range(steps):
        net, opt_state = _opt_step(net, opt_state, tx,
                                   lambda m: fb.cross_entropy(jax.vmap(m)(xs), labels[:1]))
    np.testing.assert_allclose(net.layers[1].weight - net.layers[1].feedback,
                               (1 - lr * wd) ** steps * d0, rtol=1e-4, atol=1e-6)


class Mixed(eqx.Module):
    mlp: eqx.nn.MLP
    conv: eqx.nn.Conv2d
    norm: eqx.nn.LayerNorm
    proj: jax.Array

    def __call__(self, x):
        h = self.conv(x[None].reshape(1, 2, 2)).reshape(-1) @ self.proj
        return self.mlp(self.norm(h))


def test_convert_swaps_layers_keeps_the_forward_and_warns_about_left_alone_weights():
    ks = jax.random.split(_key(21), 3)
    model = Mixed(eqx.nn.MLP(4, 3, 5, 2, key=ks[0]), eqx.nn.Conv2d(1, 2, 2, padding=1, key=ks[1]),
                  eqx.nn.LayerNorm(4), jax.random.normal(ks[2], (18, 4)))
    x = _rand(22, (3, 4))[0]
    with pytest.warns(UserWarning, match=r"proj") as rec:
        conv = fe.convert(model, "fa", key=_key(23))
    assert "norm" not in str(rec[0].message)  # scale/offset only: not a weighted layer
    assert all(type(lyr) is fe.Linear and lyr.rule == "fa" for lyr in conv.mlp.layers)
    assert type(conv.conv) is fe.Conv and conv.conv.rule == "fa"
    fwd = eqx.filter_jit(lambda m, xs: jax.vmap(m)(xs))
    np.testing.assert_allclose(fwd(conv, x), fwd(model, x), rtol=1e-6)
    assert type(model.mlp.layers[0]) is eqx.nn.Linear  # the input is not modified
    # Single layers, a switch of rule, and an MLP built with scan=True (stacked hidden layers).
    single = fe.convert(model.conv, "usf")
    assert type(single) is fe.Conv and single.rule == "usf" and single.feedback is None
    assert fe.convert(conv, "bp", warn=False).mlp.layers[1].rule == "bp"
    scan = eqx.nn.MLP(4, 3, 5, 3, key=ks[0], scan=True)
    scan_fa = fe.convert(scan, "frsf", key=_key(24))
    assert fe.feedback_array(scan_fa.layers[1]).shape == (2, 5, 5)
    np.testing.assert_allclose(fwd(scan_fa, x), fwd(scan, x), rtol=1e-6)
    g = _grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(scan_fa)
    assert g.layers[1].weight.shape == (2, 5, 5) and np.all(np.isfinite(g.layers[1].weight))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_converted_mlp_trains_and_works_under_vmap_over_seeds(rule):
    rng = np.random.default_rng(25)
    x = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    labels = jnp.asarray(np.argmax(np.asarray(x) @ rng.standard_normal((4, 3)), 1))
    keys = jax.random.split(jax.random.key(26), 2)  # threefry: the same draws under vmap

    def make(k):
        return fe.convert(eqx.nn.MLP(4, 3, 16, 1, activation=jnp.tanh, key=k), rule, key=k)

    # An ensemble over seeds, converted under filter_vmap; member 1 equals a lone conversion.
    ens = eqx.filter_jit(eqx.filter_vmap(make))(keys)
    lone = make(keys[1])
    member = jax.tree.map(lambda a: a[1] if eqx.is_array(a) else a, ens)
    fwd = eqx.filter_jit(lambda m, xs: jax.vmap(m)(xs))
    np.testing.assert_allclose(fwd(member, x), fwd(lone, x), rtol=1e-6)

    def loss(m):
        return fb.cross_entropy(jax.vmap(m)(x), labels)

    tx = optax.adam(0.05)
    state = tx.init(eqx.filter(lone, eqx.is_inexact_array))
    first = eqx.filter_jit(loss)(lone)
    for _ in range(15):
        lone, state = _opt_step(lone, state, tx, loss)
    last = eqx.filter_jit(loss)(lone)
    assert last < 0.7 * first, (rule, first, last)


def test_bad_input_errors_clearly():
    mlp = eqx.nn.MLP(4, 3, 5, 1, key=_key(27))
    with pytest.raises(ValueError, match=r"unknown rule 'nope'; valid: bp, fa"):
        fe.Linear(4, 3, rule="nope", key=_key(0))
    assert fe.Linear(4, 3, rule="sign", key=_key(0)).rule == "usf"  # the same rule
    with pytest.raises(ValueError, match=r"unknown rule 'drtp'.*dfa"):
        fe.convert(mlp, "drtp", key=_key(0))
    with pytest.raises(ValueError, match=r"pass key="):
        fe.convert(mlp, "fa")
    with pytest.raises(ValueError, match=r"pass key="):
        fe.convert(mlp, "dfa")
    with pytest.raises(ValueError, match=r"'dfa'\) supports an eqx.nn.MLP"):
        fe.convert(eqx.nn.Conv2d(1, 1, 1, key=_key(0)), "dfa", key=_key(0))
    with pytest.raises(ValueError, match=r"magnitude_distribution 'cauchy'"):
        fe.Linear(4, 3, rule="frsf", key=_key(0), magnitude_distribution="cauchy")
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 4\)"):
        fe.Linear(4, 3, rule="fa", key=_key(0))(jnp.ones(5))
    with pytest.raises(ValueError, match=r"DFATap with B of shape \(3, 6\)"):
        fe.DFATap(3, (6,), key=_key(0))(jnp.ones(5), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"carrier \(2,\) must have the output's shape"):
        fe.dfa_output(jnp.ones(3), jnp.zeros(2))
    with pytest.raises(TypeError, match="floating-point"):
        fe.FixedFeedback(jnp.ones(3, jnp.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an MLP has nothing left alone: no warning
        fe.convert(mlp, "fa", key=_key(0))
