"""Dynamic inversion (Podlaski & Machens 2020): the Euler dynamics against NumPy, the fixed point
against the closed-form (pseudo-)inverse on a linear network, the stability check and its
warning, the jax.grad form, and training on a small task."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.lift import explicit, through_primitives
from fbalign._src.rules.dynamic_inversion import (
    DynamicInversionState,
    check_stability,
    dynamic_inversion,
    invert,
)
from fbalign.rules import Batch, StepContext

RNG = np.random.default_rng(0)


def test_euler_steps_match_numpy():
    """u_0 = 0, u_{k+1} = u_k + dt (-alpha u_k + delta - u_k B^T W), delta_h = u_T B^T."""
    delta, w, b = RNG.normal(size=(5, 3)), RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    alpha, dt, steps = 0.7, 0.15, 4
    u = np.zeros_like(delta)
    for _ in range(steps):
        u = u + dt * (-alpha * u + delta - (u @ b.T) @ w)
    got = invert(jnp.asarray(delta, jnp.float32), jnp.asarray(w, jnp.float32),
                 jnp.asarray(b, jnp.float32), alpha, steps, dt)
    np.testing.assert_allclose(got, u @ b.T, rtol=1e-5, atol=1e-6)


def test_a_diverging_euler_iteration_gives_nan_instead_of_a_huge_error():
    """The flow is stable (B^T W = 25 I, eigenvalues 25 + alpha > 0) but at dt 0.2 the Euler map
    I - dt (alpha I + B^T W) has radius 4.2: the inverted error is NaN, so training stops at its
    non-finite check (podlaski2020 at the default dt got errors 6e4x backprop's, silently). At
    dt 0.02 (radius 0.48) the same layer converges to the closed form."""
    w = b = 5.0 * jnp.eye(3)
    delta = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    assert bool(jnp.isnan(invert(delta, w, b, 1.0, 50, 0.2)).all())
    fixed = np.asarray(delta) @ np.linalg.inv(np.eye(3) + 25.0 * np.eye(3)) @ np.asarray(b).T
    np.testing.assert_allclose(invert(delta, w, b, 1.0, 50, 0.02), fixed, rtol=1e-4)
    # the same layer in a network: the rule's explicit update of the layer below is NaN
    net = fb.mlp((3, 3, 3), activation="linear")
    params = net.init(jax.random.PRNGKey(0))
    params[1]["w"] = w
    rule = dynamic_inversion(alpha=1.0, dt=0.2, warn=False)
    state = rule.init(jax.random.PRNGKey(2), params)
    state = state._replace(feedback=(None, b))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    _, tape = net.forward(params, x)
    updates, _ = rule.update(params, state, tape, delta)
    assert bool(jnp.isnan(updates[0]["w"]).all()) and not bool(jnp.isnan(updates[1]["w"]).any())


def _linear_setup(w1, seed=0):
    """A linear (4, 6, 3) MLP whose second layer is ``w1`` (6, 3): contracting, full rank."""
    net = fb.mlp((4, 6, 3), activation="linear")
    params = net.init(jax.random.PRNGKey(seed))
    params[1]["w"] = jnp.asarray(w1, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (8, 4))
    labels = jnp.arange(8) % 3
    y, tape = net.forward(params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, labels))(y)
    return net, params, x, labels, tape, err


def test_fixed_point_is_the_pseudo_inverse_on_a_linear_network():
    """With B = W and alpha = 0 the hidden error converges to delta W^+ (NumPy pinv), whose
    forward image is the output error itself; with random B and alpha > 0 to the closed form
    delta (alpha I + B^T W)^{-1} B^T."""
    w1 = np.linalg.qr(RNG.normal(size=(6, 3)))[0] * np.array([1.0, 0.8, 0.6])  # well conditioned
    net, params, x, _, tape, err = _linear_setup(w1)
    e = np.asarray(err, np.float64)
    xs = np.asarray(x, np.float64)

    rule = dynamic_inversion(alpha=0.0, steps=300, dt=0.5, warn=False)
    state = DynamicInversionState((None, params[1]["w"]), jnp.zeros(()))
    updates, _ = jax.jit(rule.update)(params, state, tape, err)
    hidden = e @ np.linalg.pinv(w1)  # (8, 6)
    np.testing.assert_allclose(hidden @ w1, e, atol=1e-10)  # it inverts the layer
    np.testing.assert_allclose(updates[0]["w"], xs.T @ hidden, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates[1]["w"], np.asarray(tape.inputs[1]).T @ e, rtol=1e-5,
                               atol=1e-6)

    b1 = RNG.normal(size=(6, 3)) * 0.5
    alpha = 1.5
    assert check_stability(params, DynamicInversionState((None, jnp.asarray(b1, jnp.float32)),
                                                         jnp.asarray(alpha)))[1] < 0
    rule = dynamic_inversion(alpha=alpha, steps=400, dt=0.1, warn=False)
    state = DynamicInversionState((None, jnp.asarray(b1, jnp.float32)), jnp.asarray(alpha))
    updates, _ = jax.jit(rule.update)(params, state, tape, err)
    hidden = e @ np.linalg.inv(alpha * np.eye(3) + b1.T @ w1) @ b1.T
    np.testing.assert_allclose(updates[0]["w"], xs.T @ hidden, rtol=1e-4, atol=1e-5)


def _stability_params():
    net = fb.mlp((3, 3, 3), activation="linear")
    params = net.init(jax.random.PRNGKey(0))
    params[1]["w"] = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    return params


@pytest.mark.parametrize("sign,unstable", [(1.0, False), (-1.0, True)])
def test_stability_warning_fires_only_for_unstable_feedback(sign, unstable):
    """B = +I: B^T W = diag(1, 2, 3), dynamics -(alpha + diag) are stable. B = -I: the
    eigenvalues of -(alpha I - diag(1, 2, 3)) reach 3 - alpha = 2.5 > 0, unstable."""
    params = _stability_params()
    init = lambda key, shape, dtype: sign * jnp.eye(*shape, dtype=dtype)  # noqa: E731
    rule = dynamic_inversion(alpha=0.5, dt=0.1, init=init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = rule.init(jax.random.PRNGKey(0), params)
    found = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    margins = check_stability(params, state)
    w1, b1 = np.diag([1.0, 2.0, 3.0]), sign * np.eye(3)
    want = np.max(np.linalg.eigvals(-(0.5 * np.eye(3) + b1.T @ w1)).real)
    assert margins[0] is None
    np.testing.assert_allclose(margins[1], want, rtol=1e-6)
    if unstable:
        assert len(found) == 1 and "layer 1" in found[0] and "2.5" in found[0], found
        # the check runs on the host when init is traced too (jit): a debug callback
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jax.block_until_ready(jax.jit(rule.init)(jax.random.PRNGKey(0), params))
        assert sum("layer 1" in str(w.message) for w in caught) == 1
    else:
        assert not found, found


def test_euler_step_too_large_warns():
    params = _stability_params()
    init = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="Euler steps diverge"):
        dynamic_inversion(alpha=0.5, dt=1.0, init=init).init(jax.random.PRNGKey(0), params)


def test_grad_form_equals_explicit():
    net = fb.mlp((5, 7, 6, 3))
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
    batch, ctx = Batch(x, jnp.arange(8) % 3), StepContext(net, fb.cross_entropy)
    # unconverged after 5 steps: every step counts
    rule = dynamic_inversion(alpha=3.0, steps=5, dt=0.2, warn=False)
    out = []
    for lift in (explicit, through_primitives):
        lr = lift(rule)
        state = lr.init(jax.random.PRNGKey(3), params, net)
        assert max(m for m in check_stability(params, state) if m is not None) < 0
        out.append(jax.jit(lambda p, s, lr=lr: lr.step(p, s, batch, None, ctx)[0])(
            params, state))
    assert_trees_close(out[1], out[0], rtol=1e-4, atol=1e-6)


def test_fit_lowers_the_loss():
    data = fb.data.load_dataset("digits")
    model = fb.mlp((64, 32, 10))
    rule = dynamic_inversion()
    params = model.init(jax.random.PRNGKey(0))
    start = float(fb.cross_entropy(model.apply(params, data.x_test), data.y_test))
    res = fb.train.fit(model, rule, optax.sgd(0.1), data, epochs=1, progress=False)
    assert res.history[-1]["test_loss"] < start - 0.3, (start, res.history[-1]["test_loss"])


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": -1.0}, "alpha must be a number >= 0"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"dt": 0.0}, "dt must be a number > 0"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_inversion(**kwargs)
