"""Networks as lists of layers (`fbalign.models.sequential`): dense, conv, pooling, flatten and
residual blocks, under every rule's `Backward` and, for chains, the recorded `Tape`.

References: the MLP and LeNet-5 (the same networks written as layer lists must give the same
outputs, tapes and updates), NumPy FA/DFA backward passes through a residual block written
from the rules' equations, and ``jax.grad`` (FA with ``B = W`` is backprop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.data import load_dataset
from fbalign.models import (
    AvgPool,
    Conv,
    Dense,
    Flatten,
    MaxPool,
    Residual,
    sequential,
)
from fbalign.rules import explicit, through_primitives
from fbalign.train import fit

KEY = jax.random.PRNGKey(0)


def _grads(net, params, x, c, backward):
    """``jax.grad`` of ``sum(y * c)`` through ``backward``: the rule's updates for ``e = c``.
    Jitted here and below: eager, a conv net's ops compile one by one (twice the time)."""
    return jax.jit(lambda: jax.grad(
        lambda p: jnp.sum(net.apply(p, x, backward=backward) * c))(params))()


def _step(rule, net, params, state, x, y):
    ctx = fb.rules.StepContext(net, fb.losses.get_loss("cross_entropy"))
    upd, state, _ = jax.jit(rule.step, static_argnums=4)(params, state, fb.rules.Batch(x, y),
                                                          KEY, ctx)
    return upd, state


def test_a_dense_layer_list_is_the_mlp():
    net = sequential([Dense(16, "tanh"), Dense(12, "tanh"), Dense(3)], (8,))
    mlp = fb.mlp((8, 16, 12, 3))
    params = mlp.init(KEY)
    assert [p["w"].shape for p in net.init(KEY)] == [p["w"].shape for p in params]
    x = jax.random.normal(KEY, (5, 8))
    np.testing.assert_array_equal(net.apply(params, x), mlp.apply(params, x))
    (y1, t1), (_, t2) = net.forward(params, x), mlp.forward(params, x)
    assert t1.is_dense and t2.is_dense
    assert_trees_close(t1, t2, rtol=0, atol=0)
    rule = fb.rules.get_rule("fa")
    state = rule.init(KEY, params)
    e = jax.random.normal(KEY, y1.shape)
    assert_trees_close(rule.update(params, state, t1, e)[0], rule.update(params, state, t2, e)[0],
                       rtol=0, atol=0)


LENET_LAYERS = [Conv(6, (5, 5), padding=2, activation="tanh"), MaxPool(),
                Conv(16, (5, 5), padding="VALID", activation="tanh"), MaxPool(), Flatten(),
                Dense(120, "tanh"), Dense(84, "tanh"), Dense(10)]


def test_lenet5_as_a_layer_list_equals_lenet5():
    """Output, tape and FA's jax.grad-form updates of LeNet-5 written as a list of layers equal
    `fbalign.models.lenet5` on the same params; the rule's own init gives FA the feedback that
    LeNet-5 draws for it. (Each network's checks run as one jitted program: eager, LeNet-5's
    ops compile one by one, 14 s cold against 3.)"""
    net, lenet = sequential(LENET_LAYERS, (28, 28, 1)), fb.models.lenet5()
    params = lenet.init(KEY)
    assert net.param_shapes == lenet.param_shapes and net.feature_shapes == lenet.feature_shapes
    x = jax.random.normal(KEY, (2, 784))
    state = net.init_rule_state("fa", KEY, params)
    assert_trees_close(state, lenet.init_rule_state("fa", KEY, params), rtol=0, atol=0)
    bw = fb.rules.get_rule("fa").backward(state.feedback, None)
    c = jax.random.normal(KEY, (2, 10))

    def run(model):
        t = model.forward(params, x)[1]
        return (model.apply(params, x), t.inputs + t.preacts + t.hidden,
                _grads(model, params, x, c, bw))

    (o1, t1, g1), (o2, t2, g2) = jax.jit(lambda: run(net))(), jax.jit(lambda: run(lenet))()
    np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6)
    assert_trees_close(t1, t2, rtol=1e-6, atol=1e-6)
    assert_trees_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fa", "dfa", "kp"])
def test_explicit_form_equals_grad_form_on_a_conv_chain(name):
    """On a conv chain with max and average pooling, a tape rule's explicit form (its update on
    the recorded tape, through `Links`) equals its jax.grad form (its `Backward`), state
    included."""
    net = sequential([Conv(3, (3, 3), activation="tanh"), MaxPool(),
                      Conv(4, (3, 3), activation="tanh"), AvgPool(), Flatten(),
                      Dense(5, "tanh"), Dense(3)], (8, 8, 1))
    params = net.init(KEY)
    x, y = jax.random.normal(KEY, (4, 64)), jnp.array([0, 1, 2, 1])
    rule = fb.rules.get_rule(name)
    state = net.init_rule_state(name, KEY, params)
    got = _step(explicit(rule), net, params, state, x, y)
    want = _step(through_primitives(rule), net, params, state, x, y)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


RES_LAYERS = [Dense(6, "tanh"), Residual((Dense(5, "tanh"), Dense(6)), "tanh"), Dense(3)]


def _residual_forward(params, x):
    (w0, b0), (w1, b1), (w2, b2), (w3, b3) = [(np.asarray(p["w"], np.float64),
                                               np.asarray(p["b"], np.float64)) for p in params]
    h0 = np.tanh(x @ w0 + b0)
    u = np.tanh(h0 @ w1 + b1)
    h2 = np.tanh(h0 + u @ w2 + b2)  # the block: h = f(x + F(x))
    return h0, u, h2, h2 @ w3 + b3


def _updates(x, h0, u, h2, e, d2, d1, d0):
    return [{"w": x.T @ d0, "b": d0.sum(0)}, {"w": h0.T @ d1, "b": d1.sum(0)},
            {"w": u.T @ d2, "b": d2.sum(0)}, {"w": h2.T @ e, "b": e.sum(0)}]


def test_fa_and_dfa_through_a_residual_block_equal_numpy_references():
    """FA sends ``delta`` down both paths of a block (through ``B`` inside it, unchanged around
    it); DFA's taps replace whatever reaches a hidden layer by ``e @ B_l``, the block's tap
    sitting after the add. Both written out in NumPy from the rules' equations."""
    net = sequential(RES_LAYERS, (4,))
    params = net.init(KEY)
    x = np.asarray(jax.random.normal(KEY, (7, 4)), np.float64)
    e = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (7, 3)), np.float64)
    h0, u, h2, y = _residual_forward(params, x)
    np.testing.assert_allclose(net.apply(params, jnp.asarray(x, jnp.float32)), y, rtol=1e-5,
                               atol=1e-6)
    xs, es = jnp.asarray(x, jnp.float32), jnp.asarray(e, jnp.float32)
    fa = net.init_rule_state("fa", KEY, params).feedback
    b1, b2, b3 = (np.asarray(b, np.float64) for b in fa[1:])
    d2 = (e @ b3.T) * (1 - h2**2)
    d1 = (d2 @ b2.T) * (1 - u**2)
    d0 = (d2 + d1 @ b1.T) * (1 - h0**2)  # skip path + block path
    got = _grads(net, params, xs, es, fb.rules.get_rule("fa").backward(fa, None))
    assert_trees_close(got, _updates(x, h0, u, h2, e, d2, d1, d0), rtol=1e-4, atol=1e-5)
    dfa = net.init_rule_state("dfa", KEY, params).feedback
    assert [b.shape for b in dfa[:3]] == [(3, 6), (3, 5), (3, 6)] and dfa[3] is None
    c0, c1, c2 = (np.asarray(b, np.float64) for b in dfa[:3])
    d2, d1, d0 = (e @ c2) * (1 - h2**2), (e @ c1) * (1 - u**2), (e @ c0) * (1 - h0**2)
    got = _grads(net, params, xs, es, fb.rules.get_rule("dfa").backward(dfa, None))
    assert_trees_close(got, _updates(x, h0, u, h2, e, d2, d1, d0), rtol=1e-4, atol=1e-5)


def test_fa_with_b_equal_w_is_backprop_on_a_residual_conv_net():
    net = sequential([Conv(4, (3, 3), activation="relu"),
                      Residual((Conv(4, (3, 3), activation="tanh"), Conv(4, (3, 3))), "relu"),
                      MaxPool(), Flatten(), Dense(3)], (6, 6, 1))
    params = net.init(KEY)
    x, c = jax.random.normal(KEY, (3, 36)), jax.random.normal(KEY, (3, 3))
    mirror = tuple([None] + [p["w"] for p in params[1:]])
    got = _grads(net, params, x, c, fb.rules.get_rule("fa").backward(mirror, None))
    want = jax.grad(lambda p: jnp.sum(net.apply(p, x) * c))(params)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert net.forward is None  # a residual network records no tape


def test_a_residual_conv_net_trains_through_fit():
    data = load_dataset("digits")
    net = sequential([Conv(4, (3, 3), activation="tanh"),
                      Residual((Conv(4, (3, 3), activation="tanh"), Conv(4, (3, 3))), "tanh"),
                      MaxPool(), Flatten(), Dense(10)], (8, 8, 1))
    for rule in ("fa", "dfa"):  # form="explicit" (the default) becomes the jax.grad form
        res = fit(net, rule, optax.adam(3e-3), data, epochs=2, batch_size=64, progress=False)
        assert res.history[-1]["test_error"] < 70.0, rule  # chance: 90%
    with pytest.raises(ValueError, match="'bfa' changes its feedback state .* records none"):
        fit(net, "bfa", optax.adam(3e-3), data, epochs=1, progress=False)


@pytest.mark.parametrize("layers, shape, msg", [
    ([Conv(4, (3, 3)), Dense(3)], (6, 6, 1), r"layers\[1\] \(Dense\): .* put Flatten"),
    ([Dense(4), Conv(4, (3, 3)), Flatten(), Dense(2)], (5,), r"layers\[1\] \(Conv\)"),
    ([Conv(4, (3, 3)), MaxPool(4), Flatten(), Dense(2)], (6, 6, 1), "multiples of 4"),
    ([Dense(4), Residual((Dense(5),)), Dense(2)], (3,), "F\\(x\\) has shape \\(5,\\)"),
    ([Dense(4), Residual((Dense(4, "tanh"),)), Dense(2)], (3,), "activation 'linear'"),
    ([Dense(4), Flatten()], (3,), "must end in a Dense"),
    ([Dense(4, "swish"), Dense(2)], (3,), "swish"),
])
def test_bad_layer_lists_are_refused_naming_the_layer(layers, shape, msg):
    with pytest.raises((ValueError, KeyError), match=msg):
        sequential(layers, shape)


def test_inputs_of_another_shape_are_refused():
    net = sequential(RES_LAYERS, (4,))
    with pytest.raises(ValueError, match=r"expects inputs \(batch, \*\(4,\)\)"):
        net.apply(net.init(KEY), jnp.ones((2, 5)))


@pytest.mark.parametrize("name", ["dfa", "drtp", "srbp", "asrbp", "bdfa"])
def test_direct_feedback_rules_draw_onto_feature_maps_with_glorot_scale(name):
    """Every DFA-style rule's own init, told the network's feature maps, gives LeNet-5 one
    ``(n_out, *map_l)`` matrix per hidden layer with std ``sqrt(2 / (n_out + n_l))`` (no rule
    is special-cased by name any more: srbp, asrbp and bdfa used to get ``1/sqrt(n_out)``
    there), while the MLP keeps Nokland's ``1/sqrt(n_out)``."""
    lenet = fb.models.lenet5()
    state = lenet.init_rule_state(name, KEY, lenet.init(KEY))
    for b, shape in zip(state.feedback[:-1], lenet.feature_shapes[:-1], strict=True):
        assert b.shape == (10, *shape)
        want = np.sqrt(2.0 / (10 + np.prod(shape)))
        assert abs(float(jnp.std(b)) / want - 1) < 0.08, (shape, float(jnp.std(b)), want)
    assert state.feedback[-1] is None
    mlp = fb.mlp((20, 400, 10))
    b = fb.rules.get_rule(name).init(KEY, mlp.init(KEY)).feedback[0]
    assert b.shape == (10, 400) and abs(float(jnp.std(b)) * np.sqrt(10) - 1) < 0.08


def test_xavier_feedback_has_each_layers_glorot_limit():
    """``--feedback-init xavier`` (BioTorch's default): every B is U[-a, a] with a = sqrt(6 /
    (fan_in + fan_out)) of its own shape, conv kernels by their window, and DFA's map-shaped
    B_l by (n_out, n_l)."""
    lenet = fb.models.lenet5(activation="relu")
    params = lenet.init(KEY)
    fa = lenet.init_rule_state("fa", KEY, params, init="xavier").feedback
    for b, shape in zip(fa[1:], lenet.param_shapes[1:], strict=True):
        window = int(np.prod(shape[:-2]))
        limit = np.sqrt(6.0 / (window * shape[-2] + window * shape[-1]))
        assert float(jnp.max(jnp.abs(b))) <= limit
        assert abs(float(jnp.std(b)) / (limit / np.sqrt(3)) - 1) < 0.1, shape
    dfa = lenet.init_rule_state("dfa", KEY, params, init="xavier").feedback
    for b, shape in zip(dfa[:-1], lenet.feature_shapes[:-1], strict=True):
        limit = np.sqrt(6.0 / (10 + np.prod(shape)))
        assert b.shape == (10, *shape) and float(jnp.max(jnp.abs(b))) <= limit
        assert abs(float(jnp.std(b)) / (limit / np.sqrt(3)) - 1) < 0.1, shape
