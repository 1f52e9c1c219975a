"""Training harness: a jitted pure train step for any rule, and an epoch loop with logging."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbalign._src import sharding as _dist
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
from fbalign._src.lift import as_learning_rule, is_tape_rule, resolve_form
from fbalign._src.losses import Loss, check_targets, get_loss
from fbalign._src.precision import precision_rule
from fbalign._src.runner import ensemble_step, reduce_chunk
from fbalign._src.sharding import data_parallel
from fbalign._src.wrap import is_seeded

NONFINITE_MODES = ("stop", "skip")


def rule_flags(metrics: dict[str, Any]) -> str:
    """The rule's own finiteness flags that dropped below 1 in a chunk (e.g. target
    propagation's ``target_finite_3``: layer 3's target was not finite), for the message of a
    stopped run: they say where a rule's inner computation diverged, which the first
    non-finite leaf of the updates does not (targets flow down, so every layer below fails
    too)."""
    flags = sorted((k for k, v in metrics.items()
                   if "finite" in k and not k.startswith("nonfinite_")
                   and np.size(v) == 1 and not float(np.asarray(v)) >= 1.0), reverse=True)
    if not flags:
        return ""
    return f" The rule flags non-finite values in: {', '.join(flags)}."


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
) -> tuple[Array, Array, Params, RuleState]:
    """One rule evaluation on a batch: returns ``(loss, output, updates, new_rule_state)``.

    A `TapeRule` runs lifted: ``form="explicit"`` (`fbalign.rules.explicit`: ``model.forward``
    and ``rule.update`` on the recorded tape) or ``form="grad"``
    (`fbalign.rules.through_primitives`: ``jax.grad`` of ``loss(model.apply(params, x,
    backward=rule.backward(feedback, y)))``, then ``rule.advance`` for rules whose state
    moves). A `LearningRule` runs its own ``step``.
    """
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
    rule = as_learning_rule(rule, form, rule_kwargs, model)
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
        return state, reduce_chunk(ms)

    return jax.jit(run, donate_argnums=0)


def make_eval_fn(model: Any, loss: Loss | str = "cross_entropy",
                 predict: Callable[[Any, Params, Array], Array] | None = None):
    """Jitted ``(params, x, y) -> (sum of loss, number correct)`` on one batch: the plain forward
    ``model.apply(params, x)``, or ``predict(model, params, x)`` for a rule that answers otherwise
    (`LearningRule.predict`)."""
    loss = _resolve_loss(loss)
    answer = model.apply if predict is None else functools.partial(predict, model)

    @jax.jit
    def ev(params, x, y):
        out = answer(params, x)
        m = _batch_metrics(loss(out, y), out, y)
        correct = m.get("accuracy", jnp.nan) * x.shape[0]
        return m["loss"] * x.shape[0], correct

    return ev


def evaluate(
    model: Any, params: Params, x: np.ndarray, y: np.ndarray, loss: Loss | str = "cross_entropy",
    batch_size: int = 1000, eval_fn: Callable | None = None,
    predict: Callable[[Any, Params, Array], Array] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and error (%) of ``model`` on ``(x, y)``, in batches of ``batch_size``;
    ``predict``: a rule's own answer (`LearningRule.predict`, e.g. forward-forward's goodness)
    in place of ``model.apply``."""
    ev = eval_fn or make_eval_fn(model, loss, predict)
    if len(x) == 0:
        return {}
    if eval_fn is None:
        check_targets(x, y, output_width(model, params, x))
    return {k: float(v) for k, v in evaluate_batches(params, x, y, ev, batch_size).items()}


class FitResult(NamedTuple):
    """What `fit` returns: the final `TrainState` and one metrics dict per epoch."""

    state: TrainState
    history: list[dict[str, Any]]


def json_safe(obj: Any) -> Any:
    """NaN/Inf become ``null`` so that ``metrics.jsonl`` is strict JSON for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
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
    rule_kwargs: dict | None = None,
    log_every: int = 50,
    probe_fn: Callable[[TrainState], dict[str, Any]] | None = None,
    probe_every: int = 0,
    out_dir: str | Path | None = None,
    progress: bool | str = True,
    state: TrainState | None = None,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_nonfinite: str | None = "stop",
    devices: int | None = None,
    ensemble_impl: str = "auto",
    max_skips: int = 100,
    precision: str = "float32",
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
        ``"kind": "nonfinite"`` record); more than ``max_skips`` skipped steps in a row raise
        `NonFiniteError` (the run is not recovering). None: no check.
      devices: train data-parallel over this many devices (`fbalign.distributed`): each
        global batch is split evenly over them (``batch_size`` must divide), updates are
        averaged, and the result equals the single-device run up to float reassociation. With
        ``seeds``, the ensemble is also sharded: ``gcd(seeds, devices)`` device groups each
        train their share of the seeds. None: one device, no sharding.
      precision: ``"float32"`` (default) or ``"bfloat16"``: each step computes in bfloat16
        while the params, optimizer state and rule state stay float32 masters
        (`fbalign._src.precision.mixed_precision`; no loss scaling is needed for bfloat16).
    """
    n = len(data.x_train)
    ckpt_dir = _check_fit_args(
        data, epochs=epochs, batch_size=batch_size, log_every=log_every, seeds=seeds,
        on_nonfinite=on_nonfinite, checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir, out_dir=out_dir, resume=resume, state=state,
        max_skips=max_skips)
    impl = resolve_ensemble_impl(ensemble_impl, model)
    rule, form = _fit_rule(model, rule, form, rule_kwargs, seeds)
    rule = precision_rule(rule, precision)
    program = _build_program(
        model, rule, optimizer, _resolve_loss(loss), n=n, batch_size=batch_size,
        log_every=log_every, probe_every=probe_every, checkpoint_every=checkpoint_every,
        on_nonfinite=on_nonfinite, devices=devices, seeds=seeds, impl=impl)
    seeding = _Seeding(model, rule, optimizer, seed, seeds, n)
    fingerprint = {"seed": seed, "seeds": seeds, "batch_size": batch_size, "n_train": n,
                   "steps_per_epoch": program.steps_per_epoch, "form": form,
                   **({"precision": precision} if precision != "float32" else {})}
    if resume:
        start = _resume(ckpt_dir, seeding, fingerprint)
    else:
        start = _Start(_given_state(state, seeding), 0, 0, {}, [], None, [])
    _check_data_targets(model, data, start.state.params, seeding.ensemble)
    log = _RunLog(out_dir, start.records)  # on resume, cut back to the checkpoint's records
    checkpoints = _Checkpoints(ckpt_dir, checkpoint_every, fingerprint, start.saved,
                               program.host_params)
    guard = _NonFiniteGuard(on_nonfinite,
                            nonfinite_leaf_names(start.state.params, start.state.rule_state),
                            checkpoints, log, max_skips)
    per_epoch = program.steps_per_epoch
    bar = _Progress(progress, epochs * per_epoch, start.epoch * per_epoch + start.done,
                    f"{data.name}" + (f" x{seeds} seeds" if seeding.ensemble else ""))
    loop = _FitLoop(program, seeding, data, start, log=log, checkpoints=checkpoints,
                    guard=guard, bar=bar, probe_fn=probe_fn, probe_every=probe_every)
    try:
        loop.run(epochs)
    finally:
        bar.close()
        log.close()
    return FitResult(loop.state, loop.history)


def _check_fit_args(data: Dataset, *, epochs, batch_size, log_every, seeds, on_nonfinite,
                    checkpoint_every, checkpoint_dir, out_dir, resume, state,
                    max_skips) -> Path | None:
    """`fit`'s checks of its arguments (a ValueError naming the bad one); returns the
    checkpoint directory (None without ``out_dir`` and ``checkpoint_dir``)."""
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
    if not isinstance(max_skips, int) or isinstance(max_skips, bool) or max_skips < 0:
        raise ValueError(f"max_skips must be an integer >= 0, got {max_skips!r}")
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
    return ckpt_dir


def _fit_rule(model: Any, rule: AnyRule, form: str, rule_kwargs: dict | None,
              seeds: int | None) -> tuple[LearningRule, str]:
    """The `LearningRule` that `fit` trains, checked against ``model``, and the form it runs in
    (a tape rule's ``form`` resolved for the model; the checkpoint fingerprint records it)."""
    if is_tape_rule(rule, rule_kwargs):
        form = resolve_form(form, model)  # the fingerprint records the form that runs
    rule = as_learning_rule(rule, form, rule_kwargs, model)
    check_network(rule, model)
    if seeds is not None and seeds > 1 and not is_seeded(model):
        warnings.warn(f"{type(model).__name__} wraps one model instance, so all {seeds} seeds "
                      "start from the same weights (only feedback, data order and rule noise "
                      "differ); pass a factory (from_nnx(lambda rngs: Model(..., rngs=rngs)), "
                      "from_equinox(lambda key: ...)) to draw weights per seed",
                      RuntimeWarning, stacklevel=3)  # _fit_rule <- fit <- fit's caller
    return rule, form


class _Program(NamedTuple):
    """The compiled pieces of a `fit`: runners of ``chunk`` steps and of the ``tail`` of an
    epoch that does not fill a chunk (None without one), the evaluation, and how the step
    count and parameters reach the host."""

    steps_per_epoch: int
    chunk: int
    tail: int
    runner: Callable
    tail_runner: Callable | None
    eval_fn: Callable
    host_step: Callable
    host_params: Callable

    def runner_at(self, done: int) -> tuple[int, Callable]:
        """``(size, runner)`` of the chunk that starts ``done`` steps into an epoch."""
        size = self.chunk if self.steps_per_epoch - done >= self.chunk else self.tail
        return size, self.runner if size == self.chunk else self.tail_runner


def _build_program(model: Any, rule: LearningRule, optimizer: optax.GradientTransformation,
                   loss_fn: Loss, *, n: int, batch_size: int, log_every: int, probe_every: int,
                   checkpoint_every: int | None, on_nonfinite: str | None, devices: int | None,
                   seeds: int | None, impl: str) -> _Program:
    """Jits `fit`'s chunk runners (sharded over ``devices`` when given) and evaluation. A chunk
    is at most ``log_every``, ``probe_every`` and ``checkpoint_every`` steps and one epoch, so
    logs, probes and checkpoints fall on chunk ends."""
    ensemble = seeds is not None
    step = make_train_step(model, rule, optimizer, loss_fn, jit=False,
                           on_nonfinite=on_nonfinite,
                           axis_name=None if devices is None else "data")
    steps_per_epoch = n // batch_size
    chunk = min(log_every, steps_per_epoch, probe_every or steps_per_epoch,
                checkpoint_every or steps_per_epoch)
    make_runner, host_step, host_params = make_epoch_runner, np.asarray, lambda p: p
    if devices is not None:
        mesh = _dist.make_mesh(devices, seeds)
        make_runner = lambda st, bs, c, e, i: _dist.make_sharded_epoch_runner(
            st, bs, c, mesh, e, ensemble_impl=i)
        host_step, host_params = _dist.first_local, _dist.to_host
    runner = make_runner(step, batch_size, chunk, ensemble, impl)
    tail = steps_per_epoch % chunk
    tail_runner = make_runner(step, batch_size, tail, ensemble, impl) if tail else None
    eval_fn = make_eval_fn(model, loss_fn, rule.predict)
    if ensemble:
        one_eval = eval_fn
        eval_fn = jax.jit(lambda ps, x, y: ensemble_step(
            lambda p: one_eval(p, x, y), impl)(ps))
    return _Program(steps_per_epoch, chunk, tail, runner, tail_runner, eval_fn, host_step,
                    host_params)


class _Seeding:
    """The seeds of a `fit` (``seed``, or ``seed..seed+seeds-1`` for an ensemble): their
    initial states and each epoch's data order, from one key per seed."""

    def __init__(self, model: Any, rule: LearningRule, optimizer: optax.GradientTransformation,
                 seed: int, seeds: int | None, n: int):
        self.model, self.rule, self.optimizer, self.n = model, rule, optimizer, n
        self.ensemble = seeds is not None
        self.seed_list = [seed + i for i in range(seeds)] if self.ensemble else [seed]
        keys = jnp.stack([jax.random.PRNGKey(s) for s in self.seed_list])
        self.k_init, self.k_shuffle = jax.vmap(jax.random.split, out_axes=1)(keys)

    def initial_state(self) -> TrainState:
        if self.ensemble:
            return jax.vmap(lambda k: init_train_state(self.model, self.rule, self.optimizer,
                                                       k))(self.k_init)
        return init_train_state(self.model, self.rule, self.optimizer, self.k_init[0])

    def permutation(self, epoch: int) -> Array:
        """The order of the training examples in ``epoch`` (one row per seed for an ensemble)."""
        if self.ensemble:
            return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch),
                                                             self.n))(self.k_shuffle)
        return jax.random.permutation(jax.random.fold_in(self.k_shuffle[0], epoch), self.n)


class _Start(NamedTuple):
    """Where `fit` starts: the state, the epoch, the steps done in it and their metric sums,
    the history so far, how many records ``metrics.jsonl`` holds (None for a new run: whatever
    it holds) and the steps of the checkpoints saved so far."""

    state: TrainState
    epoch: int
    done: int
    sums: dict[str, Any]
    history: list[dict[str, Any]]
    records: int | None
    saved: list[int]


def _given_state(state: TrainState | None, seeding: _Seeding) -> TrainState:
    """``state`` after checking that it has the params and rule state that the model and rule
    build (a ValueError if not), or the initial state when None."""
    if state is None:
        return seeding.initial_state()
    want = jax.eval_shape(seeding.initial_state)
    check_tree_matches({"params": want.params, "rule_state": want.rule_state},
                       {"params": state.params, "rule_state": state.rule_state}, "state",
                       "this model and rule" + (f" (x{len(seeding.seed_list)} seeds)"
                                                if seeding.ensemble else ""))
    return state


def _resume(ckpt_dir: Path, seeding: _Seeding, fingerprint: dict[str, Any]) -> _Start:
    """Where a resumed `fit` starts: its newest checkpoint in ``ckpt_dir`` (a CheckpointError
    if a run with other settings wrote it), or the beginning when there is none."""
    clean_temp_files(ckpt_dir)
    if latest_checkpoint(ckpt_dir) is None:
        return _Start(seeding.initial_state(), 0, 0, {}, [], 0, [])
    ck = load_checkpoint(ckpt_dir, target=jax.eval_shape(seeding.initial_state))
    differ = {k: (ck.meta["fit"].get(k), v) for k, v in fingerprint.items()
              if ck.meta["fit"].get(k) != v}
    if differ:
        raise CheckpointError(
            f"checkpoint {ck.path} was written by a run with other settings: " + ", ".join(
                f"{k}={a!r} there, {b!r} now" for k, (a, b) in differ.items())
            + "; resume with the run's own settings (its config.json)")
    _check_position(ck, fingerprint["steps_per_epoch"])
    sums = {k: np.asarray(v, np.float64) for k, v in ck.meta["sums"].items()}
    return _Start(ck.state, ck.meta["epoch"], ck.meta["step_in_epoch"], sums,
                  list(ck.meta["history"]), ck.meta["records"], [ck.step])


def _check_position(ck: Any, steps_per_epoch: int) -> None:
    """A `CheckpointError` naming the file when a checkpoint's position does not add up: its
    ``step`` must be ``epoch * steps_per_epoch + step_in_epoch`` with ``0 <= step_in_epoch <
    steps_per_epoch``, equal the state's own step counter, and its history must hold one record
    per finished epoch (a resume from anything else would repeat or skip steps)."""
    m = ck.meta
    epoch, done, step = m.get("epoch"), m.get("step_in_epoch"), m.get("step")
    state_steps = {int(s) for s in np.asarray(jax.device_get(ck.state.step)).reshape(-1)}
    problems = []
    if not all(isinstance(v, int) for v in (epoch, done, step)):
        problems.append(f"epoch {epoch!r}, step_in_epoch {done!r}, step {step!r} are not all "
                        "integers")
    else:
        if not 0 <= done < steps_per_epoch:
            problems.append(f"step_in_epoch {done} is outside [0, {steps_per_epoch})")
        if step != epoch * steps_per_epoch + done:
            problems.append(f"step {step} != epoch {epoch} x {steps_per_epoch} steps + "
                            f"{done}")
        if state_steps != {step}:
            problems.append(f"the state's step counter is {sorted(state_steps)}, the meta's "
                            f"{step}")
        if len(m.get("history", ())) != epoch:
            problems.append(f"{len(m.get('history', ()))} epoch records for {epoch} finished "
                            "epochs")
    if problems:
        raise CheckpointError(f"checkpoint {ck.path} has an inconsistent position: "
                              + "; ".join(problems) + ". Resume from an earlier checkpoint "
                              "(delete this one) or start the run again")


class _RunLog:
    """``metrics.jsonl`` in ``out_dir``, appended one strict-JSON record a line (nothing is
    written without ``out_dir``); ``records`` counts its lines, which checkpoints save.

    ``keep``: None for a new run (records already there stay and are counted); on resume, the
    count of the checkpoint, and the file is first cut back to that many records.
    """

    def __init__(self, out_dir: str | Path | None, keep: int | None):
        self._file = None
        self.records = keep
        if out_dir is not None:
            path = Path(out_dir) / "metrics.jsonl"
            self._drop_partial_line(path)
            if keep is not None:
                self._cut_back(path, keep)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            if keep is None:
                self.records = self._count(path)
            self._file = open(path, "a")  # noqa: SIM115
        self.records = self.records or 0

    def write(self, rec: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
            self._file.flush()
            self.records += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @staticmethod
    def _count(path: Path) -> int:
        if not path.exists():
            return 0
        with open(path, "rb") as f:
            return sum(1 for _ in f)

    @staticmethod
    def _drop_partial_line(path: Path) -> None:
        """Repairs a file whose last record was cut mid-line (a write interrupted by a kill or a
        full disk): the partial line goes, with a warning naming the file, so that the next
        record starts on a line of its own."""
        if not path.exists():
            return
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data[:data.rfind(b"\n") + 1]
        atomic_write_bytes(path, keep)
        complete = keep.count(b"\n")
        warnings.warn(f"{path}: dropped a partial last record ({len(data) - len(keep)} bytes, "
                      f"cut mid-write); the {complete} complete records before it are kept",
                      RuntimeWarning, stacklevel=4)

    @staticmethod
    def _cut_back(path: Path, keep: int) -> None:
        """Cuts the file back to its first ``keep`` records (atomically), dropping the records
        of steps after the checkpoint a run resumes from (and any partial last line)."""
        if not path.exists():
            return
        lines = path.read_bytes().splitlines(keepends=True)
        if len(lines) < keep:
            warnings.warn(f"{path} has {len(lines)} records, the checkpoint saw {keep}; some "
                          "records are missing", RuntimeWarning,
                          stacklevel=4)  # _cut_back <- __init__ <- fit <- fit's caller
        if len(lines) != keep or (lines and not lines[-1].endswith(b"\n")):
            atomic_write_bytes(path, b"".join(lines[:keep]))


class _Checkpoints:
    """`fit`'s checkpoint policy: none with ``every`` None; else one at the end of each epoch,
    and for ``every > 0`` one at the first chunk end at or after each multiple of ``every``
    steps. ``saved`` lists the steps saved (a resumed run's starts with its checkpoint)."""

    def __init__(self, directory: Path | None, every: int | None, fingerprint: dict[str, Any],
                 saved: list[int], host_params: Callable):
        self.directory, self.every, self.fingerprint = directory, every, fingerprint
        self.saved, self._host_params = saved, host_params

    @property
    def each_epoch(self) -> bool:
        return self.every is not None

    def due(self, before: int, after: int, done: int, steps_per_epoch: int) -> bool:
        """Whether to save after the chunk of steps ``before+1..after`` that ends ``done``
        steps into its epoch (not at the epoch's end, which saves anyway)."""
        return bool(self.every and done < steps_per_epoch
                    and after // self.every > before // self.every)

    def save(self, state: TrainState, step: int, epoch_idx: int, done_in_epoch: int,
             sums: dict[str, Any], history: list[dict[str, Any]], records: int) -> None:
        meta = {"step": step, "epoch": epoch_idx, "step_in_epoch": done_in_epoch,
                "sums": {k: np.asarray(v, np.float64).tolist() for k, v in sums.items()},
                "history": history, "records": records, "fit": self.fingerprint,
                "saved_at": time.time()}
        host = self._host_params(state)  # every process joins in (a gather when multi-host)
        if jax.process_index() == 0:
            save_checkpoint(self.directory, host, meta)
        self.saved.append(step)


class _NonFiniteGuard:
    """`fit`'s ``on_nonfinite`` policy, on each chunk's metrics: NaN/Inf in a step stops the
    run with a `NonFiniteError` (``"stop"``), or (``"skip"``: the steps dropped those updates)
    gives a warning and a ``"kind": "nonfinite"`` record."""

    def __init__(self, mode: str | None, leaf_names: list[str], checkpoints: _Checkpoints,
                 log: _RunLog, max_skips: int = 100):
        self.mode, self.leaf_names, self.checkpoints, self.log = mode, leaf_names, checkpoints, log
        self.max_skips, self.run = max_skips, 0  # run: the current streak of skipped steps

    def check(self, m: dict[str, Any], before: int, after: int, epoch: int) -> None:
        """Takes the ``nonfinite_*`` entries out of ``m``, the metrics of steps
        ``before+1..after``, and acts on them."""
        nf = {k: m.pop(k) for k in list(m) if k.startswith("nonfinite_")}
        if not nf or int(nf["nonfinite_steps"]) == 0:
            self.run = 0
            return
        at = before + int(nf["nonfinite_first"]) + 1
        bad = [self.leaf_names[i] for i in np.flatnonzero(nf["nonfinite_leaves"])]
        where = bad[0] + (f" (also {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
                          if len(bad) > 1 else "")
        if self.mode == "skip":
            count = int(nf["nonfinite_steps"])
            warnings.warn(f"skipped {count} update(s) with NaN/Inf in steps {before + 1}-{after}; "
                          f"the first at step {at}, in {where}", RuntimeWarning,
                          stacklevel=6)  # check <- _chunk <- _epoch <- run <- fit <- caller
            self.log.write({"kind": "nonfinite", "epoch": epoch + 1, "step": at,
                            "skipped": count, "first": bad[0]})
            self._count_streak(np.asarray(nf["nonfinite_per_step"]), before, where)
            return
        saved = self.checkpoints.saved
        kept = (f" The last good checkpoint (step {saved[-1]}) in {self.checkpoints.directory} "
                "is intact." if saved else "")
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) at step {at} (epoch {epoch + 1}), first in {where}; "
            f"training stopped.{rule_flags(m)}{kept} Lower the learning rate, or drop such "
            "updates with on_nonfinite='skip' (fbalign train --on-nonfinite skip).", step=at,
            leaf=bad[0])


    def _count_streak(self, per_step: np.ndarray, before: int, where: str) -> None:
        """Stops the run once more than ``max_skips`` steps in a row were skipped: a run whose
        every update is NaN/Inf is not recovering, and would end with a NaN test loss."""
        for i, bad in enumerate(per_step.reshape(-1)):
            self.run = self.run + 1 if bad else 0
            if self.run > self.max_skips:
                at = before + i + 1
                raise NonFiniteError(
                    f"{self.run} updates in a row (steps {at - self.run + 1}-{at}) had NaN or "
                    f"Inf, first in {where}, and were skipped: the run is not recovering, so "
                    f"training stopped (max_skips={self.max_skips}). Lower the learning rate, or "
                    "raise max_skips (--max-skips).", step=at, leaf=where.split(" ")[0])


class _Progress:
    """`fit`'s tqdm bar over all steps and a line per epoch (``show=True``), only the lines
    (``"lines"``: logs and ``fbalign train --no-progress``), or nothing (False)."""

    def __init__(self, show: bool | str, total: int, initial: int, desc: str):
        if show not in (True, False, "lines"):
            raise ValueError(f"progress must be True, False or 'lines', got {show!r}")
        self._bar, self._lines = None, show == "lines"
        if show is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, desc=desc,
                             leave=True, initial=min(initial, total))

    def chunk(self, epoch: int, size: int, m: dict[str, Any]) -> None:
        """``size`` steps more; the chunk's metrics ``m`` in the bar."""
        if self._bar is not None:
            self._bar.update(size)
            self._bar.set_postfix({"epoch": epoch + 1, **{
                k: f"{float(np.mean(v)):.4f}" for k, v in m.items()}})

    def epoch_end(self, epoch: int, rec: dict[str, Any]) -> None:
        """A line with the epoch's training loss and test error (when it has one)."""
        if self._bar is None and not self._lines:
            return
        line = f"epoch {epoch + 1}: train loss {np.mean(rec.get('train_loss', np.nan)):.4f}"
        if "test_error" in rec:
            line += f"  test error {rec.get('test_error_mean', rec['test_error']):.2f}%"
        elif "test_loss" in rec:
            line += f"  test loss {np.mean(rec['test_loss']):.4g}"
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _FitLoop:
    """The epochs of `fit`, from ``start``: chunks of steps on device (each checked for
    NaN/Inf, probed, shown and checkpointed as due), then an evaluated record per epoch.
    ``state`` is the current `TrainState`, ``history`` the epoch records so far."""

    def __init__(self, program: _Program, seeding: _Seeding, data: Dataset, start: _Start, *,
                 log: _RunLog, checkpoints: _Checkpoints, guard: _NonFiniteGuard,
                 bar: _Progress, probe_fn: Callable | None, probe_every: int):
        self.program, self.seeding, self.data, self.start = program, seeding, data, start
        self.state, self.history = start.state, start.history
        self.log, self.checkpoints, self.guard, self.bar = log, checkpoints, guard, bar
        self.probe_fn, self.probe_every = probe_fn, probe_every
        self.x, self.y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def global_step(self) -> int:
        return int(self.program.host_step(self.state.step).reshape(-1)[0])

    def run(self, epochs: int) -> None:
        for epoch in range(self.start.epoch, epochs):
            if epoch == self.start.epoch:  # a resumed run continues mid-epoch
                self._epoch(epoch, dict(self.start.sums), self.start.done)
            else:
                self._epoch(epoch, {}, 0)

    def _epoch(self, epoch: int, sums: dict[str, Any], done: int) -> None:
        """The rest of ``epoch`` after ``done`` steps whose metrics add up to ``sums``."""
        t0 = time.perf_counter()
        perm = self.seeding.permutation(epoch)
        while done < self.program.steps_per_epoch:
            done = self._chunk(epoch, perm, sums, done)
        rec = self._epoch_record(epoch, sums, t0)
        self.history.append(rec)
        self.log.write(rec)
        if self.checkpoints.each_epoch:
            self._save(epoch + 1, 0, {})
        self.bar.epoch_end(epoch, rec)

    def _chunk(self, epoch: int, perm: Array, sums: dict[str, Any], done: int) -> int:
        """One chunk of steps from ``done`` steps into ``epoch``; returns the new ``done``."""
        size, run = self.program.runner_at(done)
        before = self.global_step()
        self.state, m = run(self.state, self.x, self.y, perm, jnp.asarray(done, jnp.int32))
        m = jax.device_get(m)
        after = before + size
        self.guard.check(m, before, after, epoch)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64) * size
        done += size
        self._probe(epoch, before, after)
        self.bar.chunk(epoch, size, m)
        if self.checkpoints.due(before, after, done, self.program.steps_per_epoch):
            self._save(epoch, done, sums)
        return done

    def _probe(self, epoch: int, before: int, after: int) -> None:
        """A ``"kind": "probe"`` record when the chunk ``before+1..after`` passed a multiple of
        ``probe_every``."""
        every = self.probe_every
        if self.probe_fn is not None and every and after // every > before // every:
            rec = {"kind": "probe", "epoch": epoch + 1, "step": after}
            rec.update(_scalarise("", jax.device_get(
                self.probe_fn(self.program.host_params(self.state))), self.seeding.ensemble))
            self.log.write(rec)

    def _save(self, epoch_idx: int, done_in_epoch: int, sums: dict[str, Any]) -> None:
        self.checkpoints.save(self.state, self.global_step(), epoch_idx, done_in_epoch, sums,
                              self.history, self.log.records)

    def _epoch_record(self, epoch: int, sums: dict[str, Any], t0: float) -> dict[str, Any]:
        """The ``"kind": "epoch"`` record: the training metrics averaged over the epoch's
        steps, and the loss and error on the validation and test sets."""
        ensemble, program, data = self.seeding.ensemble, self.program, self.data
        rec: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": self.global_step()}
        if ensemble:
            rec["seeds"] = self.seeding.seed_list
        rec.update(_scalarise("train_", {k: v / program.steps_per_epoch
                                         for k, v in sums.items()}, ensemble))
        for split, xs, ys in (("val", data.x_val, data.y_val),
                              ("test", data.x_test, data.y_test)):
            if len(xs):
                rec.update(_scalarise(f"{split}_", evaluate_batches(
                    program.host_params(self.state.params), xs, ys, program.eval_fn), ensemble))
        rec["epoch_time_s"] = time.perf_counter() - t0
        return rec


def _scalarise(prefix: str, m: dict[str, Any], ensemble: bool) -> dict[str, Any]:
    """Metrics as floats named ``prefix + name``; for an ensemble, per-seed lists with their
    ``_mean`` and ``_std``."""
    out: dict[str, Any] = {}
    for k, v in m.items():
        v = np.asarray(v)
        if ensemble:
            out[f"{prefix}{k}"] = [float(a) for a in v]
            out.update({f"{prefix}{k}_{s}": x for s, x in _summarise(v).items()})
        else:
            out[f"{prefix}{k}"] = float(v)
    return out


def output_width(model: Any, params: Params, x: Any) -> int:
    """The size of the last axis of ``model.apply(params, x)`` (traced, nothing computed)."""
    return int(jax.eval_shape(model.apply, params, jnp.asarray(x[:1])).shape[-1])


def _check_data_targets(model: Any, data: Dataset, params: Params, ensemble: bool) -> None:
    """`check_targets` on every split of ``data``, once per `fit` (labels outside the output
    width would train with zero loss and zero gradient)."""
    if ensemble:
        params = jax.tree.map(lambda a: a[0], params)
    n_out = output_width(model, params, data.x_train)
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if len(x):
            check_targets(x, y, n_out, f"{data.name} y_{split}")


def evaluate_batches(params, x, y, eval_fn, batch_size: int = 1000) -> dict[str, Any]:
    """Like `evaluate`, but works on (possibly seed- or configuration-batched) outputs of
    ``eval_fn(params, x, y) -> (sum of loss, number correct)``, summed over batches in float64."""
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
