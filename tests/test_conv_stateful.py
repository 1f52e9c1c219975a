"""Rules whose feedback learns or is redrawn every step, on conv layers (LeNet-5's jax.grad form
plus `TapeRule.advance`), and the sparse and k-bit channels on conv kernels.

Each step of the harness (``make_train_step(..., form="grad")`` on a narrow LeNet, plain SGD) is
compared with the explicit conv backward of ``test_conv_rules.lenet_reference`` and the rule's
state update written out here from the paper's equations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from test_conv_rules import (
    LENET,
    LENET_LABELS,
    _lenet_reference,
    _lenet_setup,
    _rand,
)

import fbalign as fb
from fbalign._src.train import TrainState, make_train_step

LR = 0.05


def _one_step(rule, params, x, rule_state, rule_kwargs=None, key=0):
    opt = optax.sgd(LR)
    state = TrainState(params, opt.init(params), rule_state, jax.random.PRNGKey(key),
                       jnp.zeros((), jnp.int32))
    step = make_train_step(LENET, rule, opt, form="grad", rule_kwargs=rule_kwargs, jit=False)
    new, _ = jax.jit(step)(state, x, LENET_LABELS)
    sub = jax.random.split(state.key)[1]  # the key the step hands the rule
    return new, sub


def _sgd(params, grads, lr=LR):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def _feedback(seed, scale=0.3):
    return [None] + _rand(seed, *LENET.param_shapes[1:], scale=scale)


def test_kolen_pollack_on_lenet_matches_reference():
    """KP (Akrout et al. 2019, eqs. 16-17): W_l -= lr (G_l + wd W_l), B_l -= eta (G_l + wd B_l),
    with G_l = x_l (*) delta_l computed with errors going down through B (conv kernels too)."""
    params, x = _lenet_setup(11)
    backs = _feedback(12)
    eta, wd = 0.02, 0.1
    new, _ = _one_step("kp", params, x, fb.rules.KolenPollackState(tuple(backs)),
                       dict(learning_rate=eta, weight_decay=wd))
    g = _lenet_reference(params, x, backs)
    decayed = [{"w": gi["w"] + wd * p["w"], "b": gi["b"]} for gi, p in zip(g, params,
                                                                         strict=True)]
    assert_trees_close(new.params, _sgd(params, decayed), 2e-4, 1e-6)
    want_b = [None] + [backs[i] - eta * (g[i]["w"] + wd * backs[i]) for i in range(1, 5)]
    assert_trees_close(list(new.rule_state.feedback), want_b, 2e-4, 1e-6)
    # B moved toward W: KP's W - B contracts by (1 - lr wd) when eta = lr.
    assert not np.allclose(new.rule_state.feedback[1], backs[1])


def test_adaptive_rbp_on_lenet_matches_reference():
    """ARBP (Baldi et al. 2018, Sec. 3): the channel C_l learns by the forward weights' own
    local update, C_l -= eta x_l (*) delta_l, on the conv kernels as on the dense layers."""
    params, x = _lenet_setup(13)
    backs = _feedback(14)
    eta = 0.03
    new, _ = _one_step("arbp", params, x, fb.rules.RandomBackpropState(tuple(backs)),
                       dict(learning_rate=eta))
    g = _lenet_reference(params, x, backs)
    assert_trees_close(new.params, _sgd(params, g), 2e-4, 1e-6)
    want_c = [None] + [backs[i] - eta * g[i]["w"] for i in range(1, 5)]
    assert_trees_close(list(new.rule_state.feedback), want_c, 2e-4, 1e-6)


def test_brsf_on_lenet_uses_the_stored_magnitudes_then_redraws():
    """brSF: this step's error goes down through sign(W_l) * M_l with the magnitudes of the
    stored key; the next step's M_l are fresh |R_l|, R_l ~ U(-sqrt(3) s, sqrt(3) s), s the
    Glorot std of the kernel (receptive field included), hashed from the step's key."""
    params, x = _lenet_setup(15)
    rule = fb.brsf()
    state = rule.init(jax.random.PRNGKey(16), params)
    assert isinstance(state, fb.rules.BatchRandomSignState)
    mags = fb.rules.rule_feedback(rule, params, state)
    new, sub = _one_step("brsf", params, x, state)
    backs = [None] + [jnp.sign(params[i]["w"]) * mags[i] for i in range(1, 5)]
    assert_trees_close(new.params, _sgd(params, _lenet_reference(params, x, backs)), 2e-4, 1e-6)
    np.testing.assert_array_equal(new.rule_state.key, sub)
    fresh = fb.rules.rule_feedback(rule, params, new.rule_state)
    for i in range(1, 5):
        shape = LENET.param_shapes[i]
        window = int(np.prod(shape[:-2]))
        s = np.sqrt(2 / (window * shape[-2] + window * shape[-1]))
        m = np.asarray(fresh[i])
        assert m.shape == shape and m.min() >= 0 and m.max() < np.sqrt(3) * s
        assert m.max() > 0.8 * np.sqrt(3) * s
        assert not np.allclose(m, mags[i])
    # The next step uses the new magnitudes: a second step from the same state with another key
    # draws different ones.
    other, _ = _one_step("brsf", params, x, state, key=1)
    assert not np.allclose(fb.rules.rule_feedback(rule, params, other.rule_state)[1], fresh[1])


def _np_conv(x, w, pad):
    """Stride-1 NHWC/HWIO convolution with symmetric zero padding, by loops over the window."""
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + oh, j:j + ow], w[i, j])
    return out, xp


@pytest.mark.parametrize("pad", [0, 1])
def test_mirror_step_on_a_conv_kernel_matches_numpy_reference(pad):
    """Weight mirror on a conv layer (Akrout et al. 2019): noise images xi drive the layer,
    y = conv(xi, W), and B += eta * sum_sites xi_patch y^T / m - lambda B (m = batch x sites)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 2, 4))
    b = rng.normal(size=(3, 3, 2, 4))
    xi = rng.normal(size=(5, 6, 7, 2))
    eta, lam = 0.3, 0.05
    y, xp = _np_conv(xi, w, pad)
    corr = np.zeros_like(w)
    oh, ow = y.shape[1:3]
    for i in range(3):
        for j in range(3):
            corr[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i:i + oh, j:j + ow], y)
    want = b + eta * corr / (y.shape[0] * oh * ow) - lam * b
    op = fb.ops.conv_op(2, padding=pad)
    got = fb.rules.mirror_op_step(jnp.asarray(b, jnp.float32), jnp.asarray(w, jnp.float32),
                                  jnp.asarray(xi, jnp.float32), op, eta, lam)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The dense case is exactly mirror_step.
    wd, bd, xd = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(6, 4))
    dense = fb.rules.mirror_op_step(*(jnp.asarray(a, jnp.float32) for a in (bd, wd, xd)),
                                    jnp.matmul, eta, lam)
    np.testing.assert_allclose(dense, fb.rules.mirror_step(bd, wd, xd, eta, lam), rtol=1e-5)


def _angle(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))


def test_weight_mirror_on_lenet_aligns_conv_and_dense_feedback():
    """The mirror phase run through LeNet's layer ops drives every B_l (conv kernels included)
    toward W_l: the angle falls from about 90 degrees to below 25."""
    params, x = _lenet_setup(17)
    backs = _feedback(18)
    state = fb.rules.WeightMirrorState(tuple(backs))
    opt = optax.sgd(0.0)  # freeze W: only the mirror phase moves anything
    rule_kwargs = dict(learning_rate=0.05, batch_size=64)
    step = jax.jit(make_train_step(LENET, "wm", opt, form="grad", rule_kwargs=rule_kwargs,
                                   jit=False))
    ts = TrainState(params, opt.init(params), state, jax.random.PRNGKey(0),
                    jnp.zeros((), jnp.int32))
    before = [_angle(backs[i], params[i]["w"]) for i in range(1, 5)]
    for _ in range(80):
        ts, _ = step(ts, x, LENET_LABELS)
    after = [_angle(ts.rule_state.feedback[i], params[i]["w"]) for i in range(1, 5)]
    assert min(before) > 60, before
    assert max(after) < 25, after
    # The forward updates of that step were FA through the B it started from.
    ts0 = TrainState(params, optax.sgd(LR).init(params), state, jax.random.PRNGKey(0),
                     jnp.zeros((), jnp.int32))
    one = make_train_step(LENET, "wm", optax.sgd(LR), form="grad", jit=False)
    new, _ = jax.jit(one)(ts0, x, LENET_LABELS)
    assert_trees_close(new.params, _sgd(params, _lenet_reference(params, x, backs)), 2e-4, 1e-6)


@pytest.mark.parametrize("nonzeros", [1, 4])
def test_sparse_rbp_on_lenet_has_the_density_per_receiving_unit(nonzeros):
    """Sparse RBP on a conv kernel: each input channel (the unit the error reaches) keeps exactly
    k nonzero feedback weights among its kh * kw * cout; dense layers keep k per input unit. The
    grad step is FA through that sparse feedback."""
    params, x = _lenet_setup(19)
    st = jax.jit(lambda k, p: LENET.init_rule_state("sparse_rbp", k, p, nonzeros=nonzeros))(
        jax.random.PRNGKey(3), params)
    for i in range(1, 5):
        b = np.asarray(st.feedback[i])
        per_unit = np.count_nonzero(np.moveaxis(b, -2, 0).reshape(b.shape[-2], -1), axis=1)
        np.testing.assert_array_equal(per_unit, nonzeros)
    new, _ = _one_step("sparse_rbp", params, x, st, dict(nonzeros=nonzeros))
    want = _sgd(params, _lenet_reference(params, x, list(st.feedback)))
    assert_trees_close(new.params, want, 2e-4, 1e-6)


@pytest.mark.parametrize("bits", [1, 3])
def test_kbit_rbp_on_lenet_quantises_the_error_at_every_hidden_layer(bits):
    """k-bit RBP (Baldi et al. 2018): the error arriving at each hidden layer's output (conv maps
    before pooling's VJP is applied below them, and dense layers) is quantised to 2^k levels."""
    params, x = _lenet_setup(21)
    backs = _feedback(22)
    new, _ = _one_step("kbit_rbp", params, x, fb.rules.RandomBackpropState(tuple(backs)),
                       dict(bits=bits))
    want = _lenet_reference(params, x, backs, bits=bits)
    assert_trees_close(new.params, _sgd(params, want), 2e-4, 1e-6)
    full = _lenet_reference(params, x, backs)
    assert not np.allclose(want[0]["w"], full[0]["w"], atol=1e-5)
    # The grad form through apply(error_bits=...) is the same rule.
    got = jax.jit(jax.grad(lambda p: fb.cross_entropy(
        LENET.apply(p, x, backs, "fa", error_bits=bits), LENET_LABELS)))(params)
    assert_trees_close(got, want, 2e-4, 1e-6)


def _dfa_feedback(seed):
    shapes = [(LENET.num_classes, *s) for s in LENET.feature_shapes[:-1]]
    return _rand(seed, *shapes, scale=0.2) + [None]


def test_adaptive_skipped_rbp_on_lenet_matches_reference():
    """ASRBP (Baldi et al. 2018; our reading, see `random_backprop`): DFA updates through C, and
    each skip channel learns by C_l -= eta e^T h_l, e the output error and h_l the feature map
    it reaches (before pooling)."""
    params, x = _lenet_setup(25)
    cs = _dfa_feedback(26)
    eta = 0.04
    new, _ = _one_step("asrbp", params, x, fb.rules.RandomBackpropState(tuple(cs)),
                       dict(learning_rate=eta))
    grads, hidden = _lenet_reference(params, x, None, dfa=cs, with_hidden=True)
    assert_trees_close(new.params, _sgd(params, grads), 2e-4, 1e-6)
    logits = LENET.apply(params, x)
    e = jax.grad(lambda o: fb.cross_entropy(o, LENET_LABELS))(logits)
    want = [c - eta * jnp.tensordot(e, h, axes=(0, 0)) for c, h in zip(cs[:-1], hidden,
                                                                        strict=True)] + [None]
    assert_trees_close(list(new.rule_state.feedback), want, 2e-4, 1e-6)


def test_bidirectional_dfa_on_lenet_matches_reference():
    """BDFA (Luo, Fu & Glass 2017, eqs. 31, 39-41): DFA updates through B, and B_l predicts the
    feature map h_l from the one-hot target t: B_l += (eta / n) t^T (sigmoid'(z) h_l),
    z = (t B_l) * h_l."""
    params, x = _lenet_setup(27)
    bs = _dfa_feedback(28)
    eta = 0.5
    new, _ = _one_step("bdfa", params, x,
                       fb.rules.BidirectionalDirectFeedbackAlignmentState(tuple(bs)),
                       dict(learning_rate=eta))
    grads, hidden = _lenet_reference(params, x, None, dfa=bs, with_hidden=True)
    assert_trees_close(new.params, _sgd(params, grads), 2e-4, 1e-6)
    t = jax.nn.one_hot(LENET_LABELS, LENET.num_classes)
    n = x.shape[0]
    want = []
    for b, h in zip(bs[:-1], hidden, strict=True):
        z = jnp.tensordot(t, b, axes=1) * h
        s = jax.nn.sigmoid(z)
        want.append(b + (eta / n) * jnp.tensordot(t, s * (1 - s) * h, axes=(0, 0)))
    assert_trees_close(list(new.rule_state.feedback), want + [None], 2e-4, 1e-6)
    assert not np.allclose(new.rule_state.feedback[0], bs[0], atol=1e-4)


GRAD_FORM_RULES = [n for n in fb.RULES if fb.rules.has_grad_form(n)]


@pytest.mark.parametrize("name", GRAD_FORM_RULES)
def test_harness_grad_form_equals_explicit_form_on_an_mlp(name):
    """Two forms, one truth, for a whole harness step (updates, optimizer, the rule's next state
    via `TapeRule.advance`), with each rule's registry grad form (mode and apply options)."""
    model = fb.mlp((6, 5, 5, 3), "tanh")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    y = jnp.array([0, 1, 2, 1])
    opt = optax.sgd(0.1)
    kwargs = {"kbit_rbp": dict(bits=2)}.get(name)
    out = {}
    for form in ("explicit", "grad"):
        st = fb.train.init_train_state(model, name, opt, jax.random.PRNGKey(0), kwargs)
        step = make_train_step(model, name, opt, form=form, rule_kwargs=kwargs)
        st, _ = step(st, x, y)
        st, _ = step(st, x, y)  # the second step runs on the advanced state
        out[form] = (st.params, st.rule_state)
    assert_trees_close(out["grad"], out["explicit"], 1e-5, 1e-6)


def test_rules_without_a_grad_form_state_update_are_refused_on_lenet():
    for rule in ("bfa",):
        with pytest.raises(ValueError, match="explicit"):
            make_train_step(LENET, rule, optax.sgd(LR), form="grad")
