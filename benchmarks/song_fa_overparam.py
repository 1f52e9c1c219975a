"""Song, Xu & Lafferty (2021): feedback alignment on an overparameterised two-layer network.

The network of the paper, ``f(x) = (1/sqrt(p)) sum_r beta_r psi(w_r . x)`` with ``psi = tanh``,
width ``p`` much larger than the ``n`` training samples, trained by full-batch gradient descent
on the squared loss, where the hidden weights ``W`` learn by feedback alignment: the error
reaches them through a fixed random vector ``b`` instead of ``beta``. Here that is literally
``fbalign.fa_matmul(h, beta, b)`` -- plain ``jax.grad`` of the loss gives the FA updates. An
L2 penalty ``(lambda / 2) ||beta||^2`` on the output weights plays the role of the paper's
regularisation. Claims checked:

1. the training error decays exponentially (a straight line on a log plot) -- exactly without
   regularisation; with it, the error converges exponentially to the regularised optimum;
2. the alignment ``cos(beta, b)`` stays small without regularisation (``beta`` hardly moves from
   its random start in this regime) and grows with ``lambda``.

    python benchmarks/song_fa_overparam.py            # writes results/song_fa_overparam.*
    python benchmarks/song_fa_overparam.py --quick    # seconds (used by the tests)

Reference: G. Song, R. Xu, J. Lafferty (2021), "Convergence and Alignment of Gradient Descent
with Random Backpropagation Weights", NeurIPS 34.

Why this is a script and not a recipe (``fbalign reproduce``): none of its defining choices is a
``fbalign train`` option. The network is in the paper's scaling, ``p^(-1/2) beta^T tanh(W x)``
with ``N(0, 1)`` weights (train's MLP has LeCun-initialised layers with biases and no width
factor); the data are ``n`` Gaussian points with Gaussian targets (not a train dataset); the
penalty is on ``beta`` alone (train's ``--weight-decay`` decays every parameter); the
measurements are ``cos(beta, b)`` and the exponential rate of the training error across a sweep
of ``lambda``. A recipe would need train options for the parameterisation and a per-layer weight
decay, a dataset of that kind, and a report of probe curves and fitted rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fbalign as fb
from fbalign.metrics import cosine

RESULTS = Path(__file__).resolve().parent / "results"
LAMBDAS = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def run(quick: bool = False, n: int = 20, d: int = 40, p: int | None = None,
        steps: int | None = None, lr: float = 2.0, seeds: int | None = None,
        lambdas: tuple[float, ...] = LAMBDAS, points: int = 100) -> dict:
    """Trains one net per (lambda, seed) with FA by full-batch GD; returns curves and finals."""
    p = p or (1000 if quick else 4000)
    steps = steps or (600 if quick else 4000)
    seeds = seeds or (2 if quick else 5)
    every = max(steps // points, 1)
    n_points = steps // every

    def one(seed, lam):
        k_x, k_y, k_w, k_beta, k_b = jax.random.split(jax.random.PRNGKey(seed), 5)
        x = jax.random.normal(k_x, (n, d)) / jnp.sqrt(d)
        y = jax.random.normal(k_y, (n, 1))
        w = jax.random.normal(k_w, (d, p))
        beta = jax.random.normal(k_beta, (p, 1))
        b = jax.random.normal(k_b, (p, 1))  # fixed random feedback for beta

        def f(params):
            w, beta = params
            h = jnp.tanh(x @ w)
            return fb.fa_matmul(h, beta, b) / jnp.sqrt(p)  # error reaches h through b

        def data_loss(params):
            return 0.5 * jnp.mean((f(params) - y) ** 2)

        def loss(params):
            return data_loss(params) + 0.5 * lam * jnp.sum(params[1] ** 2)

        def gd(params, _):
            g = jax.grad(loss)(params)
            return jax.tree.map(lambda a, ga: a - lr * ga, params, g), None

        def outer(params, _):
            params, _ = jax.lax.scan(gd, params, None, length=every)
            return params, measure(params)

        def measure(params):
            return {"train_loss": data_loss(params), "cos": cosine(params[1], b),
                    "beta_move": jnp.linalg.norm(params[1] - beta) / jnp.linalg.norm(beta)}

        params = (w, beta)
        first = measure(params)
        params, curve = jax.lax.scan(outer, params, None, length=n_points)
        return jax.tree.map(lambda a, c: jnp.concatenate([a[None], c]), first, curve)

    lam_arr = jnp.asarray(lambdas, jnp.float32)
    t0 = time.perf_counter()
    curves = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))(
        jnp.arange(seeds), lam_arr)
    curves = jax.device_get(curves)  # (seeds, lambdas, points)
    sec = time.perf_counter() - t0
    res = {"n": n, "d": d, "p": p, "steps": steps, "lr": lr, "seeds": seeds,
           "lambdas": list(lambdas), "step_axis": [every * i for i in range(n_points + 1)],
           "seconds": sec, "per_lambda": []}
    for j, lam in enumerate(lambdas):
        tl = np.asarray(curves["train_loss"][:, j])
        cs = np.asarray(curves["cos"][:, j])
        res["per_lambda"].append({
            "lambda": lam,
            "train_loss": tl.tolist(), "cos": cs.tolist(),
            "final_loss_mean": float(tl[:, -1].mean()),
            "initial_loss_mean": float(tl[:, 0].mean()),
            "final_cos_mean": float(cs[:, -1].mean()), "final_cos_std": float(cs[:, -1].std()),
            "beta_move": float(np.asarray(curves["beta_move"][:, j, -1]).mean()),
        })
        r = res["per_lambda"][-1]
        print(f"lambda {lam:<7g} train loss {r['initial_loss_mean']:.3g} -> "
              f"{r['final_loss_mean']:.3g}   cos(beta, b) {r['final_cos_mean']:.3f} +- "
              f"{r['final_cos_std']:.3f}   |beta - beta0|/|beta0| {r['beta_move']:.3f}",
              flush=True)
    # Rate of exponential decay without regularisation: a line through log(loss), from 10% of
    # the run until the loss reaches 1e-9 of its start (float32 rounding below that).
    base = np.asarray(res["per_lambda"][0]["train_loss"]).mean(0)
    xs = np.asarray(res["step_axis"])
    sl = (xs >= xs[-1] // 10) & (base > 1e-9 * base[0])
    slope, _ = np.polyfit(xs[sl], np.log(base[sl]), 1)
    corr = np.corrcoef(xs[sl], np.log(base[sl]))[0, 1]
    res["fit_range"] = [int(xs[sl][0]), int(xs[sl][-1])]
    res["decay_rate"], res["log_linear_r"] = float(-slope), float(corr)
    print(f"lambda 0: log(train loss) falls linearly, rate {-slope:.3g}/step (r = {corr:.4f}); "
          f"{sec:.1f} s", flush=True)
    return res


def write(res: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    """Writes ``<tag>.md``, ``<tag>.png`` and ``<tag>.json`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fbalign._src.plot import machine_line

    out_dir.mkdir(parents=True, exist_ok=True)
    xs = np.asarray(res["step_axis"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("viridis")
    for j, r in enumerate(res["per_lambda"]):
        c = cmap(j / max(len(res["per_lambda"]) - 1, 1))
        lab = f"lambda = {r['lambda']:g}"
        a1.plot(xs, np.asarray(r["train_loss"]).mean(0), color=c, label=lab)
        cs = np.asarray(r["cos"])
        a2.plot(xs, cs.mean(0), color=c, label=lab)
        a2.fill_between(xs, cs.min(0), cs.max(0), color=c, alpha=0.15, linewidth=0)
    a1.set_yscale("log")
    a1.set_title("Training error (mean over seeds)")
    a1.set_xlabel("gradient step")
    a1.set_ylabel("0.5 mean (f(x) - y)^2")
    a2.set_title("Alignment cos(beta, b)")
    a2.set_xlabel("gradient step")
    a2.set_ylabel("cosine")
    lams = [r["lambda"] for r in res["per_lambda"]]
    fin = [r["final_cos_mean"] for r in res["per_lambda"]]
    err = [r["final_cos_std"] for r in res["per_lambda"]]
    a3.errorbar(range(len(lams)), fin, yerr=err, marker="o", capsize=4)
    a3.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
    a3.set_xlabel("weight decay lambda on beta")
    a3.set_ylabel("final cos(beta, b)")
    a3.set_title("Final alignment vs regularisation")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / f"{tag}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    rows = "\n".join(
        f"| {r['lambda']:g} | {r['initial_loss_mean']:.3g} | {r['final_loss_mean']:.3g} | "
        f"{r['final_cos_mean']:.3f} +- {r['final_cos_std']:.3f} | {r['beta_move']:.3f} |"
        for r in res["per_lambda"])
    md = f"""# Song, Xu & Lafferty 2021: FA on an overparameterised two-layer network

f(x) = p^(-1/2) sum_r beta_r tanh(w_r . x), n = {res['n']} samples (x ~ N(0, I/d), d =
{res['d']}, y ~ N(0, 1)), width p = {res['p']}, W, beta, b ~ N(0, 1); full-batch gradient descent,
lr {res['lr']}, {res['steps']} steps, on 0.5 mean (f - y)^2 + (lambda/2) ||beta||^2; W learns by
feedback alignment through the fixed random b (`fbalign.fa_matmul`). {res['seeds']} seeds per
lambda; {res['seconds']:.1f} s in all. Produced by `python benchmarks/song_fa_overparam.py`.

Machine: {machine_line()}

| lambda | initial train error | final train error | final cos(beta, b), mean +- std \
| abs(beta - beta0) / abs(beta0) |
|---|---|---|---|---|
{rows}

Without regularisation the training error decays exponentially: log(error) is linear in the
step count (fit over steps {res['fit_range'][0]}-{res['fit_range'][1]}, before float32 rounding:
rate {res['decay_rate']:.3g} per step, correlation {res['log_linear_r']:.4f}), and beta barely \
leaves its random start, so cos(beta, b) stays near
0. With weight decay on beta, its random start decays away and what remains is the part driven
by the feedback-aligned hidden features: the alignment grows with lambda (the paper's claim),
while the training error converges to the regularised optimum.

![curves]({tag}.png)
"""
    mdp = out_dir / f"{tag}.md"
    mdp.write_text(md)
    (out_dir / f"{tag}.json").write_text(json.dumps(res) + "\n")
    return mdp, png


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds: p = 1000, 600 steps, 2 seeds")
    ap.add_argument("--p", type=int, default=None, help="width (default 4000)")
    ap.add_argument("--n", type=int, default=20, help="training samples (default 20)")
    ap.add_argument("--d", type=int, default=40, help="input dimension (default 40)")
    ap.add_argument("--steps", type=int, default=None, help="GD steps (default 4000)")
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=None, help="seeds per lambda (default 5)")
    ap.add_argument("--out", default=None, help=f"output directory (default {RESULTS}; --quick "
                    "writes nothing unless --out is given)")
    args = ap.parse_args(argv)
    res = run(args.quick, n=args.n, d=args.d, p=args.p, steps=args.steps, lr=args.lr,
              seeds=args.seeds)
    if args.out or not args.quick:
        md, png = write(res, Path(args.out) if args.out else RESULTS,
                        "song_fa_overparam" + ("_quick" if args.quick else ""))
        print(f"wrote {md} and {png}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
