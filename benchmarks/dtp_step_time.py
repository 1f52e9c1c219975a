"""Difference target propagation's jitted train-step time as a ratio to backprop, side by side.

    python benchmarks/dtp_step_time.py            # MLP 784-1000-1000-1000-10, batch 128
    python benchmarks/dtp_step_time.py --quick    # seconds: MLP 64-32-32-32-10, batch 16
    python benchmarks/dtp_step_time.py --threads 1

Every variant is one jitted `fbalign.train.make_train_step` step (forward, rule, optax SGD) on
the same MLP; the reference is backprop (``jax.grad``). DTP runs with ``diagnostics=False``
(no backprop pass for the angle metric) and is measured twice, so that the inverses' training
is reported separately: ``feedback_steps=0`` (targets and forward updates only: the cost of
propagating targets) and ``feedback_steps=K`` (``--feedback-steps``, default 1: plus ``K``
inverse-training iterations per step). A DRL and an L-DRL row show the other feedback losses.
Procedure as in ``benchmarks/step_time.py``: a correctness check first (DTP with transposed
feedback on a linear net equals backprop), compile (reported separately), warm up, then
``--repeats`` samples per variant each paired with a backprop sample (alternating order),
``--loop`` steps per sample inside one jitted ``lax.scan`` (as `fit` runs them).

Target (issue): DTP (feedback_steps=1) <= 3x backprop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

TARGET = 3.0


def build_variants(quick: bool, feedback_steps: int):
    """[(label, rule, step, state)], backprop first; plus the batch."""
    import jax
    import optax

    import fbalign
    from fbalign._src.rules.target_propagation import drl, dtp, ldrl
    from fbalign._src.train import init_train_state, make_train_step

    sizes = (64, 32, 32, 32, 10) if quick else (784, 1000, 1000, 1000, 10)
    batch = 16 if quick else 128
    model = fbalign.mlp(sizes)
    opt = optax.sgd(1e-3)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    y = jax.numpy.arange(batch) % sizes[-1]
    rules = [
        ("bp (grad)", "bp", "grad"),
        ("dtp, feedback_steps=0", dtp(feedback_steps=0, diagnostics=False), "explicit"),
        (f"dtp, feedback_steps={feedback_steps}",
         dtp(feedback_steps=feedback_steps, diagnostics=False), "explicit"),
        (f"drl, feedback_steps={feedback_steps}",
         drl(feedback_steps=feedback_steps, diagnostics=False), "explicit"),
        (f"ldrl, feedback_steps={feedback_steps}",
         ldrl(feedback_steps=feedback_steps, diagnostics=False), "explicit"),
    ]
    out = []
    for label, rule, form in rules:
        step = make_train_step(model, rule, opt, form=form)
        out.append((label, rule, step, init_train_state(model, rule, opt, key)))
    return model, out, x, y, sizes, batch


def check_correctness() -> str:
    """DTP with g_l(h) = h W_l^T on a linear MLP gives backprop's gradient."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fbalign
    from fbalign._src.base import Batch, StepContext
    from fbalign._src.losses import cross_entropy
    from fbalign._src.rules.target_propagation import dtp

    model = fbalign.mlp((8, 6, 5, 3), activation="linear")
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    y = jnp.arange(4) % 3
    rule = dtp(feedback_steps=0, inverse_activation="linear", diagnostics=False)
    st = rule.init(jax.random.PRNGKey(2), params, model)
    st = st._replace(inverses=tuple({"w": params[j + 1]["w"].T, "b": jnp.zeros(
        params[j]["w"].shape[1])} for j in range(2)))
    upd, _, _ = rule.step(params, st, Batch(x, y), jax.random.PRNGKey(3),
                          StepContext(model, cross_entropy))
    bp = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
    for u, v in zip(jax.tree.leaves(upd), jax.tree.leaves(bp), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=1e-6)
    return "DTP with transposed feedback on a linear MLP equals backprop"


def run(args) -> tuple[str, list[dict], str]:
    import jax

    note = check_correctness()
    _, variants, x, y, sizes, batch = build_variants(args.quick, args.feedback_steps)
    rows, fns, states = [], {}, {}
    for label, _, step, st in variants:
        t0 = time.perf_counter()
        compiled = step.lower(st, x, y).compile()
        compile_s = time.perf_counter() - t0

        def body(s, x, y, step=step):
            return jax.lax.scan(lambda c, _: (step(c, x, y)[0], None), s, None,
                                length=args.loop)[0]

        looped = jax.jit(body, donate_argnums=0)
        states[label] = _bench.block(looped(st, x, y))  # compile + warm up

        def sample(label=label, looped=looped):
            states[label] = _bench.block(looped(states[label], x, y))

        fns[label] = sample
        rows.append({"label": label, "compile_s": compile_s,
                     "gflop": _bench.flops(compiled) / 1e9})
    ref = variants[0][0]
    timing = _bench.time_paired(fns, ref, args.repeats)
    for row in rows:
        t = timing[row["label"]]
        row.update(ms=1e3 * t["median"] / args.loop, ratio=t["ratio"],
                   ratio_min=t["ratio_min"], flop_ratio=row["gflop"] / rows[0]["gflop"])
    title = (f"MLP {'-'.join(map(str, sizes))}, tanh, batch {batch}"
             + (" (--quick)" if args.quick else ""))
    return title, rows, note


def table(rows: list[dict]) -> str:
    return _bench.md_table(
        ["variant", "step ms in loop", "ratio to BP (median of pairs)", "ratio of mins",
         "GFLOP/step", "FLOP ratio", "compile s"],
        [[r["label"], f"{r['ms']:.3f}", f"{r['ratio']:.3f}", f"{r['ratio_min']:.3f}",
          f"{r['gflop']:.4f}", f"{r['flop_ratio']:.2f}", f"{r['compile_s']:.2f}"]
         for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (seconds)")
    p.add_argument("--feedback-steps", type=int, default=1,
                   help="inverse-training iterations per step for the K > 0 rows (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="samples per variant (default 21)")
    p.add_argument("--loop", type=int, default=None,
                   help="steps per sample inside one jitted lax.scan (default 8)")
    p.add_argument("--threads", type=int, default=None, help="XLA CPU threads (default: all)")
    p.add_argument("--out", default=None,
                   help="results directory (default benchmarks/results; --quick: none)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 21)
    args.loop = args.loop or (4 if args.quick else 8)
    out_dir = args.out or (None if args.quick else _bench.RESULTS)
    _bench.configure_threads(args.threads)
    info = _bench.machine(args.threads)
    title, rows, note = run(args)
    k_row = next(r for r in rows if r["label"].startswith("dtp, feedback_steps=")
                 and not r["label"].endswith("=0"))
    verdict = (f"DTP (feedback_steps={args.feedback_steps}) / BP = {k_row['ratio']:.2f} "
               f"(target <= {TARGET:.0f}: {'met' if k_row['ratio'] <= TARGET else 'MISSED'})")
    print(f"\n{title}\n{table(rows)}\n{verdict}")
    info["load_average_end"] = _bench.load_average()
    text = ("# DTP train-step time relative to backprop\n\n"
            f"`python benchmarks/dtp_step_time.py{' --quick' if args.quick else ''}` "
            f"({args.repeats} paired samples per variant, {args.loop} steps per sample in one "
            "jitted `lax.scan`; optax SGD; float32; DTP with `diagnostics=False`).\n\n"
            + _bench.machine_md(info) + f"\n## {title}\n\nCorrectness check passed first: "
            f"{note}.\n\n{table(rows)}\n{verdict}\n\nThe `feedback_steps=0` row is target "
            "propagation alone (output target, difference targets through the inverses, local "
            "forward updates); the difference to the `feedback_steps=K` row is the cost of "
            "training the inverses (K iterations of the reconstruction loss, each a forward "
            "and backward pass through every inverse and forward layer).\n")
    _bench.write_result(out_dir, "dtp_step_time.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
