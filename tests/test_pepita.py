"""PEPITA (Dellaferrera & Kreiman 2022): one step equals a NumPy transcription of the paper's
Algorithm 1 (in the paper's orientation and sign: W <- W - eta dW), F is drawn as the paper says
and never moves, and fit learns a small task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.rules.pepita import pepita


def _np_relu(a):
    return np.maximum(a, 0.0)


def _np_softmax(a):
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_algorithm1(ws, bs, f_mat, x, target, eta, out_fn):
    """Algorithm 1 with the paper's layout: ``w_l`` is ``(out, in)``, ``h_l = relu(w_l h_{l-1})``,
    output ``out_fn(w_L h_{L-1})``; F is ``(input, output)``. Returns the weights after one
    step ``W_l <- W_l - eta dW_l`` (biases: the same rule with a constant input 1)."""
    def forward(inp):
        hs = [inp]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            a = hs[-1] @ w.T + b
            hs.append(out_fn(a) if i == len(ws) - 1 else _np_relu(a))
        return hs

    n = len(x)
    hs = forward(x)
    e = hs[-1] - target                      # e = y - target
    x_mod = x + e @ f_mat.T                  # h_0^mod = x + F e
    hm = forward(x_mod)
    e_mod = hm[-1] - target
    new_w, new_b = [], []
    for i in range(len(ws)):
        last = i == len(ws) - 1
        delta = e_mod if last else hs[i + 1] - hm[i + 1]   # (h_l - h_l^mod) or e^mod
        dw = delta.T @ hm[i] / n                             # dW_l = delta (x h_{l-1}^mod)^T
        new_w.append(ws[i] - eta * dw)
        new_b.append(bs[i] - eta * delta.mean(0))
    return new_w, new_b


@pytest.mark.parametrize("loss_name", ["cross_entropy", "squared_error"])
def test_one_step_equals_a_numpy_transcription_of_algorithm_1(loss_name):
    with jax.enable_x64(True):
        sizes, n, eta = (7, 6, 5, 4), 9, 0.3
        model = fb.mlp(sizes, activation="relu")
        params = model.init(jax.random.PRNGKey(0), jnp.float64)
        # nonzero biases, so that the bias rule is checked too
        params = [{"w": p["w"], "b": 0.1 * jnp.arange(len(p["b"]), dtype=jnp.float64)}
                  for p in params]
        x = jax.random.uniform(jax.random.PRNGKey(1), (n, sizes[0]), jnp.float64)
        labels = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, sizes[-1])
        # a large F, so that the two passes differ clearly (and relu units switch)
        rule = pepita(feedback_scale=3.0)
        state = rule.init(jax.random.PRNGKey(3), params, model)
        loss = getattr(fb, loss_name)
        opt = optax.sgd(eta)

        @jax.jit
        def step(params):
            updates, new_state, out = rule.step(params, state, Batch(x, labels), None,
                                                StepContext(model, loss))
            moves, _ = opt.update(updates, opt.init(params), params)
            return optax.apply_updates(params, moves), new_state, out

        new_params, new_state, out = step(params)
        want_loss = loss(model.apply(params, x), labels)
    target = np.eye(sizes[-1])[np.asarray(labels)]
    out_fn = _np_softmax if loss_name == "cross_entropy" else (lambda a: a)
    want_w, want_b = _np_algorithm1([np.asarray(p["w"]).T for p in params],
                                    [np.asarray(p["b"]) for p in params],
                                    np.asarray(state.feedback), np.asarray(x), target, eta,
                                    out_fn)
    for p, w, b in zip(new_params, want_w, want_b, strict=True):
        np.testing.assert_allclose(np.asarray(p["w"]).T, w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(p["b"]), b, rtol=1e-10, atol=1e-12)
    assert new_state.feedback is state.feedback or np.array_equal(new_state.feedback,
                                                                  state.feedback)
    assert float(out.metrics["pepita_input_change"]) > 0.05  # the modulation is not negligible
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-12)


def test_feedback_is_drawn_as_the_paper_says():
    model = fb.mlp((400, 8, 10))
    params = [{"w": jnp.zeros((400, 8))}, {"w": jnp.zeros((8, 10))}]  # init reads the dtype
    f_mat = np.asarray(pepita().init(jax.random.PRNGKey(1), params, model).feedback)
    bound = 0.05 * np.sqrt(6 / 400)  # U[-1, 1] * 0.05 * sqrt(6 / d_in)
    assert f_mat.shape == (400, 10) and f_mat.dtype == np.float32
    assert np.abs(f_mat).max() <= bound and np.abs(f_mat).max() > 0.99 * bound
    # uniform: variance bound^2 / 3 (4000 draws: the sample variance is within ~3 % of it)
    np.testing.assert_allclose(f_mat.var(), bound**2 / 3, rtol=0.1)
    assert abs(f_mat.mean()) < 4 * bound / np.sqrt(3 * f_mat.size)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        assert pepita().init(jax.random.PRNGKey(1), p64, model).feedback.dtype == jnp.float64


def test_fit_improves_accuracy_and_never_moves_f():
    full = fb.data.load_dataset("digits")
    data = full._replace(x_train=full.x_train[:640], y_train=full.y_train[:640],
                         x_test=full.x_test[:200], y_test=full.y_test[:200])
    model, rule, opt = fb.mlp((64, 32, 10), activation="relu"), pepita(), optax.sgd(0.05, 0.9)
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    f0 = np.array(state.rule_state.feedback)
    before = fb.train.evaluate(model, state.params, data.x_test, data.y_test)
    res = fb.train.fit(model, rule, opt, data, epochs=3, batch_size=32, state=state,
                       progress=False)
    after = res.history[-1]
    assert after["test_accuracy"] > before["accuracy"] + 0.4, (before, after)
    assert after["test_loss"] < 0.5 * before["loss"]
    np.testing.assert_array_equal(np.asarray(res.state.rule_state.feedback), f0)


def test_bad_options_and_networks_are_refused():
    for bad in (0.0, -0.05, True, "0.05"):
        with pytest.raises(ValueError, match="feedback_scale"):
            pepita(feedback_scale=bad)
    with pytest.raises(TypeError, match="dense fbalign.models.mlp"):
        pepita().init(jax.random.PRNGKey(0), [], object())
