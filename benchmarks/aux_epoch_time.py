"""Wall time per epoch of the auxiliary-variable rules (online alternating minimisation, ADMM)
beside backprop, on the same MLP and data, measured side by side in one run.

    python benchmarks/aux_epoch_time.py            # MNIST, first 5,000 images, 784-100-100-10
    python benchmarks/aux_epoch_time.py --quick    # seconds: digits, 64-32-32-10
    python benchmarks/aux_epoch_time.py --threads 1

Every variant is one epoch as `fit` runs it: `make_train_step` (forward, rule, optax) inside
one jitted `lax.scan` over the epoch's batches (`make_epoch_runner`, the old state donated).
Backprop and AM train with Adam on mini-batches of 200 (Choromanska et al.'s setting, recipe
choromanska2019: 5 Nesterov code steps per code); ADMM (Taylor et al. 2016) with optax.sgd(1.0),
which applies its closed-form solve, on squared error, once on the whole training set (its
paper's setting: one step per epoch) and once on mini-batches of 200. Procedure: a correctness
check first (for every variant, the jitted epoch runner over 2 steps gives the same parameters
as 2 calls of the jitted step), then each epoch program is compiled (its time reported apart),
run once to warm up, and timed ``--repeats`` times, each sample paired with a backprop epoch
taken right before or after it (alternately). Reported: median epoch time, the median of the
paired ratios to backprop and the ratio of minimum times. A second table times ADMM's weight
solve alone: ``weight_solve="pinv"`` (an SVD, `fbalign.rules.admm`'s default) against
``weight_solve="cholesky"`` (a Cholesky solve of the ridge-regularised normal equations) on the
same bias-augmented input matrix; the epoch table has ADMM with each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

BATCH = 200


def load_data(quick: bool, n: int):
    """(name, x, y, n_in, hidden): the first ``n`` MNIST training images ([0, 1] pixels) or, with
    ``--quick`` or without MNIST, the UCI digits."""
    from fbalign._src.data import load_dataset

    if not quick:
        try:
            data = load_dataset("mnist", normalize="unit")
            return (f"MNIST (first {n:,} training images, pixels in [0, 1])",
                    data.x_train[:n], data.y_train[:n], 784, (100, 100))
        except (OSError, ValueError) as err:
            print(f"MNIST unavailable ({err}); using the digits")
    data = load_dataset("digits")
    return ("UCI digits (1,438 training images, standardised)", data.x_train, data.y_train, 64,
            (32, 32) if quick else (100, 100))


def variants(n: int, batch: int):
    """[(label, rule, optimizer, loss, batch_size)]; backprop (the reference) first."""
    import optax

    import fbalign

    am = fbalign.rules.alternating_minimization(mu=3e-5, code_steps=5, code_lr=1.5e-5,
                                                code_momentum=0.9)
    admm = fbalign.rules.admm(beta=1.0, gamma=10.0, num_examples=n, warm_start=10)
    chol = fbalign.rules.admm(beta=1.0, gamma=10.0, num_examples=n, warm_start=10,
                              weight_solve="cholesky")
    return [("bp", "bp", optax.adam(3e-3), "cross_entropy", batch),
            ("altmin", am, optax.adam(2e-3), "cross_entropy", batch),
            ("admm, full batch", admm, optax.sgd(1.0), "squared_error", n),
            (f"admm, batch {batch}", admm, optax.sgd(1.0), "squared_error", batch),
            ("admm cholesky, full batch", chol, optax.sgd(1.0), "squared_error", n),
            (f"admm cholesky, batch {batch}", chol, optax.sgd(1.0), "squared_error", batch)]


def build(model, rule, opt, loss, batch: int, x, y, chunk: int | None = None):
    """(jitted epoch runner, jitted step, initial state, perm) for one variant."""
    import jax
    import jax.numpy as jnp

    from fbalign._src.train import init_train_state, make_epoch_runner, make_train_step

    steps = chunk or len(x) // batch
    step = make_train_step(model, rule, opt, loss, jit=False)
    runner = make_epoch_runner(step, batch, steps)
    state = init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    rounds = -(-steps * batch // len(x))  # whole permutations, one after another
    perm = jnp.concatenate([jax.random.permutation(jax.random.PRNGKey(1 + i), len(x))
                            for i in range(rounds)])[:steps * batch]
    return runner, jax.jit(step), state, perm


def check_runner(model, specs, x, y) -> str:
    """For every variant, 2 steps of the jitted epoch runner == 2 calls of the jitted step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    for label, rule, opt, loss, batch in specs:
        runner, step, state, perm = build(model, rule, opt, loss, batch, x, y, chunk=2)
        s_loop = jax.tree.map(jnp.copy, state)
        for i in range(2):
            idx = perm[i * batch:(i + 1) * batch]
            s_loop, _ = step(s_loop, x[idx], y[idx], idx)
        s_run, _ = runner(state, x, y, perm, jnp.int32(0))
        for a, b in zip(jax.tree.leaves(s_run.params), jax.tree.leaves(s_loop.params),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5,
                                       err_msg=label)
        assert int(s_run.step) == 2, label
    return ("for every variant, 2 steps of the jitted epoch runner give the parameters of 2 "
            "calls of the jitted step (rtol 2e-4)")


def time_epochs(model, specs, x, y, repeats: int) -> list[dict]:
    """Compile, warm up and time one epoch per variant, paired with backprop epochs."""
    import jax.numpy as jnp

    rows, fns = [], {}
    for label, rule, opt, loss, batch in specs:
        runner, _, state, perm = build(model, rule, opt, loss, batch, x, y)
        t0 = time.perf_counter()
        compiled = runner.lower(state, x, y, perm, jnp.int32(0)).compile()
        compile_s = time.perf_counter() - t0
        box = {"state": state}

        def epoch(compiled=compiled, box=box, perm=perm):
            box["state"], m = compiled(box["state"], x, y, perm, jnp.int32(0))
            _bench.block(box["state"])
            box["loss"] = float(m["loss"])

        epoch()  # warm-up
        fns[label] = epoch
        rows.append({"label": label, "batch": batch, "steps": len(x) // batch,
                     "compile": compile_s, "box": box})
        print(f"compiled {label}: {compile_s:.1f} s", flush=True)
    timed = _bench.time_paired(fns, specs[0][0], repeats)
    for row in rows:
        row.update(timed[row["label"]])
        row["loss"] = row.pop("box")["loss"]
    return rows


def time_solves(x, width: int, repeats: int) -> list[list[str]]:
    """ADMM's weight block on the input layer: pinv (SVD) against the normal equations."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fbalign._src.rules.admm import CHOLESKY_RIDGE, solve_weights

    a = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    z = jax.random.normal(jax.random.PRNGKey(2), (x.shape[0], width))
    pinv = jax.jit(lambda a, z: solve_weights(a, z, False, "pinv")["w"])
    normal = jax.jit(lambda a, z: solve_weights(a, z, False, "cholesky")["w"])
    ridge = CHOLESKY_RIDGE * jnp.trace(a.T @ a) / a.shape[1]
    w_p, w_n = _bench.block(pinv(a, z)), _bench.block(normal(a, z))
    # the least-squares objective each reaches, relative to |Z| (lower is better)
    res_p, res_n = (float(jnp.linalg.norm(a @ w - z) / jnp.linalg.norm(z)) for w in (w_p, w_n))
    t = _bench.time_paired({"pinv": lambda: _bench.block(pinv(a, z)),
                            "normal": lambda: _bench.block(normal(a, z))}, "pinv", repeats)
    shape = f"{a.shape[0]:,} x {a.shape[1]}"
    return [["`weight_solve=\"pinv\"`: `pinv(A) @ Z` (SVD, the default)", shape,
             f"{t['pinv']['median'] * 1e3:.1f}", "1.00", f"{res_p:.4f}"],
            [f"`weight_solve=\"cholesky\"`: Cholesky of `A^T A + {float(ridge):.1e} I`", shape,
             f"{t['normal']['median'] * 1e3:.1f}", f"{t['normal']['ratio']:.3f}",
             f"{res_n:.4f}" if np.isfinite(res_n) else "nan"]]


def table(rows: list[dict]) -> str:
    return _bench.md_table(
        ["variant", "batch", "steps / epoch", "compile (s)", "epoch, median (s)",
         "epoch, min (s)", "ratio to bp (paired median [q1, q3])", "ratio of minima",
         "train loss (last timed epoch)"],
        [[r["label"], r["batch"], r["steps"], f"{r['compile']:.1f}", f"{r['median']:.3f}",
          f"{r['min']:.3f}", f"{r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]",
          f"{r['ratio_min']:.2f}", f"{r['loss']:.4f}"] for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits, tiny net, few repeats")
    p.add_argument("--examples", type=int, default=5000,
                   help="MNIST training images used (default 5000)")
    p.add_argument("--repeats", type=int, default=None, help="paired samples (default 5)")
    p.add_argument("--threads", type=int, default=None, help="XLA CPU threads (default: all)")
    p.add_argument("--out", default=None,
                   help="results directory (default benchmarks/results; --quick: none)")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    out_dir = args.out or (None if args.quick else _bench.RESULTS)
    _bench.configure_threads(args.threads)
    info = _bench.machine(args.threads)
    import jax.numpy as jnp

    import fbalign

    name, x, y, n_in, hidden = load_data(args.quick, args.examples)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = fbalign.mlp((n_in, *hidden, 10), "relu", "linear")
    specs = variants(len(x), BATCH if not args.quick else 100)
    note = check_runner(model, specs, x, y)
    print("check passed:", note, flush=True)
    rows = time_epochs(model, specs, x, y, repeats)
    solves = time_solves(x, hidden[0], repeats)
    info["load_average_end"] = _bench.load_average()
    sizes = "-".join(map(str, (n_in, *hidden, 10)))
    cmd = "python benchmarks/aux_epoch_time.py" + (" --quick" if args.quick else "")
    print(f"\n{table(rows)}")
    text = (
        "# Epoch time of alternating minimisation and ADMM beside backprop\n\n"
        f"`{cmd}`: {name}, a {sizes} ReLU MLP, float32; {repeats} samples per variant, each "
        "paired with a backprop epoch. One epoch = one jitted `lax.scan` over its batches, as "
        "`fit` runs it. bp: Adam 3e-3; altmin: Adam 2e-3, mu 3e-5, 5 Nesterov code steps of "
        "1.5e-5 (recipe choromanska2019); admm: beta 1, gamma 10, optax.sgd(1.0), squared "
        "error, weight_solve pinv (the default) or cholesky.\n\n" + _bench.machine_md(info)
        + f"\n## Epoch time\n\nCorrectness check passed first: {note}.\n\n{table(rows)}\n"
        "Compile time is the `lower(...).compile()` of the epoch program, apart from the epoch "
        "times. The train loss is the mean over the last timed epoch (the states train on from "
        "epoch to epoch).\n\n## ADMM's weight solve alone\n\n"
        + _bench.md_table(["solve of the input layer's weights", "A", "median (ms)",
                           "ratio to pinv (paired median)", "residual |A W - Z| / |Z|"],
                          solves)
        + "\nA is the bias-augmented input matrix `[x, 1]`, Z random targets of the first "
        "hidden layer's width. The ridge keeps the Cholesky factor defined where pixels are "
        "constant (A has rank below its width). The residual is the least-squares objective "
        "each solve reaches (lower is better): `jnp.linalg.pinv` drops singular values below "
        "its default relative cut-off (10 max(N, d) float32 eps), so the two do not solve "
        "exactly the same problem.\n")
    _bench.write_result(out_dir, "aux_epoch_time.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
