"""Forward-forward (Hinton 2022): goodness, per-layer loss, label embedding and negative labels
equal a NumPy reference written from the paper; negative labels are never the true one and are
uniform over the others; each layer's update is the finite-difference gradient of its own loss
and ignores the layers above; prediction by accumulated goodness equals a NumPy reference; fit
improves accuracy; bad options and networks raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy
from fbalign._src.rules.forward_forward import (
    forward_forward,
    forward_forward_goodness,
    forward_forward_predict,
    sample_negative_labels,
)
from fbalign.data import load_teacher
from fbalign.train import fit

SIZES = (7, 6, 5, 4, 3)  # three FF layers and a 3-class readout
THETA = 1.5


# ---------------------------------------------------------------- NumPy reference (the paper)

def np_embed(x, labels, k):
    x = np.array(x, np.float64)
    x[:, :k] = np.eye(k)[labels]
    return x


def np_softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def np_activities(params, x):
    """h_1 = relu(x W_1 + b_1), h_{k+1} = relu(h_k/|h_k| W_{k+1} + b_{k+1}) over the FF layers."""
    hs, h = [], x
    for k, layer in enumerate(params):
        inp = h if k == 0 else h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-8)
        h = np.maximum(inp @ np.asarray(layer["w"], np.float64)
                       + np.asarray(layer["b"], np.float64), 0)
        hs.append(h)
    return hs


def np_layer_loss(h_pos, h_neg, theta=THETA):
    g_pos, g_neg = (h_pos ** 2).sum(1), (h_neg ** 2).sum(1)
    return np.mean(np_softplus(-(g_pos - theta)) + np_softplus(g_neg - theta))


def np_scores(params, x, k, skip_first=True, mean=False):
    out = np.zeros((len(x), k))
    for c in range(k):
        hs = np_activities(params[:-1], np_embed(x, np.full(len(x), c), k))
        g = [(h ** 2).mean(1) if mean else (h ** 2).sum(1) for h in hs]
        out[:, c] = sum(g[1 if skip_first else 0:])
    return out


# ---------------------------------------------------------------- helpers

def _problem(dtype=jnp.float32, seed=0, batch=12):
    """A ReLU MLP with NumPy-drawn params and data (eager JAX draws would each compile)."""
    model = fb.mlp(SIZES, activation="relu")
    rng = np.random.default_rng(seed)
    params = [{"w": jnp.asarray(rng.normal(size=(i, o)) * np.sqrt(2 / i), dtype),
               "b": jnp.asarray(0.1 * rng.normal(size=o), dtype)}
              for i, o in zip(SIZES[:-1], SIZES[1:], strict=True)]
    x = jnp.asarray(rng.normal(size=(batch, SIZES[0])), dtype)
    y = jnp.asarray(np.arange(batch) % SIZES[-1])
    return model, params, x, y


_JITTED: dict = {}
KEY = jax.random.PRNGKey(3)


def _step(rule, model, params, x, y):
    """The rule's step (state: the `EmptyState`), jitted once per rule and model."""
    if (rule, model) not in _JITTED:
        _JITTED[rule, model] = jax.jit(lambda p, x, y: rule.step(
            p, rule.init(KEY, p, model), Batch(x, y), KEY, StepContext(model, cross_entropy)))
    return _JITTED[rule, model](params, x, y)


def _fd(fn, arr, eps=1e-6):
    arr = np.array(arr, np.float64)
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        up, dn = arr.copy(), arr.copy()
        up[idx] += eps
        dn[idx] -= eps
        g[idx] = (fn(up) - fn(dn)) / (2 * eps)
    return g


# ---------------------------------------------------------------- tests

def test_negative_labels_are_wrong_and_uniform_over_the_others():
    k, n = 5, 20000
    y = jnp.asarray(np.arange(n) % k)
    neg = np.asarray(jax.jit(sample_negative_labels, static_argnums=2)(KEY, y, k))
    assert neg.dtype == np.asarray(y).dtype and neg.min() >= 0 and neg.max() < k
    assert not np.any(neg == np.asarray(y))  # never the true label, in 20000 draws
    # Uniform over the k - 1 others: each (true, wrong) pair has probability 1/(k(k-1)).
    counts = np.zeros((k, k))
    np.add.at(counts, (np.asarray(y), neg), 1)
    expected = n / (k * (k - 1))
    off = counts[~np.eye(k, dtype=bool)]
    chi2 = np.sum((off - expected) ** 2 / expected)
    assert chi2 < 50  # 19 degrees of freedom: p(chi2 > 50) < 2e-4
    # A second key gives other draws (the step's key reaches the sampler).
    assert np.mean(np.asarray(sample_negative_labels(jax.random.PRNGKey(4), y, k)) != neg) > 0.5


def test_loss_and_updates_match_numpy_and_finite_differences():
    with jax.enable_x64(True):
        model, params, x, y = _problem(jnp.float64)
        rule = forward_forward(threshold=THETA)
        updates, _, out = _step(rule, model, params, x, y)
        k = SIZES[-1]
        neg = np.asarray(sample_negative_labels(KEY, y, k))  # the draw the step made
        x_pos, x_neg = np_embed(x, np.asarray(y), k), np_embed(x, neg, k)
        np.testing.assert_array_equal(x_pos[:, k:], np.asarray(x)[:, k:])
        hid = [{n: np.asarray(a) for n, a in p.items()} for p in params[:-1]]
        hp, hn = np_activities(hid, x_pos), np_activities(hid, x_neg)
        want = sum(np_layer_loss(a, b) for a, b in zip(hp, hn, strict=True))
        np.testing.assert_allclose(out.loss, want, rtol=1e-10)
        np.testing.assert_allclose(out.metrics["ff_goodness_pos"],
                                   np.mean([(h ** 2).sum(1) for h in hp]), rtol=1e-10)
        for i in range(len(hid)):
            def local(w, b, i=i):
                layers = [*hid[:i], {"w": w, "b": b}]
                return np_layer_loss(np_activities(layers, x_pos)[i],
                                     np_activities(layers, x_neg)[i])

            w, b = hid[i]["w"], hid[i]["b"]
            np.testing.assert_allclose(updates[i]["w"], _fd(lambda v, b=b: local(v, b), w),
                                       atol=1e-7)
            np.testing.assert_allclose(updates[i]["b"], _fd(lambda v, w=w: local(w, v), b),
                                       atol=1e-7)
        # The readout: cross-entropy on the normalised top activity for the neutral label.
        x_neu = np.array(x, np.float64)
        x_neu[:, :k] = 1.0 / k
        top = np_activities(hid, x_neu)[-1]
        z = top / (np.linalg.norm(top, axis=1, keepdims=True) + 1e-8)
        onehot = np.eye(k)[np.asarray(y)]

        def readout(w):
            logits = z @ w + np.asarray(params[-1]["b"])
            logits = logits - logits.max(1, keepdims=True)
            return -np.mean(np.sum(onehot * (logits - np.log(np.exp(logits).sum(1,
                                                                               keepdims=True))), 1))

        np.testing.assert_allclose(updates[-1]["w"], _fd(readout, np.asarray(params[-1]["w"])),
                                   atol=1e-7)
        np.testing.assert_allclose(out.metrics["ff_readout_loss"],
                                   readout(np.asarray(params[-1]["w"])), rtol=1e-10)
        # The harness's output: per-class accumulated goodness, all but the first layer.
        np.testing.assert_allclose(out.output, np_scores(params, np.asarray(x), k), rtol=1e-10)


def test_no_gradient_crosses_a_layer():
    model, params, x, y = _problem()
    rule = forward_forward(threshold=THETA)
    base, _, _ = _step(rule, model, params, x, y)
    for layer in range(3):
        p2 = [dict(p) if i <= layer else {n: 2 * np.asarray(a) + 0.5 for n, a in p.items()}
              for i, p in enumerate(params)]
        got, _, _ = _step(rule, model, p2, x, y)
        assert_trees_close(got[:layer + 1], base[:layer + 1], rtol=0, atol=0)
        assert not np.allclose(got[layer + 1]["w"], base[layer + 1]["w"])


@pytest.mark.parametrize("skip_first", [True, False])
def test_prediction_by_goodness_matches_numpy(skip_first):
    model, params, x, _ = _problem(seed=2, batch=40)
    k = SIZES[-1]
    want = np_scores(params, np.asarray(x), k, skip_first)
    got = forward_forward_goodness(model, params, x, k, skip_first_layer=skip_first)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    pred = np.asarray(forward_forward_predict(model, params, x, k, skip_first_layer=skip_first))
    np.testing.assert_array_equal(pred, want.argmax(1))
    # The two choices differ on this draw, so the option is honoured.
    other = np_scores(params, np.asarray(x), k, not skip_first).argmax(1)
    assert np.any(other != pred)


def test_fit_improves_goodness_accuracy():
    data = load_teacher(seed=1, n_train=256, n_test=256, input_dim=12, hidden=16, output_dim=3)
    model = fb.mlp((12, 32, 32, 3), activation="relu")
    res = fit(model, forward_forward(skip_first_layer=True), optax.adam(1e-2), data, epochs=4,
              batch_size=32, progress=False, log_every=8)
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["train_accuracy"] > first["train_accuracy"] + 0.1
    pred = forward_forward_predict(model, res.state.params, jnp.asarray(data.x_test), 3,
                                   skip_first_layer=True)
    accuracy = np.mean(np.asarray(pred) == data.y_test)
    assert accuracy > 0.55  # chance: 1/3
    # fit's test error is the goodness prediction's (the rule's predict), not network.apply's.
    np.testing.assert_allclose(last["test_error"], 100 * (1 - accuracy), atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": "2"}, "threshold must be a finite number"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2 or None"),
    ({"negative": "hybrid"}, "unknown negative 'hybrid'; valid: random_label"),
    ({"skip_first_layer": 1}, "skip_first_layer must be True, False or None"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward_forward(**kwargs)


def test_networks_it_cannot_train_are_refused():
    key = jax.random.PRNGKey(0)
    rule = forward_forward()
    with pytest.raises(TypeError, match="forward_forward.*dense fbalign.models.mlp"):
        rule.init(key, None, fb.lenet5())
    with pytest.raises(TypeError, match="needs ReLU hidden layers.*activation='tanh'"):
        rule.init(key, None, fb.mlp((7, 5, 5, 3)))
    with pytest.raises(ValueError, match="skip_first_layer=True.*only one"):
        forward_forward(skip_first_layer=True).init(key, None, fb.mlp((7, 5, 3),
                                                                      activation="relu"))
    rule.init(key, None, fb.mlp((7, 5, 3), activation="relu"))  # auto: all layers score
    forward_forward(skip_first_layer=False).init(key, None, fb.mlp((7, 5, 3), activation="relu"))
    with pytest.raises(ValueError, match="num_classes=9.*\\[2, 7\\]"):
        forward_forward(num_classes=9).init(key, None, fb.mlp((7, 5, 5, 3), activation="relu"))
    model, params, x, _ = _problem()
    with pytest.raises(ValueError, match="needs integer class labels"):
        rule.step(params, rule.init(key, params, model), Batch(x, jnp.zeros((12, 3))), key,
                  StepContext(model, cross_entropy))


def test_mean_goodness_is_the_sum_over_the_width():
    """``goodness_measure="mean"`` (the PyTorch reference's) scores every label by the sum over
    layers of mean squared activities: the sum's scores divided by the layer widths."""
    model, params, x, _ = _problem(seed=3, batch=16)
    k = SIZES[-1]
    for skip in (True, False):
        got = forward_forward_goodness(model, params, x, k, skip, measure="mean")
        want = np_scores(params, np.asarray(x), k, skip, mean=True)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown goodness_measure 'max'; valid: sum, mean"):
        forward_forward(goodness_measure="max")
