"""Activation relaxation (Millidge et al. 2020): the relaxed activities reach backprop's adjoints
at the rate the dynamics contract, one step matches a NumPy reference of the paper's Euler
step, learned backward weights align with W, dropping f' still learns, and the harness trains
with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.rules.activation_relaxation import activation_relaxation


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _problem(sizes=(5, 7, 6, 3), batch=8, dtype=jnp.float32, seed=0):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(seed), dtype)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]), dtype)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _run(rule, model, params, x, y, loss=cross_entropy, state=None):
    if state is None:
        state = rule.init(jax.random.PRNGKey(9), params, model)
    return rule.step(params, state, Batch(x, y), jax.random.PRNGKey(10), StepContext(model, loss))


def _backprop(model, params, x, y, loss=cross_entropy):
    return jax.grad(lambda p: loss(model.apply(p, x), y))(params)


@pytest.mark.parametrize("steps,eta", [(1, 1.0), (5, 0.5), (20, 0.3), (60, 0.1)])
def test_one_hidden_layer_error_decays_exactly_as_one_minus_eta_to_the_t(steps, eta):
    # One hidden layer: x_1(t) - x_1* = (1-eta)^t (h_1 - x_1*) exactly (the target is fixed), so
    # the W_1 update's error is (1-eta)^t times its error at t = 0, the bound the tolerance of
    # the fixed-point test below derives from.
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 9, 3), dtype=jnp.float64)
        bp = _backprop(model, params, x, y)
        u0 = _run(activation_relaxation(steps=1, step_size=1e-300), model, params, x, y)[0]
        u, _, out = _run(activation_relaxation(steps=steps, step_size=eta), model, params, x, y)
        e0 = _flat(u0[0]) - _flat(bp[0])
        np.testing.assert_allclose(_flat(u[0]) - _flat(bp[0]), (1 - eta) ** steps * e0,
                                   atol=1e-14)
        np.testing.assert_allclose(_flat(u[1]), _flat(bp[1]), atol=1e-14)  # the clamped layer
        assert float(out.metrics["ar_steps"]) == steps


@pytest.mark.parametrize("loss", [cross_entropy, squared_error])
def test_fixed_point_is_backprops_adjoint(loss):
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 8, 7, 6, 3), dtype=jnp.float64)
        if loss is squared_error:
            y = jax.random.normal(jax.random.PRNGKey(5), (8, 3), jnp.float64)
        bp = _flat(_backprop(model, params, x, y, loss))
        u, _, out = _run(activation_relaxation(steps=300, step_size=0.2), model, params, x, y,
                         loss)
        # error of layer L-1-k: O(t^k (1 - eta)^(t - k)) times the initial error (O(1)):
        # 300^2 * 0.8^298 ~ 1e-24, far below float64's rounding
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-12)
        assert float(out.metrics["ar_residual"]) < 1e-14
        # eta = 1 is exact after L - 1 = 3 steps
        u, _, _ = _run(activation_relaxation(steps=3, step_size=1.0), model, params, x, y, loss)
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-14)
        # too few steps is not: the lowest layer still remembers its feedforward start
        u, _, out = _run(activation_relaxation(steps=2, step_size=1.0), model, params, x, y,
                         loss)
        assert np.abs(_flat(u) - bp).max() > 1e-3
        assert float(out.metrics["ar_residual"]) > 1e-3


def test_float32_default_converges_within_its_contraction_bound():
    model, params, x, y = _problem((5, 7, 6, 3))
    bp = _flat(_backprop(model, params, x, y))
    u, _, out = _run(activation_relaxation(), model, params, x, y)  # 100 steps, eta = 0.1
    bound = 100 * 0.9**99 * 10  # t^k (1-eta)^(t-k) with k = 1, times |h - x*| <= ~10
    assert np.abs(_flat(u) - bp).max() < bound
    assert float(out.metrics["ar_residual"]) < bound


def test_one_step_matches_a_numpy_reference_of_the_papers_dynamics():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 7, 6, 3), dtype=jnp.float64)
        eta = 0.3
        u, _, _ = _run(activation_relaxation(steps=1, step_size=eta), model, params, x, y)
        ws = [np.asarray(p["w"]) for p in params]
        bs = [np.asarray(p["b"]) for p in params]
        xn = np.asarray(x)
        a1 = xn @ ws[0] + bs[0]
        h1 = np.tanh(a1)
        a2 = h1 @ ws[1] + bs[1]
        h2 = np.tanh(a2)
        a3 = h2 @ ws[2] + bs[2]
        p = np.exp(a3 - a3.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = (p - np.eye(3)[np.asarray(y)]) / len(xn)  # dL/dy of the batch-mean CE
        d1, d2 = 1 - h1**2, 1 - h2**2
        # dx_l/dt = -x_l + (x_{l+1} * f'(a_{l+1})) W_{l+1}^T, Euler step, x(0) = h
        x2 = h2 + eta * (-h2 + top @ ws[2].T)
        x1 = h1 + eta * (-h1 + (h2 * d2) @ ws[1].T)
        want = [{"b": (x1 * d1).sum(0), "w": xn.T @ (x1 * d1)},
                {"b": (x2 * d2).sum(0), "w": h1.T @ (x2 * d2)},
                {"b": top.sum(0), "w": h2.T @ top}]
        np.testing.assert_allclose(_flat(u), _flat(want), rtol=1e-10, atol=1e-14)


def test_learned_backward_weights_align_over_training():
    model = fb.mlp((6, 16, 16, 3))
    lr, decay = 0.1, 0.05
    rule = activation_relaxation(steps=30, step_size=0.3, learn_backward=True, backward_lr=lr,
                                 backward_decay=decay)
    opt = optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr))
    step = fb.train.make_train_step(model, rule, opt, loss="cross_entropy")
    state = fb.train.init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
    y = jnp.argmax(x[:, :3], axis=1)
    angles = []
    for _ in range(300):
        state, metrics = step(state, x, y)
        angles.append(float(metrics["ar_backward_angle"]))
    assert angles[0] > 70.0  # random B starts near orthogonal to W
    assert angles[-1] < 0.5 * angles[0], (angles[0], angles[-1])
    assert np.all(np.diff(angles[::50]) < 0), angles[::50]


def test_learned_backward_weights_equal_to_w_give_backprop():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 7, 6, 3), dtype=jnp.float64)
        rule = activation_relaxation(steps=3, step_size=1.0, learn_backward=True)
        state = rule.init(jax.random.PRNGKey(0), params, model)
        assert state.feedback[0] is None
        assert [b.shape for b in state.feedback[1:]] == [p["w"].shape for p in params[1:]]
        state = type(state)((None, *(p["w"] for p in params[1:])))
        u, new, out = _run(rule, model, params, x, y, state=state)
        np.testing.assert_allclose(_flat(u), _flat(_backprop(model, params, x, y)), atol=1e-14)
        assert float(out.metrics["ar_backward_angle"]) < 1e-5
        np.testing.assert_allclose(new.feedback[1], params[1]["w"] - 0.01 * u[1]["w"])


def test_without_the_derivative_it_differs_from_backprop_but_learns():
    model, params, x, y = _problem((6, 16, 3), batch=64)
    bp = _flat(_backprop(model, params, x, y))
    u, _, _ = _run(activation_relaxation(steps=100, step_size=0.3, derivative=False), model,
                   params, x, y)
    cos = _flat(u) @ bp / (np.linalg.norm(_flat(u)) * np.linalg.norm(bp))
    assert np.abs(_flat(u) - bp).max() > 1e-3
    assert cos > 0.3  # still a descent direction
    data = fb.data.load_dataset("digits")
    res = fb.train.fit(fb.mlp((64, 32, 10)), activation_relaxation(steps=30, step_size=0.3,
                                                                   derivative=False),
                       optax.adam(1e-2), data, epochs=1, progress=False)
    assert res.history[-1]["test_error"] < 40.0  # chance: 90 %


def test_jit_equals_eager_and_vmap_over_seeds():
    model, _, x, y = _problem()
    rule = activation_relaxation(steps=20, learn_backward=True)
    ctx = StepContext(model, cross_entropy)

    def run(key):
        p = model.init(key)
        return rule.step(p, rule.init(key, p, model), Batch(x, y), key, ctx)

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    eager = run(keys[0])
    for g, w in zip(jax.tree.leaves(jax.jit(run)(keys[0])), jax.tree.leaves(eager),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    batched = jax.vmap(run)(keys)
    for i in range(3):
        for g, w in zip(jax.tree.leaves(batched), jax.tree.leaves(run(keys[i])), strict=True):
            np.testing.assert_allclose(g[i], w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"tol": 1e-5}, {"derivative": False}])
def test_runs_in_the_harness_train_step(kwargs):
    model = fb.mlp((6, 8, 3))
    rule = activation_relaxation(steps=50, step_size=0.3, **kwargs)
    step = fb.train.make_train_step(model, rule, optax.sgd(0.1), loss="cross_entropy")
    state = fb.train.init_train_state(model, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 3)
    first = None
    for _ in range(30):
        state, metrics = step(state, x, y)
        first = float(metrics["loss"]) if first is None else first
    assert {"ar_steps", "ar_residual"} <= set(metrics)
    assert float(metrics["loss"]) < 0.8 * first
    if "tol" in kwargs:
        assert float(metrics["ar_steps"]) < 50


@pytest.mark.parametrize("kwargs,match", [
    ({"step_size": 0.0}, "step_size must be a positive"),
    ({"step_size": -1.0}, "step_size must be a positive"),
    ({"step_size": 2.0}, "below 2"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"tol": 0.0}, "tol must be positive"),
    ({"backward_lr": 0.0}, "backward_lr"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        activation_relaxation(**kwargs)


def test_non_mlp_network_is_refused_naming_the_rule():
    net = fb.models.from_function(lambda p, x: x @ p, lambda key: jnp.ones((3, 2)))
    rule = activation_relaxation()
    with pytest.raises(TypeError, match="activation_relaxation.*fbalign.models.mlp"):
        rule.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), net)
    with pytest.raises(TypeError, match="activation_relaxation.*fbalign.models.mlp"):
        rule.step(jnp.ones((3, 2)), None, Batch(jnp.ones((4, 3)), jnp.zeros(4, int)),
                  jax.random.PRNGKey(0), StepContext(net, cross_entropy))


# ----- chains of conv, pooling and dense layers (arXiv:2010.06219's CNNs) ---------------------


def _conv_chain(pool=None, activation="tanh"):
    from fbalign._src.sequential import Conv, Dense, Flatten, MaxPool

    pool = MaxPool() if pool is None else pool
    return fb.models.sequential(
        [Conv(2, (3, 3), activation=activation), pool,
         Conv(2, (2, 2), padding="VALID", activation=activation), Flatten(),
         Dense(4, activation=activation), Dense(3)], input_shape=(6, 6, 1))


def _jit_run(rule, model, params, x, y, loss=cross_entropy, state=None):
    """`_run` under jit (eager steps compile each small op apart)."""
    if state is None:
        state = rule.init(jax.random.PRNGKey(9), params, model)
    return jax.jit(lambda p, s: _run(rule, model, p, x, y, loss, state=s))(params, state)


def _conv_problem(pool=None, dtype=jnp.float64, batch=5, seed=0):
    net = _conv_chain(pool)
    params = net.init(jax.random.PRNGKey(seed), dtype)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 6, 6, 1), dtype)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, 3)
    return net, params, x, y


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_conv_chain_fixed_point_is_backprops_gradient(pool):
    from fbalign._src.sequential import AvgPool, MaxPool

    with jax.enable_x64(True):
        net, params, x, y = _conv_problem(MaxPool() if pool == "max" else AvgPool())
        assert net.forward(params, x)[1].links is not None  # the conv path, not the dense one
        bp = _flat(jax.jit(lambda p: _backprop(net, p, x, y))(params))
        # 4 weight layers: eta = 1 is exact after L - 1 = 3 steps, not after 2
        u, _, out = _jit_run(activation_relaxation(steps=3, step_size=1.0), net, params, x, y)
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-14)
        u, _, _ = _jit_run(activation_relaxation(steps=2, step_size=1.0), net, params, x, y)
        assert np.abs(_flat(u) - bp).max() > 1e-3
        # eta = 0.2: error O(t^2 (1 - eta)^(t - 2)) ~ 1e-24 after 300 steps
        u, _, out = _jit_run(activation_relaxation(steps=300, step_size=0.2), net, params, x, y)
        np.testing.assert_allclose(_flat(u), bp, rtol=0, atol=1e-13)
        assert float(out.metrics["ar_residual"]) < 1e-14


@pytest.mark.slow  # ~15 s of float64 compiles on a 2-core CPU
def test_lenet5_fixed_point_is_backprops_gradient():
    with jax.enable_x64(True):
        net = fb.models.lenet5()
        params = net.init(jax.random.PRNGKey(0), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1), jnp.float64)
        y = jnp.array([3, 7])
        rule = activation_relaxation(steps=4, step_size=1.0)  # 5 layers: exact after 4 steps
        u = jax.jit(lambda p: _run(rule, net, p, x, y)[0])(params)
        bp = jax.jit(lambda p: _backprop(net, p, x, y))(params)
        np.testing.assert_allclose(_flat(u), _flat(bp), rtol=0, atol=1e-14)


def test_learned_backward_kernels_equal_to_w_give_the_plain_rule():
    with jax.enable_x64(True):
        net, params, x, y = _conv_problem()
        rule = activation_relaxation(steps=7, step_size=0.6, learn_backward=True)
        state = rule.init(jax.random.PRNGKey(0), params, net)
        assert state.feedback[0] is None
        assert [b.shape for b in state.feedback[1:]] == [p["w"].shape for p in params[1:]]
        assert state.feedback[1].ndim == 4  # a conv kernel (kh, kw, cin, cout)
        fan = np.prod(params[1]["w"].shape[:-1])
        assert 0.5 < float(jnp.std(state.feedback[1])) * np.sqrt(fan) < 1.5
        state = type(state)((None, *(p["w"] for p in params[1:])))
        u, new, out = _jit_run(rule, net, params, x, y, state=state)
        plain, _, _ = _jit_run(activation_relaxation(steps=7, step_size=0.6), net, params, x, y)
        np.testing.assert_allclose(_flat(u), _flat(plain), rtol=0, atol=1e-15)
        assert float(out.metrics["ar_backward_angle"]) < 1e-5
        np.testing.assert_allclose(new.feedback[1], params[1]["w"] - 0.01 * u[1]["w"])


def test_learned_backward_kernels_align_on_a_conv_chain():
    net = _conv_chain()
    lr, decay = 1.0, 0.1
    rule = activation_relaxation(steps=20, step_size=0.5, learn_backward=True, backward_lr=lr,
                                 backward_decay=decay)
    opt = optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr))
    step = fb.train.make_train_step(net, rule, opt, loss="cross_entropy")
    state = fb.train.init_train_state(net, rule, opt, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 36))
    y = jnp.argmax(x[:, :3], axis=1)
    angles = []
    for _ in range(40):
        state, metrics = step(state, x, y)
        angles.append(float(metrics["ar_backward_angle"]))
    # W - B shrinks by 1 - lr * decay = 0.9 a step (0.9^40 ~ 0.015) while the shared
    # updates build up in both
    assert angles[0] > 60.0, angles[0]  # random kernels start near orthogonal to W
    assert angles[-1] < 0.25 * angles[0], (angles[0], angles[-1])
    assert np.all(np.diff(angles[::10]) < 0), angles[::10]


# ----- the unfrozen feedforward pass (arXiv:2010.06219) -----------------------------------------


def _numpy_unfrozen(params, x, y, eta, steps):
    """The unfrozen dynamics in NumPy: every f' at the current activities, the input relaxing
    too, tanh hidden layers and a linear output; x_l is the input of layer l."""
    ws = [np.asarray(p["w"]) for p in params]
    bs = [np.asarray(p["b"]) for p in params]
    num = len(ws)
    xs = [np.asarray(x)]
    for w, b in zip(ws[:-1], bs[:-1], strict=True):
        xs.append(np.tanh(xs[-1] @ w + b))
    logits = xs[-1] @ ws[-1] + bs[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = (p - np.eye(ws[-1].shape[1])[np.asarray(y)]) / len(xs[0])
    fed = list(xs)  # the feedforward inputs: the presynaptic term of the update

    def fprime(ll, xl):
        a = xl @ ws[ll] + bs[ll]
        return 1 - np.tanh(a) ** 2 if ll < num - 1 else np.ones_like(a)

    for _ in range(steps):
        err = xs[1:] + [top]
        xs = [xs[ll] + eta * (-xs[ll] + (err[ll] * fprime(ll, xs[ll])) @ ws[ll].T)
              for ll in range(num)]
    err = xs[1:] + [top]
    deltas = [err[ll] * fprime(ll, xs[ll]) for ll in range(num)]
    return [{"b": d.sum(0), "w": h.T @ d} for h, d in zip(fed, deltas, strict=True)]


def test_unfrozen_steps_match_a_numpy_reference():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 7, 6, 3), dtype=jnp.float64)
        params = [{"w": p["w"], "b": p["b"] + 0.1 * (i + 1)} for i, p in enumerate(params)]
        rule = activation_relaxation(steps=3, step_size=0.4, frozen_forward=False)
        u, _, _ = _run(rule, model, params, x, y)
        want = _flat(_numpy_unfrozen(params, x, y, 0.4, 3))
        np.testing.assert_allclose(_flat(u), want, rtol=1e-10, atol=1e-14)
        frozen, _, _ = _run(activation_relaxation(steps=3, step_size=0.4), model, params, x, y)
        assert np.abs(_flat(frozen) - want).max() > 1e-4  # it is another rule


def test_unfrozen_limits_frozen_at_t0_and_no_derivative_for_small_errors():
    with jax.enable_x64(True):
        model, params, x, y = _problem((5, 8, 7, 3), dtype=jnp.float64)
        # t = 0: every f' is read at the feedforward activities, so it is the frozen rule
        tiny = {"steps": 1, "step_size": 1e-300}
        u = _run(activation_relaxation(frozen_forward=False, **tiny), model, params, x, y)[0]
        u0 = _run(activation_relaxation(**tiny), model, params, x, y)[0]
        np.testing.assert_allclose(_flat(u), _flat(u0), rtol=1e-13, atol=1e-16)
        # relaxed, with an error scaled by eps: x ~ eps, f'(x W + 0) = 1 - O(eps^2) (tanh),
        # so the rule tends to derivative=False (biases are 0 at init), not to backprop
        gaps = []
        for eps in (1e-1, 1e-2):
            def loss(o, t, eps=eps):
                return eps * cross_entropy(o, t)

            kw = {"steps": 120, "step_size": 0.5}
            un = _flat(_run(activation_relaxation(frozen_forward=False, **kw), model, params, x,
                            y, loss)[0])
            nod = _flat(_run(activation_relaxation(derivative=False, **kw), model, params, x,
                             y, loss)[0])
            gaps.append(np.abs(un - nod).max() / np.abs(nod).max())
            if eps == 1e-2:
                bp = _flat(_backprop(model, params, x, y, loss))
                assert np.abs(un - bp).max() / np.abs(bp).max() > 1e-2
        assert gaps[1] < 1e-6 and 50 < gaps[0] / gaps[1] < 200, gaps  # O(eps^2)
        # linear units have f' = 1 wherever they are read: unfrozen is frozen
        lin = fb.mlp((5, 8, 7, 3), activation="linear")
        lp = lin.init(jax.random.PRNGKey(0), jnp.float64)
        kw = {"steps": 5, "step_size": 0.7}
        np.testing.assert_allclose(
            _flat(_run(activation_relaxation(frozen_forward=False, **kw), lin, lp, x, y)[0]),
            _flat(_run(activation_relaxation(**kw), lin, lp, x, y)[0]), rtol=0, atol=1e-15)


def test_conv_chain_under_jit_and_vmap_over_seeds():
    # (eager runs of the conv chain compile every small op apart: the jitted step is the
    # reference here)
    net, _, x, y = _conv_problem(dtype=jnp.float32, batch=4)
    rule = activation_relaxation(steps=10, step_size=0.5, learn_backward=True,
                                 frozen_forward=False)
    ctx = StepContext(net, cross_entropy)

    def run(key):
        p = net.init(key)
        return rule.step(p, rule.init(key, p, net), Batch(x, y), key, ctx)

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    jitted = jax.jit(run)
    batched = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        one = jitted(keys[i])
        assert one[1].feedback[0] is not None  # the input units relax too, through B_0
        assert np.isfinite(_flat(one)).all()
        for g, w in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(g[i], w, rtol=1e-4, atol=1e-6)
    assert np.abs(_flat(jitted(keys[0])[0]) - _flat(jitted(keys[1])[0])).max() > 1e-3


def test_residual_network_is_refused_naming_the_reason():
    from fbalign._src.sequential import Dense, Residual

    net = fb.models.sequential([Dense(4, activation="tanh"),
                                Residual((Dense(4, activation="tanh"), Dense(4)), "tanh"),
                                Dense(3)], input_shape=(5,))
    params = net.init(jax.random.PRNGKey(0))
    rule = activation_relaxation()
    with pytest.raises(TypeError, match="activation_relaxation.*residual.*skip paths"):
        rule.init(jax.random.PRNGKey(0), params, net)
    with pytest.raises(TypeError, match="activation_relaxation.*residual"):
        rule.step(params, None, Batch(jnp.ones((2, 5)), jnp.zeros(2, int)),
                  jax.random.PRNGKey(0), StepContext(net, cross_entropy))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"frozen_forward": "no"}, TypeError, "frozen_forward must be True or False"),
    ({"derivative": 0}, TypeError, "derivative must be True or False"),
    ({"frozen_forward": False, "derivative": False}, ValueError, "pass derivative=False alone"),
])
def test_bad_unfrozen_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        activation_relaxation(**kwargs)


def test_cli_trains_ar_on_mlp_or_lenet5_and_refuses_other_models(tmp_path, capsys):
    from fbalign.cli import main

    assert main(["train", "--model", "rnn", "--rule", "ar", "--epochs", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--rule ar trains --model mlp or lenet5, not rnn" in capsys.readouterr().err
