"""Backward objects: the rule decides what each layer sends back; MLP, LeNet-5 and the RNN only
call it. A user-written Backward runs unchanged in every model, and each mode string's object
gives exactly what that mode gave."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.backward import Backward, DirectFeedback, LinearFeedback, SignFeedback
from fbalign._src.modes import backward_for_mode, mode_kind


@jax.custom_vjp
def _scale_error(x, s):
    return x


_scale_error.defvjp(lambda x, s: (x, s), lambda s, g: (s * g, None))


@dataclasses.dataclass(frozen=True)
class HalfError(Backward):
    """A user's backward: every linear layer halves the error reaching its input."""

    def linear(self, i, op, x, w):
        return op(_scale_error(x, 0.5), w)


def _loss(model, params, x, y, **kw):
    return fb.cross_entropy(model.apply(params, x, **kw), y)


@pytest.mark.parametrize("which", ["mlp", "lenet5"])
def test_a_user_backward_runs_in_every_model_without_touching_it(which):
    if which == "mlp":
        model = fb.mlp((6, 5, 4, 3))
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    else:
        model = fb.LeNet5(conv_features=(2, 3), dense_features=(8, 6))
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 784))
    y = jnp.array([0, 1, 2, 0])[: len(x)]
    params = model.init(jax.random.PRNGKey(0))
    bp = jax.jit(jax.grad(lambda p: _loss(model, p, x, y)))(params)  # jit: eager, LeNet-5's
    half = jax.jit(jax.grad(lambda p: _loss(model, p, x, y, backward=HalfError())))(params)
    n = len(params)  # ops would compile one by one
    for i in range(n):  # layer i's error crossed n - 1 - i halving inputs above it
        np.testing.assert_allclose(half[i]["w"], bp[i]["w"] * 0.5 ** (n - 1 - i), rtol=2e-4,
                                   atol=1e-7)


@pytest.mark.parametrize("mode", ["fa", "kp", "sign", "dfa", "adfa"])
def test_backward_objects_equal_their_mode_strings(mode):
    model = fb.mlp((6, 7, 5, 3))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    y = jnp.array([0, 1, 2, 1])
    name = {"sign": "frsf", "adfa": "asrbp"}.get(mode, mode)
    rule = fb.get_rule(name)
    fbk = fb.rules.rule_feedback(rule, params, rule.init(jax.random.PRNGKey(2), params))
    obj = {"fa": LinearFeedback(feedback=fbk), "kp": LinearFeedback(feedback=fbk, learn=True),
           "sign": SignFeedback(feedback=fbk), "dfa": DirectFeedback(feedback=fbk),
           "adfa": DirectFeedback(feedback=fbk, tap_cotangent="activity")}[mode]
    by_mode = jax.grad(lambda p, f: _loss(model, p, x, y, feedback=f, mode=mode),
                       argnums=(0, 1))(params, fbk)
    by_obj = jax.grad(lambda p, f: _loss(model, p, x, y, backward=dataclasses.replace(
        obj, feedback=f)), argnums=(0, 1))(params, fbk)
    assert_trees_close(by_obj, by_mode, 1e-6, 1e-8)
    assert obj.kind == mode_kind(mode)
    # and the mode is not backprop (the object is really used)
    bp = jax.grad(lambda p: _loss(model, p, x, y))(params)
    assert not np.allclose(by_obj[0][0]["w"], bp[0]["w"], atol=1e-5)


def test_fa_with_b_equal_w_in_a_backward_object_is_backprop_and_transposed_b_is_refused():
    model = fb.mlp((5, 6, 6, 3))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    y = jnp.array([0, 1, 2, 1])
    same = LinearFeedback(feedback=[p["w"] for p in params])
    assert_trees_close(jax.grad(lambda p: _loss(model, p, x, y, backward=same))(params),
                       jax.grad(lambda p: _loss(model, p, x, y))(params), 1e-6, 1e-8)
    with pytest.raises(ValueError, match="one feedback entry per layer.*shared_dfa_feedback"):
        DirectFeedback(feedback=jnp.zeros((3, 12)))  # a shared matrix, not per-layer entries
    bad = LinearFeedback(feedback=[None, params[1]["w"], params[2]["w"].T])
    with pytest.raises(ValueError, match=r"layer 2.*\(6, 3\).*transposed"):
        model.apply(params, x, backward=bad)


def test_mode_strings_are_read_in_one_place_with_clear_errors():
    kw = dict(num_layers=2, n_out=3, batch=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="unknown backward mode 'xx'"):
        backward_for_mode("xx", None, **kw)
    with pytest.raises(ValueError, match="needs one feedback entry per layer"):
        backward_for_mode("fa", None, **kw)
    with pytest.raises(ValueError, match="pass labels"):
        backward_for_mode("drtp", [jnp.zeros((3, 4)), None], **kw)
    assert mode_kind("drtp") == "dfa" and mode_kind("bp") is None and mode_kind(None) is None
    # the models carry no rule logic of their own: no branch on a mode string
    import inspect

    for fn in (fb.MLP.apply, fb.LeNet5.apply, fb.models.RNN.apply):
        src = inspect.getsource(fn)
        assert 'mode == "fa"' not in src and 'mode == "sign"' not in src and "DFA_TAPS" not in src


def test_one_sign_feedback_for_rules_backward_objects_and_flax():
    import fbalign.flax as fbx

    assert fbx.sign_feedback is fb.rules.sign_feedback
    w = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    np.testing.assert_allclose(fb.rules.sign_feedback(w), np.sign(w) * np.sqrt(2 / 10),
                               rtol=1e-6)
    m = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (6, 4)))
    np.testing.assert_allclose(fb.rules.sign_feedback(w, m), np.sign(w) * m, rtol=1e-6)
    # feedback initialisers are named as such at the top level
    assert fb.gaussian_feedback is fb.rules.gaussian and not hasattr(fb, "gaussian")


def test_a_rules_feedback_gradient_reaches_the_tap_as_a_function():
    """Rule math stays in the rule's file: `dfa_hidden` hands B whatever the rule's function
    computes (BDFA's lives in rules/bidirectional.py), and knows no rule by name."""
    from fbalign._src.rules.bidirectional import bdfa_feedback_grad

    h = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    b = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    t = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), 3)
    seen = {}

    def mine(e, hh, bb, tt):
        seen["shapes"] = (e.shape, hh.shape, bb.shape, tt.shape)
        return 2.0 * bb

    def f(bb, fn):
        carrier = fb.dfa_carrier((4, 3))
        hh, carrier = fb.dfa_hidden(h, carrier, bb, feedback_cotangent=fn, targets=t)
        return jnp.sum(hh) + jnp.sum(fb.dfa_output(hh[:, :3], carrier))

    np.testing.assert_allclose(jax.grad(f)(b, mine), 2.0 * b, rtol=1e-6)
    assert seen["shapes"] == ((4, 3), (4, 5), (3, 5), (4, 3))
    # BDFA's function is the gradient of its stated loss (checked against jax.grad of the loss)
    loss = lambda bb: jnp.mean(jnp.sum(1 - jax.nn.sigmoid((t @ bb) * h), axis=1))
    np.testing.assert_allclose(bdfa_feedback_grad(None, h, b, t), jax.grad(loss)(b), rtol=1e-5)
    with pytest.raises(ValueError, match="'zero', 'activity' or a function"):
        fb.dfa_hidden(h, fb.dfa_carrier((4, 3)), b, feedback_cotangent="bdfa", targets=t)


# What each rule's jax.grad form ran before rules built their own Backward: the legacy mode string
# of ``apply(params, x, feedback, mode, **kw)`` (`backward_for_mode`). The reference below.
LEGACY_MODES = {
    "bp": ("bp", {}), "fa": ("fa", {}), "dfa": ("dfa", {}), "usf": ("sign", {}),
    "frsf": ("sign", {}), "brsf": ("sign", {}), "rbp": ("fa", {}), "srbp": ("dfa", {}),
    "arbp": ("kp", {}), "asrbp": ("adfa", {}), "sparse_rbp": ("fa", {}),
    "kbit_rbp": ("fa", {"error_bits": 2}), "nd_rbp": ("fa", {"derivative": False}),
    "kp": ("kp", {}), "wm": ("fa", {}), "bfa": ("fa", {}), "bdfa": ("bdfa", {}),
    "drtp": ("drtp", {}), "shallow": ("shallow", {}),
}
# Rules added after the mode strings went: their grad form is held to their explicit form in
# their own test files (and in test_fa_family's grad == explicit check).
NEWER_GRAD_RULES = {"ia", "sa", "aa", "dyninv", "pal", "mdfa", "hdfa"}
GRAD_RULES = sorted(n for n, s in fb.RULES.items()
                    if isinstance(s.make(), fb.TapeRule) and s.make().backward is not None
                    and n not in NEWER_GRAD_RULES)


def test_every_rule_with_a_backward_has_a_legacy_mode():
    every = {n for n, s in fb.RULES.items()
             if isinstance(s.make(), fb.TapeRule) and s.make().backward is not None}
    assert every == set(LEGACY_MODES) | NEWER_GRAD_RULES


def _legacy_step(model, rule, mode, kw, params, state, x, y, key):
    """The grad form as the legacy mode string ran it: jax.grad of apply(p, x, fb, mode)."""
    extra = {"labels": y} if mode in ("drtp", "bdfa") else {}

    def f(p, fbk):
        return fb.cross_entropy(model.apply(p, x, fbk, mode, **extra, **kw), y)

    feedback = fb.rules.rule_feedback(rule, params, state)
    updates, fb_grads = jax.grad(f, argnums=(0, 1))(params, feedback)
    if rule.advance is None:
        return updates, state
    return rule.advance(params, state, updates, fb_grads, key=key, layers=model.layer_ops())


# LeNet-5 (every rule, both forms, conv compiles) is slow: `pytest -m slow`; the MLP runs in CI,
# and test_conv_explicit holds every rule's two forms to each other on LeNet-5.
@pytest.mark.parametrize("which", ["mlp", pytest.param("lenet5", marks=pytest.mark.slow)])
def test_every_rules_own_backward_equals_its_legacy_mode(which):
    """Each tape rule builds its Backward in its own file (TapeRule.backward); through the
    harness's grad form it gives the updates and next state of its legacy mode string."""
    from fbalign._src.lift import through_primitives

    if which == "mlp":
        model = fb.mlp((6, 7, 5, 3))
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    else:
        model = fb.LeNet5(conv_features=(2, 3), dense_features=(8, 6), num_classes=3)
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 784))
    y = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.PRNGKey(0))
    ctx = fb.rules.StepContext(model, fb.cross_entropy)
    key = jax.random.PRNGKey(5)
    for name in GRAD_RULES:
        rule = fb.get_rule(name)
        mode, kw = LEGACY_MODES[name]
        state = model.init_rule_state(name, jax.random.PRNGKey(2), params) if which == "lenet5" \
            else rule.init(jax.random.PRNGKey(2), params)
        own = through_primitives(rule).step(params, state, fb.rules.Batch(x, y), key, ctx)
        legacy = _legacy_step(model, rule, mode, kw, params, state, x, y, key)
        assert_trees_close(own[:2], legacy, 1e-5, 1e-7)
