"""Data-parallel, seed-parallel and multi-host training with JAX's own runtime.

The main path is `jax.shard_map` over a two-axis mesh ``("seed", "data")``:

* the **data** axis splits every global batch into equal contiguous shards; each device runs the
  rule on its shard and the updates are averaged with ``lax.pmean``, so the optimizer sees the
  global-batch updates and applies them identically everywhere (parameters stay replicated);
* the **seed** axis splits a seed ensemble (``fit(..., seeds=K)``): each device group trains its
  own ``K / n_seed`` networks, with no communication between groups.

``devices=8, seeds=1`` is pure data parallelism (mesh ``1 x 8``); ``devices=8, seeds=8`` puts one
network on each device (``8 x 1``); ``devices=8, seeds=2`` trains two networks, each over four
devices (``2 x 4``). The seed axis gets ``gcd(K, devices)`` devices.

Meshes, placement, `data_parallel` (the helper for the custom_vjp caveat: replicated parameters
must be cast to varying before a rule runs inside `shard_map`) and the sharded epoch runner live
in `fbalign._src.sharding`, which `train` imports too; this module adds the step builders on top
of `train.make_train_step` and re-exports the rest.

A `jax.pmap` entry point (`make_pmap_train_step`) uses the same step for users of the older API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fbalign._src.sharding import (
    DATA_AXIS,
    check_batch,
    local_step_fn,
    make_mesh,
    place,
    select_devices,
    shard_specs,
)
from fbalign._src.train import make_train_step

# ---------------------------------------------------------------------------------------------
# shard_map train step
# ---------------------------------------------------------------------------------------------


def make_sharded_train_step(
    model: Any,
    rule: Any,
    optimizer: Any,
    loss: Any = "cross_entropy",
    *,
    devices: int | Sequence[jax.Device] | None = None,
    mesh: Mesh | None = None,
    seeds: int | None = None,
    form: str = "explicit",
    rule_kwargs: dict | None = None,
) -> Callable:
    """Builds a data-parallel ``step(state, x, y) -> (state, metrics)`` with `jax.shard_map`.

    The same step as `fbalign.train.make_train_step` on the *global* batch ``x``: the batch is
    split over the mesh's ``"data"`` axis, each device runs the rule on its shard inside
    `data_parallel`, and the averaged updates go through the optimizer on every device.

    Args:
      model, rule, optimizer, loss, form, rule_kwargs: as in `make_train_step`.
      devices: number of devices (or a list); ignored when ``mesh`` is given.
      mesh: a mesh from `make_mesh`.
      seeds: when given, ``state`` is an ensemble with a leading seed axis (as made by
        ``jax.vmap(init_train_state)``) and ``x``, ``y`` carry the same leading axis (one batch
        per network); the seed axis is sharded over the mesh's ``"seed"`` axis.

    Returns:
      A jitted step (old state donated). Inputs are moved to the mesh as needed; the returned
      state stays there (``fbalign.distributed.to_host`` fetches it).
    """
    ensemble = seeds is not None
    mesh = mesh if mesh is not None else make_mesh(devices, seeds)
    local = make_train_step(model, rule, optimizer, loss, form=form, rule_kwargs=rule_kwargs,
                            jit=False, axis_name=DATA_AXIS)
    state_spec, batch_spec = shard_specs(ensemble)
    sharded = jax.jit(
        jax.shard_map(local_step_fn(local, ensemble), mesh=mesh,
                      in_specs=(state_spec, batch_spec, batch_spec),
                      out_specs=(state_spec, state_spec)),
        donate_argnums=0,
    )

    def step(state, x, y):
        check_batch(x.shape[1 if ensemble else 0], mesh)
        return sharded(place(state, mesh, state_spec), place(x, mesh, batch_spec),
                       place(y, mesh, batch_spec))

    step.mesh = mesh  # type: ignore[attr-defined]
    return step



# ---------------------------------------------------------------------------------------------
# pmap entry point (older API)
# ---------------------------------------------------------------------------------------------


def replicate(tree: Any, devices: Sequence[jax.Device] | int | None = None) -> Any:
    """Stacks ``tree`` once per device (a leading device axis) for a `jax.pmap` step."""
    devs = select_devices(devices) if devices is None or isinstance(devices, int) else devices
    sharding = NamedSharding(Mesh(np.array(list(devs), dtype=object), ("replica",)), P("replica"))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (len(devs), *jnp.shape(x))), sharding), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a pmapped pytree (they are identical after a data-parallel step)."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(x: Any, n: int) -> Any:
    """Reshapes a global batch ``(B, ...)`` to ``(n, B / n, ...)`` for `jax.pmap`."""

    def split(a):
        if a.shape[0] % n:
            raise ValueError(f"batch of {a.shape[0]} does not split evenly over {n} devices")
        return a.reshape(n, a.shape[0] // n, *a.shape[1:])

    return jax.tree.map(split, x)


def make_pmap_train_step(
    model: Any,
    rule: Any,
    optimizer: Any,
    loss: Any = "cross_entropy",
    *,
    devices: int | Sequence[jax.Device] | None = None,
    form: str = "explicit",
    rule_kwargs: dict | None = None,
    axis_name: str = DATA_AXIS,
) -> Callable:
    """`jax.pmap` data-parallel ``step(state, x, y)`` for users of the older API.

    ``state`` is replicated with `replicate`; ``x``, ``y`` have a leading device axis
    (`shard_batch`). The rule runs per device inside `data_parallel` (updates ``pmean``-ed), so
    the result equals `make_sharded_train_step`. `jax.pmap` is in maintenance mode: prefer
    `make_sharded_train_step`.
    """
    devs = None
    if devices is not None:
        devs = select_devices(devices) if isinstance(devices, int) else list(devices)
    local = make_train_step(model, rule, optimizer, loss, form=form, rule_kwargs=rule_kwargs,
                            jit=False, axis_name=axis_name)
    return jax.pmap(local, axis_name=axis_name, devices=devs, donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Multi-host
# ---------------------------------------------------------------------------------------------


def wait_for_coordinator(coordinator: str, timeout: float, interval: float = 0.5) -> None:
    """Waits until ``HOST:PORT`` accepts a TCP connection, for at most ``timeout`` seconds.

    ``jax.distributed.initialize`` on a process whose coordinator is absent waits minutes and
    then aborts the interpreter (a C++ fatal error, no Python exception); checking first turns
    that into a `TimeoutError` that says what to do.
    """
    import socket
    import time

    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=min(interval, timeout)):
                return
        except OSError as err:
            last = err
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"cannot reach the coordinator {coordinator} within {timeout:g} s "
                f"({last.strerror if last and last.strerror else last}); start process 0 "
                "(--process-id 0) first, on the host and port that --coordinator names, check "
                "that it is reachable from here, or raise --connect-timeout")
        time.sleep(interval)


def initialize(coordinator: str, num_processes: int, process_id: int, **kwargs: Any) -> None:
    """``jax.distributed.initialize`` with checked arguments; call it before any other JAX use.

    Args:
      coordinator: ``HOST:PORT`` of process 0 (every process passes the same address).
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      **kwargs: passed on (e.g. ``local_device_ids``, ``initialization_timeout``).

    On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``).
    """
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)
