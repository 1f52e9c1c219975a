"""Synthetic gradients on MNIST fully connected nets (Jaderberg et al. 2017, Table 1 and Fig. 5).

Every hidden layer of a 3-6 layer ReLU net is decoupled. Methods: backprop (BP), DNI (linear
synthesizers), cDNI (linear synthesizers that also see the one-hot label) and "top layer only"
(only the output layer learns: the paper's "no bprop" baseline). Then the ``p_update`` sweep:
every layer and its synthesizer update with probability p per step.

    python benchmarks/dni_mnist.py            # reduced full run, writes results/dni_mnist.md
    python benchmarks/dni_mnist.py --quick    # seconds, embedded 8x8 digits

Reports test error (%) per depth and method, with the machine, date and jax version.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbalign
from fbalign._src.base import EmptyState, TapeRule, dense_grads
from fbalign._src.losses import cross_entropy
from fbalign._src.models import mlp
from fbalign._src.rules.backprop import backprop
from fbalign._src.rules.synthetic_gradients import cdni, dni

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one), architecture and visible cores."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({platform.machine()}), {os.cpu_count()} visible cores"


def top_layer_only() -> TapeRule:
    """Only the output layer learns (the paper's "no bprop" baseline)."""

    def init_fn(key, params):
        del key, params
        return EmptyState()

    def update_fn(params, state, tape, error, **extra):
        del extra
        delta = error * tape.derivs[-1]
        ups = [jax.tree.map(jnp.zeros_like, p) for p in params[:-1]]
        ups.append(dense_grads(tape.inputs[-1], delta, "b" in params[-1]))
        return ups, state

    return TapeRule(init_fn, update_fn)


def load(name: str, n_train: int | None):
    """``fbalign.data.load_dataset``; MNIST from ``$FBALIGN_DATA`` or the checkout's shared copy."""
    from fbalign.data import load_dataset

    kw = {}
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if name == "mnist" and not os.environ.get("FBALIGN_DATA") and (shared / "mnist.npz").exists():
        kw["path"] = str(shared)
    ds = load_dataset(name, **kw)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if n_train:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    return (jnp.asarray(x_tr), jnp.asarray(y_tr, jnp.int32), jnp.asarray(x_te),
            jnp.asarray(y_te, jnp.int32))


def make_rule(method: str, p_update: float, synth_lr: float) -> TapeRule:
    if method == "bp":
        return backprop()
    if method == "top":
        return top_layer_only()
    kw = dict(learning_rate=synth_lr, p_update=p_update)
    return {"dni": dni, "cdni": cdni}[method](**kw)


def train(method, depth, data, *, hidden, epochs, batch, lr, synth_lr, p_update, seed,
          optimizer="adam"):
    """Trains one net; returns (test error %, final synthesizer losses, seconds)."""
    x_tr, y_tr, x_te, y_te = data
    model = mlp([x_tr.shape[1]] + [hidden] * (depth - 1) + [10], activation="relu")
    rule = make_rule(method, p_update, synth_lr)
    opt = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr, momentum=0.9)
    key = jax.random.PRNGKey(seed)
    k_model, k_rule, key = jax.random.split(key, 3)
    params = model.init(k_model)
    rstate = rule.init(k_rule, params)
    ostate = opt.init(params)
    n_steps = x_tr.shape[0] // batch

    def step(carry, idx):
        params, rstate, ostate, key = carry
        key, sub = jax.random.split(key)
        x, y = x_tr[idx], y_tr[idx]
        out, tape = model.forward(params, x)
        err = jax.grad(lambda o: cross_entropy(o, y))(out)
        ups, rstate = rule.update(params, rstate, tape, err, key=sub, labels=y)
        ups, ostate = opt.update(ups, ostate, params)
        return (optax.apply_updates(params, ups), rstate, ostate, key), None

    @jax.jit
    def epoch(carry, key):
        perm = jax.random.permutation(key, x_tr.shape[0])[: n_steps * batch]
        carry, _ = jax.lax.scan(step, carry, perm.reshape(n_steps, batch))
        return carry

    t0 = time.perf_counter()
    carry = (params, rstate, ostate, key)
    for e in range(epochs):
        carry = epoch(carry, jax.random.fold_in(jax.random.PRNGKey(seed + 1000), e))
    params, rstate = carry[0], carry[1]
    logits = model.apply(params, x_te)
    err = float(100.0 * jnp.mean(jnp.argmax(logits, -1) != y_te))
    synth = getattr(rstate, "synth_loss", None)
    synth = None if synth is None else np.asarray(synth)
    return err, synth, time.perf_counter() - t0


def run(args) -> dict:
    data = load(args.dataset, args.n_train)
    common = dict(hidden=args.hidden, epochs=args.epochs, batch=args.batch, lr=args.lr,
                  synth_lr=args.synth_lr, seed=args.seed, optimizer=args.optimizer)
    table = {}
    for depth in args.depths:
        for method in args.methods:
            err, synth, sec = train(method, depth, data, p_update=1.0, **common)
            table[(depth, method)] = err
            print(f"depth {depth} {method:5s} test error {err:6.2f}%  ({sec:5.1f}s)"
                  + ("" if synth is None else f"  synth loss {np.round(synth, 4)}"), flush=True)
    sweep = {}
    for method in args.sweep_methods:
        for p in args.p_updates:
            err, _, sec = train(method, args.sweep_depth, data, p_update=p, **common)
            sweep[(method, p)] = err
            print(f"p_update {p:4.2f} {method:5s} depth {args.sweep_depth} test error "
                  f"{err:6.2f}%  ({sec:5.1f}s)", flush=True)
    return {"table": table, "sweep": sweep}


def to_markdown(args, res, seconds) -> str:
    names = {"bp": "BP", "dni": "DNI", "cdni": "cDNI", "top": "top layer only"}
    lines = [
        "# Synthetic gradients on MNIST-style FC nets (benchmarks/dni_mnist.py)",
        "",
        f"- date: {datetime.date.today().isoformat()}; jax {jax.__version__}, fbalign "
        f"{fbalign.__version__}; backend {jax.default_backend()}; machine: {machine()}",
        f"- command: `python benchmarks/dni_mnist.py {' '.join(sys.argv[1:])}`",
        f"- data: {args.dataset}, {args.n_train or 'all'} training examples; test error on the "
        "full test split",
        f"- nets: ReLU, {args.hidden} units per hidden layer, every hidden layer decoupled "
        f"(DNI/cDNI: zero-initialised linear synthesizers, Adam {args.synth_lr}); model "
        f"optimizer Adam {args.lr}; batch {args.batch}; {args.epochs} epochs; seed {args.seed}",
        f"- wall time {seconds:.0f}s",
        "",
        "## Test error (%) by depth (number of weight layers)",
        "",
        "| method | " + " | ".join(str(d) for d in args.depths) + " |",
        "|---" * (len(args.depths) + 1) + "|",
    ]
    for m in args.methods:
        lines.append(f"| {names[m]} | "
                     + " | ".join(f"{res['table'][(d, m)]:.2f}" for d in args.depths) + " |")
    if res["sweep"]:
        lines += [
            "",
            f"## p_update sweep (depth {args.sweep_depth}): test error (%)",
            "",
            "Every run takes the same number of steps, so at p=0.1 each layer and synthesizer "
            "receives about a tenth of the updates.",
            "",
            "| method | " + " | ".join(f"p={p}" for p in args.p_updates) + " |",
            "|---" * (len(args.p_updates) + 1) + "|",
        ]
        for m in args.sweep_methods:
            lines.append(f"| {names[m]} | "
                         + " | ".join(f"{res['sweep'][(m, p)]:.2f}" for p in args.p_updates)
                         + " |")
    lines += [
        "",
        "Paper (Jaderberg et al. 2017, Table 1, MNIST FCN, 500k iterations with batch norm): "
        "cDNI close to BP, DNI somewhat worse with depth, no-bprop far worse; cDNI still "
        "learns at low p_update (Fig. 5). The settings here are much shorter; compare methods "
        "within this table, not with the paper's absolute numbers.",
        "",
    ]
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run on the embedded 8x8 digits")
    ap.add_argument("--dataset", default=None, help="mnist (default) or digits (quick default)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--depths", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=["bp", "dni", "cdni", "top"])
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="model optimizer (sgd: momentum 0.9)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--synth-lr", type=float, default=1e-3)
    ap.add_argument("--p-updates", type=float, nargs="+", default=None)
    ap.add_argument("--sweep-methods", nargs="*", default=["dni", "cdni"])
    ap.add_argument("--sweep-depth", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="Markdown file to write")
    args = ap.parse_args(argv)
    q = args.quick
    args.dataset = args.dataset or ("digits" if q else "mnist")
    args.depths = args.depths or ([3, 5] if q else [3, 4, 5, 6])
    args.hidden = args.hidden or (64 if q else 256)
    args.epochs = args.epochs or (30 if q else 3)
    args.batch = args.batch or (32 if q else 128)
    args.p_updates = args.p_updates or ([1.0, 0.2] if q else [1.0, 0.5, 0.2, 0.1])
    args.out = args.out or str(RESULTS / ("dni_mnist_quick.md" if q else "dni_mnist.md"))
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    res = run(args)
    md = to_markdown(args, res, time.perf_counter() - t0)
    print(md)
    _bench.write_result(Path(args.out).parent, Path(args.out).name, md)
    return res


if __name__ == "__main__":
    main()
