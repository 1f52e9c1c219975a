"""Tape rules in their explicit form on LeNet-5: the recorded `Tape` carries the convolutions,
pooling and flattening (`Links`), and the rules' own code sends errors through them.

Two independent implementations must agree: the explicit form walks the tape
(`chain_updates`, `Tape.send_back`, `Tape.weight_grads`), the jax.grad form runs the rule's
`Backward` through custom_vjp primitives. Matmuls run at highest precision so that the checks
hold under TF32 on a GPU too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.rules import Batch, StepContext, explicit, through_primitives

MODEL = fb.LeNet5(conv_features=(2, 3), dense_features=(8, 6), num_classes=3)
X = jax.random.normal(jax.random.PRNGKey(1), (4, 784))
Y = jnp.array([0, 1, 2, 1])
CTX = StepContext(MODEL, fb.cross_entropy)
TAPE_RULES = [n for n in fb.RULES if isinstance(fb.get_rule(n), fb.TapeRule)]
# Explicit forms stated for dense layers only (dynamic inversion has a jax.grad form, which runs
# on LeNet-5; its explicit form inverts dense layers).
DENSE_ONLY = ["bfa", "dni", "cdni", "dyninv", "pal"]
BOTH_FORMS = [n for n in TAPE_RULES if fb.rules.has_grad_form(n) and n not in DENSE_ONLY]


def _params():
    return MODEL.init(jax.random.PRNGKey(0))


def _step(lifted, name, params):
    state = MODEL.init_rule_state(name, jax.random.PRNGKey(2), params)
    with jax.default_matmul_precision("highest"):
        updates, new_state, _ = lifted.step(params, state, Batch(X, Y), jax.random.PRNGKey(5),
                                            CTX)
    return updates, new_state


def test_every_tape_rule_is_either_two_form_or_refused_on_conv_nets():
    assert set(BOTH_FORMS) | set(DENSE_ONLY) == set(TAPE_RULES)


@pytest.mark.parametrize("name", BOTH_FORMS)
def test_explicit_form_equals_grad_form_on_lenet5(name):
    rule, params = fb.get_rule(name), _params()
    got = _step(explicit(rule), name, params)
    want = _step(through_primitives(rule), name, params)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(want[0]))
    assert scale > 0
    # the conv layers' weights learn (their updates are not zero) in both forms; shallow
    # learning's hidden layers do not, by definition
    if name == "shallow":
        assert all(float(jnp.max(jnp.abs(u["w"]))) == 0 for u in got[0][:-1])
    else:
        assert float(jnp.max(jnp.abs(got[0][0]["w"]))) > 0
    assert_trees_close(got, want, 1e-4, 1e-5 * scale)


def test_explicit_backprop_and_fa_with_b_equal_w_are_jax_grad_on_lenet5():
    params = _params()
    with jax.default_matmul_precision("highest"):
        bp = jax.grad(lambda p: fb.cross_entropy(MODEL.apply(p, X), Y))(params)
        out, tape = MODEL.forward(params, X)
        np.testing.assert_allclose(out, MODEL.apply(params, X), rtol=1e-6, atol=1e-6)
        err = jax.grad(lambda o: fb.cross_entropy(o, Y))(out)
        got, _ = fb.backprop().update(params, fb.rules.EmptyState(), tape, err)
        assert_trees_close(got, bp, 1e-5, 1e-7)
        mirror = fb.rules.FeedbackAlignmentState((None,) + tuple(p["w"] for p in params[1:]))
        fa, _ = fb.feedback_alignment().update(params, mirror, tape, err)
        assert_trees_close(fa, bp, 1e-5, 1e-7)
        # random feedback is not backprop below the top layer
        rand = MODEL.init_rule_state("fa", jax.random.PRNGKey(3), params)
        fa_rand, _ = fb.feedback_alignment().update(params, rand, tape, err)
    assert not np.allclose(fa_rand[0]["w"], bp[0]["w"], atol=1e-4)
    np.testing.assert_allclose(fa_rand[-1]["w"], bp[-1]["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", DENSE_ONLY)
def test_dense_only_explicit_forms_refuse_a_conv_tape(name):
    params = _params()
    with pytest.raises(NotImplementedError, match="stated for dense layers"):
        _step(explicit(fb.get_rule(name)), name, params)


def test_lenet_tape_passes_through_jit_and_compiles_once():
    params = _params()
    y, tape = jax.jit(MODEL.forward)(params, X)
    assert not tape.is_dense and tape.links == MODEL.forward(params, X)[1].links
    assert [h.shape for h in tape.hidden] == [(4, 28, 28, 2), (4, 10, 10, 3), (4, 8), (4, 6)]
    assert tape.inputs[2].shape == (4, 75)  # pooled and flattened: what the first dense sees
    traces = []

    @jax.jit
    def upd(p, t):
        traces.append(1)
        return fb.backprop().update(p, fb.rules.EmptyState(), t, t.output)[0]

    upd(params, tape)
    upd(params, MODEL.forward(params, X)[1])
    assert len(traces) == 1


def test_lenet_trains_through_the_harness_in_the_explicit_form():
    import optax

    opt = optax.adam(1e-2)
    st = fb.train.init_train_state(MODEL, "dfa", opt, jax.random.PRNGKey(0))
    step = fb.train.make_train_step(MODEL, "dfa", opt, form="explicit")
    losses = []
    for _ in range(20):
        st, m = step(st, X, Y)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.85 * losses[0]
