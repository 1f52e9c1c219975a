"""Evolution strategies through evosax: OpenAI-ES (Salimans et al. 2017) and separable NES
(Wierstra et al. 2014) as `LearningRule` s that only evaluate the loss.

evosax does the strategy work (sampling, fitness shaping, the gradient estimate, step-size
adaptation); this module evaluates the population in one vmapped (or chunked) program, averages
fitness over the data-parallel axis, and hands evosax's mean step to fbalign's optimizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fbalign._src.base import (
    Array,
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
)

# strategy -> fitness shapings it accepts (first: its default). OpenAI-ES shapes raw losses into
# "lower is better" weights; SNES's utilities are "higher is better" (evosax's sign convention
# for each algorithm), so the two do not share shapings.
# The values name functions of evosax.core.fitness_shaping (evosax is imported when a strategy
# is built, so that `import fbalign` does not pay for it).
SHAPINGS: dict[str, dict[str, str]] = {
    "open_es": {"centered_rank": "centered_rank_fitness_shaping_fn",
                "raw": "identity_fitness_shaping_fn",
                "standardize": "standardize_fitness_shaping_fn"},
    "snes": {"utilities": "weights_fitness_shaping_fn"},
}
STRATEGIES = tuple(SHAPINGS)


class EvolutionState(NamedTuple):
    """State of `evolution_strategy`: evosax's own strategy state (a flax struct dataclass: the
    mean, ``std`` (a scalar for OpenAI-ES, one per parameter for SNES), SNES's ``lr_std``, the
    inner optimizer's state, the generation counter and the best member seen so far), saved and
    restored by `fbalign.checkpoint` like any other pytree."""

    strategy: Any


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def evolution_strategy(
    strategy: str = "open_es",
    population_size: int = 64,
    sigma: float = 0.02,
    antithetic: bool | None = None,
    fitness_shaping: str | None = None,
    chunk_size: int | None = None,
) -> LearningRule:
    """An evolution strategy from evosax as a rule whose update is the strategy's gradient estimate.

    **OpenAI-ES** (``"open_es"``; Salimans, Ho, Chen, Sidor & Sutskever 2017, "Evolution
    strategies as a scalable alternative to reinforcement learning"): draw ``eps_i ~ N(0, I)``
    (antithetic: ``eps_{i+P/2} = -eps_i``), evaluate ``F_i = loss(theta + sigma eps_i)`` on the
    batch, shape them into ``u_i`` (centered ranks ``rank_i / (P - 1) - 1/2``, lowest loss rank 0;
    or the raw ``F_i``; or standardised) and estimate

    ``g = 1 / (P sigma) sum_i u_i eps_i``   (``E[g] = grad E[F(theta + sigma eps)]`` for raw F).

    With antithetic pairs and raw fitness, ``g = 1/(2 P sigma) sum_pairs (F(theta + sigma eps) -
    F(theta - sigma eps)) eps``: constants and even-order (curvature) terms of ``F`` cancel, so
    on a quadratic ``g = (1/P) sum_i eps_i eps_i^T grad F(theta)`` exactly, for any ``sigma``.

    **Separable NES** (``"snes"``; Wierstra, Schaul, Glasmachers, Sun, Peters & Schmidhuber 2014,
    "Natural evolution strategies", Algorithm 6): ``z_k ~ N(0, I)``, ``theta_k = mu + sigma * z_k``
    (``sigma`` a vector), utilities ``u_k = max(0, log(P/2 + 1) - log k) / sum_j max(0, log(P/2 +
    1) - log j) - 1/P`` for the ``k``-th best member, and

    ``g = -sigma * sum_k u_k z_k`` (the update; ``mu <- mu - eta_mu g``, the paper's ``eta_mu = 1``
    with ``optax.sgd(1.0)``),
    ``sigma <- sigma * exp(eta_sigma / 2 * sum_k u_k (z_k^2 - 1))``, ``eta_sigma = (3 + ln d) /
    (5 sqrt d)``  (kept in the rule state).

    **Design.** evosax runs ask / tell on the flattened parameters (``ravel_pytree``) with its
    inner mean optimizer fixed to ``optax.sgd(1.0)``, and the strategy mean is set to the current
    params before every ask. evosax's mean step ``theta - mean_new`` is then exactly its gradient
    estimate ``g`` (gradient sign), which the step returns as ``updates``, so fbalign's optimizer
    applies it: ``optax.sgd(lr)`` is the papers' plain update with step ``lr``, ``optax.adam(lr)``
    what Salimans et al. used (OpenAI-ES); SNES's paper step is ``optax.sgd(1.0)``. This keeps
    evosax doing the strategy work, keeps one optimizer (whose state fbalign already checkpoints)
    instead of two, and keeps evosax's own state (sigma, SNES's adapted sigma vector, counters)
    in `EvolutionState`, which checkpoints save and restore. (The alternative, evosax's inner
    optimizer taking the step and ``optax.sgd(1.0)`` outside, would split the optimizer state
    between evosax and fbalign and ignore the optimizer given to ``fit``.) evosax's ``best_*``
    fields compare fitness measured on different batches; they are kept as evosax keeps them.

    The population's ``P`` networks run as one ``jax.vmap`` over members, or ``chunk_size`` at a
    time (``jax.lax.map(..., batch_size=chunk_size)``) to bound memory. Under data parallelism
    (``context.axis_name``) every device draws the same population (the step key is
    replicated) and the fitness is averaged over the axis (``lax.pmean``) before shaping, so
    every device shapes the global-batch fitness and takes the same step. The step key is split
    into ``(ask, tell)`` keys. Works with any network with ``apply(params, x)``.

    Args:
      strategy: ``"open_es"`` or ``"snes"``.
      population_size: ``P``, members per step (even for OpenAI-ES; at least 2).
      sigma: the perturbation scale (OpenAI-ES's fixed ``sigma``; SNES's initial ``sigma``).
      antithetic: mirrored sampling; None: the strategy's default (True for OpenAI-ES; SNES
        samples plainly, and True is refused for it).
      fitness_shaping: OpenAI-ES: ``"centered_rank"`` (default), ``"raw"``, ``"standardize"``;
        SNES: ``"utilities"`` (default, the NES utility function).
      chunk_size: None evaluates the whole population in one vmap; else members per chunk.

    Returns:
      A `LearningRule` with an `EvolutionState`.

    Example:
      >>> rule = fbalign.rules.evolution_strategy("open_es", population_size=256, sigma=0.02)
      >>> fbalign.train.fit(fbalign.mlp((64, 32, 10)), rule, optax.adam(1e-2), data)
    """
    if strategy not in SHAPINGS:
        raise ValueError(f"evolution_strategy: unknown strategy {strategy!r}; valid: "
                         f"{', '.join(STRATEGIES)}")
    if not _is_pos_int(population_size) or population_size < 2:
        raise ValueError(f"evolution_strategy: population_size must be an integer >= 2, got "
                         f"{population_size!r}")
    if strategy == "open_es" and population_size % 2:
        raise ValueError(f"evolution_strategy: population_size must be even for open_es "
                         f"(evosax's OpenAI-ES draws mirrored pairs), got {population_size}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"evolution_strategy: sigma must be a positive number, got {sigma!r}")
    if antithetic not in (None, True, False):
        raise ValueError(f"evolution_strategy: antithetic must be None, True or False, got "
                         f"{antithetic!r}")
    if strategy == "snes" and antithetic:
        raise ValueError("evolution_strategy: antithetic=True is not available for snes "
                         "(evosax's SNES samples independently); valid for snes: None, False")
    shapings = SHAPINGS[strategy]
    shaping = next(iter(shapings)) if fitness_shaping is None else fitness_shaping
    if shaping not in shapings:
        raise ValueError(f"evolution_strategy: fitness_shaping {fitness_shaping!r} is not "
                         f"available for {strategy}; valid: {', '.join(shapings)}")
    if chunk_size is not None and not _is_pos_int(chunk_size):
        raise ValueError(f"evolution_strategy: chunk_size must be None or a positive integer, "
                         f"got {chunk_size!r}")
    mirrored = strategy == "open_es" and antithetic is not False
    sigma = float(sigma)
    cache: dict[Any, tuple[Any, Any]] = {}

    def build(params: Params) -> tuple[Any, Any]:
        """The evosax strategy for params of this structure and its (static) params; cached per
        structure, shapes and dtypes (both are fixed configuration, not state)."""
        leaves, treedef = jax.tree.flatten(params)
        sig = (treedef, tuple((tuple(a.shape), jnp.result_type(a)) for a in leaves))
        if sig not in cache:
            # Built outside any trace (params may be tracers): evosax keeps its template.
            with jax.ensure_compile_time_eval():
                cache[sig] = make(jax.tree.unflatten(
                    treedef, [np.zeros(a.shape, jnp.result_type(a)) for a in leaves]))
        return cache[sig]

    def make(template: Params) -> tuple[Any, Any]:
        from evosax.algorithms import SNES, Open_ES
        from evosax.core import fitness_shaping as evosax_shaping

        shaping_fn = getattr(evosax_shaping, shapings[shaping])
        if strategy == "open_es":
            algo = Open_ES(population_size, template, use_antithetic_sampling=mirrored,
                           optimizer=optax.sgd(1.0), std_schedule=optax.constant_schedule(sigma),
                           fitness_shaping_fn=shaping_fn)
            return algo, algo.default_params
        algo = SNES(population_size, template, optimizer=optax.sgd(1.0),
                    fitness_shaping_fn=shaping_fn)
        return algo, algo.default_params.replace(std_init=jnp.asarray(sigma))

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EvolutionState:
        del network
        algo, es_params = build(params)
        dtype = ravel_pytree(params)[0].dtype
        return EvolutionState(_settle(algo.init(key, params, es_params), dtype))

    def step_fn(params: Params, state: EvolutionState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EvolutionState, StepOutput]:
        algo, es_params = build(params)
        flat, unravel = ravel_pytree(params)
        es_state = state.strategy.replace(mean=flat.astype(state.strategy.mean.dtype))
        k_ask, k_tell = jax.random.split(key)
        population, es_state = algo.ask(k_ask, es_state, es_params)
        fitness = population_fitness(context, batch, population, chunk_size)
        es_state, _ = algo.tell(k_tell, population, fitness, es_state, es_params)
        updates = unravel((flat - es_state.mean).astype(flat.dtype))
        out = context.network.apply(params, batch.x)
        metrics = {"es_fitness_mean": jnp.mean(fitness), "es_fitness_min": jnp.min(fitness),
                   "es_sigma": jnp.mean(es_state.std)}
        new_state = EvolutionState(_settle(es_state, flat.dtype))
        return updates, new_state, StepOutput(context.loss(out, batch.y), out, metrics)

    return LearningRule(init_fn, step_fn, (), "evolution_strategy")


def _settle(tree: Any, dtype: Any) -> Any:
    """Every float leaf as a strongly typed array of the params' dtype, integers strongly typed:
    evosax makes some leaves weakly typed (Python scalars) or float64 under x64, and the state
    must keep one type from step to step (a scan carry; no recompiles between chunks)."""

    def fix(a: Any) -> Any:
        a = jnp.asarray(a)
        return jnp.asarray(a, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)

    return jax.tree.map(fix, tree)


def population_fitness(context: StepContext, batch: Batch, population: Params,
                       chunk_size: int | None = None) -> Array:
    """``F_i = loss(apply(theta_i, x), y)`` for every member of ``population`` (params with a
    leading member axis): one ``jax.vmap``, or ``jax.lax.map`` over chunks of ``chunk_size``
    members. Under data parallelism (``context.axis_name``) the per-device batch losses are
    averaged (``lax.pmean``), giving the global-batch fitness on every device."""

    def fitness(member: Params) -> Array:
        return context.loss(context.network.apply(member, batch.x), batch.y)

    if chunk_size is None:
        f = jax.vmap(fitness)(population)
    else:
        f = jax.lax.map(fitness, population, batch_size=chunk_size)
    if context.axis_name is not None:
        f = jax.lax.pmean(f, context.axis_name)
    return f
