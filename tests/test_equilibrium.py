"""Equilibrium propagation (Scellier & Bengio 2017) on a layered Hopfield network: the energy and
its gradient against NumPy references, the free phase's descent, EP's update against the gradient
of the cost at the fixed point (implicit differentiation) with the bias orders one-sided and
symmetric nudging predict (Laborieux et al. 2021), and training through the harness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.hopfield import HopfieldNetwork, hopfield
from fbalign._src.rules.equilibrium import equilibrium_propagation
from fbalign.rules import Batch, StepContext


def _problem(sizes=(5, 6, 3), activation="hard_sigmoid", batch=4, scale=1.0, dtype=jnp.float32,
             **kw):
    net = hopfield(sizes, activation, **kw)
    params = jax.tree.map(lambda a: a * scale, net.init(jax.random.PRNGKey(0), dtype))
    params = [{"w": p["w"], "b": 0.1 * jnp.ones_like(p["b"])} for p in params]
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]), dtype)
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
    return net, params, x, y


def _step(rule, net, params, x, y, key=None, loss=fb.squared_error):
    key = jax.random.PRNGKey(3) if key is None else key
    return rule.step(params, rule.init(key, params, net), Batch(x, y), key,
                     StepContext(net, loss))


def _jstep(rule, net, params, x, y, key=None):
    """The step's updates, jitted (one compile instead of op-by-op dispatch)."""
    key = jax.random.PRNGKey(3) if key is None else key
    return jax.jit(lambda k: _step(rule, net, params, x, y, key=k)[0])(key)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


# -- NumPy references written from the paper's equation -------------------------------------

_RHO = {"hard_sigmoid": (lambda s: np.clip(s, 0, 1), lambda s: ((s >= 0) & (s <= 1)) * 1.0),
        "sigmoid": (lambda s: 1 / (1 + np.exp(-s)),
                    lambda s: np.exp(-s) / (1 + np.exp(-s)) ** 2),
        "tanh": (np.tanh, lambda s: 1 - np.tanh(s) ** 2)}


def _np_energy_and_grad(activation, params, x, states):
    """E = sum_b [1/2 sum_l |s_l|^2 - sum_l rho(s_{l-1}) W_l rho(s_l) - sum_l b_l rho(s_l)],
    rho(s_0) = x; dE/ds_l = s_l - rho'(s_l) (rho(s_{l-1}) W_l + b_l + rho(s_{l+1}) W_{l+1}^T)."""
    rho, drho = _RHO[activation]
    w = [np.asarray(p["w"], np.float64) for p in params]
    b = [np.asarray(p["b"], np.float64) for p in params]
    s = [np.asarray(a, np.float64) for a in states]
    r = [np.asarray(x, np.float64)] + [rho(a) for a in s]
    e = 0.5 * sum((a**2).sum() for a in s)
    for i in range(len(w)):
        e -= np.einsum("bi,ij,bj->", r[i], w[i], r[i + 1]) + (r[i + 1] * b[i]).sum()
    grads = []
    for i in range(len(w)):
        drive = r[i] @ w[i] + b[i] + (r[i + 2] @ w[i + 1].T if i + 1 < len(w) else 0)
        grads.append(s[i] - drho(s[i]) * drive)
    return e, grads


@pytest.mark.parametrize("activation", ["hard_sigmoid", "sigmoid", "tanh"])
def test_energy_and_its_state_gradient_match_a_numpy_reference(activation):
    net, params, x, _ = _problem((5, 6, 4, 3), activation, dtype=jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    states = [0.5 + 0.7 * jax.random.normal(k, (4, d))
              for k, d in zip(keys, (6, 4, 3), strict=True)]
    e, g = jax.value_and_grad(lambda s: net.energy(params, x, s))(states)
    e_ref, g_ref = _np_energy_and_grad(activation, params, x, states)
    np.testing.assert_allclose(float(e), e_ref, rtol=1e-5)
    for got, want in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_free_phase_descends_monotonically_to_a_fixed_point_at_the_default_step_size():
    data = fb.data.load_dataset("digits")
    net = hopfield((64, 32, 10))  # hard sigmoid, default step size
    params = net.init(jax.random.PRNGKey(0))
    x = jnp.asarray(data.x_train[:64])
    res = net.free_phase(params, x, steps=300, record=True)
    traj = np.asarray(res.trajectory, np.float64)
    assert np.all(np.isfinite(traj)) and not bool(res.diverged)
    assert np.all(np.diff(traj) <= 1e-6 * np.abs(traj).max()), np.diff(traj).max()
    assert traj[-1] < traj[0] - 1.0
    # the hard sigmoid's fixed point (states projected on [0, 1]): s_l = clip(drive_l, 0, 1)
    s = [np.asarray(a, np.float64) for a in res.state]
    w = [np.asarray(p["w"], np.float64) for p in params]
    b = [np.asarray(p["b"], np.float64) for p in params]
    np.testing.assert_allclose(s[0], np.clip(np.asarray(x) @ w[0] + b[0] + s[1] @ w[1].T, 0, 1),
                               atol=1e-4)
    np.testing.assert_allclose(s[1], np.clip(s[0] @ w[1] + b[1], 0, 1), atol=1e-4)
    long = hopfield((64, 32, 10), free_steps=300)  # apply: the free phase's output
    np.testing.assert_allclose(np.asarray(long.apply(params, x)), s[1], atol=1e-6)


def test_smooth_free_phase_reaches_a_zero_gradient_fixed_point():
    net, params, x, _ = _problem((5, 6, 3), "sigmoid", scale=2.0)
    res = net.free_phase(params, x, steps=2000, tol=1e-5)
    assert float(res.grad_norm) < 1e-5 and int(res.steps) < 2000
    _, g_ref = _np_energy_and_grad("sigmoid", params, x, res.state)
    assert max(np.abs(g).max() for g in g_ref) < 1e-5


def _implicit_gradient(net, params, x, y, s_star):
    """d/dtheta of C(s*(theta), y) / B with ds*/dtheta = -(d2E/ds2)^-1 d2E/ds dtheta."""
    s_flat, unravel_s = jax.flatten_util.ravel_pytree(s_star)
    p_flat, unravel_p = jax.flatten_util.ravel_pytree(params)
    energy = lambda sf, pf: net.energy(unravel_p(pf), x, unravel_s(sf))
    hess = jax.hessian(energy, 0)(s_flat, p_flat)
    cross = jax.jacobian(jax.grad(energy, 0), 1)(s_flat, p_flat)  # (n_s, n_theta)
    onehot = jax.nn.one_hot(y, s_star[-1].shape[-1], dtype=s_flat.dtype)
    dc = jax.flatten_util.ravel_pytree(
        [jnp.zeros_like(a) for a in s_star[:-1]] + [s_star[-1] - onehot])[0]
    lam = jnp.linalg.solve(hess, dc)
    return np.asarray(-(lam @ cross) / x.shape[0])


def _slope(betas, biases):
    return np.polyfit(np.log(betas), np.log(biases), 1)[0]


def test_ep_update_tends_to_the_implicit_gradient_with_the_predicted_bias_orders():
    with jax.enable_x64(True):
        net, params, x, y = _problem((4, 5, 3), "sigmoid", batch=3, scale=2.0,
                                     dtype=jnp.float64, step_size=0.5)
        s_star = net.free_phase(params, x, steps=5000, tol=1e-13).state
        true = _implicit_gradient(net, params, x, y, s_star)
        betas = np.array([5e-2, 2.5e-2, 1.25e-2])  # each beta compiles its own programs
        bias = {}
        for nudging in ("one_sided", "symmetric"):
            bias[nudging] = []
            for beta in betas:
                rule = equilibrium_propagation(float(beta), nudged_steps=5000, free_steps=5000,
                                               nudging=nudging, tol=1e-13)
                u = _flat(_jstep(rule, net, params, x, y))
                bias[nudging].append(np.linalg.norm(u - true) / np.linalg.norm(true))
        assert bias["symmetric"][-1] < 1e-3 and bias["one_sided"][-1] < 5e-2, bias
        assert np.all(np.array(bias["symmetric"]) < np.array(bias["one_sided"])), bias
        one, sym = _slope(betas, bias["one_sided"]), _slope(betas, bias["symmetric"])
        assert 0.8 < one < 1.3, (one, bias)
        assert 1.7 < sym < 2.4, (sym, bias)


def test_symmetric_nudging_is_even_in_beta_and_random_sign_flips_one_sided_beta():
    net, params, x, y = _problem((5, 6, 3), "sigmoid", scale=2.0)
    sym = [_flat(_jstep(equilibrium_propagation(b, 30, nudging="symmetric"), net, params, x,
                        y)) for b in (0.3, -0.3)]
    np.testing.assert_allclose(sym[0], sym[1], rtol=1e-4, atol=1e-6)
    rule = equilibrium_propagation(0.3, 30, random_sign=True)
    keys = jax.random.split(jax.random.PRNGKey(11), 6)
    batched = jax.jit(jax.vmap(lambda k: _flat_j(_step(rule, net, params, x, y, key=k)[0])))(
        keys)
    plus = _flat(_jstep(equilibrium_propagation(0.3, 30), net, params, x, y))
    minus = _flat(_jstep(equilibrium_propagation(-0.3, 30), net, params, x, y))
    signs = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (), jnp.float32))(keys))
    assert 0 < (signs > 0).sum() < len(signs)  # both signs occur
    for row, sign in zip(np.asarray(batched), signs, strict=True):
        np.testing.assert_allclose(row, plus if sign > 0 else minus, rtol=1e-4, atol=1e-6)
    assert np.abs(plus - minus).max() > 1e-3  # one-sided's bias differs with the sign


def _flat_j(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("cost,loss", [("squared", fb.squared_error),
                                       ("cross_entropy", fb.cross_entropy)])
def test_ep_matches_backprop_through_the_converged_free_phase(cost, loss):
    net, params, x, y = _problem((5, 6, 3), "sigmoid", scale=2.0, free_steps=400)
    bptt = _flat(jax.grad(lambda p: loss(net.apply(p, x), y))(params))
    rule = equilibrium_propagation(1e-2, 400, nudging="symmetric", cost=cost)
    updates, _, out = _step(rule, net, params, x, y, loss=loss)
    np.testing.assert_allclose(_flat(updates), bptt, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(float(out.loss), float(loss(net.apply(params, x), y)), rtol=1e-6)
    assert set(out.metrics) == {"ep_energy_free", "ep_steps_free", "ep_steps_nudged",
                                "ep_diverged"}
    assert float(out.metrics["ep_steps_nudged"]) == 800 and float(out.metrics["ep_diverged"]) == 0


def test_bad_arguments_and_networks_are_refused():
    with pytest.raises(ValueError, match="beta must be a non-zero"):
        equilibrium_propagation(beta=0)
    with pytest.raises(ValueError, match="nudging"):
        equilibrium_propagation(nudging="both")
    with pytest.raises(ValueError, match="cost"):
        equilibrium_propagation(cost="hinge")
    rule = equilibrium_propagation()
    mlp = fb.mlp((4, 3))
    with pytest.raises(TypeError, match="equilibrium_propagation.*fbalign.models.hopfield.*MLP"):
        fb.train.init_train_state(mlp, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    p = mlp.init(jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="equilibrium_propagation.*hopfield"):
        rule.step(p, None, Batch(jnp.ones((2, 4)), jnp.zeros(2, int)), jax.random.PRNGKey(0),
                  StepContext(mlp, fb.squared_error))
    with pytest.raises(ValueError, match="sizes"):
        hopfield((4,))
    with pytest.raises(ValueError, match="unknown activation"):
        hopfield((4, 3), "swish2")


def test_jit_equals_eager_and_the_harness_step_trains():
    net, params, x, y = _problem((5, 6, 3), free_steps=20)
    rule = equilibrium_propagation(0.5, 10, nudging="symmetric", random_sign=True)
    eager = _step(rule, net, params, x, y)
    jitted = jax.jit(lambda p, xx, yy: _step(rule, net, p, xx, yy))(params, x, y)
    assert_trees_close(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
    assert_trees_close(jitted[2], eager[2], rtol=1e-5, atol=1e-6)
    assert isinstance(net, HopfieldNetwork)
    step = fb.train.make_train_step(net, rule, optax.sgd(0.1), loss="squared_error")
    state = fb.train.init_train_state(net, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    state, metrics = step(state, x, y)
    assert {"loss", "accuracy", "ep_energy_free", "ep_diverged"} <= set(metrics)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_fit_on_digits_beats_chance_by_far():
    data = fb.data.load_dataset("digits")
    net = hopfield((64, 64, 10), free_steps=30)
    rule = equilibrium_propagation(beta=0.5, nudged_steps=15)
    res = fb.train.fit(net, rule, optax.sgd(0.2), data, loss="squared_error", epochs=2,
                       batch_size=32, progress=False)
    rec = res.history[-1]
    assert rec["test_error"] < 60.0, rec  # chance is 90%
    assert rec["train_ep_diverged"] == 0.0


# -- Prototypical dynamics (Ernoult et al. 2019; Laborieux et al.'s code) ---------------------

def _np_prototypical_ep(params, x, y, beta, t1, t2, readout):
    """Laborieux et al.'s ``P_MLP`` (and the holomorphic-EP code's ``xp_mlp``), written from
    their equations: ``Phi = sum_l (s_{l-1} W_l + b_l) . s_l``, all layers updated at once by
    ``s <- rho(dPhi/ds)`` (``rho = sigmoid(4 (s - 1/2))``) from zeros for ``t1`` steps, then
    ``t2`` steps of ``Phi - beta C``, and the update ``-(dPhi/dtheta(s^beta) -
    dPhi/dtheta(s*)) / beta`` averaged over the batch. ``C``: ``1/2 |y - s_L|^2``; with
    ``readout`` the last layer is a softmax readout of ``s_{L-1}`` and ``C`` its cross-entropy,
    which also trains the readout (its update is ``dC/dtheta_out`` at ``s^beta``)."""
    rho = lambda a: 1 / (1 + np.exp(-4 * (a - 0.5)))
    w = [np.asarray(p["w"], np.float64) for p in params]
    b = [np.asarray(p["b"], np.float64) for p in params]
    x = np.asarray(x, np.float64)
    t = np.eye(w[-1].shape[1])[np.asarray(y)]
    n_states = len(w) - (1 if readout else 0)

    def softmax(o):
        e = np.exp(o - o.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def step(s, strength):
        full = [x, *s]
        drives = []
        for i in range(n_states):
            d = full[i] @ w[i] + b[i]
            if i + 1 < n_states:
                d = d + full[i + 2] @ w[i + 1].T
            elif readout:
                d = d - strength * (softmax(s[-1] @ w[-1] + b[-1]) - t) @ w[-1].T
            else:
                d = d + strength * (t - s[-1])
            drives.append(d)
        return [rho(d) for d in drives]

    s = [np.zeros((x.shape[0], wi.shape[1])) for wi in w[:n_states]]
    for _ in range(t1):
        s = step(s, 0.0)
    free = s
    for _ in range(t2):
        s = step(s, beta)
    n = x.shape[0]
    ups = []
    for i in range(n_states):
        lo, hi = ([x, *free][i], free[i]), ([x, *s][i], s[i])
        ups.append({"w": -(hi[0].T @ hi[1] - lo[0].T @ lo[1]) / (beta * n),
                    "b": -(hi[1].sum(0) - lo[1].sum(0)) / (beta * n)})
    if readout:
        err = softmax(s[-1] @ w[-1] + b[-1]) - t
        ups.append({"w": s[-1].T @ err / n, "b": err.sum(0) / n})
    return free, ups


@pytest.mark.parametrize("readout", [False, True])
def test_prototypical_dynamics_and_update_match_laborieux_et_al_equations(readout):
    with jax.enable_x64(True):
        sizes = (5, 6, 4, 3)
        net = hopfield(sizes, "steep_sigmoid", free_steps=7, dynamics="prototypical",
                       readout=readout)
        assert net.step_size == 1.0  # the default step of prototypical dynamics
        params = jax.tree.map(lambda a: 1.5 * a, net.init(jax.random.PRNGKey(0), jnp.float64))
        params = [{"w": p["w"], "b": 0.1 * jnp.ones_like(p["b"])} for p in params]
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 5), jnp.float64)
        y = jnp.array([0, 2, 1, 2])
        rule = equilibrium_propagation(beta=0.3, nudged_steps=3,
                                       cost="cross_entropy" if readout else "squared")
        updates = _jstep(rule, net, params, x, y)
        free, want = _np_prototypical_ep(params, x, y, 0.3, 7, 3, readout)
        for got, ref in zip(net.free_phase(params, x).state, free, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-14)
        assert_trees_close(updates, want, rtol=1e-10, atol=1e-13)
        # the update is not trivially small: the nudge moved the states
        assert np.abs(_flat(updates)).max() > 1e-3


def test_prototypical_hard_sigmoid_equals_projected_descent_and_refuses_tol():
    net, params, x, y = _problem((5, 6, 4, 3), scale=2.0)
    proto = hopfield((5, 6, 4, 3), dynamics="prototypical")  # hard sigmoid, step 1
    desc = hopfield((5, 6, 4, 3), step_size=1.0)
    rule = equilibrium_propagation(beta=0.5, nudged_steps=5)
    # states stay in [0, 1], where rho(s) = s: the two models are one (Laborieux et al.'s
    # hard-sigmoid iteration is fbalign's projected descent at step 1)
    assert_trees_close(_jstep(rule, proto, params, x, y), _jstep(rule, desc, params, x, y),
                       rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="prototypical.*tol"):
        hopfield((5, 3), dynamics="prototypical", tol=1e-4)
    with pytest.raises(ValueError, match="prototypical.*tol"):
        proto.free_phase(params, x, tol=1e-4)
    with pytest.raises(ValueError, match="unknown dynamics 'bptt'"):
        hopfield((5, 3), dynamics="bptt")


def test_cli_hopfield_options_build_the_network_the_rule_trains(tmp_path, capsys):
    """--hopfield-dynamics/--hopfield-readout reach the network; ep's free_steps/step_size set
    its prediction's free phase too; the options are refused for another model."""
    import argparse
    import json

    from fbalign._src.cli import build_model, hopfield_options
    from fbalign.cli import main

    out = tmp_path / "proto"
    assert main(["train", "--rule", "ep", "--model", "hopfield", "--dataset", "digits",
                 "--hidden", "16", "--activation", "steep_sigmoid", "--hopfield-dynamics",
                 "prototypical", "--hopfield-readout", "--rule-arg", "cost=cross_entropy",
                 "--rule-arg", "free_steps=6", "--rule-arg", "nudged_steps=3", "--epochs", "1",
                 "--optimizer", "sgd", "--lr", "0.05", "--no-progress", "--out", str(out)]) == 0
    cfg = argparse.Namespace(**json.loads((out / "config.json").read_text()))
    cfg.rule_args = cfg.rule_args or {}
    net = build_model("hopfield", 64, 10, (16,), "steep_sigmoid", "linear",
                      **hopfield_options(cfg))
    assert (net.dynamics, net.readout, net.free_steps, net.step_size) == (
        "prototypical", True, 6, 1.0), net
    out = tmp_path / "persistent"  # fbalign train sizes the persistent particles itself
    assert main(["train", "--rule", "ep", "--model", "hopfield", "--dataset", "digits",
                 "--hidden", "16", "--rule-arg", "persistent=true", "--rule-arg", "free_steps=5",
                 "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["rule_args"]["num_examples"] == len(fb.data.load_dataset("digits").x_train)
    # the run's loss is the cost ep nudges with (squared), not classification's cross-entropy
    assert saved["loss"] == "squared_error"
    cfg.hopfield_free_steps = 9  # --hopfield-free-steps sets the prediction's free phase first
    assert build_model("hopfield", 64, 10, (16,), "steep_sigmoid", "linear",
                       **hopfield_options(cfg)).free_steps == 9
    capsys.readouterr()
    assert main(["train", "--rule", "bp", "--hopfield-dynamics", "prototypical", "--epochs", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--hopfield-dynamics: an option of --model hopfield" in capsys.readouterr().err
    assert main(["train", "--rule", "ep", "--model", "hopfield", "--loss", "cross_entropy",
                 "--epochs", "1", "--out", str(tmp_path / "bad2")]) == 2
    assert "--loss cross_entropy is not the cost --rule ep nudges with" in capsys.readouterr().err


def test_persistent_particles_start_each_free_phase_from_the_examples_last_fixed_point():
    """Scellier & Bengio's persistent particles: with the weights held, visiting an example k
    times with T free steps each leaves its stored state at the free phase of kT steps from
    zero; an unseen example starts from zero; the rows of other examples stay untouched."""
    net, params, x, y = _problem((5, 6, 4, 3), "sigmoid", batch=4, scale=2.0, step_size=0.2)
    rule = equilibrium_propagation(beta=0.5, nudged_steps=2, free_steps=3, persistent=True,
                                   num_examples=7)
    state = rule.init(jax.random.PRNGKey(0), params, net)
    assert [s.shape for s in state.states] == [(7, 6), (7, 4), (7, 3)]
    key, ctx = jax.random.PRNGKey(3), StepContext(net, fb.squared_error)
    step = jax.jit(lambda st, xb, yb, i: rule.step(params, st, Batch(xb, yb, i), key, ctx)[1])
    first = jnp.array([5, 1])
    state = step(state, x[:2], y[:2], first)
    state = step(state, x[:2], y[:2], first)
    state = step(state, x[1:3], y[1:3], jnp.array([1, 2]))  # example 1 again; 2 is new
    free = lambda xb, t: net.free_phase(params, xb, steps=t).state
    for layer, (six, three, nine) in enumerate(zip(free(x[:1], 6), free(x[2:3], 3),
                                                   free(x[1:2], 9), strict=True)):
        got = np.asarray(state.states[layer])
        np.testing.assert_allclose(got[5], np.asarray(six)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[2], np.asarray(three)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], np.asarray(nine)[0], rtol=1e-5, atol=1e-6)
        assert not np.any(got[[0, 3, 4, 6]])
    # the free phase had not converged in 3 steps, so reading the stored state matters
    assert not np.allclose(np.asarray(free(x[1:2], 9)[0]), np.asarray(free(x[1:2], 3)[0]),
                           atol=1e-3)
    np.testing.assert_array_equal(np.asarray(state.seen), [0, 1, 1, 0, 0, 1, 0])


def test_persistent_particles_refuse_what_they_cannot_do():
    net, params, x, y = _problem((5, 6, 3))
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        equilibrium_propagation(persistent=True, num_examples=0)
    rule = equilibrium_propagation(persistent=True)
    with pytest.raises(ValueError, match="needs num_examples"):
        rule.init(jax.random.PRNGKey(0), params, net)
    rule = equilibrium_propagation(persistent=True, num_examples=4)
    state = rule.init(jax.random.PRNGKey(0), params, net)
    with pytest.raises(ValueError, match="needs batch.index"):
        rule.step(params, state, Batch(x, y), jax.random.PRNGKey(0),
                  StepContext(net, fb.squared_error))
