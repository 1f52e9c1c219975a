"""The shared relaxation loop: exact iterates on a quadratic, early stop at a tolerance, energy
trajectories, divergence reported (and raised on the host with the phase named), jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbalign.rules import RelaxationError, check_relaxation, relax

A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
B = np.array([1.0, -2.0, 0.5])


def quad(s):
    x = s["x"]
    return 0.5 * x @ jnp.asarray(A, x.dtype) @ x - jnp.asarray(B, x.dtype) @ x


def test_fixed_steps_give_the_closed_form_iterates():
    eta, steps = 0.2, 7
    x0 = np.array([0.3, -0.1, 2.0])
    res = relax(quad, {"x": jnp.asarray(x0, jnp.float32)}, steps=steps, step_size=eta)
    star = np.linalg.solve(A, B)
    want = star + np.linalg.matrix_power(np.eye(3) - eta * A, steps) @ (x0 - star)
    np.testing.assert_allclose(res.state["x"], want, rtol=1e-5, atol=1e-6)
    assert int(res.steps) == steps and not bool(res.diverged)
    np.testing.assert_allclose(res.grad_norm, np.max(np.abs(A @ want - B)), rtol=1e-4)


def test_trajectory_decreases_and_optimizer_equals_step_size():
    x0 = {"x": jnp.array([1.0, 1.0, 1.0])}
    res = relax(quad, x0, steps=20, step_size=0.3, record=True)
    traj = np.asarray(res.trajectory)
    assert traj.shape == (20,) and np.all(np.diff(traj) < 0)  # eta < 2 / lambda_max
    np.testing.assert_allclose(traj[0], quad(x0), rtol=1e-6)
    via_opt = relax(quad, x0, steps=20, optimizer=optax.sgd(0.3))
    np.testing.assert_allclose(via_opt.state["x"], res.state["x"], rtol=1e-6)


def test_tolerance_stops_early_at_a_small_gradient():
    x0 = {"x": jnp.array([1.0, 1.0, 1.0])}
    res = relax(quad, x0, steps=500, step_size=0.3, tol=1e-4, record=True)
    n = int(res.steps)
    assert 0 < n < 500 and float(res.grad_norm) < 1e-4
    fixed = relax(quad, x0, steps=n, step_size=0.3)  # the same iterates
    np.testing.assert_allclose(res.state["x"], fixed.state["x"], rtol=1e-6)
    traj = np.asarray(res.trajectory)
    assert np.all(np.isfinite(traj[:n])) and np.all(np.isnan(traj[n:]))
    # one step fewer: the gradient is still above the tolerance
    assert float(relax(quad, x0, steps=n - 1, step_size=0.3).grad_norm) >= 1e-4


@pytest.mark.parametrize("tol", [None, 1e-6])
def test_divergence_is_reported_and_raised_with_the_phase(tol):
    energy = lambda s: jnp.sum(jnp.exp(s["x"] ** 2))  # blows up for a large step
    res = relax(energy, {"x": jnp.array([1.0, -1.0])}, steps=50, step_size=5.0, tol=tol)
    assert bool(res.diverged)
    assert np.all(np.isfinite(res.state["x"]))  # the last state with a finite energy is kept
    with pytest.raises(RelaxationError, match="nudged relaxation diverged.*smaller step size"):
        check_relaxation(res, "nudged", step_size=5.0)
    ok = relax(energy, {"x": jnp.array([0.1, -0.1])}, steps=50, step_size=0.01, tol=tol)
    assert not bool(ok.diverged)
    check_relaxation(ok, "free")


def test_jit_and_vmap_over_starting_points():
    x0 = jnp.stack([jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 2.0, -1.0])])
    run = lambda x: relax(quad, {"x": x}, steps=30, step_size=0.2, tol=1e-3)
    batched = jax.jit(jax.vmap(run))(x0)
    for k in range(2):
        one = run(x0[k])
        np.testing.assert_allclose(batched.state["x"][k], one.state["x"], rtol=1e-6)
        assert int(batched.steps[k]) == int(one.steps)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="step_size must be positive"):
        relax(quad, {"x": jnp.zeros(3)}, steps=3, step_size=0.0)
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        relax(quad, {"x": jnp.zeros(3)}, steps=2.5)
