"""Issue 18 item 5: the adapters' default feedback is of each kernel's own scale, so converted
layers send errors of backprop's magnitude; `compare_to_backprop` measures it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fbalign.flax as ff
from fbalign._src.feedback_init import glorot_std, matched_feedback


class CNN(nnx.Module):
    """Flax's MNIST example, shrunk: conv, relu, avg-pool (twice), dense 128 -> dense 10."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(32 * 2 * 2, 128, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = self.pool(nnx.relu(self.conv1(x)))
        x = self.pool(nnx.relu(self.conv2(x)))
        x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
        return self.linear2(x)


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batch():
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 8, 8, 1))
    y = jax.random.randint(jax.random.PRNGKey(1), (32,), 0, 10)
    return x, y


def test_matched_feedback_has_the_kernels_rms_and_glorot_for_a_zero_kernel():
    w = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (200, 150))
    b = matched_feedback(jax.random.PRNGKey(1), w)
    assert b.shape == w.shape and b.dtype == w.dtype
    np.testing.assert_allclose(float(jnp.std(b)), float(jnp.sqrt(jnp.mean(w**2))), rtol=0.01)
    assert abs(float(jnp.corrcoef(b.ravel(), w.ravel())[0, 1])) < 0.01  # drawn, not copied
    z = matched_feedback(jax.random.PRNGKey(1), jnp.zeros((200, 150), jnp.bfloat16))
    assert z.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(jnp.std(z.astype(jnp.float32))), glorot_std((200, 150)),
                               rtol=0.02)


def test_default_feedback_keeps_errors_at_backprops_scale_where_fan_out_blew_them_up():
    x, y = _batch()
    base = CNN(nnx.Rngs(0))
    matched = ff.compare_to_backprop(ff.convert(base, "fa", rngs=nnx.Rngs(1)), _loss, x, y)
    old = ff.compare_to_backprop(
        ff.convert(base, "fa", rngs=nnx.Rngs(1), feedback_init=ff.fan_out_feedback_init),
        _loss, x, y)
    r_new, r_old = matched.ratios(), old.ratios()
    assert set(r_new) == {f"{n}/kernel" for n in ("conv1", "conv2", "linear1", "linear2")}
    # the output layer sees the true error under any feedback
    assert r_new["linear2/kernel"] == pytest.approx(1.0, rel=1e-5)
    # hidden errors, measured: 0.4-2.6 with the kernels' own scale (1.0 for linear1; the small
    # convs' ratios vary from seed to seed), 1.8-5.9 with std 1/sqrt(fan_out); on Flax's full
    # MNIST example 0.97-1.06 against 4.9-18 (README)
    hidden = ("conv1", "conv2", "linear1")
    for name in hidden:
        assert 0.3 < r_new[f"{name}/kernel"] < 2.0, matched
    assert 0.8 < r_new["linear1/kernel"] < 1.25 and r_old["linear1/kernel"] > 3, (matched, old)
    assert np.mean([r_old[f"{n}/kernel"] for n in hidden]) > 2 * np.mean(
        [r_new[f"{n}/kernel"] for n in hidden]), (matched, old)
    assert "linear1/kernel" in str(matched)


def test_convert_matches_the_feedback_to_the_kernel_it_takes_over():
    base = CNN(nnx.Rngs(0))
    base.linear1.kernel[...] = 10.0 * base.linear1.kernel[...]  # not what Linear would draw
    model = ff.convert(base, "fa", rngs=nnx.Rngs(1))
    for layer, ref in ((model.linear1, base.linear1), (model.conv2, base.conv2)):
        rms = float(jnp.sqrt(jnp.mean(ref.kernel[...] ** 2)))
        np.testing.assert_allclose(float(jnp.std(layer.feedback[...])), rms, rtol=0.05)


def test_compare_to_backprop_is_exact_when_the_feedback_is_the_weight():
    x, y = _batch()
    model = ff.convert(CNN(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(1))
    for layer in (model.conv1, model.conv2, model.linear1, model.linear2):
        layer.feedback[...] = layer.kernel[...]
    report = ff.compare_to_backprop(model, _loss, x, y)
    for _, ratio, angle in report.rows:
        assert ratio == pytest.approx(1.0, rel=1e-4) and angle < 0.1
    # the model itself is left as it was (the reference is a clone)
    assert model.linear1.rule == "fa"


def test_compare_to_backprop_on_a_direct_feedback_model_uses_the_original_gradients():
    x, y = _batch()
    base = CNN(nnx.Rngs(0))
    model = ff.convert(base, "dfa", rngs=nnx.Rngs(1), sample_input=x[:2])
    report = ff.compare_to_backprop(model, _loss, x, y)
    grad = nnx.jit(nnx.grad(_loss))
    bp, dfa = grad(base, x, y), grad(model, x, y)
    for path, ratio, _ in report.rows:
        layer = path.split("/")[-2]
        want = (jnp.linalg.norm(getattr(dfa.model, layer).kernel[...])
                / jnp.linalg.norm(getattr(bp, layer).kernel[...]))
        assert ratio == pytest.approx(float(want), rel=1e-4), path
    assert model.rule == "dfa"
