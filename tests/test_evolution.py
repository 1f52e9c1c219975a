"""Evolution strategies (OpenAI-ES, Salimans et al. 2017; SNES, Wierstra et al. 2014) through
evosax: the estimators against NumPy references written from the papers, the population's
fitness against a Python loop over members, chunked == vmapped, data parallelism, jit/vmap over
seeds, checkpoints of the strategy state, training through `fit`, and refused options."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from evosax.algorithms import SNES, Open_ES
from jax.flatten_util import ravel_pytree

import fbalign as fb
from fbalign import checkpoint as C
from fbalign._src.rules.evolution import evolution_strategy, population_fitness
from fbalign.models import from_function
from fbalign.rules import Batch, StepContext
from fbalign.train import init_train_state, make_train_step

KEY = jax.random.PRNGKey(7)


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def _mlp_problem(sizes=(3, 4, 2), batch=8):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    y = jnp.arange(batch) % sizes[-1]
    return model, params, x, y


def _step(rule, model, params, x, y, key=KEY, loss=fb.cross_entropy):
    """One jitted rule step (a single compile per configuration)."""
    state = rule.init(jax.random.PRNGKey(3), params, model)
    ctx = StepContext(model, loss)
    return jax.jit(lambda p, s, k: rule.step(p, s, Batch(x, y), k, ctx))(params, state, key)


def _eps(algo, params, sigma, key=KEY, es_params=None) -> np.ndarray:
    """The perturbations eps_i = (theta_i - theta) / sigma of the population the rule evaluates:
    evosax's ask with the rule's ask key (the step key split in two, first half), float64."""
    pop = _members(algo, params, sigma, key, es_params)
    flat = np.asarray(jax.vmap(lambda m: ravel_pytree(m)[0])(pop), np.float64)
    return (flat - _flat(params)) / sigma


def _members(algo, params, sigma, key=KEY, es_params=None):
    es_params = algo.default_params if es_params is None else es_params
    st = algo.init(jax.random.PRNGKey(0), params, es_params).replace(std=sigma)
    return algo.ask(jax.random.split(key)[0], st, es_params)[0]


def _loop_fitness(model, loss, pop, x, y, n) -> np.ndarray:
    """F_i one member at a time, in a Python loop (the jitted loss compiles once)."""
    f = jax.jit(lambda m: loss(model.apply(m, x), y))
    return np.array([float(f(jax.tree.map(lambda a, i=i: a[i], pop))) for i in range(n)])


def _quadratic():
    """f(theta) = mean(out) + 0.5 mean(out^2) with out = x @ w + b: a quadratic in theta."""
    net = from_function(lambda p, x: x @ p["w"] + p["b"],
                        lambda k: {"w": jax.random.normal(k, (3, 2)) / 2, "b": jnp.zeros(2)})
    loss = lambda out, y: jnp.mean(out) + 0.5 * jnp.mean(out**2) + 0.0 * jnp.sum(y)
    params = net.init(jax.random.PRNGKey(4))
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 3))
    return net, loss, params, x, jnp.zeros(6)


def test_antithetic_raw_estimator_is_exact_on_a_quadratic_and_unbiased_for_any_sigma():
    """Mirrored pairs cancel F's constant and curvature (Salimans et al. 2017, sec. 2.2): on a
    quadratic (a linear F plus curvature) g = (1/P) sum_i eps_i eps_i^T grad F exactly, whatever
    sigma, so g is an unbiased sample of grad F with Var[g_j] = (|grad F|^2 + (grad F)_j^2) /
    (P/2) (P/2 independent pairs), also whatever sigma."""
    net, loss, params, x, y = _quadratic()
    grad = _flat(jax.grad(lambda p: loss(net.apply(p, x), y))(params))
    p_size = 4000
    algo = Open_ES(p_size, params)
    for sigma in (0.01, 10.0):
        rule = evolution_strategy("open_es", p_size, sigma, antithetic=True,
                                  fitness_shaping="raw")
        got = _flat(_step(rule, net, params, x, y, loss=loss)[0])
        eps = _eps(algo, params, sigma)
        np.testing.assert_allclose(eps[: p_size // 2], -eps[p_size // 2:], rtol=1e-3, atol=1e-3)
        want = eps.T @ (eps @ grad) / p_size
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
        z = (got - grad) / np.sqrt((grad @ grad + grad**2) / (p_size / 2))
        assert np.abs(z).max() < 5.0 and 0.1 < np.mean(z**2) < 3.0, (sigma, z)


def test_openai_es_update_equals_the_papers_estimator_from_a_python_loop():
    model, params, x, y = _mlp_problem()
    p_size, sigma = 6, 0.1
    pop = _members(Open_ES(p_size, params), params, sigma)
    f = _loop_fitness(model, fb.cross_entropy, pop, x, y, p_size)
    # the rule's evaluation: one vmap, and in chunks of 4 (6 = 4 + a remainder of 2)
    ctx = StepContext(model, fb.cross_entropy)
    fit_of = jax.jit(lambda pop: [population_fitness(ctx, Batch(x, y), pop, c)
                                  for c in (None, 4)])
    for got in fit_of(pop):
        np.testing.assert_allclose(got, f, rtol=1e-6)
    flat = np.asarray(jax.vmap(lambda m: ravel_pytree(m)[0])(pop), np.float64)
    eps = (flat - _flat(params)) / sigma
    for shaping, chunk in (("raw", 4), ("centered_rank", None)):
        rule = evolution_strategy("open_es", p_size, sigma, fitness_shaping=shaping,
                                  chunk_size=chunk)
        updates, state, out = _step(rule, model, params, x, y)
        u = f if shaping == "raw" else np.argsort(np.argsort(f)) / (p_size - 1) - 0.5
        want = u @ eps / (p_size * sigma)  # g = 1/(P sigma) sum_i u_i eps_i (Salimans 2017)
        np.testing.assert_allclose(_flat(updates), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(out.loss),
                               float(fb.cross_entropy(model.apply(params, x), y)), rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics["es_fitness_mean"]), f.mean(), rtol=1e-5)
    assert int(state.strategy.generation_counter) == 1


def test_snes_mean_and_sigma_steps_equal_wierstra_2014_algorithm_6():
    model, params, x, y = _mlp_problem()
    p_size, sigma = 7, 0.2
    updates, state, _ = _step(evolution_strategy("snes", p_size, sigma), model, params, x, y)
    algo = SNES(p_size, params)
    pop = _members(algo, params, sigma)
    f = _loop_fitness(model, fb.cross_entropy, pop, x, y, p_size)
    z = _eps(algo, params, sigma)
    d = z.shape[1]
    k = np.arange(1, p_size + 1)
    raw = np.maximum(0.0, np.log(p_size / 2 + 1) - np.log(k))
    util = raw / raw.sum() - 1 / p_size  # u_k for the k-th best (lowest loss) member
    u = util[np.argsort(np.argsort(f))]
    np.testing.assert_allclose(_flat(updates), -sigma * (u @ z), rtol=1e-4, atol=1e-6)
    eta_sigma = (3 + np.log(d)) / (5 * np.sqrt(d))
    want_sigma = sigma * np.exp(eta_sigma / 2 * (u @ (z**2 - 1)))
    np.testing.assert_allclose(np.asarray(state.strategy.std), want_sigma, rtol=1e-4)


def test_data_parallel_fitness_is_the_global_batch_fitness():
    """Two shards under an axis name (vmap stands in for shard_map) take the step the whole
    batch takes: the fitness is averaged before ranking."""
    model, params, x, y = _mlp_problem(batch=8)
    rule = evolution_strategy("open_es", 8, 0.5)
    state = rule.init(jax.random.PRNGKey(3), params, model)

    def both(x, y):
        whole = rule.step(params, state, Batch(x, y), KEY, StepContext(model, fb.cross_entropy))
        ctx = StepContext(model, fb.cross_entropy, "data")
        shards = jax.vmap(lambda xs, ys: rule.step(params, state, Batch(xs, ys), KEY, ctx)[0],
                          axis_name="data")(x.reshape(2, 4, -1), y.reshape(2, 4))
        return whole[0], shards

    whole, shards = jax.jit(both)(x, y)
    for i in range(2):
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], shards), whole, 1e-5, 1e-7)


@functools.cache
def _snes_training():
    """A SNES train step (Adam) shared by the seed and checkpoint tests: (model, rule, opt, x,
    y, the unjitted step, the jitted step)."""
    model, _, x, y = _mlp_problem((3, 5, 2))
    rule, opt = evolution_strategy("snes", 6, 0.1), optax.adam(1e-2)
    step = make_train_step(model, rule, opt, jit=False)
    return model, rule, opt, x, y, step, jax.jit(step)


def test_jit_and_vmap_over_two_seeds_match_single_runs():
    model, rule, opt, x, y, step, one = _snes_training()
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    states = jax.tree.map(lambda *a: jnp.stack(a),
                          *[init_train_state(model, rule, opt, k) for k in keys])
    new, _ = jax.jit(jax.vmap(step, in_axes=(0, None, None)))(states, x, y)
    for i in range(2):
        single, _ = one(jax.tree.map(lambda a, i=i: a[i], states), x, y)
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], new.params), single.params,
                           1e-5, 1e-7)
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], new.rule_state),
                           single.rule_state, 1e-5, 1e-7)
    assert not np.allclose(new.rule_state.strategy.std[0], new.rule_state.strategy.std[1])


def test_checkpoint_round_trip_restores_the_strategy_state(tmp_path):
    model, rule, opt, x, y, _, step = _snes_training()
    make = lambda: init_train_state(model, rule, opt, jax.random.PRNGKey(2))
    st = make()
    for _ in range(2):
        st, _ = step(st, x, y)
    std0 = np.full(_flat(st.params).shape, 0.1)
    assert not np.allclose(np.asarray(st.rule_state.strategy.std), std0)  # sigma has adapted
    C.save_checkpoint(tmp_path, st, {"step": 2})
    back = C.load_checkpoint(tmp_path, target=jax.eval_shape(make)).state
    assert type(back.rule_state.strategy) is type(st.rule_state.strategy)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(st), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    (s1, _), (s2, _) = step(back, x, y), step(st, x, y)
    assert_trees_close(s1.rule_state, s2.rule_state, 0, 0)
    assert_trees_close(s1.params, s2.params, 0, 0)


def test_fit_lowers_the_loss():
    """One epoch of `fit` (12 steps) takes a 3-class teacher task well below chance."""
    data = fb.data.load_teacher(n_train=192, n_test=64, input_dim=6, hidden=8, output_dim=3)
    res = fb.train.fit(fb.mlp((6, 12, 3)), evolution_strategy("open_es", 32, 0.05),
                       optax.adam(0.05), data, epochs=1, batch_size=16, progress=False)
    last = res.history[-1]
    assert last["test_loss"] < 0.7 * np.log(3)  # uniform prediction: ln 3
    assert last["test_error"] < 40.0  # chance: 67 %
    assert last["train_es_sigma"] == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "cma_es"}, "strategy 'cma_es'.*open_es, snes"),
    ({"population_size": 1}, "population_size must be an integer >= 2"),
    ({"population_size": 8.0}, "population_size"),
    ({"population_size": 7}, "population_size must be even for open_es"),
    ({"sigma": 0.0}, "sigma must be a positive number, got 0.0"),
    ({"sigma": -1}, "sigma"),
    ({"antithetic": "yes"}, "antithetic must be None, True or False"),
    ({"strategy": "snes", "antithetic": True}, "antithetic=True is not available for snes"),
    ({"fitness_shaping": "utilities"}, "'utilities' is not available for open_es; valid: "
                                       "centered_rank, raw, standardize"),
    ({"strategy": "snes", "fitness_shaping": "raw"}, "not available for snes; valid: utilities"),
    ({"chunk_size": 0}, "chunk_size must be None or a positive integer, got 0"),
    ({"chunk_size": True}, "chunk_size"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evolution_strategy(**kwargs)
