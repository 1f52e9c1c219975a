"""Conv/einsum feedback ops, DFA on feature maps and under scan, LeNet-5: references, identities."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign import ops
from fbalign._src.primitives import feedback_op


def _rand(seed, *shapes, scale=1.0):
    # NumPy draws: eager jax.random compiles once per shape, which dominates these tiny tests.
    rng = np.random.default_rng(seed)
    return [jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in shapes]


def _init_rule_state(model, rule, key, params, **kwargs):
    """``model.init_rule_state`` under jit: one compile instead of one per drawn shape."""
    fn = jax.jit(lambda k, p: model.init_rule_state(rule, k, p, **kwargs))
    return fn(_key(key), params)


def _key(seed):
    # The "rbg" generator compiles several times faster than threefry on CPU; the tests only
    # need some random draw, not a particular one.
    return jax.random.key(seed, impl="rbg")


def f64(a):
    return np.asarray(a, np.float64)


# ------------------------------------------------------------------------------------------
# An independent NumPy convolution (explicit windows, groups, strides, asymmetric padding).


def np_conv_windows(x, kshape, stride, pad):
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kshape
    ho = (xp.shape[1] - kh) // stride[0] + 1
    wo = (xp.shape[2] - kw) // stride[1] + 1
    return xp, ho, wo


def np_conv(x, w, stride, pad, groups):
    xp, ho, wo = np_conv_windows(x, w.shape[:2], stride, pad)
    kh, kw, cg, co = w.shape
    og = co // groups
    y = np.zeros((x.shape[0], ho, wo, co))
    for g in range(groups):
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw,
                           g * cg:(g + 1) * cg]
                y[:, i, j, g * og:(g + 1) * og] = np.einsum(
                    "nabc,abco->no", patch, w[..., g * og:(g + 1) * og])
    return y


def np_conv_fa_backward(x, w, b, gy, stride, pad, groups):
    """FA backward of a conv: the input error goes through kernel b, the weight gets x * gy."""
    xp, ho, wo = np_conv_windows(x, w.shape[:2], stride, pad)
    kh, kw, cg, co = w.shape
    og = co // groups
    gxp, gw = np.zeros_like(xp), np.zeros_like(w)
    for g in range(groups):
        osl, isl = slice(g * og, (g + 1) * og), slice(g * cg, (g + 1) * cg)
        for i in range(ho):
            for j in range(wo):
                rs = slice(i * stride[0], i * stride[0] + kh)
                cs = slice(j * stride[1], j * stride[1] + kw)
                gxp[:, rs, cs, isl] += np.einsum("no,abco->nabc", gy[:, i, j, osl], b[..., osl])
                gw[..., osl] += np.einsum("nabc,no->abco", xp[:, rs, cs, isl], gy[:, i, j, osl])
    h, w_ = x.shape[1], x.shape[2]
    gx = gxp[:, pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + w_]
    return gx, gw


CONV_CASES = [
    # (input (N,H,W,C), kernel (kh,kw,cin/groups,cout), strides, padding pairs, groups)
    ((2, 6, 5, 3), (3, 2, 3, 4), (1, 1), ((1, 1), (0, 1)), 1),
    ((2, 7, 6, 4), (3, 3, 2, 6), (2, 1), ((1, 0), (0, 2)), 2),
    ((1, 6, 6, 3), (2, 3, 1, 6), (2, 2), ((0, 0), (0, 0)), 3),
]


@pytest.mark.parametrize("impl", ["xla", "im2col"])
@pytest.mark.parametrize("xshape,kshape,strides,padding,groups", CONV_CASES)
def test_fa_conv_matches_numpy_reference(xshape, kshape, strides, padding, groups, impl):
    x, w, b, bias = _rand(0, xshape, kshape, kshape, (kshape[-1],))
    if impl == "im2col" and groups > 1:
        with pytest.raises(ValueError, match="without groups"):
            ops.fa_conv(x, w, b, bias, strides=strides, padding=padding,
                        feature_group_count=groups, impl=impl)
        return
    y = ops.fa_conv(x, w, b, bias, strides=strides, padding=padding, feature_group_count=groups,
                    impl=impl)
    want_y = np_conv(f64(x), f64(w), strides, padding, groups) + f64(bias)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    (r,) = _rand(1, y.shape)

    def loss(x, w, b, bias):
        out = ops.fa_conv(x, w, b, bias, strides=strides, padding=padding,
                          feature_group_count=groups, impl=impl)
        return jnp.sum(out * r)

    gx, gw, gb, gbias = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, b, bias)
    want_gx, want_gw = np_conv_fa_backward(f64(x), f64(w), f64(b), f64(r), strides, padding,
                                           groups)
    assert_trees_close((gx, gw, gb, gbias),
                       (want_gx, want_gw, np.zeros(kshape), f64(r).sum((0, 1, 2))), 1e-4, 1e-5)
    # The input error must depend on b, not on w: backprop's would differ.
    bp_gx, _ = np_conv_fa_backward(f64(x), f64(w), f64(w), f64(r), strides, padding, groups)
    assert not np.allclose(gx, bp_gx, atol=1e-3)


@pytest.mark.parametrize("xshape,kshape,kwargs", [
    ((2, 9), (3, 2, 4), dict(padding="SAME", strides=2)),
    ((2, 9, 8), (3, 3, 2, 3), dict(padding="SAME", strides=(2, 1), rhs_dilation=(1, 2))),
    ((1, 8, 7), (5, 5, 1, 6), dict(padding=2)),
    ((1, 5, 6), (2, 3, 2, 2), dict(padding=((1, 0), (-1, 2)))),
    ((1, 5, 4, 5), (2, 2, 3, 2, 3), dict(padding="VALID", strides=(1, 2, 1))),
    # one input channel: patches stacked axis by axis instead of concatenated
    ((2, 9), (3, 1, 4), dict(padding="SAME", strides=2, rhs_dilation=2)),
    ((2, 9, 8), (3, 2, 1, 3), dict(padding=((1, -1), (2, 0)), strides=(2, 1),
                                   rhs_dilation=(1, 3))),
    ((1, 5, 6, 5), (2, 3, 2, 1, 2), dict(padding="VALID", strides=(2, 1, 2))),
])
def test_im2col_conv_equals_xla_conv_and_its_vjps(xshape, kshape, kwargs):
    """impl='im2col' (slices + one matmul) is the same convolution as lax's, in 1-3 spatial
    dims, with strides, dilation and every padding form (a negative pad crops), for one input
    channel and several."""
    nd = len(kshape) - 2
    x, w = _rand(7, (*xshape, kshape[-2]), kshape)
    xla, col = ops.conv_op(nd, **kwargs), ops.conv_op(nd, impl="im2col", **kwargs)
    y, vjp = jax.vjp(xla, x, w)
    y2, vjp2 = jax.vjp(col, x, w)
    assert y2.shape == y.shape
    (g,) = _rand(8, y.shape)
    assert_trees_close((y2, *vjp2(g)), (y, *vjp(g)), 1e-5, 1e-5)
    assert ops.conv_op(nd, impl="im2col", **kwargs) is col  # cached like the XLA op


def test_conv_impl_is_checked_and_auto_picks_by_backend():
    with pytest.raises(ValueError, match="unknown conv impl 'cudnn'"):
        ops.conv_op(2, impl="cudnn")
    with pytest.raises(ValueError, match="lhs_dilation"):
        ops.conv_op(2, lhs_dilation=2, impl="im2col")
    from fbalign._src.layers import resolve_conv_impl

    want = "im2col" if jax.default_backend() == "cpu" else "xla"
    assert resolve_conv_impl("auto") == want
    assert resolve_conv_impl("auto", feature_group_count=2) == "xla"
    with pytest.raises(ValueError, match="conv impl"):
        fb.lenet5(conv_impl="fast")


def test_fa_conv_padding_forms_and_dilation_match_plain_conv_vjp():
    """'SAME', ints and dilations: forward = lax conv; input error = VJP of the conv at b."""
    x, w, b = _rand(2, (2, 7, 7, 2), (3, 3, 2, 3), (3, 3, 2, 3))
    for kwargs in [dict(padding="SAME", strides=2), dict(padding=1, rhs_dilation=2),
                   dict(padding=(2, 1), lhs_dilation=(1, 2))]:
        plain = ops.conv_op(2, **kwargs)

        @jax.jit
        def both(x, w, b, g, kwargs=kwargs, plain=plain):
            y, vjp = jax.vjp(lambda x_, w_: ops.fa_conv(x_, w_, b, **kwargs), x, w)
            want_gx = jax.vjp(lambda x_: plain(x_, b), x)[1](g)[0]
            want_gw = jax.vjp(lambda w_: plain(x, w_), w)[1](g)[0]
            return (y, *vjp(g)), (plain(x, w), want_gx, want_gw)

        (g,) = _rand(3, jax.eval_shape(plain, x, w).shape)
        got, want = both(x, w, b, g)
        assert_trees_close(got, want, 1e-5, 1e-5)


def _small_convnet(params, x, fb_=None):
    """conv SAME -> tanh -> conv stride 2 groups 2 -> tanh -> avg pool -> dense."""
    def conv(i, h, **kw):
        if fb_ is None:
            return ops.conv_op(2, **kw)(h, params[i]["w"]) + params[i]["b"]
        return ops.fa_conv(h, params[i]["w"], fb_[i], params[i]["b"], **kw)

    h = jnp.tanh(conv(0, x, padding="SAME"))
    h = jnp.tanh(conv(1, h, strides=2, padding=1, feature_group_count=2))
    h = h.mean(axis=(1, 2))
    if fb_ is None:
        return h @ params[2]["w"] + params[2]["b"]
    return ops.fa_matmul(h, params[2]["w"], fb_[2]) + params[2]["b"]


def test_conv_fa_with_b_equal_w_is_backprop():
    ws = _rand(4, (3, 3, 2, 4), (3, 3, 2, 6), (6, 3), scale=0.5)
    params = [{"w": w, "b": 0.1 * jnp.ones(w.shape[-1])} for w in ws]
    (x,) = _rand(5, (3, 6, 6, 2))
    labels = jnp.array([0, 1, 2])

    def loss(p, fb_):
        return fb.cross_entropy(_small_convnet(p, x, fb_), labels)

    bp = jax.jit(jax.grad(loss))(params, None)
    fa_eq = jax.jit(jax.grad(loss))(params, [p["w"] for p in params])
    assert_trees_close(fa_eq, bp, 1e-5, 1e-6)
    # ...and random feedback changes every layer below the top.
    fa_rand = jax.jit(jax.grad(loss))(params, _rand(6, *(w.shape for w in ws), scale=0.5))
    assert np.allclose(fa_rand[2]["w"], bp[2]["w"], atol=1e-6)
    for i in (0, 1):
        assert not np.allclose(fa_rand[i]["w"], bp[i]["w"], atol=1e-4)


def test_kp_conv_and_einsum_give_feedback_the_weight_gradient():
    x, w, b = _rand(7, (2, 5, 5, 2), (3, 3, 2, 3), (3, 3, 2, 3))
    gw, gb = jax.grad(lambda w_, b_: jnp.sum(ops.kp_conv(x, w_, b_) ** 2), (0, 1))(w, b)
    np.testing.assert_allclose(gb, gw, rtol=1e-6)
    assert np.abs(gw).sum() > 0
    gw, gb = jax.grad(lambda w_, b_: jnp.sum(ops.fa_conv(x, w_, b_) ** 2), (0, 1))(w, b)
    assert np.all(gb == 0)
    x, w, b = _rand(8, (2, 3, 4), (4, 5), (4, 5))
    gw, gb = jax.grad(lambda w_, b_: jnp.sum(ops.kp_einsum("btd,de->bte", x, w_, b_) ** 2),
                      (0, 1))(w, b)
    np.testing.assert_allclose(gb, gw, rtol=1e-6)


def test_feedback_ops_are_cached_per_configuration():
    x, w, b = _rand(9, (1, 5, 5, 2), (3, 3, 2, 2), (3, 3, 2, 2))
    assert ops.conv_op(2, strides=2, padding=1) is ops.conv_op(2, strides=(2, 2),
                                                                padding=((1, 1), (1, 1)))
    ops.fa_conv(x, w, b, strides=2, padding=1)
    ops.fa_einsum("btd,dhk->bthk", jnp.ones((1, 2, 3)), jnp.ones((3, 2, 2)), jnp.ones((3, 2, 2)))
    n = feedback_op.cache_info().currsize
    for _ in range(3):
        ops.fa_conv(x, w, b, strides=[2, 2], padding=[1, 1])
        ops.fa_einsum("btd,dhk->bthk", jnp.ones((1, 2, 3)), jnp.ones((3, 2, 2)),
                      jnp.ones((3, 2, 2)))
    assert feedback_op.cache_info().currsize == n
    ops.fa_conv(x, w, b, strides=1, padding=1)  # a new configuration is a new primitive
    assert feedback_op.cache_info().currsize == n + 1


def test_feedback_ops_reject_wrong_shapes():
    x, w = _rand(10, (1, 5, 5, 2), (3, 3, 2, 4))
    with pytest.raises(ValueError, match="shape of the kernel"):
        ops.fa_conv(x, w, jnp.ones((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="padding"):
        ops.fa_conv(x, w, w, padding="CIRCULAR")
    with pytest.raises(ValueError, match="shape of the kernel"):
        ops.fa_einsum("bd,de->be", jnp.ones((2, 3)), jnp.ones((3, 3)), jnp.ones((3, 2)))


# ------------------------------------------------------------------------------------------
# Einsum / attention projections.

EINSUM_CASES = [
    ("btd,dhk->bthk", (2, 3, 4), (4, 2, 5), "bthk,dhk->btd", "btd,bthk->dhk"),
    ("bthk,hkd->btd", (2, 3, 2, 5), (2, 5, 4), "btd,hkd->bthk", "bthk,btd->hkd"),
    ("bd,de->be", (3, 4), (4, 4), "be,de->bd", "bd,be->de"),  # square: a transposed B must fail
]


@pytest.mark.parametrize("spec,xshape,wshape,gx_spec,gw_spec", EINSUM_CASES)
def test_fa_einsum_matches_backprop_and_hand_written_reference(spec, xshape, wshape, gx_spec,
                                                               gw_spec):
    x, w, b = _rand(11, xshape, wshape, wshape)
    bias = jnp.arange(wshape[-1], dtype=jnp.float32)
    y = ops.fa_einsum(spec, x, w, b, bias)
    np.testing.assert_allclose(y, jnp.einsum(spec, x, w) + bias, rtol=1e-6, atol=1e-6)
    (r,) = _rand(12, y.shape)

    def loss(x, w, b):
        return jnp.sum(ops.fa_einsum(spec, x, w, b) * r)

    # B = W is backprop.
    got = jax.grad(loss, (0, 1))(x, w, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * r), (0, 1))(x, w)
    assert_trees_close(got, want, 1e-5, 1e-6)
    # Random B: the error reaching x is the einsum of the output error with B.
    gx, gw = jax.grad(loss, (0, 1))(x, w, b)
    want_gx = np.einsum(gx_spec, f64(r), f64(b))
    want_gw = np.einsum(gw_spec, f64(x), f64(r))
    assert_trees_close((gx, gw), (want_gx, want_gw), 1e-4, 1e-5)
    if wshape[0] == wshape[-1] and len(wshape) == 2:
        assert not np.allclose(gx, np.einsum(gx_spec, f64(r), f64(b).T), atol=1e-3)


def _attention(params, x, feedback=None):
    """Multi-head self-attention whose four projections are (FA) einsums."""
    def proj(spec, h, name):
        if feedback is None:
            return jnp.einsum(spec, h, params[name])
        return ops.fa_einsum(spec, h, params[name], feedback[name])

    q = proj("btd,dhk->bthk", x, "q")
    k = proj("btd,dhk->bthk", x, "k")
    v = proj("btd,dhk->bthk", x, "v")
    att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    return proj("bthk,hkd->btd", jnp.einsum("bhqs,bshk->bqhk", att, v), "o")


def test_attention_with_fa_projections_b_equal_w_is_backprop():
    shapes = {"q": (4, 2, 3), "k": (4, 2, 3), "v": (4, 2, 3), "o": (2, 3, 4)}
    params = dict(zip(shapes, _rand(30, *shapes.values()), strict=True))
    x, r = _rand(31, (2, 5, 4), (2, 5, 4))

    @jax.jit
    def grads(params, feedback):
        return jax.grad(lambda p, x: jnp.sum(_attention(p, x, feedback) * r), (0, 1))(params, x)

    bp = jax.jit(jax.grad(lambda p, x: jnp.sum(_attention(p, x) * r), (0, 1)))(params, x)
    assert_trees_close(grads(params, params), bp, 1e-5, 1e-6)
    random_b = dict(zip(shapes, _rand(32, *shapes.values()), strict=True))
    got = grads(params, random_b)
    # The output projection's own update is exact; what reaches the input is not.
    np.testing.assert_allclose(got[0]["o"], bp[0]["o"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[1], bp[1], atol=1e-3)


# ------------------------------------------------------------------------------------------
# DFA on feature maps.


def test_dfa_conv_with_b_equal_output_weights_is_backprop():
    """One hidden conv layer: DFA with B = W_out.T (reshaped to the map) is exactly backprop."""
    w1, w2 = _rand(13, (3, 3, 1, 2), (5 * 4 * 2, 3), scale=0.5)
    (x,) = _rand(14, (2, 5, 4, 1))
    labels = jnp.array([0, 2])

    def net(params, b=None):
        h = jnp.tanh(ops.conv_op(2, padding="SAME")(x, params[0]))
        carrier = None
        if b is not None:
            carrier = fb.dfa_carrier((2, 3))
            h, carrier = fb.dfa_hidden(h, carrier, b)
        y = h.reshape(2, -1) @ params[1]
        if b is not None:
            y = fb.dfa_output(y, carrier)
        return fb.cross_entropy(y, labels)

    bp = jax.grad(net)([w1, w2])
    for b in (w2.T, w2.T.reshape(3, 5, 4, 2)):
        assert_trees_close(jax.grad(net)([w1, w2], b), bp, 1e-5, 1e-6)
    # A B built with the wrong (channels-first) flattening is not backprop.
    wrong = w2.T.reshape(3, 2, 5, 4).transpose(0, 2, 3, 1).reshape(3, -1)
    assert not np.allclose(jax.grad(net)([w1, w2], wrong)[0], bp[0], atol=1e-4)


def _dfa_convnet(params, x, feedback):
    """conv -> tanh -> tap -> maxpool -> flatten -> dense -> tanh -> tap -> dense (DFA)."""
    carrier = fb.dfa_carrier((x.shape[0], params[2]["w"].shape[1]))
    h = jnp.tanh(ops.conv_op(2, padding=1)(x, params[0]["w"]) + params[0]["b"])
    h, carrier = fb.dfa_hidden(h, carrier, feedback[0])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jnp.tanh(h.reshape(x.shape[0], -1) @ params[1]["w"] + params[1]["b"])
    h, carrier = fb.dfa_hidden(h, carrier, feedback[1])
    return fb.dfa_output(h @ params[2]["w"] + params[2]["b"], carrier)


def _np_dfa_convnet_grads(params, x, b1, b2, labels):
    """Nokland 2016 written out: delta_l = (e B_l) * f'(a_l); conv weight grad by windows."""
    p = [{k: f64(v) for k, v in layer.items()} for layer in params]
    x = f64(x)
    a1 = np_conv(x, p[0]["w"], (1, 1), ((1, 1), (1, 1)), 1) + p[0]["b"]
    h1 = np.tanh(a1)
    n, hh, ww, c = h1.shape
    pooled = h1.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4)).reshape(n, -1)
    a2 = pooled @ p[1]["w"] + p[1]["b"]
    h2 = np.tanh(a2)
    y = h2 @ p[2]["w"] + p[2]["b"]
    prob = np.exp(y - y.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    e = (prob - np.eye(y.shape[1])[labels]) / n
    d1 = (e @ f64(b1).reshape(e.shape[1], -1)).reshape(h1.shape) * (1 - h1**2)
    d2 = (e @ f64(b2)) * (1 - h2**2)
    _, gw1 = np_conv_fa_backward(x, p[0]["w"], p[0]["w"], d1, (1, 1), ((1, 1), (1, 1)), 1)
    return [{"w": gw1, "b": d1.sum((0, 1, 2))},
            {"w": pooled.T @ d2, "b": d2.sum(0)},
            {"w": h2.T @ e, "b": e.sum(0)}]


def test_dfa_conv_and_shared_matrix_match_numpy_reference():
    shapes = [(3, 3, 2, 3), (2 * 2 * 3, 5), (5, 4)]
    params = [{"w": w, "b": 0.1 * jnp.ones(w.shape[-1])} for w in _rand(15, *shapes)]
    (x,) = _rand(16, (3, 4, 4, 2))
    labels = jnp.array([0, 3, 1])
    n1 = 4 * 4 * 3

    @jax.jit
    def grads(feedback):
        return jax.grad(lambda p: fb.cross_entropy(_dfa_convnet(p, x, feedback), labels))(params)

    b1, b2 = _rand(17, (4, 4, 4, 3), (4, 5))
    want = _np_dfa_convnet_grads(params, x, b1, b2, labels)
    assert_trees_close(grads([b1, b2]), want, 1e-4, 1e-6)
    assert_trees_close(grads([b1.reshape(4, n1), b2]), want, 1e-4, 1e-6)

    # One shared (n_out, max_units) matrix: layer l uses its first n_l columns.
    (m,) = _rand(18, (4, n1 + 7))
    want = _np_dfa_convnet_grads(params, x, np.asarray(m)[:, :n1], np.asarray(m)[:, :5], labels)
    got = grads([ops.shared_dfa_feedback(m, (4, 4, 3)), ops.shared_dfa_feedback(m, (5,))])
    assert_trees_close(got, want, 1e-4, 1e-6)
    want = _np_dfa_convnet_grads(params, x, 0.5 * np.asarray(m)[:, :n1],
                                 2.0 * np.asarray(m)[:, :5], labels)
    got = grads([ops.shared_dfa_feedback(m, (4, 4, 3), 0.5),
                 ops.shared_dfa_feedback(m, (5,), 2.0)])
    assert_trees_close(got, want, 1e-4, 1e-6)
    with pytest.raises(ValueError, match="columns"):
        ops.shared_dfa_feedback(m[:, :10], (4, 4, 3))
    with pytest.raises(ValueError, match="dfa_hidden"):
        grads([b1[:, :3], b2])


# ------------------------------------------------------------------------------------------
# Recurrent DFA under lax.scan.


def np_rnn_dfa(params, b, xs, targets):
    """Hand-unrolled DFA for a tanh RNN with a readout at every step (squared error)."""
    p = {k: f64(v) for k, v in params.items()}
    xs, targets, b = f64(xs), f64(targets), f64(b)
    t_len, batch, _ = xs.shape
    h = np.zeros((batch, p["w_rec"].shape[0]))
    g = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(t_len):
        h_prev = h
        h = np.tanh(xs[t] @ p["w_in"] + h_prev @ p["w_rec"] + p["b"])
        y = h @ p["w_out"] + p["b_out"]
        e = y - targets[t]
        delta = (e @ b) * (1 - h**2)
        g["w_in"] += xs[t].T @ delta
        g["w_rec"] += h_prev.T @ delta
        g["b"] += delta.sum(0)
        g["w_out"] += h.T @ e
        g["b_out"] += e.sum(0)
    return g


def test_recurrent_dfa_matches_hand_unrolled_reference():
    model = fb.rnn(2, 5, 3)
    params = jax.jit(model.init)(_key(19))
    params["b"] = 0.1 * jnp.ones(5)
    xs, targets = _rand(20, (4, 3, 2), (4, 3, 3))
    b = _init_rule_state(model, "dfa", 21, params).feedback["h"]
    assert b.shape == (3, 5)

    def loss(p, mode, feedback=None, targets=targets):
        return 0.5 * jnp.sum((model.apply(p, xs, feedback, mode) - targets) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got = grad(params, "dfa", b)
    assert_trees_close(got, np_rnn_dfa(params, b, xs, targets), 1e-4, 1e-6)
    # The forward is the same in every mode, and DFA is not BPTT.
    np.testing.assert_allclose(model.apply(params, xs, b, "dfa"), model.apply(params, xs),
                               rtol=1e-6)
    bptt = grad(params, "bp")
    assert not np.allclose(got["w_rec"], bptt["w_rec"], atol=1e-4)
    # The error is injected at *every* step: a target change at t=0 alone changes W_in's update.
    got2 = grad(params, "dfa", b, targets.at[0].add(1.0))
    assert not np.allclose(got2["w_in"], got["w_in"], atol=1e-4)


def test_recurrent_fa_with_b_equal_w_is_bptt():
    model = fb.rnn(2, 4, 3)
    params = jax.jit(model.init)(_key(22))
    xs, targets = _rand(23, (5, 2, 2), (5, 2, 3))

    def loss(p, mode, feedback=None):
        return jnp.sum((model.apply(p, xs, feedback, mode) - targets) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    bptt = grad(params, "bp")
    same = {"w_rec": params["w_rec"], "w_out": params["w_out"]}
    assert_trees_close(grad(params, "fa", same), bptt, 1e-5, 1e-6)
    rand = _init_rule_state(model, "fa", 24, params).feedback
    assert not np.allclose(grad(params, "fa", rand)["w_in"], bptt["w_in"], atol=1e-4)


# ------------------------------------------------------------------------------------------
# LeNet-5.


def test_lenet5_shapes_inputs_and_rule_state():
    model = fb.lenet5()
    apply = jax.jit(model.apply, static_argnames="mode")
    params = jax.jit(model.init)(_key(0))
    assert [p["w"].shape for p in params] == [(5, 5, 1, 6), (5, 5, 6, 16), (400, 120),
                                              (120, 84), (84, 10)]
    (x,) = _rand(25, (2, 784))
    y = apply(params, x)
    assert y.shape == (2, 10)
    np.testing.assert_allclose(apply(params, x.reshape(2, 28, 28)), y, rtol=1e-6)
    np.testing.assert_allclose(apply(params, x.reshape(2, 28, 28, 1)), y, rtol=1e-6)
    with pytest.raises(ValueError, match="784"):
        apply(params, jnp.ones((2, 32, 32, 1)))
    fa = _init_rule_state(model, "fa", 1, params)
    assert fa.feedback[0] is None
    assert [b.shape for b in fa.feedback[1:]] == [p["w"].shape for p in params[1:]]
    dfa = _init_rule_state(model, "dfa", 1, params)
    assert [None if b is None else b.shape for b in dfa.feedback] == [
        (10, 28, 28, 6), (10, 10, 10, 16), (10, 120), (10, 84), None]
    shared = _init_rule_state(model, "dfa", 1, params, shared=True)
    assert shared.feedback.shape == (10, 28 * 28 * 6)
    # The shared matrix is the per-layer form with B_l = sqrt(2 / (n_out + n_l)) M[:, :n_l].
    m = shared.feedback
    per_layer = [np.sqrt(2 / (10 + np.prod(s))) * m[:, :np.prod(s)].reshape(10, *s)
                 for s in [(28, 28, 6), (10, 10, 16), (120,), (84,)]] + [None]

    @jax.jit
    def g(fbk):
        return jax.grad(lambda p: fb.cross_entropy(model.apply(p, x, fbk, "dfa"),
                                                   jnp.array([1, 2])))(params)

    assert_trees_close(g(m), g(per_layer), 1e-4, 1e-7)
    for mode, st in [("fa", fa), ("kp", fa), ("dfa", dfa), ("dfa", shared)]:
        np.testing.assert_allclose(apply(params, x, st.feedback, mode=mode), y, rtol=1e-5)


def test_lenet5_fa_with_b_equal_w_is_backprop_and_dfa_matches_reference():
    model = fb.lenet5("tanh")
    params = jax.jit(model.init)(_key(2))
    (x,) = _rand(26, (2, 28, 28))
    labels = jnp.array([3, 7])

    def loss(p, fbk=None, mode="bp"):
        return fb.cross_entropy(model.apply(p, x, fbk, mode), labels)

    grad = jax.jit(jax.grad(loss), static_argnames="mode")
    bp = grad(params)
    same = [None] + [p["w"] for p in params[1:]]
    assert_trees_close(grad(params, same, mode="fa"), bp, 1e-4, 1e-6)

    # DFA: the first conv's update is the weight-VJP of delta_1 = (e B_1) * f'(a_1), taken
    # *before* pooling; e is dL/dlogits.
    st = _init_rule_state(model, "dfa", 3, params)
    got = grad(params, st.feedback, mode="dfa")

    @jax.jit
    def reference(params, b1):
        e = jax.grad(lambda o: fb.cross_entropy(o, labels))(model.apply(params, x))
        conv1 = ops.conv_op(2, padding=2)
        x4 = x[..., None]
        a1 = conv1(x4, params[0]["w"]) + params[0]["b"]
        d1 = jnp.einsum("no,ohwc->nhwc", e, b1) * (1 - jnp.tanh(a1) ** 2)
        return jax.vjp(lambda w: conv1(x4, w), params[0]["w"])[1](d1)[0], d1

    want_w1, d1 = reference(params, st.feedback[0])
    np.testing.assert_allclose(got[0]["w"], want_w1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[0]["b"], d1.sum((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[4]["w"], bp[4]["w"], rtol=1e-5, atol=1e-7)


def test_max_pool_2x2_equals_reduce_window_with_first_max_routing():
    """LeNet's pooling: values and VJP of lax.reduce_window max pooling, ties included (the
    error goes to the first maximum of a window, row-major), on random maps and ties."""
    from fbalign._src.convnet import max_pool_2x2

    window = (1, 2, 2, 1)

    def reduce_window(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, window, window, "VALID")

    h, g = _rand(41, (3, 6, 8, 2), (3, 3, 4, 2))
    ties = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(3, 6, 8, 2)), jnp.float32)
    for x in (h, ties, jnp.zeros_like(h)):
        y, vjp = jax.vjp(max_pool_2x2, x)
        want_y, want_vjp = jax.vjp(reduce_window, x)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(vjp(g)[0], want_vjp(g)[0])
    # all-equal windows: everything goes to the top-left entry
    gz = jax.vjp(max_pool_2x2, jnp.zeros((1, 2, 2, 1)))[1](jnp.ones((1, 1, 1, 1)))[0]
    np.testing.assert_array_equal(gz.ravel(), [1, 0, 0, 0])


def test_lenet5_conv_impls_give_the_same_rule_updates():
    """LeNet-5's im2col convolutions (the CPU default) and XLA's give the same jax.grad updates
    in every backward mode that has feedback through a conv layer."""
    (x,) = _rand(31, (3, 784))
    labels = jnp.array([1, 7, 3])
    models = {impl: fb.lenet5("tanh", conv_impl=impl) for impl in ("xla", "im2col")}
    params = jax.jit(models["xla"].init)(_key(2))
    fa = _init_rule_state(models["xla"], "fa", 3, params)
    dfa = _init_rule_state(models["xla"], "dfa", 3, params)
    mags = [None] + [jnp.abs(b) for b in fa.feedback[1:]]

    @functools.partial(jax.jit, static_argnames=("impl", "mode"))
    def grads(fbk, impl, mode):
        model = models[impl]
        return jax.grad(lambda p: fb.cross_entropy(model.apply(p, x, fbk, mode), labels))(params)

    for mode, fbk in [("bp", None), ("fa", fa.feedback), ("dfa", dfa.feedback), ("sign", mags)]:
        assert_trees_close(grads(fbk, "im2col", mode), grads(fbk, "xla", mode), 2e-4, 1e-6)


def test_lenet5_rule_state_for_every_registered_rule_fits_apply():
    """By name (conv-aware defaults) or as a TapeRule (dense stand-ins), every rule with a
    primitive form gets a state whose feedback `apply` accepts (checked by tracing only)."""
    from fbalign._src.registry import RULES, get_rule

    model = fb.lenet5()
    key = _key(0)
    params = jax.eval_shape(model.init, key)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    x, labels = jnp.zeros((2, 784)), jnp.array([1, 2])
    names = [n for n in RULES if getattr(get_rule(n), "backward", None) is not None]
    assert {"fa", "dfa", "kp", "drtp"} <= set(names)
    for name in names:
        rule_obj = get_rule(name)
        for rule in (name, rule_obj):
            fbk = jax.eval_shape(  # brsf's state is a key; rule_feedback hashes its magnitudes
                lambda k, p, r=rule, o=rule_obj: fb.rules.rule_feedback(
                    o, p, model.init_rule_state(r, k, p)), key, params)
            if name in ("dfa", "drtp"):
                assert fbk[-1] is None
                assert [math.prod(b.shape) for b in fbk[:-1]] == [10 * 4704, 10 * 1600,
                                                                   10 * 120, 10 * 84]

            def loss(p, f, o=rule_obj):
                out = model.apply(p, x, backward=o.backward(f, labels))
                return fb.cross_entropy(out, labels)

            fbk = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fbk)
            grads = jax.eval_shape(jax.grad(loss), params, fbk)
            assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params), name


def test_lenet5_sign_symmetry_with_w_magnitudes_is_backprop():
    model = fb.lenet5("relu", pool="avg")
    params = jax.jit(model.init)(_key(6))
    (x,) = _rand(27, (3, 784))
    labels = jnp.array([0, 4, 9])

    bp = jax.jit(jax.grad(lambda p: fb.cross_entropy(model.apply(p, x), labels)))(params)
    sign_grad = jax.jit(jax.grad(lambda p, m: fb.cross_entropy(model.apply(p, x, m, "sign"),
                                                               labels)))
    got = sign_grad(params, [None] + [jnp.abs(p["w"]) for p in params[1:]])
    assert_trees_close(got, bp, 1e-4, 1e-7)
    got = sign_grad(params, [None] + [jnp.ones_like(p["w"]) for p in params[1:]])
    assert not np.allclose(got[0]["w"], bp[0]["w"], atol=1e-5)


def _synthetic_images(n=32, seed=0):
    """MNIST-like: ten sparse binary templates plus a little noise."""
    rng = np.random.default_rng(seed)
    templates = (rng.uniform(size=(10, 28, 28)) > 0.8).astype(np.float32)
    labels = np.arange(n) % 10
    x = templates[labels] + 0.1 * rng.standard_normal((n, 28, 28))
    return jnp.asarray(x.reshape(n, 784), jnp.float32), jnp.asarray(labels)


@pytest.mark.parametrize("mode,shared,factor", [("bp", False, 0.3), ("fa", False, 0.3),
                                                ("dfa", False, 0.7), ("dfa", True, 0.8)])
def test_lenet5_trains(mode, shared, factor):
    model = fb.lenet5("tanh")
    params = jax.jit(model.init)(_key(4))
    state = _init_rule_state(model, mode, 5, params, shared=shared)
    feedback = getattr(state, "feedback", None)
    x, labels = _synthetic_images()
    opt = optax.sgd(0.1)

    def loss(p):
        return fb.cross_entropy(model.apply(p, x, feedback, mode), labels)

    def step(carry, _):
        p, s = carry
        val, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), val

    _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=40))(params)
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < factor * losses[0], losses


@pytest.mark.parametrize("cotangent", ["zero", "activity"])
def test_dfa_ops_under_per_example_vmap_give_each_example_its_own_error(cotangent):
    """grad(vmap(per-example model)) equals the batched model: a carrier made inside vmap is an
    unbatched constant, and without batching it like the activations the cotangent reaching it
    would be the batch's summed error (every example's hidden layer got sum_n e_n B)."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x, t = jax.random.normal(k[0], (4, 5)), jax.random.normal(k[1], (4, 3))
    w1, w2 = jax.random.normal(k[2], (5, 6)), jax.random.normal(k[3], (6, 3))
    b = jax.random.normal(k[4], (3, 6))

    def model(w1, b, xs, carrier_shape):
        carrier = ops.dfa_carrier(carrier_shape, xs.dtype)
        h, carrier = ops.dfa_hidden(jnp.tanh(xs @ w1), carrier, b, feedback_cotangent=cotangent)
        return ops.dfa_output(h @ w2, carrier)

    def per_example(w1, b):
        return jnp.sum(jax.vmap(lambda xe: model(w1, b, xe, (3,)))(x) * t)

    def batched(w1, b):
        return jnp.sum(model(w1, b, x, (4, 3)) * t)

    got, want = jax.grad(per_example, (0, 1))(w1, b), jax.grad(batched, (0, 1))(w1, b)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    e = t  # dL/dy; hidden errors are e @ B per example
    h = jnp.tanh(x @ w1)
    np.testing.assert_allclose(want[0], x.T @ ((e @ b) * (1 - h**2)), rtol=1e-5, atol=1e-6)
