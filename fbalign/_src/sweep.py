"""Sweeps: a grid of training configurations (seeds, learning rates, feedback scales, numeric
rule options) trained in one compiled program.

Every configuration of the grid is one network with its own `TrainState`; the states are
stacked along a leading *configuration axis* and one jitted program (`make_epoch_runner`, the
runner `fit` uses for its ``seeds=`` ensembles) trains them all, each on its own data order.
What differs between configurations enters as traced values, never as compile-time constants:

* ``seed``: the keys of the initial state and of the data order (exactly as `fit` draws them);
* ``lr``: the optimizer is wrapped in ``optax.inject_hyperparams``, so the learning rate is an
  array in the optimizer state;
* ``feedback_scale`` and other numeric rule options: the rule is built *inside* the vmapped
  function from the traced values (``kolen_pollack(weight_decay=w)`` with ``w`` a tracer).
  An option the rule's code cannot take traced (a Python ``if`` on it, a loop count, a shape)
  is found once, by tracing, and its values run as separate programs, one per value
  (`SweepResult.static_axes`, `SweepResult.programs`).

Axes that change shapes (layer widths, depths, the batch size) are refused: one program holds
networks of one shape. Run one sweep per architecture.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import math
import time
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbalign._src import cli
from fbalign._src.activations import ACTIVATIONS
from fbalign._src.base import LearningRule, TapeRule, check_network
from fbalign._src.data import DATASETS, Dataset, load_dataset
from fbalign._src.lift import as_learning_rule
from fbalign._src.losses import LOSSES, Loss, check_targets, get_loss
from fbalign._src.registry import RULES
from fbalign._src.rule_args import UsageError, check_rule_builds, parse_rule_args, rule_options
from fbalign._src.runner import ensemble_step
from fbalign._src.train import (
    FitResult,
    TrainState,
    evaluate_batches,
    init_train_state,
    json_safe,
    make_epoch_runner,
    make_eval_fn,
    make_train_step,
    output_width,
    resolve_ensemble_impl,
)
from fbalign._src.train import (
    fit as single_fit,
)
from fbalign._src.wrap import is_seeded

Array = jax.Array

BUILTIN_AXES = ("seed", "lr", "feedback_scale")
# Grid names that would change the networks' shapes (or the program's): refused, with the fix.
SHAPE_AXES = ("hidden", "hidden_sizes", "width", "widths", "depth", "sizes", "layers",
              "num_layers", "batch_size", "input_dim", "output_dim", "channels", "model",
              "epochs")
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd, "adam": optax.adam, "rmsprop": optax.rmsprop}
SWEEP_IMPLS = ("auto", "vmap", "map")


# ----------------------------------------------------------------------------------------------
# The grid


def grid_configs(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The configurations of ``grid``: its Cartesian product in row-major order, the axes in the
    order the mapping gives them and the **last axis varying fastest** (``itertools.product``).

    ``{"lr": [0.1, 0.01], "seed": [0, 1]}`` gives ``lr=0.1 seed=0``, ``lr=0.1 seed=1``,
    ``lr=0.01 seed=0``, ``lr=0.01 seed=1``: configuration ``i`` of a `SweepResult` is entry
    ``i`` of this list.
    """
    names = list(grid)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(list(grid[k]) for k in names))]


def _numeric_kind(hint: Any, default: Any) -> type | None:
    """``float`` or ``int`` for an option that takes numbers (its annotation, else its
    default's type), None otherwise (strings, callables, booleans, tuples)."""
    if hint is None:
        kind = type(default)
        return kind if kind in (int, float) else None
    args = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
    if typing.get_origin(hint) is typing.Literal:
        return None
    if float in args:
        return float
    if int in args:
        return int
    return None


class _Axes(NamedTuple):
    """The checked grid: its axis names in order, the rule option each option axis sets
    (``feedback_scale`` -> ``scale``) and that option's kind (``float``/``int``)."""

    names: tuple[str, ...]
    option: dict[str, str]
    kind: dict[str, type]


def _rule_maker(rule: Any) -> tuple[Callable | None, str]:
    """The constructor whose options the grid may sweep (None for a built rule) and a name."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
        return RULES[rule].make, rule
    if isinstance(rule, (LearningRule, TapeRule)):
        return None, getattr(rule, "name", "rule")
    if callable(rule):
        return rule, getattr(rule, "__name__", "rule")
    raise TypeError("rule must be a registered name, a rule constructor (such as "
                    "fbalign.rules.kolen_pollack) or a built LearningRule/TapeRule, got "
                    f"{type(rule).__name__}")


def check_grid(grid: Mapping[str, Sequence[float]], rule: Any,
               rule_kwargs: Mapping[str, Any] | None = None) -> _Axes:
    """Checks the axes and values of ``grid`` for ``rule`` (a ValueError naming what is wrong).

    Valid axes: ``seed`` (integers in ``[0, 2^32)``), ``lr`` (positive), ``feedback_scale`` (the
    rule constructor's ``scale``) and the rule constructor's numeric options (``float``/``int``
    annotated or defaulted; booleans, strings and tuples are not grid axes). Shape-changing
    names (`SHAPE_AXES`) are refused with the fix; so is an axis that ``rule_kwargs`` also
    sets.
    """
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"grid must be a non-empty dict of axis -> values, got {grid!r}")
    make, name = _rule_maker(rule)
    options = rule_options(make) if make is not None else {}
    numeric = {k: kind for k, (hint, default) in options.items()
               if (kind := _numeric_kind(hint, default)) is not None}
    # feedback_scale names the constructor's `scale`, unless the rule has an option of that
    # name itself (PEPITA's feedback_scale)
    alias = "feedback_scale" not in numeric and "scale" in numeric
    valid = list(dict.fromkeys(["seed", "lr"] + (["feedback_scale"] if alias else [])
                               + [k for k in numeric if not (alias and k == "scale")]))
    option, kind = {}, {}
    for axis in grid:
        if axis in ("seed", "lr"):
            continue
        target = "scale" if axis == "feedback_scale" and alias else axis
        if target in numeric:
            option[axis], kind[axis] = target, numeric[target]
            continue
        if axis in SHAPE_AXES:
            raise ValueError(
                f"grid axis {axis!r} changes the networks' shapes (or the program's length), "
                "and one compiled program trains networks of one shape; run one sweep per "
                f"{axis} value instead (valid axes for rule {name!r}: {', '.join(valid)})")
        if make is None:
            raise ValueError(
                f"grid axis {axis!r}: rule {name!r} was given built, so its options cannot be "
                "swept; pass its registered name or its constructor (valid axes now: seed, lr)")
        why = ("is not numeric" if axis in options else
               "takes no 'scale' option" if axis == "feedback_scale" else "has no such option")
        raise ValueError(f"unknown grid axis {axis!r} (rule {name!r} {why}); valid: "
                         f"{', '.join(valid)}")
    if "feedback_scale" in grid and "scale" in grid:
        raise ValueError("grid sets both 'feedback_scale' and 'scale' (the same option); keep "
                         "one")
    clash = [a for a, o in option.items() if o in (rule_kwargs or {})]
    if clash:
        raise ValueError(f"grid axis {clash[0]!r} is also set in rule_kwargs "
                         f"({option[clash[0]]}={rule_kwargs[option[clash[0]]]!r}); set it in "
                         "one place")
    for axis, values in grid.items():
        _check_values(axis, values, kind.get(axis))
    return _Axes(tuple(grid), option, kind)


def _check_values(axis: str, values: Any, kind: type | None) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"grid axis {axis!r} needs a non-empty sequence of numbers, got "
                         f"{values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise ValueError(f"grid axis {axis!r}: {v!r} is not a number")
        if not math.isfinite(float(v)):
            raise ValueError(f"grid axis {axis!r}: {v!r} is not finite")
        if axis == "seed" and (int(v) != v or not 0 <= int(v) < 2**32):
            raise ValueError(f"grid axis 'seed': {v!r} is not an integer in [0, 2^32)")
        if axis == "lr" and v <= 0:
            raise ValueError(f"grid axis 'lr': {v!r} is not positive")
        if kind is int and int(v) != v:
            raise ValueError(f"grid axis {axis!r} takes integers, got {v!r}")


# ----------------------------------------------------------------------------------------------
# The result


class SweepResult(NamedTuple):
    """What `sweep` returns.

    Attributes:
      axes: the grid's axis names, in the order of `grid_configs`.
      configs: one dict of axis values per configuration, in grid order (`grid_configs`).
      history: per configuration, one record per epoch: ``epoch``, ``train_<metric>`` (the
        mean over the epoch's steps: ``loss``, ``accuracy``, the rule's metrics), and
        ``val_``/``test_`` ``loss``, ``accuracy``, ``error`` (%) where the data has them.
      static_axes: option axes the rule could not take as traced values; each of their values
        ran as a separate program.
      programs: how many compiled programs ran (1 when every axis was traced).
      wall_time_s: the sweep's wall time, compilation included.
      groups: ``(indices, state)`` per program: the configurations it trained and their final
        `TrainState` s stacked along a leading axis (`state` picks one).
    """

    axes: tuple[str, ...]
    configs: list[dict[str, float]]
    history: list[list[dict[str, Any]]]
    static_axes: tuple[str, ...]
    programs: int
    wall_time_s: float
    groups: list[tuple[np.ndarray, TrainState]]

    @property
    def final(self) -> list[dict[str, Any]]:
        """The last epoch's record of every configuration."""
        return [h[-1] if h else {} for h in self.history]

    def state(self, i: int) -> TrainState:
        """The final `TrainState` of configuration ``i`` (params, optimizer and rule state)."""
        for indices, stacked in self.groups:
            where = np.flatnonzero(indices == i)
            if where.size:
                return jax.tree.map(lambda a, j=int(where[0]): a[j], stacked)
        raise IndexError(f"configuration {i} is out of range (the sweep has "
                         f"{len(self.configs)})")

    def metric(self) -> str:
        """The headline metric: ``test_error`` when the data is labelled and has a test set,
        else ``test_loss``, else ``train_loss``."""
        last = self.final[0] if self.final else {}
        return next((k for k in ("test_error", "test_loss", "train_loss") if k in last),
                    "train_loss")

    def best(self) -> int:
        """The configuration with the lowest `metric` (NaN, a diverged run, never wins)."""
        key = self.metric()
        vals = np.array([r.get(key, np.nan) for r in self.final], np.float64)
        if np.all(np.isnan(vals)):
            return 0
        return int(np.nanargmin(vals))

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per configuration: its index, axis values, final metrics, whether
        they are finite, and its history (what ``fbalign sweep`` writes to results.jsonl)."""
        out = []
        for i, (cfg, hist) in enumerate(zip(self.configs, self.history, strict=True)):
            last = {k: v for k, v in (hist[-1] if hist else {}).items() if k != "epoch"}
            finite = all(math.isfinite(v) for v in last.values() if isinstance(v, float))
            out.append(json_safe({"config": i, **cfg, **last, "finite": finite,
                                  "history": hist}))
        return out

    def table(self) -> str:
        """A Markdown table: one row per configuration (grid order), its axis values, final
        training loss and the headline metric; the best row's metric in bold, diverged runs
        (NaN/Inf) marked."""
        key = self.metric()
        best = self.best()
        head = {"test_error": "test error (%)"}.get(key, key.replace("_", " "))
        cols = [*self.axes, "final train loss", head]
        lines = ["| # | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for i, (cfg, rec) in enumerate(zip(self.configs, self.final, strict=True)):
            vals = [f"{cfg[a]:g}" for a in self.axes]
            tl, m = rec.get("train_loss", math.nan), rec.get(key, math.nan)
            mt = f"{m:.2f}" if key == "test_error" else f"{m:.4g}"
            if not math.isfinite(m) or not math.isfinite(tl):
                mt += " (diverged)"
            elif i == best:
                mt = f"**{mt}**"
            lines.append(f"| {i} | " + " | ".join(vals) + f" | {tl:.4g} | {mt} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Writes a figure of the grid to ``path`` (matplotlib, imported here): the headline
        metric, mean and std over seeds, against the one other varying axis (a line, log-x for
        ``lr``), as a heat map over two, else one bar per configuration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = self.metric()
        vals = np.array([r.get(key, np.nan) for r in self.final], np.float64)
        varying = [a for a in self.axes if a != "seed"
                   and len({c[a] for c in self.configs}) > 1]
        groups: dict[tuple, list[float]] = {}
        for cfg, v in zip(self.configs, vals, strict=True):
            groups.setdefault(tuple(cfg[a] for a in varying), []).append(v)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        if len(varying) == 1:
            xs = sorted(groups)
            mean = [np.nanmean(groups[x]) for x in xs]
            std = [np.nanstd(groups[x]) for x in xs]
            ax.errorbar([x[0] for x in xs], mean, yerr=std, marker="o", capsize=3)
            ax.set_xlabel(varying[0])
            if varying[0] == "lr" or varying[0].endswith(("learning_rate", "scale", "decay")):
                ax.set_xscale("log")
            ax.set_ylabel(key)
        elif len(varying) == 2:
            a_vals = sorted({k[0] for k in groups})
            b_vals = sorted({k[1] for k in groups})
            img = np.array([[np.nanmean(groups.get((a, b), [np.nan])) for b in b_vals]
                            for a in a_vals])
            im = ax.imshow(img, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(b_vals)), [f"{b:g}" for b in b_vals])
            ax.set_yticks(range(len(a_vals)), [f"{a:g}" for a in a_vals])
            ax.set_xlabel(varying[1])
            ax.set_ylabel(varying[0])
            fig.colorbar(im, ax=ax, label=key)
        else:
            ax.bar(range(len(vals)), vals)
            ax.set_xlabel("configuration")
            ax.set_ylabel(key)
        ax.set_title(f"sweep of {len(self.configs)} configurations")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ----------------------------------------------------------------------------------------------
# Training


def _make_optimizer(optimizer: str | Callable[..., optax.GradientTransformation],
                    momentum: float) -> Callable[[Any], optax.GradientTransformation]:
    """``lr -> optax.inject_hyperparams(factory)(learning_rate=lr)``: the learning rate lives in
    the optimizer state (traced), every other hyperparameter stays a Python constant, as in
    ``factory(lr)`` (so the arithmetic is the plain optimizer's)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)} "
                             "or a factory taking learning_rate (such as optax.lamb)")
        factory = OPTIMIZERS[optimizer]
    elif callable(optimizer):
        factory = optimizer
    else:
        raise TypeError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or a factory "
                        f"learning_rate -> optax transformation, got {type(optimizer).__name__}")
    params = inspect.signature(factory).parameters
    if "learning_rate" not in params:
        raise ValueError(f"optimizer factory {getattr(factory, '__name__', factory)!r} takes no "
                         "learning_rate argument, which the sweep injects")
    extra: dict[str, Any] = {}
    if momentum:
        if "momentum" not in params:
            raise ValueError(f"momentum={momentum} but optimizer {optimizer!r} takes none; valid "
                             "with momentum: sgd, rmsprop")
        extra["momentum"] = momentum
    static = [p for p in params if p != "learning_rate"]
    injected = optax.inject_hyperparams(factory, static_args=static)
    return lambda lr: injected(learning_rate=lr, **extra)


class _Plan(NamedTuple):
    """What every program of a sweep shares."""

    model: Any
    rule: Any
    make: Callable | None
    rule_kwargs: dict[str, Any]
    form: str
    loss: Loss
    make_opt: Callable
    batch_size: int
    dtype: Any


def _build_rule(plan: _Plan, options: Mapping[str, Any]) -> LearningRule:
    """The `LearningRule` for one configuration's rule options (traced or Python values)."""
    kwargs = {**plan.rule_kwargs, **options}
    if isinstance(plan.rule, str):
        return as_learning_rule(plan.rule, plan.form, kwargs, plan.model)
    rule = plan.make(**kwargs) if plan.make is not None else plan.rule
    return as_learning_rule(rule, plan.form, None, plan.model)


def _program(plan: _Plan, static: dict[str, Any], traced: tuple[str, ...], axes: _Axes):
    """``(init, step)`` of one program: ``init(k_init, lr, opts) -> carry`` and
    ``step(carry, x, y, index) -> (carry, metrics)`` for one configuration, the carry being
    ``(TrainState, opts)`` with ``opts`` the traced rule options (axis -> scalar array)."""

    def options(opts):
        return {**static, **{axes.option[a]: opts[a] for a in traced}}

    def init(k_init, lr, opts):
        rule = _build_rule(plan, options(opts))
        return init_train_state(plan.model, rule, plan.make_opt(lr), k_init), opts

    def step(carry, x, y, index):
        state, opts = carry
        rule = _build_rule(plan, options(opts))
        # the optimizer reads its learning rate from the state (inject_hyperparams)
        one = make_train_step(plan.model, rule, plan.make_opt(1.0), plan.loss, jit=False)
        state, metrics = one(state, x, y, index)
        return (state, opts), metrics

    return init, step


def _option_array(value: Any, kind: type, dtype: Any) -> Array:
    return jnp.asarray(value, dtype if kind is float else jnp.int32)


def _traceable(plan: _Plan, axes: _Axes, static: dict[str, Any], traced: tuple[str, ...],
               example: dict[str, Any], x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the rule's init and step trace with the option axes ``traced`` as arrays (a
    Python ``if``, loop count or shape on them raises a tracer error, found here once)."""
    init, step = _program(plan, static, traced, axes)
    opts = {a: _option_array(example[a], axes.kind[a], plan.dtype) for a in traced}
    xb = jnp.asarray(x[:plan.batch_size])
    yb = jnp.asarray(y[:plan.batch_size])

    def both(k, lr, o):
        carry = init(k, lr, o)
        return step(carry, xb, yb, jnp.arange(xb.shape[0]))

    try:
        jax.eval_shape(both, jax.random.PRNGKey(0), jnp.asarray(1.0, plan.dtype), opts)
    except (TypeError, ValueError):
        # Tracer errors (ConcretizationTypeError...) are TypeErrors; a constructor's own check
        # refusing a tracer is a ValueError (every value was built on the host first, so the
        # values themselves are valid).
        return False
    return True


def _split_axes(plan: _Plan, axes: _Axes, configs: list[dict[str, Any]], rule_predicts: bool,
                data: Dataset) -> tuple[str, ...]:
    """The option axes that must run as separate programs (static): all of them for a rule
    that answers with its own ``predict`` (it might read an option), else those that do not
    trace (tried together first, then one by one)."""
    opt_axes = tuple(axes.option)
    if not opt_axes:
        return ()
    if rule_predicts:
        return opt_axes
    first = configs[0]
    static_of = lambda keep: {axes.option[a]: first[a] for a in opt_axes if a not in keep}
    if _traceable(plan, axes, static_of(opt_axes), opt_axes, first, data.x_train, data.y_train):
        return ()
    return tuple(a for a in opt_axes if not _traceable(
        plan, axes, static_of((a,)), (a,), first, data.x_train, data.y_train))


def _check_run(model: Any, data: Dataset, epochs: int, batch_size: int,
               chunk: int | None) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    n = len(data.x_train)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} "
                         f"examples of {data.name})")
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"chunk must be None or a positive integer, got {chunk!r}")
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    n_out = output_width(model, params, data.x_train)
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if len(x):
            check_targets(x, y, n_out, f"{data.name} y_{split}")


def _warn_one_instance(grid: Mapping[str, Sequence[float]], model: Any) -> None:
    """Seeds of a grid over a wrapped model instance share its weights: said once."""
    if len(set(grid.get("seed", ()))) > 1 and not is_seeded(model):
        warnings.warn(f"{type(model).__name__} wraps one model instance, so every seed of the "
                      "grid starts from the same weights (only feedback, data order and rule "
                      "noise differ); pass a factory (fbalign.models.from_nnx(lambda rngs: ...), "
                      "from_equinox(lambda key: ...)) to draw weights per seed", RuntimeWarning,
                      stacklevel=3)


def sweep(
    model: Any,
    rule: Any,
    data: Dataset,
    *,
    grid: Mapping[str, Sequence[float]],
    optimizer: str | Callable[..., optax.GradientTransformation] = "sgd",
    lr: float = 1e-2,
    momentum: float = 0.0,
    loss: Loss | str = "cross_entropy",
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    rule_kwargs: Mapping[str, Any] | None = None,
    form: str = "explicit",
    impl: str = "auto",
    chunk: int | None = None,
    progress: bool = False,
) -> SweepResult:
    """Trains every configuration of ``grid`` in one compiled program (per static option).

    Configuration ``i`` (entry ``i`` of `grid_configs`: the Cartesian product, last axis
    fastest) follows exactly the single run ``fit(model, rule, optimizer(lr), data,
    seed=seed_i, rule_kwargs={..., option: value_i}, epochs=..., batch_size=...)``: the same
    initial state (``PRNGKey(seed)`` split as `fit` splits it), the same data order each epoch,
    the same rule and optimizer arithmetic. Only the program differs: the configurations'
    states are stacked along a leading axis and trained together, so a grid of small networks
    fills a device that one of them leaves idle.

    Args:
      model: the network (an fbalign model or a wrapped one), the same for every configuration.
      rule: a registered rule name, a rule constructor (``fbalign.rules.kolen_pollack``), or a
        built rule (then only ``seed`` and ``lr`` can vary).
      data: the `fbalign.data.Dataset`.
      grid: axis -> values. Axes: ``seed``, ``lr``, ``feedback_scale`` (the rule's ``scale``)
        and any numeric option of the rule constructor (e.g. ``weight_decay`` and
        ``learning_rate`` of ``kp``, ``beta`` of ``ep``). Axes missing from the grid take
        ``seed``, ``lr`` and ``rule_kwargs`` (or the constructor's defaults).
      optimizer: ``"sgd"``, ``"adam"``, ``"rmsprop"`` or an optax factory taking
        ``learning_rate``; the learning rate is injected (``optax.inject_hyperparams``) so it is
        traced; the factory's other arguments keep their defaults (``momentum`` for sgd and
        rmsprop).
      loss, epochs, batch_size, form: as in `fit`.
      impl: ``"vmap"`` (one batched program), ``"map"`` (a loop over configurations inside the
        program, each running one network's kernels) or ``"auto"`` (`resolve_ensemble_impl`).
      chunk: with ``impl="vmap"``, batch at most this many configurations at a time
        (``jax.lax.map(..., batch_size=chunk)``): bounds the memory of large grids in one
        program. None: all at once.
      progress: a progress bar over programs and epochs.

    Returns:
      A `SweepResult`: per-configuration histories, final states, ``table()`` and ``plot()``.

    Raises:
      ValueError: an unknown axis (the valid ones listed), a shape-changing axis (``hidden``,
        ``batch_size``...), a bad value, or an option the rule refuses (naming the
        configuration).

    Non-finite values are not checked per step: a diverging configuration ends with NaN
    metrics (marked ``finite: false`` in `SweepResult.records`) and the others are unaffected.
    """
    t0 = time.perf_counter()
    axes = check_grid(grid, rule, rule_kwargs)
    _check_values("seed", [seed], None)
    _check_values("lr", [lr], None)
    _check_run(model, data, epochs, batch_size, chunk)
    impl = resolve_ensemble_impl(impl, model)
    if chunk is not None and impl != "vmap":
        raise ValueError(f"chunk={chunk} batches configurations for impl='vmap', got impl="
                         f"{impl!r}; drop chunk or use impl='vmap'")
    make, name = _rule_maker(rule)
    loss_fn = get_loss(loss) if isinstance(loss, str) else loss
    cast = {"seed": int, "lr": float, **axes.kind}
    configs = grid_configs({a: [cast[a](v) for v in vs] for a, vs in grid.items()})
    base = {"seed": seed, "lr": lr}
    full = [{**base, **c} for c in configs]
    # Every distinct set of option values is built once on the host, where the constructor's
    # own checks see Python values and name a bad one.
    for opts in {tuple((a, c[a]) for a in axes.option) for c in configs}:
        try:
            built = _build_rule(_Plan(model, rule, make, dict(rule_kwargs or {}), form, loss_fn,
                                      None, batch_size, None),
                                {axes.option[a]: v for a, v in opts})
        except (TypeError, ValueError) as err:
            raise ValueError(f"rule {name!r} refuses the grid configuration "
                             f"{dict(opts)}: {err}") from err
    check_network(built, model)
    _warn_one_instance(grid, model)
    dtype = next((a.dtype for a in jax.tree.leaves(jax.eval_shape(model.init,
                                                                  jax.random.PRNGKey(0)))
                  if jnp.issubdtype(a.dtype, jnp.floating)), jnp.float32)
    plan = _Plan(model, rule, make, dict(rule_kwargs or {}), form, loss_fn,
                 _make_optimizer(optimizer, momentum), batch_size, dtype)
    static_axes = _split_axes(plan, axes, full, built.predict is not None, data)
    traced = tuple(a for a in axes.option if a not in static_axes)

    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(full):
        groups.setdefault(tuple(c[a] for a in static_axes), []).append(i)
    history: list[list[dict[str, Any]]] = [[] for _ in configs]
    finals: list[tuple[np.ndarray, TrainState]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * epochs, unit="epoch", desc=f"sweep x{len(configs)}")
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    evals: dict[Any, Callable] = {}
    steps = len(data.x_train) // batch_size
    for key, indices in groups.items():
        static = {axes.option[a]: v for a, v in zip(static_axes, key, strict=True)}
        state = _run_group(plan, axes, static, traced, [full[i] for i in indices], data,
                           x_all, y_all, steps, epochs, impl, chunk, indices, history, bar,
                           evals)
        finals.append((np.asarray(indices), state))
    if bar is not None:
        bar.close()
    return SweepResult(axes.names, configs, history, static_axes, len(groups),
                       time.perf_counter() - t0, finals)


def _batched(fn: Callable, impl: str, chunk: int | None) -> Callable:
    """``fn`` over a leading configuration axis: `ensemble_step`, or ``lax.map`` over chunks of
    ``chunk`` configurations each vmapped."""
    if chunk is None:
        return ensemble_step(fn, impl)
    return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=chunk)


@functools.partial(jax.jit, static_argnums=2)
def _data_orders(k_shuffle: Array, epoch: Array, n: int) -> Array:
    """Each configuration's order of the ``n`` training examples in ``epoch``, drawn as `fit`
    draws a run's (``permutation(fold_in(k_shuffle, epoch), n)``)."""
    return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(k_shuffle)


def _run_group(plan: _Plan, axes: _Axes, static: dict[str, Any], traced: tuple[str, ...],
               configs: list[dict[str, Any]], data: Dataset, x_all: Array, y_all: Array,
               steps: int, epochs: int, impl: str, chunk: int | None, indices: list[int],
               history: list[list[dict[str, Any]]], bar: Any,
               evals: dict[Any, Callable]) -> TrainState:
    """Trains one program's configurations; appends their epoch records to ``history``.
    ``evals``: the jitted evaluations built so far, by the rule's ``predict`` (shared by the
    programs of a sweep whose rule answers with ``network.apply``)."""
    init, step = _program(plan, static, traced, axes)
    # Host-side inputs and one jitted setup: each eager op would compile on its own.
    keys = np.stack([np.asarray(jax.random.PRNGKey(int(c["seed"]))) for c in configs])
    lrs = np.asarray([c["lr"] for c in configs], plan.dtype)
    opts = {a: np.asarray([c[a] for c in configs], plan.dtype if axes.kind[a] is float
                          else np.int32) for a in traced}

    @jax.jit
    def setup(keys, lrs, opts):
        k_init, k_shuffle = jax.vmap(jax.random.split, out_axes=1)(keys)  # as fit's seeding
        return jax.vmap(init)(k_init, lrs, opts), k_shuffle

    carry, k_shuffle = setup(keys, lrs, opts)
    runner = make_epoch_runner(_batched(step, impl, chunk), plan.batch_size, steps,
                               ensemble=False)
    predict = _build_rule(plan, {**static, **{axes.option[a]: configs[0][a]
                                              for a in traced}}).predict
    if predict is not None or None not in evals:  # one evaluation for all programs when the
        one_eval = make_eval_fn(plan.model, plan.loss, predict)  # network answers by apply
        evals[predict] = jax.jit(lambda ps, x, y: _batched(lambda p: one_eval(p, x, y), impl,
                                                           chunk)(ps))
    eval_fn = evals[predict]
    for epoch in range(epochs):
        perm = _data_orders(k_shuffle, np.int32(epoch), len(data.x_train))
        carry, m = runner(carry, x_all, y_all, perm, np.int32(0))
        recs = [{"epoch": epoch + 1} for _ in configs]
        for k, v in jax.device_get(m).items():
            for r, val in zip(recs, np.asarray(v, np.float64).reshape(len(configs), -1),
                              strict=True):
                r[f"train_{k}"] = float(val[0]) if val.size == 1 else val.tolist()
        for split in ("val", "test"):
            xs, ys = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            if len(xs):
                for k, v in evaluate_batches(carry[0].params, xs, ys, eval_fn).items():
                    for r, val in zip(recs, v, strict=True):
                        r[f"{split}_{k}"] = float(val)
        for i, r in zip(indices, recs, strict=True):
            history[i].append(r)
        if bar is not None:
            bar.update(1)
    return carry[0]


# ----------------------------------------------------------------------------------------------
# Command line: fbalign sweep


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``--grid NAME=V1,V2,...`` items as a grid (axes in the order given; ``seed`` and integer
    values as ints); a `UsageError` for a malformed item or a repeated axis."""
    grid: dict[str, list[float]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise UsageError(f"--grid takes NAME=V1,V2,... such as lr=0.01,0.1; got {item!r}")
        if name in grid:
            raise UsageError(f"--grid {name} given twice; list all its values in one --grid")
        values: list[float] = []
        for t in text.split(","):
            t = t.strip()
            try:
                v = float(t)
            except ValueError:
                raise UsageError(f"--grid {item}: {t!r} is not a number") from None
            values.append(int(v) if (name == "seed" or t.lstrip("-").isdigit())
                          and v == int(v) else v)
        grid[name] = values
    return grid


def add_sweep_command(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``fbalign sweep`` to the command line's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "sweep", help="train a grid of seeds, learning rates and rule options in one program",
        description="Train every configuration of a grid (the Cartesian product of the --grid "
                    "axes, the last varying fastest) in one compiled program; writes "
                    "results.jsonl (one record per configuration), summary.md (a table) and "
                    "sweep.png (when matplotlib is installed) in --out.")
    p.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2,...",
                   help="a grid axis and its values; repeatable. Axes: seed, lr, feedback_scale "
                        "(the rule's scale) and the rule's numeric options (e.g. --rule kp "
                        "--grid weight_decay=0,1e-3)")
    p.add_argument("--rule", choices=list(RULES), default="fa", metavar="RULE",
                   help=f"learning rule (default fa); one of {', '.join(RULES)}")
    p.add_argument("--rule-arg", action="append", default=None, metavar="NAME=VALUE",
                   help="a fixed option of the rule's constructor (as in fbalign train)")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="directory holding mnist.npz")
    p.add_argument("--normalize", choices=("standardize", "unit", "none"),
                   default="standardize")
    p.add_argument("--model", choices=cli.MODELS, default="mlp")
    p.add_argument("--hidden", default="100",
                   help="hidden widths, comma-separated, or none (default 100)")
    p.add_argument("--activation", choices=list(ACTIVATIONS), default="tanh")
    p.add_argument("--output-activation", choices=list(ACTIVATIONS), default="linear")
    p.add_argument("--loss", choices=list(LOSSES), default=None,
                   help="default: cross_entropy for classification, else squared_error")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd",
                   help="optimizer whose learning rate is swept (default sgd)")
    p.add_argument("--lr", type=float, default=1e-2,
                   help="learning rate where the grid has no lr axis (default 1e-2)")
    p.add_argument("--momentum", type=float, default=0.0, help="momentum (sgd, rmsprop)")
    p.add_argument("--feedback-init", choices=("gaussian", "uniform", "orthogonal", "xavier"),
                   default=None, help="feedback distribution, for rules that take init")
    p.add_argument("--feedback-scale", type=float, default=None,
                   help="a fixed feedback scale (or sweep it: --grid feedback_scale=...)")
    p.add_argument("--form", choices=("explicit", "grad"), default="explicit")
    p.add_argument("--seed", type=int, default=0,
                   help="seed where the grid has no seed axis (default 0)")
    p.add_argument("--impl", choices=SWEEP_IMPLS, default="auto",
                   help="vmap (batched), map (a loop inside the program) or auto")
    p.add_argument("--chunk", type=int, default=None,
                   help="with vmap: at most this many configurations batched at a time")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/sweep-<rule>-<dataset>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_sweep)
    return p


def _hidden(text: str) -> tuple[int, ...]:
    if text.strip() == "none":
        return ()
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--hidden takes comma-separated positive integers such as 100,100 "
                         f"or none; got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def cmd_sweep(args: argparse.Namespace) -> int:
    """``fbalign sweep``: trains the grid, prints its table, writes results.jsonl, summary.md,
    config.json and (with matplotlib) sweep.png in the output directory."""
    grid = parse_grid(args.grid)
    rule_kwargs = parse_rule_args(args.rule, args.rule_arg or [])
    options = rule_options(RULES[args.rule].make)
    for opt, flag in (("init", "feedback_init"), ("scale", "feedback_scale")):
        value = getattr(args, flag)
        if value is None:
            continue
        if opt not in options:
            raise UsageError(f"--{flag.replace('_', '-')}: rule {args.rule!r} takes no {opt}")
        if opt in rule_kwargs and rule_kwargs[opt] != value:
            raise UsageError(f"--rule-arg {opt}={rule_kwargs[opt]} contradicts "
                             f"--{flag.replace('_', '-')} {value}")
        rule_kwargs[opt] = value
    if "scale" in rule_kwargs and ("feedback_scale" in grid or "scale" in grid):
        raise UsageError("--feedback-scale (or --rule-arg scale) fixes the scale that --grid "
                         "feedback_scale sweeps; drop one")
    check_rule_builds(args.rule, rule_kwargs)
    hidden = _hidden(args.hidden)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    try:
        check_grid(grid, args.rule, rule_kwargs)
        kwargs: dict[str, Any] = {}
        if args.dataset in ("mnist", "digits"):
            kwargs["normalize"] = args.normalize
        if args.dataset == "mnist" and args.data_dir:
            kwargs["path"] = args.data_dir
        data = load_dataset(args.dataset, seed=args.seed, **kwargs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    loss = args.loss or ("cross_entropy" if data.num_classes else "squared_error")
    if args.rule == "ep":  # the loss ep nudges with (its cost), as fbalign train sets it
        loss = cli.ep_loss(rule_kwargs.get("cost", "squared"), args.loss)
    model = cli.build_model(args.model, data.input_dim, data.output_dim, hidden,
                            args.activation, args.output_activation,
                            **cli.hopfield_options(argparse.Namespace(**vars(args),
                                                                      rule_args=rule_kwargs)))
    spec = argparse.Namespace(**vars(args))
    spec.out = args.out or str(Path("runs") / f"sweep-{args.rule}-{args.dataset}-"
                                               f"{time.strftime('%Y%m%d-%H%M%S')}")
    out = cli.prepare_out(spec)  # refuses a non-empty directory unless --overwrite
    try:
        result = sweep(model, args.rule, data, grid=grid, optimizer=args.optimizer, lr=args.lr,
                       momentum=args.momentum, loss=loss, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, rule_kwargs=rule_kwargs,
                       form="grad" if args.model == "rnn" else args.form, impl=args.impl,
                       chunk=args.chunk, progress=not args.no_progress)
    except ValueError as err:
        raise UsageError(str(err)) from None
    _write_outputs(out, args, result, loss, data)
    print(result.table())
    print(f"{len(result.configs)} configurations of {args.rule} on {args.dataset} in "
          f"{result.programs} program(s), {result.wall_time_s:.1f} s; saved in {out}")
    return 0


def _write_outputs(out: Path, args: argparse.Namespace, result: SweepResult, loss: str,
                   data: Dataset) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "given_options")}
    config.update({"loss": loss, "grid": {a: list(dict.fromkeys(c[a] for c in result.configs))
                                          for a in result.axes},
                   "jax_version": jax.__version__, "backend": jax.default_backend(),
                   "n_train": len(data.x_train), "n_test": len(data.x_test)})
    (out / "config.json").write_text(json.dumps(json_safe(config), indent=2) + "\n")
    with open(out / "results.jsonl", "w") as f:
        for rec in result.records():
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    notes = [f"{len(result.configs)} configurations (grid order: the Cartesian product of "
             f"{', '.join(result.axes)}, the last varying fastest), {args.epochs} epochs, "
             f"{result.programs} compiled program(s), {result.wall_time_s:.1f} s on "
             f"{jax.default_backend()}."]
    if result.static_axes:
        notes.append(f"Rule options run as separate programs (the rule cannot take them as "
                     f"traced values): {', '.join(result.static_axes)}.")
    try:
        result.plot(out / "sweep.png")
        notes.append("Figure: sweep.png.")
    except ImportError:
        notes.append("No figure: matplotlib is not installed (pip install matplotlib).")
    text = (f"# Sweep: {args.rule} on {args.dataset}\n\n" + "\n".join(notes) + "\n\n"
            + result.table() + "\n")
    (out / "summary.md").write_text(text)


# The `fit` options a grid run has no counterpart for, with their defaults: any other value is
# refused (naming the option) instead of being ignored.
_FIT_ONLY = {"seeds": None, "probe_fn": None, "probe_every": 0, "out_dir": None, "state": None,
             "checkpoint_every": None, "checkpoint_dir": None, "resume": False, "devices": None,
             "max_skips": 100, "precision": "float32", "log_every": 50}


def fit(model: Any, rule: Any,
        optimizer: optax.GradientTransformation | str | Callable[..., optax.GradientTransformation],
        data: Dataset, *, grid: Mapping[str, Sequence[float]] | None = None,
        **options: Any) -> FitResult | SweepResult:
    """`fbalign._src.train.fit`, or with ``grid=`` a `sweep` of the same run (issue 20).

    Without ``grid`` this is ``fit(model, rule, optimizer, data, **options)`` unchanged (see
    there for the options). With ``grid`` (axis -> values: ``seed``, ``lr``,
    ``feedback_scale`` and any numeric option of the rule, as in `sweep`) every configuration
    trains in one compiled program and equals its own single ``fit`` run; the result is a
    `SweepResult` (per-configuration histories, final states, ``table()``, ``plot()``).

    ``optimizer`` is the transformation every configuration uses, or, when ``lr`` is an axis,
    a name (``"sgd"``, ``"adam"``, ``"rmsprop"``) or a factory taking ``learning_rate``
    (``optax.sgd``) whose rate the grid sets. ``loss``, ``epochs``, ``batch_size``, ``seed``,
    ``form``, ``rule_kwargs``, ``progress`` and ``ensemble_impl`` carry over. A grid run checks
    no values per step: ``on_nonfinite`` must be ``"stop"`` (the default, read as "report":
    a diverging configuration ends with ``finite: false`` in its records) or None. The options
    that have no grid counterpart (``seeds``: use a ``seed`` axis; checkpoints, probes,
    ``out_dir``, ``state``, ``devices``, ``precision``, ``log_every``) are refused by name.

    Raises:
      ValueError: as `sweep`, an option without a grid counterpart, or an ``lr`` axis with a
        ready-made optimizer transformation.
    """
    ready = hasattr(optimizer, "init") and hasattr(optimizer, "update")  # optax.MultiSteps too
    if grid is None:
        if not ready:
            raise TypeError("fit without grid= takes an optax transformation (optax.sgd(0.1)), "
                            f"got {type(optimizer).__name__}; a name or factory is for grid=")
        return single_fit(model, rule, optimizer, data, **options)
    bad = [f"{k}={v!r}" for k, v in options.items() if k in _FIT_ONLY and v != _FIT_ONLY[k]]
    if bad:
        raise ValueError(f"fit(grid=...) cannot also take {', '.join(bad)}: a grid run has no "
                         "counterpart (seeds: add a 'seed' axis to the grid)")
    nonfinite = options.pop("on_nonfinite", "stop")
    if nonfinite not in ("stop", None):
        raise ValueError(f"fit(grid=...) checks no values per step: on_nonfinite must be "
                         f"'stop' or None, got {nonfinite!r} (a diverging configuration ends "
                         "with finite: false in SweepResult.records)")
    known = {"loss", "epochs", "batch_size", "seed", "form", "rule_kwargs", "progress",
             "ensemble_impl"}
    unknown = sorted(set(options) - known - set(_FIT_ONLY))
    if unknown:
        raise TypeError(f"fit() got unexpected option(s) {', '.join(unknown)}")
    if ready:
        if "lr" in grid:
            raise ValueError("grid axis 'lr' sets the optimizer's learning rate: pass a name "
                             "('sgd', 'adam', 'rmsprop') or a factory (optax.sgd) instead of a "
                             "ready-made transformation")
        fixed = optimizer
        optimizer = lambda learning_rate: fixed  # noqa: E731 (the rate is not swept)
    elif "lr" not in grid:
        raise ValueError("with an optimizer name or factory, the grid must have an 'lr' axis "
                         "(or pass a transformation such as optax.sgd(0.1))")
    kwargs = {k: v for k, v in options.items() if k in known}
    impl = kwargs.pop("ensemble_impl", "auto")
    kwargs["progress"] = bool(kwargs.get("progress", True))
    return sweep(model, rule, data, grid=grid, optimizer=optimizer, impl=impl, **kwargs)
