"""Equilibrium propagation in discrete time against backpropagation through time (Ernoult,
Grollier, Querlioz, Bengio & Scellier 2019, "Updates of equilibrium prop match gradients of
backprop through time in an RNN with static input", NeurIPS; Theorem 1, "GDU").

fbalign's relaxation ``s_{t+1} = s_t - eta dE/ds(s_t)`` is Ernoult et al.'s discrete-time
dynamics ``s_{t+1} = dPhi/ds(x, s_t, theta)`` with the primitive function ``Phi = 1/2 |s|^2 -
eta E``; the nudged phase ``s_{t+1} = s_t - eta (dE/ds + beta dC/ds)`` is theirs with nudging
``eta beta``. Their theorem: once the free phase has converged (``s_t = s*``), the EP updates
of the nudged phase's step ``t``,

    Delta_s(t)     = (s^b_{t+1} - s^b_t) / (eta beta),
    Delta_theta(t) = -(dE/dtheta(s^b_{t+1}) - dE/dtheta(s^b_t)) / beta,

tend, as ``beta -> 0``, to minus the gradients of backprop through time for the loss ``C(s_T)``
of the same dynamics run from ``s*``: ``-dC(s_T)/ds_{T-t}`` and ``-dC(s_T)/dtheta_{T-t}`` (the
parameters as used in transition ``T-t-1 -> T-t``), step by step. Summed over ``k`` steps, the
weight updates are the rule's update after ``k`` nudged steps, and the BPTT sum is the gradient
of ``C`` after ``k`` steps from ``s*`` with respect to the parameters of those steps only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fbalign as fb
from fbalign._src.hopfield import hopfield
from fbalign._src.rules.equilibrium import (
    energy_param_grads,
    ep_cost,
    equilibrium_propagation,
)
from fbalign.rules import Batch, StepContext

ETA, K = 0.2, 6  # the step size, and the nudged phase's steps compared one by one


def _problem():
    net = hopfield((3, 4, 2), "sigmoid", step_size=ETA)
    params = jax.tree.map(lambda a: 2.0 * a, net.init(jax.random.PRNGKey(0), jnp.float64))
    params = [{"w": p["w"], "b": 0.1 * jnp.ones_like(p["b"])} for p in params]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    y = jnp.array([0, 1])
    s_star = net.free_phase(params, x, steps=20000, tol=1e-14).state
    return net, params, x, y, s_star


def _bptt(net, params, x, y, s_star):
    """Backprop through time, written here: the dynamics ``s_{t+1} = s_t - eta dE/ds(s_t;
    theta_t)`` run for K steps from ``s_0 = s*`` with one parameter copy per transition and a
    zero perturbation added to every state; ``jax.grad`` of ``C(s_K)`` gives, in Ernoult et
    al.'s indexing (``t`` steps before the end), ``dC/ds_{K-t}`` for t = 0..K-1 and
    ``dC/dtheta_{K-t}`` (the transition into ``s_{K-t}``) for t = 0..K-1."""
    def loss(thetas, eps):
        s = list(s_star)
        for t in range(K):
            s = [a + e for a, e in zip(s, eps[t], strict=True)]
            g = jax.grad(lambda v, p=thetas[t]: net.energy(p, x, v))(s)
            s = [a - ETA * d for a, d in zip(s, g, strict=True)]
        return ep_cost("squared", s[-1] + eps[K][-1], y)

    eps = [[jnp.zeros_like(a) for a in s_star] for _ in range(K + 1)]
    g_theta, g_eps = jax.jit(jax.grad(loss, (0, 1)))([params] * K, eps)
    return [g_eps[K - t] for t in range(K)], [g_theta[K - 1 - t] for t in range(K)]


def _ep(net, params, x, y, s_star, beta):
    """The nudged trajectory ``s^b_0 = s*, ..., s^b_K`` (one relaxation step at a time), the
    cumulative EP updates ``(dE/dtheta(s^b_k) - dE/dtheta(s*)) / beta`` summed over the batch
    for k = 0..K, and the rule's own update after K nudged steps (batch-summed)."""
    nudge = lambda s: net.energy(params, x, s) + beta * ep_cost("squared", s[-1], y)
    one = jax.jit(lambda s: net.relax_states(nudge, s, steps=1).state)
    traj = [list(s_star)]
    for _ in range(K):
        traj.append(one(traj[-1]))
    n = x.shape[0]
    de = jax.jit(lambda s: energy_param_grads(net, params, x, s))
    cumulative = [jax.tree.map(lambda a, b: n * (a - b) / beta, de(s), de(s_star)) for s in traj]
    rule = equilibrium_propagation(beta=beta, nudged_steps=K, free_steps=20000, tol=1e-14)
    key = jax.random.PRNGKey(0)
    step = jax.jit(lambda p: rule.step(p, rule.init(key, p, net), Batch(x, y), key,
                                       StepContext(net, fb.squared_error))[0])
    return traj, cumulative, jax.tree.map(lambda u: u * n, step(params))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def _errors(beta, problem, bptt):
    """The largest relative error, over the K steps, of the neural and weight updates."""
    net, params, x, y, s_star = problem
    neural, weights = bptt
    traj, cumulative, rule_update = _ep(net, params, x, y, s_star, beta)
    ep_w = [_flat(u) for u in cumulative]
    # the rule's update is the sum of the K steps' updates
    np.testing.assert_allclose(_flat(rule_update), ep_w[K], rtol=1e-9, atol=1e-12)
    err_s, err_w = [], []
    for t in range(K):
        d_ep = (_flat(traj[t + 1]) - _flat(traj[t])) / (ETA * beta)
        d_bp = -_flat(neural[t])
        err_s.append(np.linalg.norm(d_ep - d_bp) / np.linalg.norm(d_bp))
        # the rule's update has the gradient's sign: Delta_theta(t) = -(u_{t+1} - u_t)
        w_ep, w_bp = ep_w[t + 1] - ep_w[t], _flat(weights[t])
        err_w.append(np.linalg.norm(w_ep - w_bp) / np.linalg.norm(w_bp))
    return np.array(err_s), np.array(err_w)


def test_ep_neural_and_weight_updates_match_bptt_step_by_step_as_beta_shrinks():
    with jax.enable_x64(True):
        problem = _problem()
        net, params, x, _, s_star = problem
        g = jax.grad(lambda s: net.energy(params, x, s))(s_star)
        assert max(float(jnp.max(jnp.abs(a))) for a in g) < 1e-12  # the free phase converged
        bptt = _bptt(*problem)
        # the BPTT gradients change from step to step (the comparison is not of constants)
        assert np.linalg.norm(_flat(bptt[0][K - 1]) - _flat(bptt[0][0])) > 0.1 * np.linalg.norm(
            _flat(bptt[0][0]))
        big_s, big_w = _errors(1e-2, problem, bptt)
        small_s, small_w = _errors(1e-3, problem, bptt)
    # every step agrees, and the disagreement is the O(beta) bias of one-sided nudging: ten
    # times smaller beta, ten times smaller error (measured 10.0 at every step)
    assert small_s.max() < 2e-3 and small_w.max() < 2e-3, (small_s, small_w)
    np.testing.assert_allclose(big_s[1:] / small_s[1:], 10.0, rtol=0.15)
    np.testing.assert_allclose(big_w / small_w, 10.0, rtol=0.15)
