"""The ``fbalign`` command line: ``fbalign train ...`` (more subcommands register here)."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fbalign._src.optimizers import LR_SCHEDULES, lr_schedule
from fbalign._src.rule_args import (
    UsageError,
    check_rule_builds,
    parse_rule_args,
    rule_arg_item,
    rule_options,
)

OPTIMIZERS = ("sgd", "adam", "rmsprop", "rprop", "signsgd", "signum")
MODELS = ("mlp", "lenet5", "rnn", "hopfield")
# Rules that need one kind of network, and the rules a network other than an MLP trains with.
_RULE_MODELS = {"ep": ("hopfield",), "pc": ("mlp",), "ar": ("mlp", "lenet5"),
                **{r: ("mlp", "lenet5") for r in ("lsig", "tp", "dtp", "drl", "ldrl")},
                **{r: ("mlp",) for r in ("ddtp", "ff",
                                         "hsic", "pepita", "lfg", "altmin", "admm", "emsa",
                                         "kickback")}}
# What a rule needs of the run where the command line does not say: option -> value.
# - forward-forward's goodness is stated for ReLU layers, as are the HSIC bottleneck's nets;
# - PEPITA: ReLU, SGD with lr 0.01 and momentum 0.9 (the paper's);
# - ADMM's closed-form solves: ReLU hidden layers, a squared-error output, and the weight solve
#   applied as is (sgd with lr 1: the update is params - W_solved);
# - evolution strategies take Adam steps of 1e-2 (Salimans et al. 2017);
# - E-MSA's update is theta_old - theta_new (sgd with lr 1 applies the Hamiltonian ascent);
# - Kickback is stated for ReLU nets with one output, trained on squared error.
_RULE_DEFAULTS = {
    "ff": {"activation": "relu"},
    "hsic": {"activation": "relu"},
    "pepita": {"activation": "relu", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
    "admm": {"activation": "relu", "loss": "squared_error", "optimizer": "sgd", "lr": 1.0},
    "es": {"lr": 1e-2},
    "emsa": {"optimizer": "sgd", "lr": 1.0},
    "kickback": {"activation": "relu", "loss": "squared_error"},
}
_HOPFIELD_RULES = ("ep", "bp", "fg")


def _names(kind: str, valid: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in valid:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {value!r}; valid: {', '.join(valid)}"
            )
        return value

    return check


def _milestones(value: str) -> tuple[int, ...]:
    if value.strip() in ("", "none"):  # none: a saved run's empty list (config.json)
        return ()
    try:
        epochs = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr-milestones takes comma-separated epochs such as 100,150; got {value!r}"
        ) from None
    if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
        raise argparse.ArgumentTypeError(f"--lr-milestones must be increasing epochs >= 1, got "
                                         f"{value!r}")
    return epochs


def _lr_scales(value: str) -> tuple[float, ...]:
    if value.strip() in ("", "none"):  # none: a saved run's empty list (config.json)
        return ()
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr-scales takes comma-separated positive factors, one per layer, such as "
            f"1,0.25,0.025; got {value!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in scales):
        raise argparse.ArgumentTypeError(f"--lr-scales must be positive numbers, got {value!r}")
    return scales


def _hidden(value: str) -> tuple[int, ...]:
    if value.strip() == "none":
        return ()
    if not value.strip():
        raise argparse.ArgumentTypeError("--hidden is empty; give widths such as 800,800, or "
                                         "none for no hidden layer")
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes comma-separated positive integers such as 800,800; got {value!r}"
        ) from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {value!r}")
    return sizes


def _positive(kind: type):
    return _number(kind, low=0, low_open=True)


def positive_int(value: str) -> int:
    """An argparse type: a positive int (other commands' options share ``train``'s checks)."""
    return _positive(int)(value)


def _number(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite ``kind`` in ``[low, high]`` (ends open as asked); NaN, inf
    and values outside are refused with the range named."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    what = f"a finite {kind.__name__}" + (f" in {lo or '(-inf'}, {hi or 'inf)'}"
                                          if low is not None or high is not None else "")
    if low == 0 and low_open and high is None:
        what = f"a positive {kind.__name__}"

    def check(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        bad = not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low)))
        bad = bad or (high is not None and (v > high or (high_open and v == high)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return v

    return check


def make_optimizer(name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """An optax optimizer by name; weight decay is added to the updates of ``params`` only."""
    import optax

    if name == "sgd":
        base = optax.sgd(lr, momentum=momentum or None)
    elif name == "adam":
        base = optax.adam(lr)
    elif name == "rmsprop":
        base = optax.rmsprop(lr, momentum=momentum)
    elif name in ("rprop", "signsgd", "signum"):
        from fbalign._src import optimizers

        if name == "rprop":
            base = optimizers.rprop(lr)
        elif name == "signsgd":
            base = optimizers.signsgd(lr)
        else:  # momentum 0 (the flag's default) means the paper's 0.9; 0 would be signSGD
            base = optimizers.signum(lr, momentum=momentum or 0.9)
    else:
        raise UsageError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), base)
    return base


def _with_lr_scales(args, model, optimizer):
    """``optimizer`` followed by ``scale_by_layer(--lr-scales)``; a usage error, before the run
    directory is made, when the factors do not number the model's weight layers."""
    scales = tuple(getattr(args, "lr_scales", None) or ())
    if not scales:
        return optimizer
    import jax
    import optax

    from fbalign._src.optimizers import scale_by_layer

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    layers = len(shapes) if isinstance(shapes, (list, tuple)) else None
    if layers != len(scales):
        where = f"{layers} weight layers" if layers is not None else "params that are not a list"
        raise UsageError(f"--lr-scales gives {len(scales)} factors, but --model {args.model} "
                         f"here has {where}; give one factor per layer")
    return optax.chain(optimizer, scale_by_layer(scales))


_SCHEDULE_FLAGS = {"lr_decay": "--lr-decay", "lr_decay_every": "--lr-decay-every",
                   "lr_milestones": "--lr-milestones", "lr_decay_epochs": "--lr-decay-epochs"}
_SCHEDULE_USES = {"constant": (), "cosine": ("lr_decay_epochs",),
                  "exponential": ("lr_decay", "lr_decay_every"),
                  "step": ("lr_decay", "lr_milestones")}


def _learning_rate(args, n_train: int):
    """--lr, or the --lr-schedule over optimizer steps (``n_train // --batch-size`` a epoch, as
    `fit` runs them). A cosine schedule's length is fixed when the run starts (--lr-decay-epochs,
    saved in config.json), so a resumed run with more epochs keeps it. Flags the schedule does
    not use, or missing ones it needs, are usage errors."""
    kind = args.lr_schedule
    given = getattr(args, "given_options", None) or ()
    unused = [_SCHEDULE_FLAGS[k] for k in _SCHEDULE_FLAGS
              if k in given and k not in _SCHEDULE_USES[kind]]
    if unused:
        raise UsageError(f"--lr-schedule {kind} does not use {', '.join(unused)}; it takes "
                         f"{', '.join(_SCHEDULE_FLAGS[k] for k in _SCHEDULE_USES[kind]) or 'none'}")
    if "lr_decay" in _SCHEDULE_USES[kind] and args.lr_decay is None:
        raise UsageError(f"--lr-schedule {kind} needs --lr-decay F, the factor (e.g. 0.1)")
    if kind == "step" and not args.lr_milestones:
        raise UsageError("--lr-schedule step needs --lr-milestones E1,E2,... (epochs)")
    if kind != "constant" and args.optimizer == "rprop":
        raise UsageError(f"--lr-schedule {kind} with --optimizer rprop: RProp adapts its own step "
                         "sizes (--lr is only its first); use another optimizer or --lr-schedule "
                         "constant")
    if kind == "cosine" and args.lr_decay_epochs is None:
        args.lr_decay_epochs = args.epochs
    return lr_schedule(args.lr, kind, steps_per_epoch=max(n_train // args.batch_size, 1),
                       decay=args.lr_decay if kind in ("exponential", "step") else None,
                       every=args.lr_decay_every if kind == "exponential" else 1,
                       milestones=tuple(args.lr_milestones) if kind == "step" else (),
                       horizon=args.lr_decay_epochs if kind == "cosine" else None,
                       warmup=args.warmup_epochs)


def build_model(name: str, input_dim: int, output_dim: int, hidden: Sequence[int],
                activation: str, output_activation: str, **hopfield_kw: Any):
    """A model by CLI name: ``mlp``, ``lenet5`` (28x28x1 inputs; ``hidden`` is ignored),
    ``rnn`` (square images read row by row, one hidden layer of ``hidden[0]`` units, classified
    from the last step) or ``hopfield`` (the layered energy-based network of ``--rule ep``;
    ``hopfield_kw``: `fbalign.models.hopfield`'s options, `hopfield_options`)."""
    from fbalign._src.models import mlp

    if name == "mlp":
        return mlp((input_dim, *hidden, output_dim), activation, output_activation)
    if name == "lenet5":
        from fbalign._src.convnet import lenet5

        if input_dim != 784:
            raise UsageError(f"--model lenet5 takes 28x28 images (784 inputs), got {input_dim} "
                             "inputs; use --dataset mnist")
        return lenet5(activation=activation, num_classes=output_dim)
    if name == "rnn":
        from fbalign._src.recurrent import rnn

        side = math.isqrt(input_dim)
        if side * side != input_dim or len(hidden) != 1:
            raise UsageError(f"--model rnn reads square images row by row with one hidden "
                             f"layer; got {input_dim} inputs and --hidden "
                             f"{','.join(map(str, hidden))} (use --dataset digits or mnist and "
                             "one width, e.g. --hidden 128)")
        return rnn(side, hidden[0], output_dim, activation, time_major=False, readout="last")
    if name == "hopfield":
        from fbalign._src.hopfield import hopfield

        return hopfield((input_dim, *hidden, output_dim), activation, **hopfield_kw)
    raise UsageError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


def _add_train_args(p: argparse.ArgumentParser, rule: bool = True) -> None:
    from fbalign._src.activations import ACTIVATIONS
    from fbalign._src.data import DATA_ENV, DATASETS
    from fbalign._src.losses import LOSSES
    from fbalign._src.registry import RULES

    rules_help = "; ".join(f"{k}: {v.description}" for k, v in RULES.items())
    if rule:  # `fbalign compare` takes --rules instead
        p.add_argument("--rule", type=_names("rule", list(RULES)), default="dfa",
                       help=f"learning rule (default dfa). {rules_help}")
        p.add_argument("--rule-arg", action="append", type=rule_arg_item, default=None,
                       metavar="NAME=VALUE",
                       help="set an option of the rule's constructor; repeatable, e.g. --rule kp "
                            "--rule-arg weight_decay=1e-3 --rule-arg learning_rate=0.05. VALUE is "
                            "read as the option's type: numbers, bool (true/false/yes/no/1/0), "
                            "none where the option allows it, tuples as 3,4 or (3,4). Unknown "
                            "names are refused with the rule's options listed; init and scale "
                            "must agree with --feedback-init/--feedback-scale if given. Saved "
                            "in config.json as rule_args and reused by --resume")
    p.add_argument("--dataset", type=_names("dataset", DATASETS), default="digits",
                   help="digits (embedded UCI 8x8 digits, no download), mnist (found via "
                        f"${DATA_ENV}, the cache, or downloaded), teacher (synthetic), linear "
                        "(Lillicrap et al. linear task). Default digits.")
    p.add_argument("--model", type=_names("model", MODELS), default="mlp",
                   help=f"architecture: {', '.join(MODELS)} (default mlp)")
    p.add_argument("--hidden", type=_hidden, default=(800,),
                   help="hidden layer widths, comma-separated (default 800)")
    p.add_argument("--activation", type=_names("activation", list(ACTIVATIONS)), default="tanh",
                   help=f"hidden activation: {', '.join(ACTIVATIONS)} (default tanh)")
    p.add_argument("--output-activation", type=_names("activation", list(ACTIVATIONS)),
                   default="linear", help="output activation (default linear: logits)")
    _add_hopfield_args(p)
    p.add_argument("--loss", type=_names("loss", list(LOSSES)), default=None,
                   help=f"{', '.join(LOSSES)} (default: cross_entropy for classification, "
                        "squared_error for regression)")
    p.add_argument("--epochs", type=_positive(int), default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=_positive(int), default=64,
                   help="minibatch size (default 64)")
    p.add_argument("--optimizer", type=_names("optimizer", OPTIMIZERS), default="adam",
                   help=f"{', '.join(OPTIMIZERS)} (default adam)")
    _add_optimizer_args(p)
    p.add_argument("--feedback-init", default="gaussian",
                   type=_names("feedback init", ["gaussian", "uniform", "orthogonal", "xavier"]),
                   help="feedback matrix distribution for fa/dfa (default gaussian)")
    p.add_argument("--feedback-scale", type=_positive(float), default=None,
                   help="std/limit/gain of the feedback init (default: variance-preserving)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: compute each step in bfloat16 with float32 master weights, "
                        "optimizer and rule state (no loss scaling needed); default float32. On "
                        "GPUs float32 matmuls run as TF32 unless JAX_DEFAULT_MATMUL_PRECISION="
                        "highest")
    p.add_argument("--form", choices=("explicit", "grad"), default="explicit",
                   help="explicit: rule.update on the recorded tape; grad: jax.grad through "
                        "the custom_vjp primitives (same updates)")
    _add_data_args(p)
    p.add_argument("--seeds", type=_positive(int), default=1,
                   help="train K networks (seeds seed..seed+K-1) at once in one jitted "
                        "program; reports per-seed results and mean/std (default 1)")
    p.add_argument("--ensemble-impl", choices=("auto", "vmap", "map"), default="auto",
                   help="how --seeds networks run in that program: vmap (batched), map (a "
                        "loop over networks) or auto (default: map for conv nets on CPU, "
                        "where batched convolutions are slow, else vmap)")
    p.add_argument("--log-every", type=_positive(int), default=50,
                   help="steps per device-side chunk between progress updates (default 50)")
    p.add_argument("--log-alignment-every", type=_non_negative_int, default=100, metavar="N",
                   help="every N steps, log alignment metrics (update/gradient and "
                        "feedback/weight angles, norm ratios, Lillicrap criterion; see "
                        "fbalign.metrics) on a fixed batch of 256 training examples into "
                        "metrics.jsonl; 0 turns it off (default 100)")
    p.add_argument("--out", default=None,
                   help="run directory for config.json and metrics.jsonl (default "
                        "runs/<rule>-<dataset>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_hopfield_args(p: argparse.ArgumentParser) -> None:
    """The options of ``--model hopfield`` (`hopfield_options`)."""
    p.add_argument("--hopfield-dynamics", type=_names("dynamics", ["descent", "prototypical"]),
                   default="descent",
                   help="--model hopfield: descent (gradient descent on the energy, default) or "
                        "prototypical (s <- rho(dPhi/ds), Ernoult et al. 2019 / Laborieux et al. "
                        "2021's code; step size 1 unless --rule-arg step_size)")
    p.add_argument("--hopfield-free-steps", type=_positive(int), default=None,
                   help="--model hopfield: the free phase's steps from zero, for its prediction "
                        "and for --rule bp's backprop through time (default: --rule ep's "
                        "free_steps if given, else 40)")
    p.add_argument("--hopfield-readout", action="store_true",
                   help="--model hopfield: the output layer is a softmax readout outside the "
                        "energy (Laborieux et al. 2021); train with --rule-arg "
                        "cost=cross_entropy")


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    """The learning rate, its schedule, momentum and weight decay of ``fbalign train``."""
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", type=_names("lr schedule", list(LR_SCHEDULES)),
                   default="constant",
                   help="constant (default); cosine (to 0 over --lr-decay-epochs, default "
                        "--epochs); exponential (x --lr-decay every --lr-decay-every epochs); "
                        "step (x --lr-decay at each of --lr-milestones)")
    p.add_argument("--lr-decay", type=_number(float, 0, 1, low_open=True), default=None,
                   help="the factor of exponential and step schedules")
    p.add_argument("--lr-decay-every", type=_positive(int), default=1,
                   help="epochs between exponential decays (default 1)")
    p.add_argument("--lr-milestones", type=_milestones, default=(),
                   help="epochs at which a step schedule decays, comma-separated")
    p.add_argument("--lr-decay-epochs", type=_positive(int), default=None,
                   help="the cosine schedule's length in epochs (default --epochs)")
    p.add_argument("--warmup-epochs", type=_number(int, 0), default=0,
                   help="epochs of linear learning-rate warm-up from 0 first (default 0)")
    p.add_argument("--lr-scales", type=_lr_scales, default=(),
                   help="per-layer learning rates: layer l trains at --lr (and its schedule) "
                        "times the l-th factor, comma-separated, one per weight layer (e.g. "
                        "1,0.25,0.025; fbalign.optimizers.scale_by_layer)")
    p.add_argument("--momentum", type=_number(float, 0, 1, high_open=True), default=0.0,
                   help="momentum for sgd/rmsprop/signum (signum: 0 means its default 0.9)")
    p.add_argument("--weight-decay", type=_number(float, 0), default=0.0,
                   help="decoupled weight decay on params (never on feedback)")


def data_seed(args) -> int:
    """The seed of a run's data: ``--data-seed``, else ``--seed`` (runs from before the option
    have no ``data_seed`` and used ``--seed``)."""
    value = getattr(args, "data_seed", None)
    return args.seed if value is None else value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The data and seed options of ``fbalign train``/``compare``."""
    from fbalign._src.data import DATA_ENV

    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of the training set held out for validation (default 0)")
    p.add_argument("--normalize", choices=("standardize", "unit", "none"), default="standardize",
                   help="image inputs: standardize (zero mean, unit std over the training set; "
                        "default), unit ([0, 1]) or none (raw)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory holding mnist.npz (overrides ${DATA_ENV})")
    p.add_argument("--train-subset", type=_positive(int), default=None, metavar="N",
                   help="train on the first N training examples only (the test set is kept "
                        "whole): quick runs of a full-size setup; default all")
    p.add_argument("--seed", type=_number(int, 0, 2**32, high_open=True), default=0,
                   help="seed of the network, the data order and the rule (default 0)")
    p.add_argument("--data-seed", type=_number(int, 0, 2**32, high_open=True), default=None,
                   help="seed of the data (the teacher task, the validation split); default "
                        "--seed. A --seeds K ensemble shares its data: member k equals the "
                        "single run --seed SEED+k --data-seed SEED")


def _non_negative_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _add_reliability_args(p: argparse.ArgumentParser) -> None:
    """``fbalign train`` options for checkpoints, resuming and non-finite values."""
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=0, metavar="N",
                   help="save a checkpoint (params, optimizer and rule state, RNG key, data "
                        "position, metrics) in RUN_DIR/checkpoints every N steps, at chunk ends, "
                        "as well as after every epoch; 0: after every epoch only (default 0). "
                        "Writes are atomic; the newest two are kept")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint with the settings "
                        "of RUN_DIR/config.json (the result is bit-identical to an uninterrupted "
                        "run); other training options may not be given")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                   help="when a step yields NaN/Inf (checked on device, read once per chunk): "
                        "stop with a message naming the step and layer, keeping the last good "
                        "checkpoint (default), or skip: drop such updates and warn")
    p.add_argument("--max-skips", type=_non_negative_int, default=100, metavar="N",
                   help="with --on-nonfinite skip: stop once more than N updates in a row were "
                        "skipped (default 100)")


# Options a resumed run may change: neither alters the steps already taken or the data order.
_RESUME_MAY_CHANGE = ("epochs", "on_nonfinite", "max_skips")
_RUN_LOCAL = ("resume", "overwrite", "no_progress", "out", "func", "given_options",
              "devices", "coordinator", "num_processes", "process_id",
              "connect_timeout")  # where, not what


def _check_config_values(config: dict[str, Any], cfg_path: Path) -> None:
    """A usage error naming ``config.json`` and the key when a saved option (edited by hand,
    say) is one the command line would refuse: each value goes through its option's own
    parser type and choices."""
    sub = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    for action in sub._actions:  # noqa: SLF001
        key = action.dest
        if key not in config or key in _RUN_LOCAL or config[key] is None:
            continue
        value = config[key]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
            ok = isinstance(value, bool)
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            if isinstance(value, list) and not value:
                text = "none"
            try:
                typed = action.type(text) if callable(action.type) else text
                ok = action.choices is None or typed in action.choices
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise UsageError(f"{cfg_path}: {key} = {value!r} is not a valid "
                                 f"{action.option_strings[0]} ({err}); fix the file or start "
                                 "a new run") from None
        if not ok:
            valid = f"; valid: {', '.join(map(str, action.choices))}" if action.choices else ""
            raise UsageError(f"{cfg_path}: {key} = {value!r} is not a valid "
                             f"{action.option_strings[0]}{valid}; fix the file or start a new "
                             "run")


def _check_resumable(run: Path) -> None:
    """A usage error when a run has records but no checkpoint to continue them from (its
    checkpoints deleted, or stopped before its first one): resuming would start it again from
    step 0 and replace its records."""
    from fbalign._src.checkpoint import CHECKPOINT_DIR, latest_checkpoint

    metrics = run / "metrics.jsonl"
    if latest_checkpoint(run / CHECKPOINT_DIR) is not None or not metrics.is_file():
        return
    records = sum(1 for line in metrics.read_text().splitlines() if line.endswith("}"))
    if records:
        raise UsageError(f"cannot resume {run}: it has {records} record(s) in {metrics} but no "
                         f"checkpoint in {run / CHECKPOINT_DIR} to continue them from; to train "
                         "it again from step 0 start a new run (--out) or replace this one "
                         f"(--out {run} --overwrite)")


def _resume_args(args) -> argparse.Namespace:
    """The namespace of the run in ``args.resume``, rebuilt from its ``config.json``."""
    run = Path(args.resume)
    cfg_path = run / "config.json"
    if args.overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pass only one")
    if not cfg_path.is_file():
        raise UsageError(f"cannot resume {run}: it has no config.json (pass a run directory "
                         "written by fbalign train)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"cannot resume {run}: {cfg_path} is not valid JSON ({err})") from None
    defaults = vars(build_parser().parse_args(["train"]))
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    typed = getattr(args, "given_options", None)  # what the command line named (main sets it)
    if typed is not None and "out" in typed and Path(args.out).resolve() != run.resolve():
        raise UsageError(f"--resume continues the run in {run}, where it writes; drop --out "
                         f"{args.out} (to train elsewhere, start a new run with --out)")
    if not isinstance(config, dict):
        raise UsageError(f"cannot resume {run}: {cfg_path} does not hold a JSON object")
    _check_config_values(config, cfg_path)
    _check_resumable(run)
    given = {k: v for k, v in vars(args).items()
             if k not in _RUN_LOCAL and k in config
             and (k in typed if typed is not None else norm(v) != norm(defaults.get(k)))}
    if "epochs" in given and given["epochs"] < config.get("epochs", 0):
        raise UsageError(f"--epochs {given['epochs']} is fewer than the {config['epochs']} the run "
                         f"in {run} was started with; --resume can only extend a run (its "
                         "results would be reported as after fewer epochs than were trained)")
    clash = [k for k, v in given.items() if k not in _RESUME_MAY_CHANGE and norm(v) != config[k]]
    if clash:
        raise UsageError(
            f"--resume takes the training options from {cfg_path} (only "
            + ", ".join(f"--{k.replace('_', '-')}" for k in _RESUME_MAY_CHANGE)
            + " may change); drop " + ", ".join(f"--{k.replace('_', '-')}" for k in clash)
            + " (or start a new run with --out)")
    new = argparse.Namespace(**vars(args))
    for k, v in config.items():
        if k in defaults and k not in _RUN_LOCAL and k not in given:
            setattr(new, k, tuple(v) if isinstance(v, list) else v)
    new.out = str(run)
    new.rule_args = _resumed_rule_args(args, new.rule, config, cfg_path)
    changed = {k: given[k] for k in _RESUME_MAY_CHANGE if k in given and given[k] != config[k]}
    if changed:  # e.g. more epochs: the run's config says what it now is
        cfg_path.write_text(json.dumps({**config, **changed}, indent=2) + "\n")
    return new


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    """``fbalign train`` options for data-parallel and multi-host training."""
    p.add_argument("--devices", type=_positive(int), default=None, metavar="N",
                   help="train data-parallel over N devices (jax.shard_map): each batch is split "
                        "evenly over them (--batch-size must be a multiple of N) and the updates "
                        "are averaged; with --seeds K the ensemble is sharded too (gcd(K, N) "
                        "device groups). Default: one device (all devices with --coordinator)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0; calls jax.distributed.initialize "
                        "before anything else. Needs --num-processes and --process-id; every "
                        "process runs the same command, only process 0 writes the run directory")
    p.add_argument("--num-processes", type=_positive(int), default=None, metavar="P",
                   help="multi-host: number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host: this process's index, 0 <= I < P (with --coordinator)")
    p.add_argument("--connect-timeout", type=_positive(float), default=300.0, metavar="S",
                   help="multi-host: seconds to wait for the coordinator and the other "
                        "processes before stopping with an error (default 300)")


def _init_multihost(args) -> None:
    """``jax.distributed.initialize`` from ``--coordinator/--num-processes/--process-id``."""
    given = {"--coordinator": getattr(args, "coordinator", None),
             "--num-processes": getattr(args, "num_processes", None),
             "--process-id": getattr(args, "process_id", None)}
    if all(v is None for v in given.values()):
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UsageError(f"multi-host training needs --coordinator, --num-processes and "
                         f"--process-id together; missing {', '.join(missing)}")
    from fbalign._src.distributed import initialize, wait_for_coordinator

    timeout = getattr(args, "connect_timeout", 300.0)
    try:
        if args.process_id != 0:  # process 0 runs the coordinator; the others must reach it
            wait_for_coordinator(args.coordinator, timeout)
        initialize(args.coordinator, args.num_processes, args.process_id,
                   initialization_timeout=max(1, int(timeout)))
    except (ValueError, TimeoutError) as err:
        raise UsageError(str(err)) from None


def _check_grad_form(rule: str, form: str, model: str, rule_kwargs: dict) -> None:
    """A usage error, before the data is loaded, for a rule with no usable jax.grad form."""
    from fbalign._src.base import TapeRule
    from fbalign._src.registry import RULES, get_rule, has_grad_form

    if form != "grad":
        return
    built = get_rule(rule, **rule_kwargs)
    if not isinstance(built, TapeRule) or has_grad_form(rule, rule_kwargs):
        return  # rules with a step of their own run on any model
    where = f"--model {model}" if model != "mlp" else "--form grad"
    if built.backward is None:
        raise UsageError(f"rule {rule!r} has no jax.grad form, which {where} needs; train it "
                         "on --model mlp with --form explicit")
    if RULES[rule].stateful:
        raise UsageError(f"rule {rule!r} updates its feedback from the activations its explicit "
                         f"form records, which {where} cannot provide; train it on --model mlp "
                         "with --form explicit")


_HOPFIELD_DEFAULTS = {"dynamics": "descent", "readout": False, "free_steps": None}


def hopfield_options(args) -> dict[str, Any]:
    """``build_model``'s hopfield options from ``--hopfield-dynamics`` / ``--hopfield-readout``
    (runs saved before these options existed read as the defaults), and, for ``--rule ep``, its
    ``free_steps`` / ``step_size`` rule args: the network then predicts (and is evaluated) after
    the same free phase the rule trains with (``--hopfield-free-steps`` first)."""
    opts = {"dynamics": getattr(args, "hopfield_dynamics", "descent"),
            "readout": bool(getattr(args, "hopfield_readout", False))}
    rule_args = getattr(args, "rule_args", None) or {}
    if getattr(args, "rule", None) == "ep":
        opts.update({k: rule_args[k] for k in ("free_steps", "step_size")
                     if rule_args.get(k) is not None})
    if getattr(args, "hopfield_free_steps", None) is not None:
        opts["free_steps"] = args.hopfield_free_steps
    return opts


def _check_hopfield_options(args) -> None:
    """A usage error for a ``--hopfield-*`` option set with another model."""
    opts = {k: hopfield_options(args).get(k) for k in _HOPFIELD_DEFAULTS}
    if args.model != "hopfield" and opts != _HOPFIELD_DEFAULTS:
        flags = [f"--hopfield-{k.replace('_', '-')}" for k in opts
                 if opts[k] != _HOPFIELD_DEFAULTS[k]]
        raise UsageError(f"{', '.join(flags)}: an option of --model hopfield, not of --model "
                         f"{args.model}; drop it or add --model hopfield")


def _check_rule_model(rule: str, model: str) -> None:
    """A usage error for a rule and a network that cannot go together (energy-based rules)."""
    if rule in _RULE_MODELS and model not in _RULE_MODELS[rule]:
        raise UsageError(f"--rule {rule} trains --model {' or '.join(_RULE_MODELS[rule])}, not "
                         f"{model}; add --model {_RULE_MODELS[rule][0]}")
    if model == "hopfield" and rule not in _HOPFIELD_RULES:
        raise UsageError(f"--model hopfield (an energy-based network) trains with --rule "
                         f"{', '.join(_HOPFIELD_RULES)}, not {rule}")


def _check_explicit_on_lenet(rule: str, rule_kwargs: dict) -> None:
    """A usage error, before the data is loaded, for a tape rule whose explicit form is stated
    for dense layers only (traced once on LeNet-5's shapes, nothing computed)."""
    import jax
    import jax.numpy as jnp

    from fbalign._src.base import TapeRule
    from fbalign._src.convnet import lenet5
    from fbalign._src.registry import get_rule

    built = get_rule(rule, **rule_kwargs)
    if not isinstance(built, TapeRule):
        return
    model = lenet5()

    def one_update(key):
        params = model.init(key)
        state = model.init_rule_state(rule, key, params, **rule_kwargs)
        out, tape = model.forward(params, jnp.zeros((2, 784)))
        return built.update(params, state, tape, out, key=key, labels=jnp.zeros((2,), int))

    try:
        jax.eval_shape(one_update, jax.random.PRNGKey(0))
    except NotImplementedError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # the rule refuses this network with these options
        raise UsageError(f"--rule {rule} on --model lenet5: {err}") from None


def _check_devices(args) -> int | None:
    """The ``devices`` argument of `fit`: ``--devices``, checked against what JAX sees."""
    import jax

    n = getattr(args, "devices", None)
    if n is None and jax.process_count() > 1:
        n = jax.device_count()
    if n is None:
        return None
    available = jax.device_count()
    if n > available:
        raise UsageError(f"--devices {n} but only {available} {jax.default_backend()} device(s) "
                         f"are available; use --devices <= {available} (on CPU, more fake "
                         f"devices come from XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{n})")
    split = n // math.gcd(args.seeds, n)
    if args.batch_size % split:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {split} "
                         f"data-parallel devices; use a multiple of {split}")
    return n


def _rule_kwargs(args) -> dict[str, Any]:
    """--feedback-init/--feedback-scale for every rule whose constructor takes them, then the
    --rule-arg options."""
    from fbalign._src.registry import RULES

    params = inspect.signature(RULES[args.rule].make).parameters
    out: dict[str, Any] = {}
    if "init" in params:
        out["init"] = args.feedback_init
    if "scale" in params:
        out["scale"] = args.feedback_scale
    out.update(getattr(args, "rule_args", None) or {})  # --rule-arg, from _set_rule_args
    return out


# ----------------------------------------------------------------------------------------------
# --rule-arg NAME=VALUE: constructor options of the rule (parsed in `fbalign._src.rule_args`)

# Constructor options that other flags set: option -> (args attribute, flag).
_FLAG_OPTIONS = {"init": ("feedback_init", "--feedback-init"),
                 "scale": ("feedback_scale", "--feedback-scale")}



def _set_rule_args(args) -> None:
    """``args.rule_args``: the typed ``--rule-arg`` options of a new run. Options that other
    flags set must agree with them; the flags then take their values (said once in config.json)."""
    args.rule_args = parse_rule_args(args.rule, getattr(args, "rule_arg", None) or [])
    if not args.rule_args:
        return
    defaults = vars(build_parser().parse_args(["train"]))
    for name, (attr, flag) in _FLAG_OPTIONS.items():
        if name not in args.rule_args:
            continue
        given, value = getattr(args, attr, defaults[attr]), args.rule_args[name]
        if given != defaults[attr] and given != value:
            raise UsageError(f"--rule-arg {name}={value} contradicts {flag} {given}; set {name} "
                             f"with {flag} only")
        setattr(args, attr, value)
    check_rule_builds(args.rule, _rule_kwargs(args))


def _resumed_rule_args(args, rule: str, config: dict, cfg_path: Path) -> dict[str, Any]:
    """The ``rule_args`` saved in a resumed run's config; ``--rule-arg`` may only repeat the
    values the rule (``rule``, from the config) was built with."""
    from fbalign._src.registry import RULES

    saved = {k: tuple(v) if isinstance(v, list) else v
             for k, v in (config.get("rule_args") or {}).items()}
    built = {k: d for k, (_, d) in rule_options(RULES[rule].make).items()}
    built.update({k: config[a] for k, (a, _) in _FLAG_OPTIONS.items()
                  if k in built and a in config})
    built.update(saved)
    given = parse_rule_args(rule, getattr(args, "rule_arg", None) or [])
    clash = [k for k, v in given.items() if built.get(k, inspect.Parameter.empty) != v]
    if clash:
        raise UsageError(
            f"--resume takes the training options from {cfg_path} (only "
            + ", ".join(f"--{k.replace('_', '-')}" for k in _RESUME_MAY_CHANGE)
            + " may change); drop " + ", ".join(f"--rule-arg {k}={given[k]}" for k in clash)
            + " (the run has " + ", ".join(f"{k}={built.get(k)}" for k in clash)
            + "; or start a new run with --out)")
    return saved


def prepare_out(args) -> Path:
    """The run directory: made (parents too), or emptied with ``--overwrite``; a usage error
    naming the path when it is a file, not empty, or cannot be written."""
    out = Path(args.out) if args.out else Path("runs") / (
        f"{args.rule}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose another --out")
    try:
        if out.exists() and any(out.iterdir()):
            if not args.overwrite:
                raise UsageError(f"run directory {out} already exists and is not empty; pass "
                                 "--overwrite to replace it or choose another --out")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fbalign-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot use --out {out}: {err.strerror or err} "
                         f"({err.filename or out}); choose a writable directory") from err
    return out


def cmd_train(args) -> int:
    """``fbalign train``: trains a model with a rule and prints its test error."""
    import jax

    _init_multihost(args)  # before any JAX computation
    from fbalign._src.train import NonFiniteError, fit

    resuming = bool(getattr(args, "resume", None))
    if resuming:  # first: the checks below need the run's own settings
        args = _resume_args(args)
    else:
        _set_rule_args(args)
        _apply_rule_defaults(args)
        _pair_ep_loss(args)
    devices = _check_devices(args)
    primary = jax.process_index() == 0  # only process 0 writes the run directory
    data = _load_train_data(args)
    if args.rule == "admm" and not resuming:
        _admm_run_defaults(args, len(data.x_train))
    if args.rule == "ep" and args.rule_args.get("persistent") and not resuming:
        args.rule_args.setdefault("num_examples", len(data.x_train))
    loss = args.loss or ("cross_entropy" if data.num_classes else "squared_error")
    activation = args.activation
    if args.model == "hopfield" and "activation" not in (getattr(args, "given_options", None)
                                                         or ()):
        activation = "hard_sigmoid"  # the papers' rho, unless --activation names another
    model = build_model(args.model, data.input_dim, data.output_dim, args.hidden, activation,
                        args.output_activation, **hopfield_options(args))
    optimizer = make_optimizer(args.optimizer, _learning_rate(args, len(data.x_train)),
                               args.momentum, args.weight_decay)
    optimizer = _with_lr_scales(args, model, optimizer)
    _check_rule_init(args, model)
    _warn_kolen_pollack_optimizer(args)
    _check_memory(args, model, optimizer, data)
    out = (Path(args.out) if resuming else prepare_out(args)) if primary else None
    if not resuming and primary:  # a resumed run keeps the config it was started with
        _write_config(args, out, loss, data)
    probe = _alignment_probe(args, model, loss, data)
    t0 = time.perf_counter()
    try:
        res = fit(model, args.rule, optimizer, data,
                  **_fit_options(args, loss, out, probe, devices, resuming, primary))
    except NonFiniteError as err:
        print(f"fbalign: error: {err} (this run: --optimizer {args.optimizer} --lr {args.lr:g})",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        _say_how_to_resume(out)
        return 130
    wall = time.perf_counter() - t0
    _report(args, res.history[-1], wall, out, primary)
    return 0


def check_run_options(args) -> None:
    """The checks of a rule, model and form that need no data (usage errors): also run by
    ``fbalign compare`` for every rule before the first one trains."""
    # The RNN records no Tape: it always trains through the rule's jax.grad form.
    _check_grad_form(args.rule, "grad" if args.model == "rnn" else args.form, args.model,
                     _rule_kwargs(args))
    if args.model == "lenet5" and args.form == "explicit":
        _check_explicit_on_lenet(args.rule, _rule_kwargs(args))
    _check_rule_model(args.rule, args.model)
    _check_hopfield_options(args)
    if args.model == "lenet5" and "hidden" in (getattr(args, "given_options", None) or ()):
        raise UsageError("--model lenet5 has fixed layers (conv6-conv16-fc120-fc84); drop "
                         "--hidden")
    if args.model == "rnn":
        from fbalign._src.recurrent import RNN_RULES, check_rnn_rule
        from fbalign._src.registry import get_rule

        if args.rule not in RNN_RULES:
            try:
                check_rnn_rule(args.rule, get_rule(args.rule, **_rule_kwargs(args)))
            except ValueError as err:
                raise UsageError(f"--model rnn: {err}") from None


def _load_train_data(args):
    """The dataset of ``fbalign train``, after the checks that need no data (so that a bad
    option stops the run before any download)."""
    from fbalign._src.data import load_dataset

    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    kwargs: dict[str, Any] = {}
    if args.dataset in ("mnist", "digits"):
        kwargs["normalize"] = args.normalize
    if args.dataset == "mnist" and args.data_dir:
        kwargs["path"] = args.data_dir
    check_run_options(args)
    try:
        data = load_dataset(args.dataset, val_fraction=args.val_fraction, seed=data_seed(args),
                            **kwargs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    subset = getattr(args, "train_subset", None)
    if subset is not None:
        if subset > len(data.x_train):
            raise UsageError(f"--train-subset {subset} is larger than the training set "
                             f"({len(data.x_train)} examples of {data.name})")
        data = data._replace(x_train=data.x_train[:subset], y_train=data.y_train[:subset])
    if args.loss == "cross_entropy" and not data.num_classes:
        raise UsageError(f"--loss cross_entropy needs class labels, but {data.name} is a "
                         "regression task (real-valued targets); use --loss squared_error")
    if args.batch_size > len(data.x_train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(data.x_train)} examples of {data.name}); use --batch-size <= "
                         f"{len(data.x_train)}")
    return data


def _admm_run_defaults(args, n_train: int) -> None:
    """ADMM's per-example variables need one row per training example (``num_examples``). Unless
    given: the whole training set as one batch (Taylor et al.'s setting; minibatches of a few
    hundred stall, measured on digits) and ``warm_start=10`` steps before the multiplier moves
    (from a random network, multiplier updates from step 0 stall; see `fbalign.rules.admm`)."""
    args.rule_args.setdefault("num_examples", n_train)
    chosen = []
    given = getattr(args, "given_options", None) or ()
    # the output block is solved for the training loss: --loss hinge <-> output_loss=hinge
    if args.loss == "hinge" and "output_loss" not in args.rule_args:
        args.rule_args["output_loss"] = "hinge"
        chosen.append("--rule-arg output_loss=hinge (for --loss hinge)")
    elif args.rule_args.get("output_loss") == "hinge" and "loss" not in given:
        args.loss = "hinge"
        chosen.append("--loss hinge (for --rule-arg output_loss=hinge)")
    if "warm_start" not in args.rule_args:
        args.rule_args["warm_start"] = 10
        chosen.append("--rule-arg warm_start=10")
    if "batch_size" not in given:
        args.batch_size = n_train
        chosen.append(f"--batch-size {n_train} (the whole training set)")
    if chosen:
        print(f"fbalign: --rule admm defaults to {' '.join(chosen)}", file=sys.stderr)


def _available_memory() -> tuple[int, str] | None:
    """Bytes the first device can hold and what that is (GPU/TPU: its allocator limit; CPU:
    MemAvailable of /proc/meminfo), or None where neither is known."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{dev.platform} memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return None


def _nbytes(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _activation_bytes(model, params, data) -> int:
    """Bytes of one example's recorded activations (the tape of ``model.forward``: every
    layer's input, pre-activation and output; traced, not run), else of the MLP's widths."""
    import jax

    if hasattr(model, "forward"):
        x1 = jax.ShapeDtypeStruct((1, *data.x_train.shape[1:]), data.x_train.dtype)
        return _nbytes(jax.eval_shape(model.forward, params, x1))
    return sum(getattr(model, "sizes", ())[1:]) * 4


def _population_bytes(args, params: int, act: int) -> tuple[int, str]:
    """An evolution strategy's extra memory: the population's params and noise (2 P copies)
    and the forward activations of ``chunk_size`` members at a time; and the advice."""
    if args.rule != "es":
        return 0, ""
    kw = _rule_kwargs(args)
    pop = int(kw.get("population_size", 64))
    chunk = int(kw.get("chunk_size") or pop)
    advice = (f"; the population of {pop} holds {pop} copies of the params and evaluates "
              f"{chunk} at a time: give --rule-arg chunk_size=N (N < {chunk}) or a smaller "
              "--rule-arg population_size")
    return 2 * pop * params + chunk * args.batch_size * act, advice


def _check_memory(args, model, optimizer, data) -> None:
    """A usage error before anything is allocated when the run cannot fit: the training state
    (params, optimizer and rule state; traced, not allocated) times the seeds, plus the
    activations of a batch (three copies of every recorded activation, forward and backward;
    for an evolution strategy, its population and the members evaluated at once) and the
    training set, against the memory the device has."""
    import jax

    from fbalign._src.train import init_train_state

    avail = _available_memory()
    if avail is None:
        return
    shapes = jax.eval_shape(lambda k: init_train_state(model, args.rule, optimizer, k,
                                                       _rule_kwargs(args)),
                            jax.random.PRNGKey(0))
    state = _nbytes(shapes)
    act = _activation_bytes(model, shapes.params, data)
    acts = 3 * args.batch_size * act
    pop, advice = _population_bytes(args, _nbytes(shapes.params), act)
    need = args.seeds * (state + acts + pop) + data.x_train.nbytes
    if need > avail[0]:
        gib = 2.0**30
        extra = f"{pop / gib:.2f} GiB of the population + " if pop else ""
        raise UsageError(f"this run needs about {need / gib:.1f} GiB ({args.seeds} x "
                         f"{state / gib:.2f} GiB of params, optimizer and rule state + "
                         f"{acts / gib:.2f} GiB of activations + {extra}the data), more "
                         f"than the {avail[0] / gib:.1f} GiB of {avail[1]}; use smaller "
                         f"--hidden, --batch-size or --seeds{advice}")


def _warn_kolen_pollack_optimizer(args) -> None:
    """Kolen-Pollack's W and B converge only when W steps by plain SGD at the rate B steps
    (its ``learning_rate``) and its decay is not added twice: say so once, on stderr, when the
    run's optimizer breaks that (issue 18: with adamw the W-B angles stayed at 83 and 65 degrees
    after 300 steps)."""
    if args.rule != "kp":
        return
    kw = _rule_kwargs(args)
    rate = kw.get("learning_rate", 0.01)
    problems = []
    if args.optimizer != "sgd" or args.momentum:
        problems.append(f"--optimizer {args.optimizer}"
                        + (f" --momentum {args.momentum:g}" if args.momentum else "")
                        + f" steps W while B steps by plain SGD at learning_rate={rate:g}")
    elif args.lr != rate:
        problems.append(f"W steps at --lr {args.lr:g} and B at learning_rate={rate:g}")
    if args.weight_decay and kw.get("decay_params", True):
        problems.append(f"--weight-decay {args.weight_decay:g} adds a second decay to W on top of "
                        f"the rule's own weight_decay={kw.get('weight_decay', 1e-3):g}")
    if problems:
        print("fbalign: warning: Kolen-Pollack's W and B converge (W - B shrinks by (1 - lr * "
              "weight_decay) a step) only under plain SGD at the rate B uses; here "
              + "; ".join(problems) + f". For the guarantee use --optimizer sgd --lr {rate:g} "
              "(or --rule-arg learning_rate=<your --lr>) and the rule's own weight_decay.",
              file=sys.stderr)


def _check_rule_init(args, model) -> None:
    """A usage error, before the run directory is made, when the rule refuses this network or
    these options (its ``init``, traced once on the network's shapes; nothing computed)."""
    import jax

    from fbalign._src.lift import as_learning_rule

    form = "grad" if args.model == "rnn" else args.form
    try:
        rule = as_learning_rule(args.rule, form, _rule_kwargs(args), model)
        jax.eval_shape(lambda k: rule.init(k, model.init(k), model), jax.random.PRNGKey(0))
    except (ValueError, TypeError) as err:
        raise UsageError(f"--rule {args.rule} on this --model {args.model}: {err}") from None


def _apply_rule_defaults(args) -> None:
    """Sets the options a rule needs (`_RULE_DEFAULTS`) that the command line left out, and says
    so once on stderr; an option given explicitly is kept (the rule then refuses it by name if it
    cannot work with it)."""
    given = getattr(args, "given_options", None) or set()
    chosen = {k: v for k, v in _RULE_DEFAULTS.get(args.rule, {}).items() if k not in given}
    for k, v in chosen.items():
        setattr(args, k, v)
    if chosen:
        flags = " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else
                         f"--{k.replace('_', '-')} {v}" for k, v in chosen.items())
        print(f"fbalign: --rule {args.rule} defaults to {flags} (give an option to override)",
              file=sys.stderr)


_EP_LOSS = {"squared": "squared_error", "cross_entropy": "cross_entropy"}


def ep_loss(cost: str, loss: str | None) -> str:
    """The run loss of ``--rule ep`` nudging with ``cost``: the matching loss when ``loss`` is
    None, else ``loss`` if it matches; a usage error otherwise (a classification run would
    report the cross-entropy of states trained on the squared error)."""
    want = _EP_LOSS.get(cost, loss)  # an unknown cost: the rule refuses it by name
    if loss is not None and loss != want:
        raise UsageError(f"--loss {loss} is not the cost --rule ep nudges with (cost={cost}, "
                         f"i.e. --loss {want}); ep nudges with --rule-arg cost=squared (--loss "
                         f"squared_error) or cost=cross_entropy (--loss cross_entropy)")
    return want


def _pair_ep_loss(args) -> None:
    """``--rule ep``'s run loss (reported, and what the test error reads) follows its cost
    unless --loss is given (`ep_loss`), and says so on stderr."""
    if args.rule != "ep":
        return
    cost = args.rule_args.get("cost", "squared")
    given = "loss" in (getattr(args, "given_options", None) or set())
    want = ep_loss(cost, args.loss if given else None)
    if want is not None and not given and args.loss != want:
        args.loss = want
        print(f"fbalign: --rule ep defaults to --loss {want} (the cost it nudges with, "
              f"cost={cost})", file=sys.stderr)


def _write_config(args, out: Path, loss: str, data) -> None:
    """``out/config.json``: the run's options (what ``--resume`` reads back) and where it ran."""
    import jax

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("func", "rule_arg", "given_options")}  # rule_arg: raw --rule-arg
    config["rule_args"] = {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in args.rule_args.items()}
    config.update({"loss": loss, "out": str(out), "jax_version": jax.__version__,
                   "backend": jax.default_backend(), "python": platform.python_version(),
                   "n_train": len(data.x_train), "n_test": len(data.x_test)})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _alignment_probe(args, model, loss: str, data):
    """The ``--log-alignment-every`` probe on the first 256 training examples, or None (turned
    off, or a model without a recorded Tape)."""
    if args.log_alignment_every <= 0 or not hasattr(model, "forward"):
        return None
    from fbalign._src.metrics import make_alignment_probe

    k = min(len(data.x_train), 256)
    return make_alignment_probe(model, args.rule, loss, data.x_train[:k], data.y_train[:k],
                                rule_kwargs=_rule_kwargs(args), index=list(range(k)))


def _fit_options(args, loss: str, out: Path | None, probe, devices: int | None, resuming: bool,
                 primary: bool) -> dict[str, Any]:
    """The keyword arguments of `fit` for ``fbalign train``."""
    options = {
        "loss": loss, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
        "seeds": args.seeds if args.seeds > 1 else None,
        # Models without a recorded Tape (convnets) train tape rules through their jax.grad
        # form (fit resolves it: fbalign.rules.resolve_form).
        "form": args.form, "rule_kwargs": _rule_kwargs(args), "log_every": args.log_every,
        "out_dir": out, "probe_fn": probe, "probe_every": max(args.log_alignment_every, 0),
        "progress": ("lines" if args.no_progress else True) if primary else False,
        "devices": devices,
        "ensemble_impl": getattr(args, "ensemble_impl", "auto"),
        "checkpoint_every": getattr(args, "checkpoint_every", None), "resume": resuming,
        "on_nonfinite": getattr(args, "on_nonfinite", "stop"),
        "max_skips": getattr(args, "max_skips", 100),
        "precision": getattr(args, "precision", None) or "float32",
    }
    if not primary:  # only process 0 writes checkpoints (the others join in gathering the
        # state); on --resume every process reads them, so the run directory must be shared
        options["checkpoint_dir"] = Path(args.out or ".") / "checkpoints"
    return options


def _say_how_to_resume(out: Path | None) -> None:
    """After Ctrl-C: the newest checkpoint's step and the command that continues from it."""
    from fbalign._src.checkpoint import CHECKPOINT_DIR, latest_checkpoint

    if out is None:  # not process 0: it says it
        return
    ckpt = latest_checkpoint(out / CHECKPOINT_DIR)
    if ckpt is None:
        print(f"fbalign: interrupted before the first checkpoint; {out} keeps its config and "
              f"records; start again with --out {out} --overwrite (or save more often with "
              "--checkpoint-every N)", file=sys.stderr)
        return
    step = int(ckpt.name.split("-")[1].split(".")[0])
    print(f"fbalign: interrupted; the last checkpoint is step {step} ({ckpt}); continue with: "
          f"fbalign train --resume {out}", file=sys.stderr)


def _previous_wall_time(args, out: Path | None) -> float:
    """The training time a resumed run's earlier sessions recorded in ``summary.json`` (0 for a
    new run, or when an earlier session was cut before writing one), so that resuming a run,
    finished or not, adds to its wall time instead of replacing it."""
    if not getattr(args, "resume", None) or out is None or not (out / "summary.json").is_file():
        return 0.0
    try:
        value = json.loads((out / "summary.json").read_text()).get("wall_time_s")
    except (OSError, json.JSONDecodeError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) else 0.0


def _report(args, last: dict[str, Any], wall: float, out: Path | None, primary: bool) -> None:
    """``summary.json`` (process 0) and the line ``fbalign train`` prints: the final test error
    (or loss), per seed for an ensemble."""
    import jax

    from fbalign._src.train import json_safe

    summary = {k: v for k, v in last.items()}
    summary["wall_time_s"] = wall + _previous_wall_time(args, out)
    if primary:  # strict JSON: NaN/Inf become null
        (out / "summary.json").write_text(
            json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    key = "test_error" if "test_error" in last else "test_loss"
    if args.seeds > 1:
        per_seed = ", ".join(f"{v:.4g}" for v in last[key])
        metric = (f"{key.replace('_', ' ')} {last[key + '_mean']:.4g} +- {last[key + '_std']:.2g}"
                  f"{'%' if key == 'test_error' else ''} over {args.seeds} seeds ({per_seed})")
    elif key == "test_error":
        metric = f"test error {last['test_error']:.2f}%"
    else:
        metric = f"test loss {last['test_loss']:.4g}"
    where = (f"run saved in {out}" if primary else
             f"process {jax.process_index()} of {jax.process_count()}; process 0 saves the run")
    epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    print(f"{args.rule} on {args.dataset}: {metric} after {epochs} "
          f"({wall:.1f} s, {wall / args.epochs:.2f} s/epoch); {where}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbalign",
        description="Train networks with learning rules beyond exact backpropagation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a network with a rule and print its test error",
                       description="Train a network with a learning rule; writes config.json, "
                                   "metrics.jsonl and summary.json in the run directory.")
    _add_train_args(p)
    _add_reliability_args(p)
    _add_scale_args(p)
    p.set_defaults(func=cmd_train)
    _add_report_commands(sub)
    from fbalign._src.reproduce import add_reproduce_command
    from fbalign._src.sweep import add_sweep_command

    add_sweep_command(sub)
    add_reproduce_command(sub)
    return parser


def _add_report_commands(sub) -> None:
    """``fbalign plot`` and ``fbalign compare`` (implemented in `fbalign._src.plot`)."""
    from fbalign._src.registry import RULES

    p = sub.add_parser("plot", help="plot loss, test error and alignment angles of runs",
                       description="Plot training loss, test error and per-layer alignment "
                                   "angles of one or more run directories, overlaid.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (fbalign train "
                   "--out), each holding metrics.jsonl")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image file to write")
    p.add_argument("--labels", default=None,
                   help="comma-separated legend labels, one per run (default: from config.json)")
    p.set_defaults(func=lambda a: _lazy("cmd_plot")(a))
    p = sub.add_parser("compare", help="train several rules over seeds and tabulate test error",
                       description="Train each rule (an ensemble of --seeds networks per rule) "
                                   "with the same options; print a table of test error mean and "
                                   "std, and write it as compare.md with a plot compare.png.")
    p.add_argument("--rules", type=_rule_list(list(RULES)), default=("bp", "fa", "dfa"),
                   help="comma-separated rule names (default bp,fa,dfa); valid: "
                        f"{', '.join(RULES)}")
    _add_train_args(p, rule=False)
    _add_reliability_args(p)
    for action in p._actions:
        if action.dest == "seeds":
            action.help = action.help.replace("(default 1)", "(default 3)")
        elif action.dest == "resume":
            action.metavar = "COMPARE_DIR"
            action.help = ("continue the comparison in COMPARE_DIR: each rule's run from its "
                           "newest checkpoint (finished rules are kept, or extended with a "
                           "larger --epochs); only --epochs, --on-nonfinite and --max-skips may "
                           "be given with it")
        elif action.dest == "out":
            action.help = ("directory for compare.md, compare.png and one run directory per "
                           "rule (default runs/compare-<dataset>-<time>)")
    p.set_defaults(func=lambda a: _lazy("cmd_compare")(a), seeds=3)


def _rule_list(valid: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def check(value: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown rule(s) {', '.join(map(repr, bad)) or repr(value)}; valid: "
                f"{', '.join(valid)}")
        return names

    return check


def _lazy(name: str) -> Callable:
    from fbalign._src import plot

    return getattr(plot, name)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options the command line names (whatever their values: ``--seed 0`` counts even
    though 0 is the default), found by parsing it again into a namespace whose attributes all
    start as a sentinel (argparse only fills in defaults for attributes that are missing)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = parser._subparsers._group_actions[0].choices.get(command)  # noqa: SLF001
    if sub is None:
        return set()
    # appending actions (--rule-arg) extend what is there: give each a fresh empty list, which
    # argparse copies before appending, so identity still tells whether it was named
    start = {a.dest: [] if isinstance(a, argparse._AppendAction) else object()  # noqa: SLF001
             for a in sub._actions}  # noqa: SLF001
    ns = argparse.Namespace(**start)
    sub.parse_known_args(argv[argv.index(command) + 1:], namespace=ns)
    return {k for k, v in vars(ns).items() if k in start and v is not start[k]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fbalign`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given_options = given_options(parser, list(sys.argv[1:] if argv is None else argv))
    from fbalign._src.checkpoint import CheckpointError
    from fbalign._src.data import DataError

    try:
        return args.func(args)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"fbalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fbalign: interrupted; files written so far are kept", file=sys.stderr)
        return 130
    except OSError as err:  # a run directory that became unwritable (disk full, removed, ...)
        where = f" {err.filename}" if err.filename else ""
        print(f"fbalign: error: cannot write{where}: {err.strerror or err}; files written "
              "before it are kept", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
