"""The RNN in the harness: `fit`, `make_train_step` and `fbalign train --model rnn` train it with
bp, fa and dfa (through their jax.grad forms), on images read row by row."""

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
    for rule in ("kp", "usf", fb.get_rule("fa")):
        with pytest.raises(ValueError, match="does not run on the RNN.*bp, fa, dfa"):
            model.init_rule_state(rule, jax.random.PRNGKey(0), params)


def test_cli_trains_model_rnn_and_refuses_other_rules(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "rnn", "--rule", "dfa", "--hidden", "16", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "rnn"
    assert "dfa on digits: test error" in capsys.readouterr().out
    for argv in (["--rule", "kp"], ["--rule", "dfa", "--hidden", "16,16"]):
        assert main(["train", "--model", "rnn", "--epochs", "1", "--out",
                     str(tmp_path / "x"), *argv]) == 2
    assert "needs a layered feedforward" in capsys.readouterr().err
