"""`fbalign.flax.linen_train_step`: the Linen counterpart of `train_step` (issue 18 item 2), which
also steps the "feedback" kernels of Kolen-Pollack layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbalign.flax import LinenDense, linen_train_step

X = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
Y = jax.nn.one_hot(jnp.arange(16) % 3, 3)


class Net(nn.Module):
    rules: tuple[str, str, str] = ("kp", "fa", "kp")

    @nn.compact
    def __call__(self, x):
        r1, r2, r3 = self.rules
        x = jnp.tanh(LinenDense(8, rule=r1, name="l1")(x))
        x = jnp.tanh(LinenDense(7, rule=r2, name="l2")(x))
        return LinenDense(3, rule=r3, name="out")(x)


def _setup(rules=("kp", "fa", "kp")):
    model = Net(rules)
    variables = model.init(jax.random.PRNGKey(1), X)

    def loss_fn(v, x, y):
        return optax.softmax_cross_entropy(model.apply(v, x), y).mean()

    return model, variables, loss_fn


@pytest.mark.parametrize("jit", [False, True])
def test_kp_layers_shrink_w_minus_b_and_fixed_feedback_stays(jit):
    """Under SGD with the same rate and decay, KP's W - B shrinks by exactly (1 - lr wd) a step
    (Akrout et al. 2019, eqs. 16-17); FA's B does not move; params follow tx."""
    lr, wd = 0.1, 0.05
    _, v, loss_fn = _setup()
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    opt = tx.init(v["params"])
    step = (jax.jit(linen_train_step, static_argnums=(0, 3), static_argnames=())
            if jit else linen_train_step)
    new, opt, loss = step(loss_fn, v, opt, tx, X, Y, feedback_lr=lr, feedback_weight_decay=wd)
    for name in ("l1", "out"):
        w0, b0 = v["params"][name]["kernel"], v["feedback"][name]["kernel"]
        w1, b1 = new["params"][name]["kernel"], new["feedback"][name]["kernel"]
        np.testing.assert_allclose(w1 - b1, (1 - lr * wd) * (w0 - b0), rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(b1 - b0).max()) > 1e-4  # B really moved
    np.testing.assert_array_equal(new["feedback"]["l2"]["kernel"], v["feedback"]["l2"]["kernel"])
    # params: one step of tx on d loss / d params (computed independently)
    g = jax.grad(lambda p: loss_fn({**v, "params": p}, X, Y))(v["params"])
    want = jax.tree.map(lambda p, gp: p - lr * (gp + wd * p), v["params"], g)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, loss_fn(v, X, Y), rtol=1e-6)


def test_kp_b_update_is_the_weights_cotangent():
    """The feedback's step is -lr times W's own gradient (no decay): B1 - B0 == W1 - W0 under
    plain SGD."""
    lr = 0.2
    _, v, loss_fn = _setup()
    tx = optax.sgd(lr)
    new, _, _ = linen_train_step(loss_fn, v, tx.init(v["params"]), tx, X, Y, feedback_lr=lr)
    for name in ("l1", "out"):
        np.testing.assert_allclose(
            new["feedback"][name]["kernel"] - v["feedback"][name]["kernel"],
            new["params"][name]["kernel"] - v["params"][name]["kernel"], rtol=1e-5, atol=1e-7)


def test_learning_feedback_without_feedback_lr_names_the_layers():
    _, v, loss_fn = _setup()
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"l1, out.*feedback_lr"):
        linen_train_step(loss_fn, v, tx.init(v["params"]), tx, X, Y)


def test_fixed_feedback_model_needs_no_feedback_lr_and_keeps_feedback():
    _, v, loss_fn = _setup(("fa", "fa", "bp"))
    tx = optax.adam(1e-2)
    new, _, _ = linen_train_step(loss_fn, v, tx.init(v["params"]), tx, X, Y)
    for a, b in zip(jax.tree.leaves(new["feedback"]), jax.tree.leaves(v["feedback"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_variables_without_params_are_refused():
    _, v, loss_fn = _setup()
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="no 'params'"):
        linen_train_step(loss_fn, {"feedback": v["feedback"]}, None, tx, X, Y)
