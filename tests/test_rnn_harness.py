"""The RNN in the harness: `fit`, `make_train_step` and `fbalign train --model rnn` train it with
bp, fa, dfa, sign symmetry and the random-backprop variants (through their jax.grad forms), on
images read row by row; other rules are refused with the reason."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.cli import main
from fbalign.rules import Batch, FeedbackAlignmentState, StepContext, as_learning_rule


def test_the_issues_example_trains_and_fa_with_b_equal_w_is_bptt():
    model = fb.rnn(3, 8, 2)
    opt = optax.sgd(0.1)
    xs = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 3))
    ys = jax.random.normal(jax.random.PRNGKey(1), (5, 4, 2))
    step = fb.train.make_train_step(model, "fa", opt, "squared_error", form="grad")
    state = fb.train.init_train_state(model, "fa", opt, jax.random.PRNGKey(2))
    assert set(state.rule_state.feedback) == {"w_rec", "w_out"}
    params, rule_state = jax.tree.map(jnp.copy, (state.params, state.rule_state))
    new, m = step(state, xs, ys)  # (donates state)
    assert np.isfinite(float(m["loss"]))
    assert not np.allclose(new.params["w_in"], params["w_in"])
    # The harness's FA step with B = W is backprop through time, and with random B it is not.
    ctx = StepContext(model, fb.squared_error)
    rule = as_learning_rule("fa", "grad")
    same = FeedbackAlignmentState({"w_rec": params["w_rec"], "w_out": params["w_out"]})
    got = rule.step(params, same, Batch(xs, ys), None, ctx)[0]
    bptt = jax.grad(lambda p: fb.squared_error(model.apply(p, xs), ys))(params)
    assert_trees_close(got, bptt, 1e-5, 1e-6)
    rand = rule.step(params, rule_state, Batch(xs, ys), None, ctx)[0]
    assert not np.allclose(rand["w_in"], bptt["w_in"], atol=1e-4)


def test_batch_major_flat_inputs_and_last_step_readout():
    tm = fb.rnn(4, 6, 3)
    bm = fb.rnn(4, 6, 3, time_major=False, readout="last")
    params = tm.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 16))  # 5 images of 4 rows of 4
    want = tm.apply(params, jnp.swapaxes(x.reshape(5, 4, 4), 0, 1))[-1]
    np.testing.assert_allclose(bm.apply(params, x), want, rtol=1e-6)
    np.testing.assert_allclose(bm.apply(params, x.reshape(5, 4, 4)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="readout"):
        fb.rnn(4, 6, 3, readout="mean")
    with pytest.raises(ValueError, match=r"\(batch, T \* 4\)"):
        bm.apply(params, jnp.ones((5, 3, 4, 4)))


def test_fit_trains_the_rnn_on_digits_rows():
    data = fb.data.load_dataset("digits")
    model = fb.rnn(8, 64, 10, time_major=False, readout="last")
    res = fb.train.fit(model, "bp", optax.adam(3e-3), data, epochs=3, batch_size=32,
                       progress=False)
    assert res.history[-1]["test_error"] < 30.0  # chance: 90%


def test_rules_the_rnn_cannot_run_are_named():
    model = fb.rnn(3, 8, 2)
    params = model.init(jax.random.PRNGKey(0))
    for rule, why in (("kp", "layer by layer"), ("asrbp", "layer by layer"),
                      ("brsf", "layer by layer"), ("bfa", "only its explicit form records"),
                      ("dni", "no jax.grad form"),
                      ("drtp", "every step of a sequence"), ("pc", "layered feedforward network")):
        with pytest.raises(ValueError, match=f"'{rule}' does not run on the RNN.*{why}"):
            model.init_rule_state(rule, jax.random.PRNGKey(0), params)


def _rnn_step(rule, state, params, model, xs, ys):
    ctx = StepContext(model, fb.squared_error)
    return as_learning_rule(rule, "grad").step(params, state, Batch(xs, ys), None, ctx)[0]


def test_every_rnn_rule_draws_its_state_with_its_own_init_and_equals_fa_or_dfa():
    """The RNN sizes every rule's feedback by that rule's own ``init`` on the unrolled chain (no
    rule is drawn by name). Each rule's step then equals FA's (``B`` for ``w_rec``, ``w_out``)
    or DFA's (one ``(dout, H)`` matrix per step) with the feedback the rule says it uses:
    ``sign(W) * M`` for sign symmetry, its own random (sparse, quantised-error) matrices for
    the random-backprop variants."""
    model = fb.rnn(3, 8, 2)
    params = model.init(jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
    ys = jax.random.normal(jax.random.PRNGKey(2), (4, 5, 2))
    from fbalign._src.recurrent import RNN_RULES
    from fbalign.rules import DirectFeedbackAlignmentState

    for name in RNN_RULES:
        state = model.init_rule_state(name, jax.random.PRNGKey(3), params)
        got = _rnn_step(name, state, params, model, xs, ys)
        if name == "bp":
            want = jax.grad(lambda p: fb.squared_error(model.apply(p, xs), ys))(params)
        elif name in ("dfa", "srbp"):
            assert state.feedback["h"].shape == (2, 8)
            want = _rnn_step("dfa", DirectFeedbackAlignmentState(state.feedback), params, model,
                             xs, ys)
        elif name in ("usf", "frsf"):
            fa = {k: jnp.sign(params[k]) * m for k, m in state.feedback.items()}
            want = _rnn_step("fa", FeedbackAlignmentState(fa), params, model, xs, ys)
        else:  # rbp, sparse_rbp (its B sparse), kbit_rbp, nd_rbp: FA through their own B
            assert {k: v.shape for k, v in state.feedback.items()} == {"w_rec": (8, 8),
                                                                       "w_out": (8, 2)}
            if name in ("kbit_rbp", "nd_rbp"):
                assert not np.allclose(got["w_in"], _rnn_step(
                    "fa", FeedbackAlignmentState(state.feedback), params, model, xs, ys)["w_in"])
                continue  # quantised or derivative-free: FA's step differs, as it should
            want = _rnn_step("fa", FeedbackAlignmentState(state.feedback), params, model, xs, ys)
        assert_trees_close(got, want, 1e-5, 1e-6)


def test_cli_trains_model_rnn_and_refuses_other_rules(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "rnn", "--rule", "dfa", "--hidden", "16", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "rnn"
    assert "dfa on digits: test error" in capsys.readouterr().out
    for argv, msg in ((["--rule", "kp"], "'kp' does not run on the RNN: its feedback changes"),
                      (["--rule", "ff"], "--rule ff trains --model mlp, not rnn"),
                      (["--rule", "dfa", "--hidden", "16,16"], "one hidden layer")):
        assert main(["train", "--model", "rnn", "--epochs", "1", "--out",
                     str(tmp_path / "x"), *argv]) == 2
        assert msg in capsys.readouterr().err


def test_sparse_direct_feedback_on_the_rnn_is_dfa_through_a_sparse_matrix():
    """Han et al. 2020's RNN case ("sparse backward weight ... in a form of sparse matrix
    multiplication"): sparse SRBP (skip=True) with k nonzeros per hidden unit gives the RNN one
    (dout, H) feedback matrix with exactly k nonzeros in each hidden unit's column, and its step
    is the RNN's DFA step through that matrix (zeros included) at every time step."""
    model = fb.rnn(3, 8, 4)
    params = model.init(jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
    ys = jax.random.normal(jax.random.PRNGKey(2), (4, 5, 4))
    from fbalign.rules import DirectFeedbackAlignmentState, sparse_random_backprop

    for k in (1, 2):
        rule = sparse_random_backprop(skip=True, nonzeros=k)
        state = model.init_rule_state(rule, jax.random.PRNGKey(3), params)
        b = np.asarray(state.feedback["h"])
        assert b.shape == (4, 8) and ((b != 0).sum(axis=0) == k).all()
        ctx = StepContext(model, fb.squared_error)
        got = as_learning_rule(rule, "grad").step(params, state, Batch(xs, ys), None, ctx)[0]
        want = _rnn_step("dfa", DirectFeedbackAlignmentState(state.feedback), params, model,
                         xs, ys)
        assert_trees_close(got, want, 1e-5, 1e-6)
        dense = _rnn_step("dfa", DirectFeedbackAlignmentState(
            {"h": jax.random.normal(jax.random.PRNGKey(3), b.shape)}), params, model, xs, ys)
        assert not np.allclose(got["w_in"], dense["w_in"])
