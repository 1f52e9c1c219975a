"""Two more rules of the feedback-alignment family: adaptive skipped random backprop (ASRBP,
Baldi, Sadowski & Lu 2018) and bidirectional direct feedback alignment (BDFA, Luo, Fu & Glass
2017).

Each is held against a NumPy reference written here from the equations (the generic NumPy
forward pass and layer-wise reference come from ``test_fa_family``), against its identities
(SRBP/ARBP/DFA), against its ``jax.grad`` form, and the registry entries against the shared
conformance checks of ``test_fa_family``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from test_fa_family import TOL, explicit, grad_form, np_forward, np_layerwise, np_params, npf
from test_fa_family import setup as make_net

import fbalign as fb
from fbalign._src.backward import DirectFeedback
from fbalign._src.rules.bidirectional import bdfa_feedback_grad
from fbalign.rules import RULES, FeedbackShapeError

# (sizes, hidden activation, batch): no hidden layer with batch 1; a wide hidden layer with
# batch 4; square hidden layers as wide as the output, with batch 1, so that a transposed
# W (3 x 3) or a transposed direct feedback B_l (n_out x n_l = 3 x 3) has the right shape and
# only the numbers can catch it.
CONFIGS = [
    ((5, 3), "tanh", 1),
    ((5, 7, 3), "relu", 4),
    ((4, 3, 3, 3), "sigmoid", 1),
]
CONFIG_IDS = ["1layer-b1", "relu-b4", "square-sigmoid-b1"]


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_output_delta(params, x, labels, act):
    """``e = dL/da_{L-1}`` for softmax cross-entropy (linear output) and the hidden activities
    ``h_l = f(a_l)``, i.e. the inputs ``x_{l+1}`` of the layers above."""
    y, xs, _, ds = np_forward(np_params(params), x, act)
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = (p - np.eye(y.shape[1])[np.asarray(labels)]) / y.shape[0] * ds[-1]
    return e, xs[1:]


# ----------------------------------------------------------------------------------------------
# ASRBP: SRBP whose skip matrices C_l (n_out x n_l) learn by C_l -= lr * e^T h_l.


def np_asrbp_channel(params, C, x, labels, act, lr):
    """ARBP's rule (Baldi et al. Sec. 3: Delta c = eta * R_upper * O_lower) on the skip
    connection: the output error at its source times the activity of the hidden layer it
    reaches, gradient sign (R = -e)."""
    e, hs = np_output_delta(params, x, labels, act)
    return [None if c is None else c - lr * e.T @ hs[j] for j, c in enumerate(C)]


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_asrbp_matches_numpy_reference(sizes, act, batch):
    lr = 0.3
    model, params, x, labels = make_net(sizes, act, batch)
    rule = fb.adaptive_skipped_random_backprop(lr)
    state = rule.init(jax.random.PRNGKey(5), params)
    C = [npf(c) for c in state.feedback]
    assert C[-1] is None
    assert [c.shape for c in C[:-1]] == [(sizes[-1], n) for n in sizes[1:-1]]
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, np_layerwise(params, x, labels, act, lambda j, d, e: e @ C[j]), **TOL)
    want_c = np_asrbp_channel(params, C, x, labels, act, lr)
    for n, w, c in zip(new.feedback, want_c, C, strict=True):
        if w is None:
            assert n is None
        else:
            np.testing.assert_allclose(n, w, **TOL)
            assert not np.allclose(n, c, atol=1e-4)  # the channel did move


@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_asrbp_forward_updates_are_srbp_dfa_and_its_grad_form(sizes, act, batch):
    model, params, x, labels = make_net(sizes, act, batch)
    rule = fb.adaptive_skipped_random_backprop(0.5)
    state = rule.init(jax.random.PRNGKey(6), params)
    got, new = explicit(model, rule, params, state, x, labels)
    srbp, kept = explicit(model, fb.skipped_random_backprop(), params, state, x, labels)
    assert_trees_close(got, srbp, **TOL)
    assert_trees_close(kept, state, 0, 0)  # SRBP's channel is fixed ...
    assert not np.allclose(new.feedback[0], state.feedback[0], atol=1e-4)  # ... ASRBP's is not
    dfa, _ = explicit(model, fb.direct_feedback_alignment(), params,
                      fb.DirectFeedbackAlignmentState(state.feedback), x, labels)
    assert_trees_close(got, dfa, **TOL)
    assert_trees_close(grad_form(model, params, x, labels, state.feedback, "dfa"), got, **TOL)
    # the next step uses the adapted channel
    nxt, _ = explicit(model, rule, params, new, x, labels)
    assert_trees_close(grad_form(model, params, x, labels, new.feedback, "dfa"), nxt, **TOL)
    assert not np.allclose(nxt[0]["w"], got[0]["w"], atol=1e-6)


def test_asrbp_with_zero_learning_rate_is_srbp():
    sizes, act, batch = CONFIGS[2]
    model, params, x, labels = make_net(sizes, act, batch)
    rule = fb.random_backprop(skip=True, adaptive=True, learning_rate=0.0)
    state = rule.init(jax.random.PRNGKey(7), params)
    srbp = fb.skipped_random_backprop()
    assert_trees_close(srbp.init(jax.random.PRNGKey(7), params), state, 0, 0)
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, explicit(model, srbp, params, state, x, labels)[0], 0, 0)
    assert_trees_close(new, state, 0, 0)


@pytest.mark.parametrize("sizes,act,batch", [((5, 7, 3), "tanh", 4), ((4, 3, 3), "relu", 1)],
                         ids=["wide-b4", "square-b1"])
def test_asrbp_with_one_hidden_layer_is_arbp_with_the_transposed_channel(sizes, act, batch):
    """One hidden layer: SRBP's C_0 (n_out x n_h) plays ARBP's B_1 (n_h x n_out) transposed, and
    the two channel updates (e^T h_0 and x_1^T delta_1 = h_0^T e) are transposes too."""
    lr = 0.4
    model, params, x, labels = make_net(sizes, act, batch)
    asrbp, arbp = fb.adaptive_skipped_random_backprop(lr), fb.adaptive_random_backprop(lr)
    s_skip = asrbp.init(jax.random.PRNGKey(8), params)
    s_arbp = fb.RandomBackpropState((None, s_skip.feedback[0].T))
    u_skip, n_skip = explicit(model, asrbp, params, s_skip, x, labels)
    u_arbp, n_arbp = explicit(model, arbp, params, s_arbp, x, labels)
    assert_trees_close(u_skip, u_arbp, **TOL)
    np.testing.assert_allclose(n_skip.feedback[0], n_arbp.feedback[1].T, **TOL)


def test_asrbp_is_registered_and_equals_random_backprop_with_skip_and_adaptive():
    spec = RULES["asrbp"]
    assert spec.make is fb.adaptive_skipped_random_backprop
    assert spec.stateful and fb.rules.has_grad_form("asrbp")
    back = fb.get_rule("asrbp").backward([None], None)  # DFA taps whose B learns from e^T h_l
    assert isinstance(back, DirectFeedback) and back.tap_cotangent == "activity"
    assert fb.get_rule("asrbp") is not None
    model, params, x, labels = make_net(*CONFIGS[1])
    a = fb.adaptive_skipped_random_backprop(0.2)
    b = fb.random_backprop(skip=True, adaptive=True, learning_rate=0.2)
    sa, sb = a.init(jax.random.PRNGKey(9), params), b.init(jax.random.PRNGKey(9), params)
    assert_trees_close(sa, sb, 0, 0)
    assert_trees_close(explicit(model, a, params, sa, x, labels),
                       explicit(model, b, params, sb, x, labels), 0, 0)


# ----------------------------------------------------------------------------------------------
# BDFA: DFA forward; B_l learns to predict h_l from the target (Luo et al. eqs. 39-41).


def np_bdfa_feedback(params, B, x, labels, act, lr):
    """The feedback loss 1/n sum (1 - sigma((t B_l) * h_l)) (eqs. 31, 40-41), its gradient by
    hand, and the SGD step on B."""
    _, hs = np_output_delta(params, x, labels, act)
    n_out = params[-1]["w"].shape[1]
    t = np.eye(n_out)[np.asarray(labels)]
    n = t.shape[0]
    new, loss = [], 0.0
    for j, b in enumerate(B):
        if b is None:
            new.append(None)
            continue
        z = (t @ b) * hs[j]
        s = np_sigmoid(z)
        loss += np.sum(1 - s) / n
        grad = -t.T @ (s * (1 - s) * hs[j]) / n
        new.append(b - lr * grad)
    return new, loss


@pytest.mark.parametrize("sizes,act,batch", CONFIGS, ids=CONFIG_IDS)
def test_bdfa_matches_numpy_reference(sizes, act, batch):
    lr = 0.7
    model, params, x, labels = make_net(sizes, act, batch)
    rule = fb.bidirectional_direct_feedback_alignment(lr)
    state = rule.init(jax.random.PRNGKey(17), params)
    B = [npf(b) for b in state.feedback]
    assert B[-1] is None
    assert [b.shape for b in B[:-1]] == [(sizes[-1], n) for n in sizes[1:-1]]
    got, new = explicit(model, rule, params, state, x, labels)
    assert_trees_close(got, np_layerwise(params, x, labels, act, lambda j, d, e: e @ B[j]), **TOL)
    want_b, loss = np_bdfa_feedback(params, B, x, labels, act, lr)
    for n, w, b in zip(new.feedback, want_b, B, strict=True):
        if w is None:
            assert n is None
        else:
            np.testing.assert_allclose(n, w, **TOL)
            assert not np.allclose(n, b, atol=1e-4)
    if len(sizes) > 2:  # the step is the loss's gradient: a central difference along a direction
        rng = np.random.default_rng(0)
        D = [None if b is None else rng.normal(size=b.shape) for b in B]
        eps = 1e-5

        def loss_at(sign):
            moved = [None if b is None else b + sign * eps * d for b, d in zip(B, D, strict=True)]
            return np_bdfa_feedback(params, moved, x, labels, act, 0.0)[1]

        numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
        analytic = sum(np.sum((b - np.asarray(n, np.float64)) / lr * d)
                       for b, n, d in zip(B, new.feedback, D, strict=True) if b is not None)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-6)
    # one-hot targets work as class indices do; the rule needs them
    onehot = jax.nn.one_hot(labels, sizes[-1])
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    assert_trees_close(rule.update(params, state, tape, err, labels=onehot), (got, new), **TOL)
    with pytest.raises(ValueError, match="labels"):
        rule.update(params, state, tape, err)


@pytest.mark.parametrize("sizes,act,batch", CONFIGS[1:], ids=CONFIG_IDS[1:])
def test_bdfa_forward_updates_are_dfa_with_the_current_feedback(sizes, act, batch):
    model, params, x, labels = make_net(sizes, act, batch)
    rule, dfa = fb.bidirectional_direct_feedback_alignment(0.5), fb.direct_feedback_alignment()
    state = rule.init(jax.random.PRNGKey(18), params)
    assert_trees_close(tuple(state.feedback),
                       tuple(dfa.init(jax.random.PRNGKey(18), params).feedback), 0, 0)
    got, new = explicit(model, rule, params, state, x, labels)
    want, _ = explicit(model, dfa, params, fb.DirectFeedbackAlignmentState(state.feedback), x,
                       labels)
    assert_trees_close(got, want, **TOL)
    assert_trees_close(grad_form(model, params, x, labels, state.feedback, "dfa"), got, **TOL)
    # the next step: DFA through the learned feedback, not the initial one
    nxt, _ = explicit(model, rule, params, new, x, labels)
    want, _ = explicit(model, dfa, params, fb.DirectFeedbackAlignmentState(new.feedback), x,
                       labels)
    assert_trees_close(nxt, want, **TOL)
    assert not np.allclose(nxt[0]["w"], got[0]["w"], atol=1e-6)


def test_bdfa_feedback_learns_to_predict_the_hidden_activity():
    """With the forward weights held, 50 feedback steps on inputs that the class explains
    (prototypes plus noise) lower the feedback loss and make the top-down prediction t B_l agree
    in sign with h_l."""
    sizes, act, n = (4, 6, 6, 3), "tanh", 24
    model, params, _, labels = make_net(sizes, act, n)
    rng = np.random.default_rng(30)
    protos = rng.normal(size=(sizes[-1], sizes[0]))
    x = jnp.asarray(protos[np.asarray(labels)] + 0.1 * rng.normal(size=(n, sizes[0])),
                    jnp.float32)
    rule = fb.bidirectional_direct_feedback_alignment(1.0)
    state = rule.init(jax.random.PRNGKey(19), params)
    y, tape = model.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    step = jax.jit(lambda s: rule.update(params, s, tape, err, labels=labels)[1])
    _, hs = np_output_delta(params, x, labels, act)
    t = np.eye(sizes[-1])[np.asarray(labels)]

    def loss(s):
        return np_bdfa_feedback(params, [npf(b) for b in s.feedback], x, labels, act, 0.0)[1]

    def agreement(s):
        return np.mean([np.mean(np.sign(t @ npf(b)) == np.sign(h))
                        for b, h in zip(s.feedback[:-1], hs, strict=True)])

    s = state
    for _ in range(50):
        s = step(s)
    assert loss(s) < 0.8 * loss(state), (loss(state), loss(s))
    assert agreement(s) > max(0.9, agreement(state) + 0.2), (agreement(state), agreement(s))


def test_bdfa_is_registered():
    spec = RULES["bdfa"]
    assert spec.make is fb.bidirectional_direct_feedback_alignment
    assert spec.stateful and fb.rules.has_grad_form("bdfa")
    back = fb.get_rule("bdfa").backward([jnp.zeros((3, 4)), None], jnp.array([0, 2]))
    assert isinstance(back, DirectFeedback) and back.tap_cotangent is bdfa_feedback_grad


# ----------------------------------------------------------------------------------------------
# Orientation: a transposed (non-square) feedback matrix is refused by name.


@pytest.mark.parametrize("name", ["asrbp", "bdfa"])
def test_transposed_feedback_is_refused(name):
    model, params, x, labels = make_net((4, 6, 6, 3), "sigmoid", 1)
    rule = RULES[name].make()
    state = rule.init(jax.random.PRNGKey(0), params)
    bad = (state.feedback[0].T,) + tuple(state.feedback[1:])
    with pytest.raises(FeedbackShapeError, match="transposed"):
        explicit(model, rule, params, state._replace(feedback=bad), x, labels)


def test_shallow_learning_updates_only_the_output_layer_with_its_gradient():
    """Lillicrap et al. 2016's baseline: hidden layers get zeros, the output layer its exact
    gradient, in both forms (explicit on the tape, jax.grad through `Shallow`)."""
    model = fb.mlp((6, 5, 4, 3))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 6))
    y = jnp.array([0, 1, 2, 0, 1, 2, 0])
    loss = fb.losses.get_loss("cross_entropy")
    grads = jax.grad(lambda p: loss(model.apply(p, x), y))(params)
    ctx = fb.rules.StepContext(model, loss)
    for lift in (fb.rules.explicit, fb.rules.through_primitives):
        upd = lift(fb.rules.shallow()).step(params, fb.rules.EmptyState(),
                                            fb.rules.Batch(x, y), None, ctx)[0]
        for i in range(2):
            assert all(float(jnp.abs(v).max()) == 0.0 for v in upd[i].values())
        np.testing.assert_allclose(upd[2]["w"], grads[2]["w"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(upd[2]["b"], grads[2]["b"], rtol=1e-5, atol=1e-7)
