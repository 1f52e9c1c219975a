"""Checkpoints: a training state and its position, written atomically as msgpack files.

A checkpoint file ``ckpt-<step>.msgpack`` is a msgpack map (``flax.serialization``; arrays are
stored as raw bytes with shape and dtype, so a restore is bit-exact; no pickle) holding

* ``format``/``version``: ``"fbalign-checkpoint"``, 2;
* ``meta``: a JSON string with the step, the data-order position (``epoch``, ``step_in_epoch``),
  the metrics so far and whatever else the writer adds;
* ``payload``: the msgpack bytes of the state's state-dict, and ``sha256``, the checksum of the
  meta and the payload together (`_digest`), so a flipped bit in the position is caught like
  one in the weights. Version-1 files (checksum of the payload only) are still read.

Files are written to a temp file in the same directory, flushed, ``fsync``-ed and renamed into
place, so a crash mid-write never leaves a broken checkpoint under a final name; older
checkpoints are deleted only after the new one is complete. Restoring needs a *target*: a state
of the same structure (rebuild the initial state with the same configuration), whose leaves'
shapes and dtypes the checkpoint must match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

FORMAT = "fbalign-checkpoint"
VERSION = 2
_READABLE = (1, 2)
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.msgpack$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or restored; the message names the file."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the state (restored into a target, or a raw state dict), its
    metadata (``step``, ``epoch``, ``step_in_epoch``, ``history``, ...) and its file."""

    state: Any
    meta: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name of the checkpoint at ``step`` in ``directory``."""
    return Path(directory) / f"ckpt-{int(step):09d}.msgpack"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint files in ``directory``, oldest (lowest step) first; temp files of
    interrupted writes are not listed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint file in ``directory``, or None."""
    files = list_checkpoints(directory)
    return files[-1] if files else None


def clean_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Removes temp files left by writes that were interrupted (a crash mid-save)."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".ckpt-") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically: temp file in the same directory, flush, fsync,
    rename (``os.replace``), fsync of the directory. Readers see the old file or the new one,
    never a partial one; on any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _digest(meta_json: str, payload: bytes, version: int = VERSION) -> str:
    """SHA-256 of what a checkpoint of ``version`` covers: since version 2 the metadata (its
    JSON text, length-prefixed) and the payload; version 1 covered the payload only."""
    h = hashlib.sha256()
    if version >= 2:
        m = meta_json.encode()
        h.update(len(m).to_bytes(8, "little"))
        h.update(m)
    h.update(payload)
    return h.hexdigest()


def _is_key(a: Any) -> bool:
    dt = getattr(a, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _key_impl(a: Any):
    if isinstance(a, jax.Array):
        return jax.random.key_impl(a)
    return a.dtype._impl  # a jax.ShapeDtypeStruct of a key type


def _unwrap_keys(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def tree_paths(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` with readable paths such as ``params[1]['w']``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(p), leaf) for p, leaf in flat]


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The path of the first floating-point leaf holding a NaN or Inf, or None."""
    for path, leaf in tree_paths(tree, prefix):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            return path
    return None


def check_tree_matches(target: Any, got: Any, what: str, expected_what: str) -> None:
    """Raises `ValueError` naming the first leaf where ``got`` differs from ``target`` in tree
    structure, shape or dtype (``what`` and ``expected_what`` name the two sides)."""
    t_flat, t_def = jax.tree_util.tree_flatten_with_path(target)
    g_flat, g_def = jax.tree_util.tree_flatten_with_path(got)
    if t_def != g_def:
        t_paths = [jax.tree_util.keystr(p) for p, _ in t_flat]
        g_paths = [jax.tree_util.keystr(p) for p, _ in g_flat]
        only_t = [p for p in t_paths if p not in g_paths][:3]
        only_g = [p for p in g_paths if p not in t_paths][:3]
        detail = ""
        if only_t or only_g:
            detail = f" (only in {expected_what}: {only_t or '-'}; only in {what}: {only_g or '-'})"
        raise ValueError(f"{what} does not have the structure of {expected_what}{detail}: "
                         f"{g_def} vs {t_def}")
    for (p, t), (_, g) in zip(t_flat, g_flat, strict=True):
        t_shape, g_shape = _shape(t), _shape(g)
        t_dtype, g_dtype = _dtype(t), _dtype(g)
        if t_shape != g_shape or t_dtype != g_dtype:
            raise ValueError(
                f"{what}{jax.tree_util.keystr(p)} has shape {g_shape} and dtype {g_dtype}; "
                f"{expected_what} needs shape {t_shape} and dtype {t_dtype}"
            )


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else tuple(np.shape(a))


def _dtype(a: Any) -> str:
    dt = getattr(a, "dtype", None)
    return str(dt) if dt is not None else type(a).__name__


def save_checkpoint(
    directory: str | os.PathLike,
    state: Any,
    meta: dict[str, Any],
    *,
    keep: int = 2,
    allow_nonfinite: bool = False,
) -> Path:
    """Writes ``state`` (any pytree, e.g. a `TrainState`) with ``meta`` to
    ``directory/ckpt-<meta["step"]>.msgpack`` atomically, then keeps only the newest ``keep``
    checkpoints (the older ones are removed only after the new file is complete).

    Args:
      meta: JSON-serialisable metadata; must hold an integer ``"step"``.
      keep: how many checkpoints to keep (at least 1).
      allow_nonfinite: by default a state holding NaN or Inf is refused (`CheckpointError`),
        so a diverged run never replaces the last good checkpoint.
    """
    from flax import serialization

    if "step" not in meta:
        raise ValueError("meta must hold the integer 'step' of the checkpoint")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    host = jax.device_get(_unwrap_keys(state))
    if not allow_nonfinite and (bad := first_nonfinite(host, "state")) is not None:
        raise CheckpointError(f"refusing to save a checkpoint at step {meta['step']}: {bad} "
                              "holds NaN or Inf; the last good checkpoint is kept")
    payload = serialization.msgpack_serialize(serialization.to_state_dict(host))
    meta_json = json.dumps(meta)
    blob = serialization.msgpack_serialize({
        "format": FORMAT,
        "version": VERSION,
        "meta": meta_json,
        "sha256": _digest(meta_json, payload),
        "payload": payload,
    })
    target = checkpoint_path(directory, meta["step"])
    try:
        path = atomic_write_bytes(target, blob)
    except OSError as err:
        kept = latest_checkpoint(directory)
        raise CheckpointError(
            f"cannot write checkpoint {target}: {err.strerror or err}"
            + (f"; the previous checkpoint {kept} is kept" if kept else "")) from err
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads and verifies one checkpoint file: returns ``(meta, state_dict)``.

    Raises:
      CheckpointError: naming the file when it is unreadable, not a checkpoint, of another
        version, its meta and payload do not match its SHA-256, or its step is not the one in
        its file name.
    """
    from flax import serialization

    path = Path(path)
    try:
        blob = serialization.msgpack_restore(path.read_bytes())
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    except Exception as err:  # msgpack raises several types on truncated/corrupt input
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fbalign checkpoint")
    version = blob.get("version")
    if version not in _READABLE:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this fbalign "
                              f"reads versions {', '.join(map(str, _READABLE))}")
    payload, meta_json = blob.get("payload", b""), blob.get("meta", "")
    if not isinstance(payload, bytes) or not isinstance(meta_json, str):
        raise CheckpointError(f"checkpoint {path} is corrupt: no meta or payload")
    got = _digest(meta_json, payload, version)
    if got != blob.get("sha256"):
        what = "meta and payload" if version >= 2 else "payload"
        raise CheckpointError(f"checkpoint {path} is corrupt: {what} SHA-256 {got}, expected "
                              f"{blob.get('sha256')}")
    try:
        meta, state_dict = json.loads(meta_json), serialization.msgpack_restore(payload)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({err})") from err
    named = _NAME.match(path.name)
    if named and meta.get("step") != int(named.group(1)):
        raise CheckpointError(f"checkpoint {path} holds step {meta.get('step')!r}, not the "
                              f"step {int(named.group(1))} of its file name")
    return meta, state_dict


def add_new_none_fields(target: Any, state_dict: Any) -> Any:
    """``state_dict`` with the fields it lacks of ``target``'s NamedTuples added as None, where
    the field defaults to None and is None in ``target``: a checkpoint written before a rule
    state gained such a field (`PALState.low_pass`, `TargetPropState.random_layer`) restores
    into a state that does not use it. A missing field that ``target`` uses stays missing, and
    the restore names it."""
    if isinstance(target, tuple) and hasattr(target, "_fields") and isinstance(state_dict, dict):
        out = dict(state_dict)
        for f in target._fields:
            v = getattr(target, f)
            if f in out:
                out[f] = add_new_none_fields(v, out[f])
            elif v is None and f in target._field_defaults and target._field_defaults[f] is None:
                out[f] = None
        return out
    if isinstance(target, dict) and isinstance(state_dict, dict):
        return {k: add_new_none_fields(target[k], v) if k in target else v
                for k, v in state_dict.items()}
    if isinstance(target, (list, tuple)) and isinstance(state_dict, dict):
        return {k: add_new_none_fields(target[int(k)], v)
                if k.isdigit() and int(k) < len(target) else v for k, v in state_dict.items()}
    return state_dict


def restore_state(target: Any, state_dict: dict[str, Any], source: str = "checkpoint") -> Any:
    """Restores ``state_dict`` into the structure of ``target`` (same tree, shapes and dtypes,
    else `CheckpointError` naming the first differing leaf). ``target`` may hold arrays or
    ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of the state's constructor: nothing is
    computed). PRNG key leaves of ``target`` get their key type back."""
    from flax import serialization

    raw_target = jax.tree.map(
        lambda a: jax.eval_shape(jax.random.key_data, a) if _is_key(a) else a, target)
    state_dict = add_new_none_fields(raw_target, state_dict)
    try:
        restored = serialization.from_state_dict(raw_target, state_dict)
        check_tree_matches(raw_target, restored, "state", "the state built from the config")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source} does not fit this model/rule/optimizer: {err}. "
                              "Was it written with another configuration?") from err

    def back(t, r):
        r = jax.numpy.asarray(r)
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=_key_impl(t))
        return r

    return jax.tree.map(back, target, restored)


def load_checkpoint(path: str | os.PathLike, target: Any = None) -> Checkpoint:
    """Loads a checkpoint file, or the newest good one of a directory.

    In a directory, a newest file that fails verification (a disk error, say) is skipped with
    a warning and the one before it is used.

    Args:
      path: a checkpoint file or a directory of them.
      target: a state of the right structure to restore into (see `restore_state`); None
        returns the raw state dict (nested dicts of numpy arrays).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint in {p}: it does not exist")
    if p.is_dir():
        files = list_checkpoints(p)
        if not files:
            raise CheckpointError(f"no checkpoint in {p}")
        errors = []
        for f in reversed(files):
            try:
                meta, sd = read_checkpoint(f)
                break
            except CheckpointError as err:
                errors.append(str(err))
                warnings.warn(f"{err}; trying the previous checkpoint", RuntimeWarning,
                              stacklevel=2)
        else:
            raise CheckpointError("no readable checkpoint in " + str(p) + ": " + "; ".join(errors))
        p = f
    else:
        meta, sd = read_checkpoint(p)
    state = sd if target is None else restore_state(target, sd, f"checkpoint {p}")
    return Checkpoint(state, meta, p)
