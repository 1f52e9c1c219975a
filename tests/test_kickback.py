"""Kickback (Balduzzi, Vanchinathan & Buhmann 2015): a NumPy reference of the update, equality
with backprop for one hidden layer (and for the top two layers of a deeper net), the paper's
coherence result (sign agreement with backprop per example), training in `fit`, and the
networks it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.data import Dataset
from fbalign._src.losses import squared_error
from fbalign._src.rules.kickback import kickback

SIZES = (3, 5, 4, 1)


def _problem(sizes=SIZES, n=6, seed=0, dtype=jnp.float64):
    """A ReLU network, its params (He-scaled weights, non-zero biases) and a batch, drawn with
    NumPy (no RNG kernels to compile)."""
    rng = np.random.default_rng(seed)
    params = [{"w": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2 / a), dtype),
               "b": jnp.asarray(0.05 * np.arange(b), dtype)}
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    x = jnp.asarray(rng.normal(size=(n, sizes[0])), dtype)
    y = jnp.asarray(rng.normal(size=(n, 1)), dtype)
    return fb.mlp(sizes, activation="relu"), params, x, y


def _step(model, params, x, y, loss=squared_error):
    rule = kickback()
    state = rule.init(jax.random.PRNGKey(0), params, model)
    ctx = StepContext(model, loss)  # jitted: one compile is cheaper than many eager ops
    return jax.jit(lambda p, x, y: rule.step(p, state, Batch(x, y), jax.random.PRNGKey(0),
                                             ctx))(params, x, y)


def _backprop(model, params, x, y, loss=squared_error):
    return jax.jit(jax.grad(lambda p, x, y: loss(model.apply(p, x), y)))(params, x, y)


def _numpy_kickback(params, x, y):
    """The paper's update unit by unit and example by example: the global error ``beta = y -
    f(x)``, the kick-back ``tau_j = sum_k w_jk 1_k`` over the units ``k`` that ``j`` feeds
    (``1_k = 1`` for the linear output), ``Delta w_ij = beta tau_j 1_j x_i`` (ascent); returned
    as the batch mean with the gradient's sign."""
    ws = [np.asarray(p["w"]) for p in params]
    bs = [np.asarray(p["b"]) for p in params]
    x, y = np.asarray(x), np.asarray(y)
    num = len(ws)
    out = [{"b": np.zeros_like(b), "w": np.zeros_like(w)} for w, b in zip(ws, bs, strict=True)]
    for xn, yn in zip(x, y, strict=True):
        hs, gates = [xn], []
        for t in range(num):
            a = hs[-1] @ ws[t] + bs[t]
            if t < num - 1:
                gates.append((a > 0).astype(float))
                hs.append(np.maximum(a, 0))
            else:
                gates.append(np.ones_like(a))
                hs.append(a)
        beta = float(yn[0] - hs[-1][0])
        for t in range(num):
            for j in range(ws[t].shape[1]):
                if t == num - 1:
                    credit = beta
                else:
                    tau = sum(ws[t + 1][j, k] * gates[t + 1][k] for k in range(ws[t + 1].shape[1]))
                    credit = beta * tau * gates[t][j]
                out[t]["b"][j] -= credit / len(x)
                for i in range(ws[t].shape[0]):
                    out[t]["w"][i, j] -= credit * hs[t][i] / len(x)
    return out


def test_update_matches_a_numpy_reference_of_the_paper():
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 5, 4, 3, 1))
        updates, _, out = _step(model, params, x, y)
        assert_trees_close(updates, _numpy_kickback(params, x, y), rtol=1e-12, atol=1e-14)
        assert updates[0]["w"].dtype == jnp.float64
        np.testing.assert_allclose(out.metrics["kickback_error"],
                                   np.mean(np.abs(np.asarray(model.apply(params, x) - y))))


def test_one_hidden_layer_is_exactly_backprop_and_deeper_nets_only_at_the_top():
    with jax.enable_x64(True):
        model, params, x, y = _problem((3, 5, 1))
        updates, _, _ = _step(model, params, x, y)
        assert_trees_close(updates, _backprop(model, params, x, y), rtol=1e-12, atol=1e-14)
        model, params, x, y = _problem(SIZES)
        updates, _, _ = _step(model, params, x, y)
        bp = _backprop(model, params, x, y)
        assert_trees_close(updates[1:], bp[1:], rtol=1e-12, atol=1e-14)  # last hidden + output
        assert np.abs(np.asarray(updates[0]["w"] - bp[0]["w"])).max() > 1e-3  # truncated below


def _coherent(params):
    """The paper's coherence for positive units: every connection between units (all weights
    above the first layer) non-negative."""
    return [params[0]] + [{"w": jnp.abs(p["w"]), "b": p["b"]} for p in params[1:]]


def test_coherent_networks_get_updates_with_backprops_signs():
    with jax.enable_x64(True):
        model, params, x, y = _problem(SIZES, n=32)

        def per_example(net):  # the paper's result is per example: batches of one, vmapped
            def one(xn, yn):
                kb = _step(model, net, xn[None], yn[None])[0]
                bp = _backprop(model, net, xn[None], yn[None])
                return [jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)])
                        for t in (kb, bp)]
            return [np.asarray(v) for v in jax.vmap(one)(x, y)]

        kb, bp = per_example(_coherent(params))
        assert np.min(kb * bp) >= 0.0  # every coordinate agrees in sign with the gradient
        moving = np.linalg.norm(bp, axis=1) > 0
        assert moving.sum() > len(x) // 2
        assert np.min(np.sum(kb * bp, axis=1)[moving]) > 0.0
        # the condition is needed: a random network has coordinates of the wrong sign
        kb, bp = per_example(params)
        assert np.min(kb * bp) < 0.0


def test_fit_lowers_the_loss_on_a_tiny_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    data = Dataset("tiny", x, y, x[:0], y[:0], x[:16], y[:16], 0)
    model = fb.mlp((3, 16, 8, 1), activation="relu")
    start = fb.train.init_train_state(model, kickback(), optax.sgd(0.05), jax.random.PRNGKey(0))
    before = fb.train.evaluate(model, start.params, x, y, loss="squared_error")["loss"]
    res = fb.train.fit(model, kickback(), optax.sgd(0.05), data, loss="squared_error", epochs=5,
                       batch_size=16, progress=False, state=start)
    after = fb.train.evaluate(model, res.state.params, x, y, loss="squared_error")["loss"]
    assert after < 0.5 * before
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_protocol_eval_shape_and_vmap_over_seeds_equal_single_runs():
    """The registry conformance (tests/test_protocol.py) with what Kickback needs: a ReLU net
    with one output and scalar regression targets under squared error."""
    model = fb.mlp((5, 7, 6, 1), activation="relu")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
    opt = optax.sgd(0.05)
    init = lambda k: fb.train.init_train_state(model, kickback(), opt, k)  # noqa: E731
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    states = jax.vmap(init)(keys)
    one = jax.tree.map(lambda a: a[0], states)
    shapes = jax.eval_shape(init, keys[0])
    assert jax.tree.structure(shapes) == jax.tree.structure(one)
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(one), strict=True):
        assert s.shape == a.shape and s.dtype == a.dtype
    step = fb.train.make_train_step(model, kickback(), opt, loss="squared_error", jit=False)
    eager, m_eager = jax.jit(step)(one, x, y)  # jitted too: eager op-by-op costs seconds here
    new, m = jax.jit(jax.vmap(step, in_axes=(0, None, None)))(states, x, y)
    assert_trees_close(jax.tree.map(lambda a: a[0], new.params), eager.params, 1e-5, 1e-7)
    np.testing.assert_allclose(m["loss"][0], m_eager["loss"], rtol=1e-6)
    assert not np.allclose(new.params[0]["w"], states.params[0]["w"])
    assert eager.params[0]["w"].dtype == jnp.float32


@pytest.mark.parametrize("network,exc,match", [
    (fb.mlp((3, 4, 1), activation="tanh"), ValueError, "rectifier.*activation='tanh'"),
    (fb.mlp((3, 4, 2), activation="relu"), ValueError, "single output.*2 outputs"),
    (fb.models.from_function(lambda p, x: x @ p, lambda key: jnp.ones((3, 1))), TypeError,
     "kickback.*fbalign.models.mlp"),
])
def test_networks_it_cannot_train_are_refused(network, exc, match):
    rule = kickback()
    with pytest.raises(exc, match=match):
        rule.init(jax.random.PRNGKey(0), None, network)
    with pytest.raises(exc, match=match):
        rule.step(None, None, Batch(jnp.ones((4, 3)), jnp.zeros((4, 1))), jax.random.PRNGKey(0),
                  StepContext(network, squared_error))
