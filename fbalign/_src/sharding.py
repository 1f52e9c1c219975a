"""The `jax.shard_map` machinery that `train.fit` and `distributed` share: meshes, placement,
the custom_vjp caveat helper `data_parallel`, and the sharded epoch runner.

A mesh has two axes, ``("seed", "data")``:

* the **data** axis splits every global batch into equal contiguous shards; each device runs the
  rule on its shard and the updates are averaged with ``lax.pmean``, so the optimizer sees the
  global-batch updates and applies them identically everywhere (parameters stay replicated);
* the **seed** axis splits a seed ensemble (``fit(..., seeds=K)``): each device group trains its
  own ``K / n_seed`` networks, with no communication between groups.

**The custom_vjp caveat.** Inside `shard_map`, JAX types every value as *invariant* (the same on
all devices) or *varying* over a mesh axis. Replicated parameters are invariant; data shards are
varying. Two things go wrong when a rule is differentiated with invariant parameters:

1. a `jax.custom_vjp` primitive (`fa_matmul`, `kp_matmul`, the DFA taps, ...) whose backward
   returns a per-shard (varying) cotangent for an invariant input is rejected ("the manual axis
   types do not match");
2. where JAX does accept it, the gradient of an invariant parameter is implicitly *summed* over
   shards (the transpose of the implicit invariant-to-varying broadcast), which for a mean loss
   is ``n_shards`` times the global-batch gradient.

`data_parallel` is the one helper for both: it casts the replicated arguments to varying with
``jax.lax.pcast(x, axis, to="varying")`` before the rule runs, so every update is a per-shard
mean, then ``pmean``-s whatever came out varying. Outputs that are the very inputs (the fixed
feedback matrices of FA and DFA) are returned uncast, so they stay bit-identical.

This module imports nothing from `train` (so `train` imports it at top level); the step builders
that need `train.make_train_step` live in `distributed`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fbalign._src.runner import ensemble_step, reduce_chunk

Array = jax.Array

DATA_AXIS = "data"
SEED_AXIS = "seed"


# ---------------------------------------------------------------------------------------------
# The helper for the custom_vjp caveat
# ---------------------------------------------------------------------------------------------


def varying_axes(x: Any) -> frozenset:
    """The mesh axes ``x`` is typed *varying* over (empty outside `jax.shard_map`)."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))  # older JAX spelling


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def to_varying(tree: Any, axis_name: str = DATA_AXIS) -> Any:
    """Casts every array leaf of ``tree`` that is invariant over ``axis_name`` to varying.

    ``jax.lax.pcast(x, axis_name, to="varying")`` on each leaf (a no-op copy on device); leaves
    already varying, and non-array leaves, are returned as they are. Under `jax.pmap` (which does
    not track varying types) it changes nothing.
    """

    def cast(x):
        if not _is_array(x) or axis_name in varying_axes(x):
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def _cross_shard_mean(x: Array, axis_name: str) -> Array:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jax.lax.pmean(x, axis_name)
    if jnp.issubdtype(dtype, jnp.bool_):
        return jax.lax.pmax(x.astype(jnp.int32), axis_name).astype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        # Counters and indices: identical on every shard when computed from replicated values.
        return jax.lax.pmax(x, axis_name)
    raise TypeError(
        f"data_parallel: cannot average a varying output of dtype {dtype} across shards "
        "(e.g. a PRNG key derived from the data); derive keys from the replicated state key"
    )


def data_parallel(
    fn: Callable[..., Any],
    axis_name: str = DATA_AXIS,
    replicated_argnums: Sequence[int] = (0, 1),
) -> Callable[..., Any]:
    """Wraps a per-shard rule computation so that it returns cross-shard means.

    For use inside `jax.shard_map` (or `jax.pmap`) over ``axis_name``. The wrapped function:

    1. casts the arguments at ``replicated_argnums`` (parameters, rule state) from invariant to
       varying with ``jax.lax.pcast(x, axis_name, to="varying")``; without this a `custom_vjp`
       backward that returns a per-shard weight cotangent fails inside ``shard_map``, and plain
       ``jax.grad`` silently *sums* the per-shard gradients instead of averaging them;
    2. calls ``fn``;
    3. returns every output leaf that is varying over ``axis_name`` as its ``lax.pmean`` (integer
       leaves: ``pmax``, they must agree), every output that *is* one of the cast inputs as the
       original uncast input (unchanged feedback matrices stay bit-identical, with no collective),
       and invariant outputs as they are.

    When every shard holds an equal slice of a batch and ``fn`` returns batch means, the result
    equals ``fn`` on the whole batch, up to floating-point reassociation. Under `jax.pmap`, which
    does not track varying types, everything but the passed-through inputs is averaged.

    Args:
      fn: the per-shard computation, e.g. ``(params, rule_state, x, y, key) -> (updates,
        rule_state, metrics)``.
      axis_name: the mesh (or pmap) axis the batch is split over.
      replicated_argnums: positions of the arguments that are replicated across shards.

    Returns:
      The wrapped function, with ``fn``'s signature.

    Example:
      >>> step = data_parallel(lambda p, x: jax.grad(loss)(p, x), replicated_argnums=(0,))
      >>> jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    """
    replicated_argnums = tuple(replicated_argnums)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        args = list(args)
        uncast: dict[int, Any] = {}
        cast_leaves: list[Any] = []
        for i in replicated_argnums:
            leaves, treedef = jax.tree.flatten(args[i])
            new = jax.tree.leaves(to_varying(leaves, axis_name))
            for c, o in zip(new, leaves, strict=True):
                uncast[id(c)] = o
            cast_leaves.extend(new)
            args[i] = jax.tree.unflatten(treedef, new)
        tracked = any(axis_name in varying_axes(c) for c in cast_leaves)
        out = fn(*args, **kwargs)

        def reduce(leaf):
            if id(leaf) in uncast:
                return uncast[id(leaf)]
            if not _is_array(leaf):
                return leaf
            if tracked and axis_name not in varying_axes(leaf):
                return leaf
            return _cross_shard_mean(leaf, axis_name)

        # ``cast_leaves`` keeps the cast values alive, so their ids cannot be reused by outputs.
        result = jax.tree.map(reduce, out)
        del cast_leaves
        return result

    return wrapped


# ---------------------------------------------------------------------------------------------
# Devices, meshes and placement
# ---------------------------------------------------------------------------------------------


def select_devices(n: int | None = None) -> list[jax.Device]:
    """The first ``n`` devices (all when None), taking ``n / process_count`` from every process.

    Raises a ValueError naming both numbers when fewer than ``n`` devices exist, or (multi-host)
    when ``n`` is not a multiple of the number of processes.
    """
    available = jax.device_count()
    if n is None:
        n = available
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"devices must be a positive integer, got {n!r}")
    if n > available:
        raise ValueError(
            f"asked for {n} devices but only {available} are available "
            f"({jax.default_backend()}: {', '.join(str(d) for d in jax.devices()[:8])}"
            f"{', ...' if available > 8 else ''}); on CPU, fake devices come from "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} set before JAX starts"
        )
    procs = jax.process_count()
    if procs == 1:
        return list(jax.devices()[:n])
    if n % procs:
        raise ValueError(f"asked for {n} devices over {procs} processes; use a multiple of {procs}"
                         " so that every process contributes the same number")
    per = n // procs
    by_proc: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_proc.setdefault(d.process_index, []).append(d)
    if any(len(v) < per for v in by_proc.values()):
        raise ValueError(f"asked for {per} devices per process but some process has fewer: "
                         f"{ {k: len(v) for k, v in by_proc.items()} }")
    return [d for p in sorted(by_proc) for d in by_proc[p][:per]]


def make_mesh(devices: int | Sequence[jax.Device] | None = None, seeds: int | None = None) -> Mesh:
    """A ``("seed", "data")`` mesh: ``gcd(seeds, n)`` seed groups of ``n / gcd`` data shards.

    Args:
      devices: how many devices (taken with `select_devices`), an explicit list, or None for all.
      seeds: ensemble size (None or 1: no seed axis, all devices split the batch).
    """
    devs = select_devices(devices) if devices is None or isinstance(devices, int) else list(devices)
    n_seed = math.gcd(int(seeds or 1), len(devs))
    return Mesh(np.array(devs, dtype=object).reshape(n_seed, len(devs) // n_seed),
                (SEED_AXIS, DATA_AXIS))


def check_batch(batch_size: int, mesh: Mesh) -> int:
    """The per-device batch size; a ValueError when ``batch_size`` does not split evenly."""
    n_data = mesh.shape[DATA_AXIS]
    if batch_size % n_data:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {n_data} data-parallel devices; "
            f"use a multiple of {n_data}"
        )
    return batch_size // n_data


def _to_global(x: Any, sharding: NamedSharding) -> Any:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() > 1 and isinstance(x, jax.Array):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = _to_global(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=impl)
        if not x.is_fully_addressable:
            raise ValueError(f"cannot move an array sharded as {x.sharding} to {sharding}")
        x = np.asarray(x)  # every process holds the same value; device_put assumes so
    return jax.device_put(x, sharding)


def place(tree: Any, mesh: Mesh, spec: P | None = None) -> Any:
    """Puts every leaf of ``tree`` on ``mesh`` with ``spec`` (default ``P()``, replicated); a
    no-op for leaves already there. With several processes, every process must pass the same
    values.
    """
    sharding = NamedSharding(mesh, P() if spec is None else spec)
    return jax.tree.map(lambda x: _to_global(x, sharding), tree)


def shard_specs(ensemble: bool) -> tuple[P, P]:
    """(state spec, batch spec): the batch is split over data (and seed, for an ensemble)."""
    if ensemble:
        return P(SEED_AXIS), P(SEED_AXIS, DATA_AXIS)
    return P(), P(DATA_AXIS)


def to_host(tree: Any) -> Any:
    """Fetches a (possibly sharded, possibly multi-host) pytree as numpy arrays on every process."""

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def first_local(x: Array) -> np.ndarray:
    """The first locally held shard of ``x`` as numpy (cheap; no cross-process traffic)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# The sharded epoch runner
# ---------------------------------------------------------------------------------------------


def local_step_fn(step: Callable, ensemble: bool, impl: str = "vmap") -> Callable:
    """What one device group runs: ``step`` over its share of the seeds for an ensemble."""
    return ensemble_step(step, impl) if ensemble else step


def make_sharded_epoch_runner(
    step: Callable, batch_size: int, chunk: int, mesh: Mesh, ensemble: bool = False,
    ensemble_impl: str = "vmap",
) -> Callable:
    """The sharded counterpart of `fbalign.train.make_epoch_runner` (``ensemble_impl`` as
    there: how each device group runs its share of the seeds).

    ``run(state, x_all, y_all, perm, start)`` runs ``chunk`` steps in one ``lax.scan`` inside
    `jax.shard_map`. The dataset and permutation are replicated on every device; data shard
    ``d`` of global batch ``i`` is ``perm[i * batch_size + d * b : ... + b]`` with ``b =
    batch_size / n_data``, so the global batch is exactly the single-device one and no example
    moves between devices. ``step`` must be built with ``make_train_step(..., jit=False,
    axis_name="data")``. Metrics come back replicated (per seed for an ensemble).
    """
    local_bs = check_batch(batch_size, mesh)
    one = local_step_fn(step, ensemble, ensemble_impl)
    state_spec, _ = shard_specs(ensemble)
    perm_spec = P(SEED_AXIS) if ensemble else P()

    def run_local(state, x_all, y_all, perm, start):
        shard = jax.lax.axis_index(DATA_AXIS)

        def body(carry, i):
            off = (start + i) * batch_size + shard * local_bs
            idx = jax.lax.dynamic_slice_in_dim(perm, off, local_bs, axis=perm.ndim - 1)
            return one(carry, x_all[idx], y_all[idx], idx)

        return jax.lax.scan(body, state, jnp.arange(chunk))

    # Per-step metrics come out as (chunk, seeds, ...) for an ensemble (seed axis sharded) and
    # are reduced over the chunk outside the shard_map, exactly as in make_epoch_runner.
    metric_spec = P(None, SEED_AXIS) if ensemble else P()
    mapped = jax.shard_map(run_local, mesh=mesh,
                           in_specs=(state_spec, P(), P(), perm_spec, P()),
                           out_specs=(state_spec, metric_spec))

    def run_global(state, x_all, y_all, perm, start):
        state, ms = mapped(state, x_all, y_all, perm, start)
        return state, reduce_chunk(ms)

    sharded = jax.jit(run_global, donate_argnums=0)
    cache: dict[int, tuple[Any, Any]] = {}

    def placed(x, spec):
        # The dataset and an epoch's permutation are reused across calls: move them once.
        hit = cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if len(cache) > 8:
            cache.clear()
        out = place(x, mesh, spec)
        cache[id(x)] = (x, out)
        return out

    def run(state, x_all, y_all, perm, start):
        return sharded(place(state, mesh, state_spec), placed(x_all, P()), placed(y_all, P()),
                       placed(perm, perm_spec), place(jnp.asarray(start, jnp.int32), mesh, P()))

    run.mesh = mesh  # type: ignore[attr-defined]
    return run
