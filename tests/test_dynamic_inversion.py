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
from fbalign._src.rule_args import parse_rule_args
from fbalign._src.rules.dynamic_inversion import (
    AUTO_DT_ITERS,
    AUTO_DT_MAX,
    AUTO_DT_SAFETY,
    AUTO_DT_SEED,
    DynamicInversionState,
    auto_dt,
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


@pytest.mark.parametrize("dt", [0.2, "auto"])
def test_grad_form_equals_explicit(dt):
    """Also for dt="auto": the jax.grad form chooses the step through the model's op (the
    generic path of `auto_dt`), the explicit form through the dense one."""
    net = fb.mlp((5, 7, 6, 3))
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
    batch, ctx = Batch(x, jnp.arange(8) % 3), StepContext(net, fb.cross_entropy)
    # unconverged after 5 steps: every step counts
    rule = dynamic_inversion(alpha=3.0, steps=5, dt=dt, warn=False)
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
    ({"dt": 0.0}, "dt must be a number > 0 or 'auto'"),
    ({"dt": -0.1}, "dt must be a number > 0 or 'auto'.*-0.1"),
    ({"dt": "Auto"}, "dt must be a number > 0 or 'auto'.*'Auto'"),
    ({"dt": "fast"}, "dt must be a number > 0 or 'auto'.*'fast'"),
    ({"dt": True}, "dt must be a number > 0 or 'auto'.*True"),
    ({"dt": None}, "dt must be a number > 0 or 'auto'.*None"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_inversion(**kwargs)


def test_bad_dt_refused_by_invert_and_auto_parsed_from_the_cli():
    with pytest.raises(ValueError, match="invert: dt must be a number > 0 or 'auto'.*'adaptive'"):
        invert(jnp.ones((2, 3)), jnp.eye(3), jnp.eye(3), 1.0, 5, "adaptive")
    assert parse_rule_args("dyninv", ["dt=auto"]) == {"dt": "auto"}
    assert parse_rule_args("dyninv", ["dt=0.05"]) == {"dt": 0.05}


# --- dt="auto": the Euler step from the current W and B -------------------------------------


def _auto_dt_numpy(w, b, alpha):
    """float64 reference of `auto_dt`'s formula: dt = min(c / s, dt_max), s = ||v M|| after
    AUTO_DT_ITERS normalised steps v <- v M M^T from the fixed start, M = alpha I + B^T W."""
    m = alpha * np.eye(w.shape[1]) + b.T @ w
    v = np.random.default_rng(AUTO_DT_SEED).standard_normal(w.shape[1])
    v /= np.linalg.norm(v)
    for _ in range(AUTO_DT_ITERS):
        v = v @ m @ m.T
        v /= np.linalg.norm(v)
    return min(AUTO_DT_SAFETY / np.linalg.norm(v @ m), AUTO_DT_MAX)


def _grown_layer(seed, scale=4.0):
    """A layer W (6, 3) grown large, with feedback B near W: the flow is stable (eigenvalues of
    B^T W real parts > 0) but the Euler map at dt 0.2 has radius > 1, as after training."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 3)) * scale
    b = w + 0.3 * scale * rng.normal(size=(6, 3))
    return w, b


def _closed_form(delta, w, b, alpha):
    return delta @ np.linalg.inv(alpha * np.eye(w.shape[1]) + b.T @ w) @ b.T


def test_auto_dt_converges_where_a_fixed_dt_diverges():
    """W grown so that fixed dt = 0.2 diverges (NaN); dt="auto" converges to the closed-form
    fixed point delta (alpha I + B^T W)^{-1} B^T (float64 NumPy), in `invert` and in the rule's
    update of the layer below on a linear network."""
    alpha = 1.5
    w, b = _grown_layer(0)
    m = alpha * np.eye(3) + b.T @ w
    assert np.min(np.linalg.eigvals(m).real) > 0  # the flow is stable
    assert np.max(np.abs(np.linalg.eigvals(np.eye(3) - 0.2 * m))) > 1  # Euler at 0.2 is not
    delta = RNG.normal(size=(5, 3))
    w32, b32, d32 = (jnp.asarray(a, jnp.float32) for a in (w, b, delta))
    assert bool(jnp.isnan(invert(d32, w32, b32, alpha, 600, 0.2)).all())
    got = jax.jit(lambda d: invert(d, w32, b32, alpha, 600, "auto"))(d32)
    np.testing.assert_allclose(got, _closed_form(delta, w, b, alpha), rtol=2e-4, atol=1e-5)

    net = fb.mlp((4, 6, 3), activation="linear")
    params = net.init(jax.random.PRNGKey(0))
    params[1]["w"] = w32
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    _, tape = net.forward(params, x)
    state = DynamicInversionState((None, b32), jnp.asarray(alpha))
    for dt in (0.2, "auto"):
        rule = dynamic_inversion(alpha=alpha, steps=600, dt=dt, warn=False)
        updates, _ = jax.jit(rule.update)(params, state, tape, d32)
        if dt == 0.2:
            assert bool(jnp.isnan(updates[0]["w"]).all())
        else:
            want = np.asarray(x, np.float64).T @ _closed_form(delta, w, b, alpha)
            np.testing.assert_allclose(updates[0]["w"], want, rtol=2e-4, atol=1e-4)


def test_auto_dt_equals_its_numpy_formula():
    """The chosen step equals the float64 NumPy power iteration of the same formula, within a
    few percent of c / ||M||_2 (exact norm) on these layers, is capped at AUTO_DT_MAX when M is
    tiny, is the same through a generic op, and carries no gradient (stop_gradient)."""
    alpha = 1.5
    step = jax.jit(auto_dt, static_argnums=2)
    generic = jax.jit(lambda w_, b_: auto_dt(w_, b_, alpha, op=lambda x_, v_: jnp.einsum(
        "ni,io->no", x_, v_), x=jnp.ones((2, 6))))
    for seed in range(3):
        w, b = _grown_layer(seed, scale=1.0 + seed)
        want = _auto_dt_numpy(w, b, alpha)
        w32, b32 = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
        np.testing.assert_allclose(float(step(w32, b32, alpha)), want, rtol=1e-5)
        exact = AUTO_DT_SAFETY / np.linalg.norm(alpha * np.eye(3) + b.T @ w, 2)
        np.testing.assert_allclose(want, exact, rtol=0.05)
        # through a non-dense op (the jax.grad form's path): same step
        np.testing.assert_allclose(float(generic(w32, b32)), want, rtol=1e-5)
    with jax.enable_x64(True):
        got64 = step(jnp.asarray(w), jnp.asarray(b), alpha)
        assert got64.dtype == jnp.float64
        np.testing.assert_allclose(float(got64), want, rtol=1e-10)
    grads = jax.jit(jax.grad(lambda w_, b_: auto_dt(w_, b_, alpha), argnums=(0, 1)))(w32, b32)
    assert all(not np.asarray(g).any() for g in grads)
    tiny = 1e-3 * np.eye(3)
    assert _auto_dt_numpy(tiny, tiny, 0.0) == AUTO_DT_MAX
    assert float(step(jnp.asarray(tiny, jnp.float32), jnp.asarray(tiny, jnp.float32),
                      0.0)) == AUTO_DT_MAX
    assert float(step(jnp.zeros((6, 3)), jnp.zeros((6, 3)), 0.0)) == AUTO_DT_MAX


def test_auto_dt_under_jit_and_vmap_over_seeds():
    """vmap over three seeds' layers under jit: each seed gets its own step (its NumPy
    formula) and its own closed-form fixed point; the program holds no host callback."""
    alpha = 1.5
    layers = [_grown_layer(seed, scale=2.0 + seed) for seed in range(3)]
    ws = jnp.asarray(np.stack([w for w, _ in layers]), jnp.float32)
    bs = jnp.asarray(np.stack([b for _, b in layers]), jnp.float32)
    delta = RNG.normal(size=(3, 4, 3))
    inv = jax.jit(jax.vmap(lambda d, w, b: invert(d, w, b, alpha, 300, "auto")))
    got = inv(jnp.asarray(delta, jnp.float32), ws, bs)
    steps = jax.jit(jax.vmap(lambda w, b: auto_dt(w, b, alpha)))(ws, bs)
    for k, (w, b) in enumerate(layers):
        np.testing.assert_allclose(steps[k], _auto_dt_numpy(w, b, alpha), rtol=1e-5)
        np.testing.assert_allclose(got[k], _closed_form(delta[k], w, b, alpha), rtol=2e-4,
                                   atol=1e-5)
    assert len(set(np.asarray(steps).tolist())) == 3
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda d, w, b: invert(d, w, b, alpha, 3, "auto")))(
        jnp.asarray(delta, jnp.float32), ws, bs))
    assert "callback" not in jaxpr


def test_auto_dt_cannot_save_far_off_axis_or_unstable_dynamics():
    """The documented limit: eigenvalues of alpha I + B^T W at 0.5 +- 5i (stable flow, 84
    degrees off the real axis) need dt < 2 Re / |l|^2 = 0.04, below 1/||M||: init warns that
    even dt='auto' diverges, and `invert` returns NaN. An unstable flow (B = -I) warns as
    before, naming dt='auto' among what does not help."""
    params = _stability_params()
    rot = jnp.array([[0.0, 5.0, 0.0], [-5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    params[1]["w"] = rot
    eye = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="even dt='auto'"):
        state = dynamic_inversion(alpha=0.5, dt="auto", init=eye).init(jax.random.PRNGKey(0),
                                                                        params)
    assert check_stability(params, state)[1] < 0
    delta = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    assert bool(jnp.isnan(invert(delta, rot, jnp.eye(3), 0.5, 100, "auto")).all())
    neg = lambda key, shape, dtype: -jnp.eye(*shape, dtype=dtype)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="unstable.*also dt='auto'"):
        dynamic_inversion(alpha=0.5, dt="auto", init=neg).init(jax.random.PRNGKey(0),
                                                               _stability_params())
