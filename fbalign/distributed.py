"""Data-parallel, seed-sharded and multi-host training (`jax.shard_map`; a `jax.pmap` entry)."""

from fbalign._src.distributed import (
    initialize,
    make_pmap_train_step,
    make_sharded_train_step,
    replicate,
    shard_batch,
    unreplicate,
)
from fbalign._src.sharding import (
    DATA_AXIS,
    SEED_AXIS,
    data_parallel,
    first_local,
    make_mesh,
    make_sharded_epoch_runner,
    place,
    select_devices,
    to_host,
    to_varying,
)

__all__ = [
    "DATA_AXIS",
    "SEED_AXIS",
    "data_parallel",
    "first_local",
    "initialize",
    "make_mesh",
    "make_pmap_train_step",
    "make_sharded_epoch_runner",
    "make_sharded_train_step",
    "place",
    "replicate",
    "select_devices",
    "shard_batch",
    "to_host",
    "to_varying",
    "unreplicate",
]
