"""Training harness: a jitted pure train step for any rule, and an epoch loop with logging."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbalign._src.base import (
    Array,
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    RuleState,
    StepContext,
    TapeRule,
    check_network,
)
from fbalign._src.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    atomic_write_bytes,
    check_tree_matches,
    clean_temp_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tree_paths,
)
from fbalign._src.data import Dataset
from fbalign._src.lift import as_learning_rule, is_tape_rule, resolve_form, through_primitives
from fbalign._src.losses import Loss, get_loss
from fbalign._src.wrap import is_seeded

NONFINITE_MODES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; ``step`` and ``leaf`` say where it was first seen."""

    def __init__(self, message: str, step: int | None = None, leaf: str | None = None):
        super().__init__(message)
        self.step = step
        self.leaf = leaf


class TrainState(NamedTuple):
    """Everything a step changes: parameters, optimizer and rule state, RNG key, step count."""

    params: Params
    opt_state: optax.OptState
    rule_state: RuleState
    key: PRNGKey
    step: Array


def _resolve_loss(loss: Loss | str) -> Loss:
    return get_loss(loss) if isinstance(loss, str) else loss


AnyRule = LearningRule | TapeRule | str


def init_rule_state(
    model: Any, rule: AnyRule, key: PRNGKey, params: Params, rule_kwargs: dict | None = None,
) -> RuleState:
    """``rule.init(key, params, model)`` of the `LearningRule` the harness trains (a tape rule's
    lift asks ``model.init_rule_state`` first: conv nets size DFA feedback by their feature
    maps and, given a rule *name*, pick layer-aware feedback scales)."""
    return as_learning_rule(rule, rule_kwargs=rule_kwargs).init(key, params, model)


def init_train_state(
    model: Any, rule: AnyRule, optimizer: optax.GradientTransformation, key: PRNGKey,
    rule_kwargs: dict | None = None,
) -> TrainState:
    """Draws parameters (``model.init``), rule state and optimizer state from one key."""
    k_model, k_rule, k_loop = jax.random.split(key, 3)
    params = model.init(k_model)
    rule_state = init_rule_state(model, rule, k_rule, params, rule_kwargs)
    return TrainState(params, optimizer.init(params), rule_state, k_loop, jnp.zeros((), jnp.int32))


def compute_updates(
    model: Any,
    rule: TapeRule | LearningRule,
    loss: Loss,
    params: Params,
    rule_state: RuleState,
    x: Array,
    y: Array,
    key: PRNGKey | None = None,
    form: str = "explicit",
    grad_mode: str | None = None,
    apply_kwargs: dict | None = None,
) -> tuple[Array, Array, Params, RuleState]:
    """One rule evaluation on a batch: returns ``(loss, output, updates, new_rule_state)``.

    A `TapeRule` runs lifted: ``form="explicit"`` (`fbalign.rules.explicit`: ``model.forward``
    and ``rule.update`` on the recorded tape) or ``form="grad"``
    (`fbalign.rules.through_primitives`: ``jax.grad`` of ``loss(model.apply(params, x,
    feedback, grad_mode, **apply_kwargs))``, then ``rule.advance`` for rules whose state
    moves). A `LearningRule` runs its own ``step``.
    """
    if isinstance(rule, TapeRule) and form == "grad":
        if grad_mode is None:
            raise ValueError("form='grad' needs the rule's grad_mode (use a registered rule name "
                             "or pass grad_mode=); this rule may have no primitive form")
        lifted = through_primitives(rule, grad_mode, apply_kwargs)
    else:
        lifted = as_learning_rule(rule, form)
    updates, rule_state, out = lifted.step(params, rule_state, Batch(x, y), key,
                                           StepContext(model, loss))
    return out.loss, out.output, updates, rule_state


def _batch_metrics(loss_val: Array, out: Array, y: Array) -> dict[str, Array]:
    m = {"loss": loss_val}
    if jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == out.ndim - 1:
        m["accuracy"] = jnp.mean(jnp.argmax(out, -1) == y)
    return m


def make_train_step(
    model: Any,
    rule: AnyRule,
    optimizer: optax.GradientTransformation,
    loss: Loss | str = "cross_entropy",
    *,
    form: str = "explicit",
    grad_mode: str | None = None,
    rule_kwargs: dict | None = None,
    jit: bool = True,
    axis_name: str | None = None,
    on_nonfinite: str | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Builds ``step(state, x, y, index=None) -> (state, metrics)``: the rule's step and the
    optimizer, in one jit. ``index`` (the batch's positions in the training set) reaches the
    rule as ``Batch.index``.

    Args:
      model: an object with ``init`` and ``apply``, such as `fbalign.models.mlp` (tape rules
        also need ``forward``, which records a `Tape`), or a wrapped Flax/Equinox model.
      rule: a `LearningRule`, a `TapeRule` (lifted in ``form``) or a registered rule name
        (``fbalign.rules.RULES``).
      optimizer: any optax transformation; it only ever sees ``params`` (feedback lives in the
        rule state, so weight decay never touches it).
      loss: a loss ``(output, target) -> scalar`` (mean over the batch) or its name.
      form: for tape rules, ``"explicit"`` (``rule.update`` on the tape) or ``"grad"``
        (``jax.grad`` through the primitives); see `fbalign.rules.as_learning_rule`.
      grad_mode: the ``model.apply`` mode for ``form="grad"``; looked up when ``rule`` is a name.
      rule_kwargs: keyword arguments for the rule constructor when ``rule`` is a name.
      jit: compile the step (donating the old state's buffers).
      axis_name: for data-parallel use inside ``jax.shard_map``/``jax.pmap`` over this axis:
        the rule runs on the local shard of the batch inside
        `fbalign.distributed.data_parallel` (updates, changed rule state and metrics are
        averaged over the axis), so every device applies the same global-batch update.
      on_nonfinite: None (no check), ``"stop"`` or ``"skip"``: the step also returns
        ``metrics["nonfinite"]``, one bool per name of `nonfinite_leaf_names` (True where the
        loss, an update, the new params, rule state or optimizer state holds NaN/Inf), computed
        on device (no host sync). ``"skip"`` also keeps the old params, optimizer and rule
        state when any flag is set (the step counter and RNG key still advance).
    """
    rule = as_learning_rule(rule, form, grad_mode, rule_kwargs, model)
    check_network(rule, model)
    loss = _resolve_loss(loss)
    context = StepContext(model, loss, axis_name)
    if on_nonfinite is not None and on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"unknown on_nonfinite {on_nonfinite!r}; valid: None, "
                         f"{', '.join(NONFINITE_MODES)}")

    def rule_step(params, rule_state, x, y, key, index=None):
        updates, rule_state, out = rule.step(params, rule_state, Batch(x, y, index), key,
                                             context)
        return updates, rule_state, {**_batch_metrics(out.loss, out.output, y),
                                     **(out.metrics or {})}

    if axis_name is not None:
        from fbalign._src.distributed import data_parallel

        rule_step = data_parallel(rule_step, axis_name, replicated_argnums=(0, 1))

    def step(state: TrainState, x: Array, y: Array, index: Array | None = None):
        key, sub = jax.random.split(state.key)
        updates, rule_state, metrics = rule_step(state.params, state.rule_state, x, y, sub,
                                                 *(() if index is None else (index,)))
        raw_updates = updates
        updates, opt_state = optimizer.update(updates, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, rule_state, key, state.step + 1)
        if on_nonfinite is not None:
            new, metrics = _guard_nonfinite(on_nonfinite, state, new, raw_updates, metrics)
        return new, metrics

    return jax.jit(step, donate_argnums=0) if jit else step


def nonfinite_leaf_names(params: Params, rule_state: RuleState) -> list[str]:
    """Names of the flags in ``metrics["nonfinite"]``: every params leaf (its update or new
    value), every rule-state leaf, then ``"opt_state"`` and ``"loss"``."""
    return ([n for n, _ in tree_paths(params, "params")]
            + [n for n, _ in tree_paths(rule_state, "rule_state")] + ["opt_state", "loss"])


def _leaf_ok(a: Array) -> Array:
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(a))
    return jnp.ones((), bool)


def _guard_nonfinite(mode: str, old: TrainState, new: TrainState, raw_updates, metrics):
    ups, pars = jax.tree.leaves(raw_updates), jax.tree.leaves(new.params)
    ok = [_leaf_ok(u) & _leaf_ok(p) for u, p in zip(ups, pars, strict=True)]
    ok += [_leaf_ok(a) for a in jax.tree.leaves(new.rule_state)]
    opt = [_leaf_ok(a) for a in jax.tree.leaves(new.opt_state)]
    ok.append(jnp.all(jnp.stack(opt)) if opt else jnp.ones((), bool))
    ok.append(_leaf_ok(metrics["loss"]))
    ok = jnp.stack(ok)
    if mode == "skip":
        kept = jax.lax.cond(jnp.all(ok), lambda t: t[0], lambda t: t[1],
                            ((new.params, new.opt_state, new.rule_state),
                             (old.params, old.opt_state, old.rule_state)))
        new = TrainState(*kept, new.key, new.step)
    return new, {**metrics, "nonfinite": ~ok}


def _reduce_chunk(ms: dict[str, Array]) -> dict[str, Array]:
    """Means over the chunk's steps; ``nonfinite`` flags become the number of bad steps, the
    index of the first one in the chunk, and which leaves were bad there."""
    ms = dict(ms)
    bad = ms.pop("nonfinite", None)
    out = jax.tree.map(lambda a: jnp.mean(a, axis=0), ms)
    if bad is not None:
        bad = bad.reshape(bad.shape[0], -1, bad.shape[-1])  # (chunk, seeds, leaves)
        per_step = jnp.any(bad, axis=(1, 2))
        first = jnp.argmax(per_step)
        out.update(nonfinite_steps=jnp.sum(per_step), nonfinite_first=first,
                   nonfinite_leaves=jnp.any(bad[first], axis=0))
    return out


ENSEMBLE_IMPLS = ("auto", "vmap", "map")


def resolve_ensemble_impl(impl: str, model: Any = None) -> str:
    """``"vmap"`` or ``"map"`` for `ensemble_step`. ``"auto"`` picks ``"map"`` on XLA's CPU
    backend for models with convolutions (``model.layer_ops()`` has a layer whose input is a
    feature map), else ``"vmap"``.

    Why: on CPU, ``vmap`` turns each network's convolutions into batched matmuls of skinny
    shapes that XLA runs slowly (LeNet-5, 8 seeds: 3.9x the per-network time of one network on
    2 cores), while a loop over networks keeps one network's kernels (1.1x). Dense layers batch
    well (MLP: vmap 1.3x, loop 1.7x: the loop copies each network's weights in and out). On
    accelerators ``vmap`` fills the device with all networks at once.
    """
    if impl not in ENSEMBLE_IMPLS:
        raise ValueError(f"unknown ensemble impl {impl!r}; valid: {', '.join(ENSEMBLE_IMPLS)}")
    if impl != "auto":
        return impl
    layer_ops = getattr(model, "layer_ops", None)
    has_conv = layer_ops is not None and any(len(op.input_shape) > 1 for op in layer_ops())
    return "map" if has_conv and jax.default_backend() == "cpu" else "vmap"


def ensemble_step(step: Callable, impl: str = "vmap") -> Callable:
    """``step`` over K networks whose arguments and results all carry a leading axis of size K.

    ``impl="vmap"``: ``jax.vmap(step)``, one batched program. ``"map"``: ``jax.lax.map``, one
    program that loops over the networks, each running the single-network kernels. Both give
    every network exactly its own single run (up to float rounding of batched kernels); see
    `resolve_ensemble_impl` for which is faster where.
    """
    if impl == "vmap":
        return jax.vmap(step)
    if impl == "map":
        return lambda *args: jax.lax.map(lambda a: step(*a), args)
    raise ValueError(f"ensemble_step: impl must be 'vmap' or 'map', got {impl!r} (resolve "
                     f"'auto' with resolve_ensemble_impl)")


def make_epoch_runner(step: Callable, batch_size: int, chunk: int, ensemble: bool = False,
                      ensemble_impl: str = "vmap"):
    """Runs ``chunk`` steps on device in one ``lax.scan``: batches are gathered from a
    device-resident dataset by a permutation, and metrics come back averaged over the chunk.

    With ``ensemble=True`` the state and permutation carry a leading seed axis and the step runs
    over it (`ensemble_step` with ``ensemble_impl``): K networks train in one program, each on
    its own data order.
    """
    one = ensemble_step(step, ensemble_impl) if ensemble else step

    def run(state, x_all, y_all, perm, start):
        def body(carry, i):
            idx = jax.lax.dynamic_slice_in_dim(perm, (start + i) * batch_size, batch_size,
                                               axis=perm.ndim - 1)
            carry, m = one(carry, x_all[idx], y_all[idx], idx)
            return carry, m

        state, ms = jax.lax.scan(body, state, jnp.arange(chunk))
        return state, _reduce_chunk(ms)

    return jax.jit(run, donate_argnums=0)


def make_eval_fn(model: Any, loss: Loss | str = "cross_entropy"):
    """Jitted ``(params, x, y) -> (sum of loss, number correct)`` on one batch (plain forward)."""
    loss = _resolve_loss(loss)

    @jax.jit
    def ev(params, x, y):
        out = model.apply(params, x)
        m = _batch_metrics(loss(out, y), out, y)
        correct = m.get("accuracy", jnp.nan) * x.shape[0]
        return m["loss"] * x.shape[0], correct

    return ev


def evaluate(
    model: Any, params: Params, x: np.ndarray, y: np.ndarray, loss: Loss | str = "cross_entropy",
    batch_size: int = 1000, eval_fn: Callable | None = None,
) -> dict[str, float]:
    """Loss, accuracy and error (%) of ``model`` on ``(x, y)``, in batches of ``batch_size``."""
    ev = eval_fn or make_eval_fn(model, loss)
    if len(x) == 0:
        return {}
    return {k: float(v) for k, v in _evaluate_raw(params, x, y, ev, batch_size).items()}


class FitResult(NamedTuple):
    """What `fit` returns: the final `TrainState` and one metrics dict per epoch."""

    state: TrainState
    history: list[dict[str, Any]]


def _json_safe(obj: Any) -> Any:
    """NaN/Inf become ``null`` so that ``metrics.jsonl`` is strict JSON for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def fit(
    model: Any,
    rule: AnyRule,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    loss: Loss | str = "cross_entropy",
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    seeds: int | None = None,
    form: str = "explicit",
    grad_mode: str | None = None,
    rule_kwargs: dict | None = None,
    log_every: int = 50,
    probe_fn: Callable[[TrainState], dict[str, Any]] | None = None,
    probe_every: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    state: TrainState | None = None,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_nonfinite: str | None = "stop",
    devices: int | None = None,
    ensemble_impl: str = "auto",
) -> FitResult:
    """Trains ``model`` with ``rule`` for ``epochs`` epochs, evaluating after each.

    Steps run on device in chunks of ``log_every`` steps (one host read per chunk, for the
    progress bar). Shuffling is ``jax.random.permutation`` of a key derived from the seed and
    the epoch, so a run is deterministic given its seed.

    Args:
      seeds: train an ensemble of ``seeds`` networks with seeds ``seed, seed+1, ...`` in one
        jitted program; seed ``s`` of the ensemble follows exactly the single run with
        ``seed=s`` (same initialisation, feedback draw and data order). Records then hold
        per-seed lists plus ``<metric>_mean``/``<metric>_std``.
      ensemble_impl: how that program runs the networks: ``"vmap"`` (batched), ``"map"``
        (a loop over networks) or ``"auto"`` (default; `resolve_ensemble_impl`).
      probe_fn: ``probe_fn(state) -> dict`` of scalars (e.g. alignment angles), called every
        ``probe_every`` steps (at chunk ends); its records go to ``metrics.jsonl`` with
        ``"kind": "probe"``. With ``probe_every=0`` nothing is computed.
      out_dir: where ``metrics.jsonl`` is appended (one ``"kind": "epoch"`` record per epoch).
      state: continue from this state instead of initialising one (its params and rule state
        must have the shapes and dtypes that ``model``/``rule`` build, else a ValueError).
      checkpoint_every: None: no checkpoints. ``0``: a checkpoint at the end of every epoch
        (the last one is the final state). ``N > 0``: also one every ``N`` steps (at the first
        chunk end at or after each multiple; chunks shrink to at most ``N`` steps). Each holds
        params, optimizer and rule state, RNG key, step, data-order position and the metrics so
        far (`fbalign.checkpoint`), written atomically; the newest two are kept.
      checkpoint_dir: where checkpoints go (default ``out_dir/checkpoints``).
      resume: continue from the newest checkpoint in ``checkpoint_dir`` (mid-epoch included:
        same data order, same remaining steps), so the result is bit-identical to a run that
        was never interrupted; ``metrics.jsonl`` is cut back to the records the checkpoint had
        seen. Without a checkpoint the run starts from the beginning.
      on_nonfinite: ``"stop"`` (default): steps flag NaN/Inf on device, checked once per chunk;
        a flag raises `NonFiniteError` naming the step and the first offending leaf (no
        checkpoint of the bad state is written). ``"skip"``: drop such updates (warning and a
        ``"kind": "nonfinite"`` record). None: no check.
      devices: train data-parallel over this many devices (`fbalign.distributed`): each
        global batch is split evenly over them (``batch_size`` must divide), updates are
        averaged, and the result equals the single-device run up to float reassociation. With
        ``seeds``, the ensemble is also sharded: ``gcd(seeds, devices)`` device groups each
        train their share of the seeds. None: one device, no sharding.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    n = len(data.x_train)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} "
                         f"examples of {data.name}); use --batch-size <= {n}")
    if log_every <= 0:
        raise ValueError(f"log_every must be positive, got {log_every}")
    if seeds is not None and (not isinstance(seeds, int) or seeds <= 0):
        raise ValueError(f"seeds must be a positive integer, got {seeds}")
    if on_nonfinite is not None and on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"unknown on_nonfinite {on_nonfinite!r}; valid: None, "
                         f"{', '.join(NONFINITE_MODES)}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 0):
        raise ValueError(f"checkpoint_every must be None or an integer >= 0, got "
                         f"{checkpoint_every}")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (
        Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None)
    if (checkpoint_every is not None or resume) and ckpt_dir is None:
        raise ValueError("checkpoint_every and resume need out_dir or checkpoint_dir")
    if resume and state is not None:
        raise ValueError("pass either state or resume=True, not both")
    ensemble = seeds is not None
    impl = resolve_ensemble_impl(ensemble_impl, model)
    if not isinstance(rule, (LearningRule, TapeRule, str)):
        raise TypeError("rule must be a LearningRule, a TapeRule or a registered name, got "
                        f"{type(rule).__name__}")
    if is_tape_rule(rule, rule_kwargs):
        form = resolve_form(form, model)  # the fingerprint records the form that runs
    rule = as_learning_rule(rule, form, grad_mode, rule_kwargs, model)
    check_network(rule, model)
    if seeds is not None and seeds > 1 and not is_seeded(model):
        warnings.warn(f"{type(model).__name__} wraps one model instance, so all {seeds} seeds "
                      "start from the same weights (only feedback, data order and rule noise "
                      "differ); pass a factory (from_nnx(lambda rngs: Model(..., rngs=rngs)), "
                      "from_equinox(lambda key: ...)) to draw weights per seed",
                      RuntimeWarning, stacklevel=2)
    rule_kwargs = None  # built into the rule
    loss_fn = _resolve_loss(loss)
    step = make_train_step(model, rule, optimizer, loss_fn, jit=False,
                           on_nonfinite=on_nonfinite,
                           axis_name=None if devices is None else "data")
    steps_per_epoch = n // batch_size
    chunk = min(log_every, steps_per_epoch, probe_every or steps_per_epoch,
                checkpoint_every or steps_per_epoch)
    make_runner, host_step, host_params = make_epoch_runner, np.asarray, lambda p: p
    if devices is not None:
        from fbalign._src import distributed as _dist

        mesh = _dist.make_mesh(devices, seeds)
        make_runner = lambda st, bs, c, e, i: _dist.make_sharded_epoch_runner(
            st, bs, c, mesh, e, ensemble_impl=i)
        host_step, host_params = _dist.first_local, _dist.to_host
    runner = make_runner(step, batch_size, chunk, ensemble, impl)
    tail = steps_per_epoch % chunk
    tail_runner = make_runner(step, batch_size, tail, ensemble, impl) if tail else None
    eval_fn = make_eval_fn(model, loss_fn)
    if ensemble:
        one_eval = eval_fn
        eval_fn = jax.jit(lambda ps, x, y: ensemble_step(
            lambda p: one_eval(p, x, y), impl)(ps))

    seed_list = [seed + i for i in range(seeds)] if ensemble else [seed]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seed_list])
    k_init, k_shuffle = jax.vmap(jax.random.split, out_axes=1)(keys)
    def initial_state():
        if ensemble:
            return jax.vmap(lambda k: init_train_state(model, rule, optimizer, k, rule_kwargs))(
                k_init)
        return init_train_state(model, rule, optimizer, k_init[0], rule_kwargs)

    if state is None:
        state = None if resume else initial_state()  # a resumed run restores it below
    else:
        want = jax.eval_shape(initial_state)
        check_tree_matches({"params": want.params, "rule_state": want.rule_state},
                           {"params": state.params, "rule_state": state.rule_state}, "state",
                           "this model and rule" + (f" (x{seeds} seeds)" if ensemble else ""))
    fingerprint = {"seed": seed, "seeds": seeds, "batch_size": batch_size, "n_train": n,
                   "steps_per_epoch": steps_per_epoch, "form": form}
    start_epoch, start_done, start_sums, history, records = 0, 0, {}, [], None
    last_saved: list[int] = []
    if resume:
        clean_temp_files(ckpt_dir)
        records = 0
        if latest_checkpoint(ckpt_dir) is None:
            state = initial_state()
        else:
            ck = load_checkpoint(ckpt_dir, target=jax.eval_shape(initial_state))
            differ = {k: (ck.meta["fit"].get(k), v) for k, v in fingerprint.items()
                      if ck.meta["fit"].get(k) != v}
            if differ:
                raise CheckpointError(
                    f"checkpoint {ck.path} was written by a run with other settings: " + ", ".join(
                        f"{k}={a!r} there, {b!r} now" for k, (a, b) in differ.items())
                    + "; resume with the run's own settings (its config.json)")
            state, last_saved = ck.state, [ck.step]
            start_epoch, start_done = ck.meta["epoch"], ck.meta["step_in_epoch"]
            start_sums = {k: np.asarray(v, np.float64) for k, v in ck.meta["sums"].items()}
            history, records = list(ck.meta["history"]), ck.meta["records"]
        if out_dir is not None:
            _truncate_records(Path(out_dir) / "metrics.jsonl", records)
    leaf_names = nonfinite_leaf_names(state.params, state.rule_state)
    x_dev, y_dev = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def permutation(epoch):
        if ensemble:
            return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(
                k_shuffle)
        return jax.random.permutation(jax.random.fold_in(k_shuffle[0], epoch), n)

    def scalarise(prefix: str, m: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in m.items():
            v = np.asarray(v)
            if ensemble:
                out[f"{prefix}{k}"] = [float(a) for a in v]
                out.update({f"{prefix}{k}_{s}": x for s, x in _summarise(v).items()})
            else:
                out[f"{prefix}{k}"] = float(v)
        return out

    log_file = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if records is None:
            records = _count_records(Path(out_dir) / "metrics.jsonl")
        log_file = open(Path(out_dir) / "metrics.jsonl", "a")  # noqa: SIM115
    records = records or 0

    def log(rec: dict[str, Any]) -> None:
        nonlocal records
        if log_file is not None:
            log_file.write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
            log_file.flush()
            records += 1

    def save(epoch_idx: int, done_in_epoch: int, sums: dict[str, Any]) -> None:
        meta = {"step": global_step(), "epoch": epoch_idx, "step_in_epoch": done_in_epoch,
                "sums": {k: np.asarray(v, np.float64).tolist() for k, v in sums.items()},
                "history": history, "records": records, "fit": fingerprint,
                "saved_at": time.time()}
        host = host_params(state)  # every process joins in (a gather when multi-host)
        if jax.process_index() == 0:
            save_checkpoint(ckpt_dir, host, meta)
        last_saved.append(meta["step"])

    def check_finite(m: dict[str, Any], before: int, after: int, epoch: int) -> None:
        nf = {k: m.pop(k) for k in list(m) if k.startswith("nonfinite_")}
        if not nf or int(nf["nonfinite_steps"]) == 0:
            return
        at = before + int(nf["nonfinite_first"]) + 1
        bad = [leaf_names[i] for i in np.flatnonzero(nf["nonfinite_leaves"])]
        where = bad[0] + (f" (also {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
                          if len(bad) > 1 else "")
        if on_nonfinite == "skip":
            count = int(nf["nonfinite_steps"])
            warnings.warn(f"skipped {count} update(s) with NaN/Inf in steps {before + 1}-{after}; "
                          f"the first at step {at}, in {where}", RuntimeWarning, stacklevel=3)
            log({"kind": "nonfinite", "epoch": epoch + 1, "step": at, "skipped": count,
                 "first": bad[0]})
            return
        kept = (f" The last good checkpoint (step {last_saved[-1]}) in {ckpt_dir} is intact."
                if last_saved else "")
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) at step {at} (epoch {epoch + 1}), first in {where}; "
            f"training stopped.{kept} Lower the learning rate, or drop such updates with "
            "on_nonfinite='skip' (fbalign train --on-nonfinite skip).", step=at, leaf=bad[0])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, unit="step", dynamic_ncols=True,
                   desc=f"{data.name}" + (f" x{seeds} seeds" if ensemble else ""), leave=True,
                   initial=min(start_epoch * steps_per_epoch + start_done,
                               epochs * steps_per_epoch))
    global_step = lambda: int(host_step(state.step).reshape(-1)[0])
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            perm = permutation(epoch)
            sums: dict[str, Any] = dict(start_sums) if epoch == start_epoch else {}
            done = start_done if epoch == start_epoch else 0
            while done < steps_per_epoch:
                size = chunk if steps_per_epoch - done >= chunk else tail
                run = runner if size == chunk else tail_runner
                before = global_step()
                state, m = run(state, x_dev, y_dev, perm, jnp.asarray(done, jnp.int32))
                m = jax.device_get(m)
                after = before + size
                check_finite(m, before, after, epoch)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64) * size
                done += size
                if probe_fn is not None and probe_every and after // probe_every > (
                        before // probe_every):
                    rec = {"kind": "probe", "epoch": epoch + 1, "step": after}
                    rec.update(scalarise("", jax.device_get(probe_fn(host_params(state)))))
                    log(rec)
                if bar is not None:
                    bar.update(size)
                    bar.set_postfix({"epoch": epoch + 1, **{
                        k: f"{float(np.mean(v)):.4f}" for k, v in m.items()}})
                if checkpoint_every and done < steps_per_epoch and (
                        after // checkpoint_every > before // checkpoint_every):
                    save(epoch, done, sums)
            rec: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": global_step()}
            if ensemble:
                rec["seeds"] = seed_list
            rec.update(scalarise("train_", {k: v / steps_per_epoch for k, v in sums.items()}))
            for split, xs, ys in (("val", data.x_val, data.y_val),
                                  ("test", data.x_test, data.y_test)):
                if len(xs):
                    rec.update(scalarise(f"{split}_", _evaluate_raw(host_params(state.params),
                                                                    xs, ys, eval_fn)))
            rec["epoch_time_s"] = time.perf_counter() - t0
            history.append(rec)
            log(rec)
            if checkpoint_every is not None:
                save(epoch + 1, 0, {})
            if bar is not None and "test_error" in rec:
                err = rec.get("test_error_mean", rec["test_error"])
                bar.write(f"epoch {epoch + 1}: train loss "
                          f"{np.mean(rec.get('train_loss', np.nan)):.4f}  test error {err:.2f}%")
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return FitResult(state, history)


def _count_records(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _truncate_records(path: Path, keep: int) -> None:
    """Cuts ``metrics.jsonl`` back to its first ``keep`` records (atomically), dropping the
    records of steps after the checkpoint a run resumes from (and any partial last line)."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) < keep:
        warnings.warn(f"{path} has {len(lines)} records, the checkpoint saw {keep}; some records "
                      "are missing", RuntimeWarning, stacklevel=3)
    if len(lines) != keep or (lines and not lines[-1].endswith(b"\n")):
        atomic_write_bytes(path, b"".join(lines[:keep]))


def _evaluate_raw(params, x, y, eval_fn, batch_size: int = 1000) -> dict[str, Any]:
    """Like `evaluate`, but works on (possibly seed-batched) outputs of ``eval_fn``."""
    n = len(x)
    tot_loss, tot_correct = 0.0, 0.0
    for s in range(0, n, batch_size):
        lo, co = eval_fn(params, x[s:s + batch_size], y[s:s + batch_size])
        tot_loss = tot_loss + np.asarray(lo, np.float64)
        tot_correct = tot_correct + np.asarray(co, np.float64)
    out = {"loss": tot_loss / n}
    if not np.any(np.isnan(tot_correct)):
        out["accuracy"] = tot_correct / n
        out["error"] = 100.0 * (1.0 - tot_correct / n)
    return out
