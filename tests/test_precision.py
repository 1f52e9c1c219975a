"""Mixed precision (issue 20 item 2): steps compute in bfloat16, the harness keeps float32
masters of the params, the optimizer state and the rule state."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.precision import mixed_precision, precision_rule
from fbalign.cli import main
from fbalign.data import load_dataset
from fbalign.rules import Batch, LearningRule, StepContext, StepOutput, as_learning_rule
from fbalign.train import fit

KEY = jax.random.PRNGKey(0)


def test_the_step_sees_bfloat16_and_hands_back_float32():
    seen = {}

    def step(params, state, batch, key, context):
        seen["dtypes"] = {a.dtype for a in jax.tree.leaves((params, state, batch.x))}
        upd = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
        new_state = {"b": state["b"] + jnp.asarray(2 ** -6, state["b"].dtype), "n": state["n"]}
        return upd, new_state, StepOutput(jnp.sum(batch.x), batch.x, {"m": jnp.sum(batch.x)})

    spy = mixed_precision(LearningRule(lambda k, p, n: None, step, name="spy"))
    params = {"w": jnp.ones((3, 2))}
    b0 = 1 + 2 ** -12  # not a bfloat16 (8-bit mantissa): a round trip would make it 1
    state = {"b": jnp.full((2,), b0, jnp.float32), "n": jnp.asarray(3, jnp.int32)}
    x = jnp.ones((4, 3))
    upd, new_state, out = spy.step(params, state, Batch(x, jnp.zeros(4, jnp.int32)), KEY, None)
    assert seen["dtypes"] == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}
    assert upd["w"].dtype == jnp.float32 and out.loss.dtype == jnp.float32
    assert out.output.dtype == jnp.float32 and out.metrics["m"].dtype == jnp.float32
    assert new_state["n"].dtype == jnp.int32 and new_state["b"].dtype == jnp.float32
    # the float32 state moves by the step's bfloat16 change, added in float32: its low bits
    # (2**-12) survive, as they would not if the state were stored as bfloat16
    np.testing.assert_array_equal(new_state["b"], np.full(2, b0 + 2 ** -6, np.float32))
    assert spy.name == "spy (bfloat16)"
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: float32, bfloat16"):
        precision_rule(spy, "fp8")


def test_kolen_pollack_under_bfloat16_warns_and_follows_the_float32_step():
    """KP's B learns inside the step, in bfloat16: precision_rule warns (changes below 2**-8 of
    B are lost), and at a rate whose changes bfloat16 resolves the step follows float32's."""
    model = fb.mlp((6, 8, 3))
    params = model.init(KEY)
    rule = as_learning_rule("kp", "explicit", {"learning_rate": 0.5})
    state = rule.init(KEY, params, model)
    x = jax.random.normal(KEY, (16, 6))
    y = jnp.arange(16) % 3
    ctx = StepContext(model, fb.losses.get_loss("cross_entropy"))
    _, want, _ = rule.step(params, state, Batch(x, y), KEY, ctx)
    with pytest.warns(RuntimeWarning, match="'kp' updates its feedback state inside the step"):
        low = precision_rule(rule, "bfloat16")
    _, got, _ = low.step(params, state, Batch(x, y), KEY, ctx)
    moved, want_moved = got.feedback[1] - state.feedback[1], want.feedback[1] - state.feedback[1]
    assert got.feedback[1].dtype == jnp.float32 and float(jnp.max(jnp.abs(want_moved))) > 0
    scale = float(jnp.max(jnp.abs(state.feedback[1])))
    np.testing.assert_allclose(moved, want_moved, atol=2 ** -7 * scale)


def test_bfloat16_training_reaches_the_float32_result_on_digits():
    data = load_dataset("digits")
    model = fb.mlp((64, 64, 10))
    errs, w = {}, {}
    for precision in ("float32", "bfloat16"):
        res = fit(model, "fa", optax.adam(3e-3), data, epochs=5, batch_size=64, progress=False,
                  precision=precision)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(res.state.params))
        errs[precision] = res.history[-1]["test_error"]
        w[precision] = np.asarray(res.state.params[0]["w"])
    assert not np.allclose(w["float32"], w["bfloat16"], atol=1e-4)  # the steps did differ
    assert errs["float32"] < 20  # it learned (chance: 90%)
    assert abs(errs["bfloat16"] - errs["float32"]) < 3.0, errs  # percentage points


def test_cli_precision_is_recorded_and_checked(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--rule", "dfa", "--hidden", "16", "--epochs", "1", "--precision",
                 "bfloat16", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["train", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
