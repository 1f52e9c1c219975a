"""Evolution-strategy throughput: model evaluations per second of a population, evaluated in one
vmapped program (as `fbalign.rules.evolution_strategy` does) vs a Python loop over members.

    python benchmarks/es_throughput.py               # population 256, MLP 64-64-10, batch 64
    python benchmarks/es_throughput.py --quick       # seconds: tiny sizes
    python benchmarks/es_throughput.py --population 512 --sizes 784,100,10

Correctness first: the vmapped and chunked fitness equal the loop's member by member. Then
every variant is compiled and warmed up, and ``--repeats`` samples of each are timed
interleaved (`_bench.time_interleaved`). A sample evaluates the whole population once:

* ``vmap``: one jitted ``jax.vmap`` over all members (`population_fitness`);
* ``chunked``: one jitted ``jax.lax.map(..., batch_size=--chunk)`` (bounded memory);
* ``loop``: a Python loop calling one jitted single-member loss per member (one dispatch each);
* ``es step``: the whole rule step (evosax ask, the vmapped evaluation, tell), jitted.

Target (issue): vmap >= 20x the loop's evaluations per second at population 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

TARGET = 20.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats")
    p.add_argument("--population", type=int, default=256)
    p.add_argument("--sizes", default="64,64,10", help="MLP layer sizes, comma separated")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="report folder (default: results/; quick: none)")
    args = p.parse_args(argv)
    _bench.configure_threads(args.threads)

    import jax
    import numpy as np

    import fbalign as fb
    from fbalign._src.rules.evolution import evolution_strategy, population_fitness
    from fbalign.rules import Batch, StepContext

    sizes = (16, 16, 4) if args.quick else tuple(int(s) for s in args.sizes.split(","))
    pop_size = 32 if args.quick else args.population
    batch, chunk = (8, 8) if args.quick else (args.batch, args.chunk)
    repeats = 3 if args.quick else args.repeats
    info = _bench.machine(args.threads)

    model = fb.mlp(sizes)
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, sizes[-1])
    ctx, data = StepContext(model, fb.cross_entropy), Batch(x, y)
    pop = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(3),
                                                              (pop_size, *a.shape)), params)
    pop = jax.block_until_ready(pop)

    vmapped = jax.jit(lambda m: population_fitness(ctx, data, m))
    chunked = jax.jit(lambda m: population_fitness(ctx, data, m, chunk))
    one = jax.jit(lambda m: fb.cross_entropy(model.apply(m, x), y))
    members = [jax.tree.map(lambda a, i=i: a[i], pop) for i in range(pop_size)]
    members = jax.block_until_ready(members)

    def loop():
        return jax.block_until_ready([one(m) for m in members])

    rule = evolution_strategy("open_es", pop_size, 0.02)
    state = rule.init(jax.random.PRNGKey(4), params, model)
    step = jax.jit(lambda k: rule.step(params, state, data, k, ctx)[0])
    key = jax.random.PRNGKey(5)

    # correctness first
    f_loop = np.array([float(v) for v in loop()])
    np.testing.assert_allclose(np.asarray(vmapped(pop)), f_loop, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked(pop)), f_loop, rtol=1e-5, atol=1e-6)
    note = (f"the vmapped and the chunked fitness equal the Python loop's for all {pop_size} "
            "members (rtol 1e-5)")
    print(note)
    jax.block_until_ready(step(key))

    fns = {"vmap": lambda: _bench.block(vmapped(pop)),
           "chunked": lambda: _bench.block(chunked(pop)),
           "loop": loop,
           "es step": lambda: _bench.block(step(key))}
    res = _bench.time_interleaved(fns, repeats, reference="loop")
    info["load_average_end"] = _bench.load_average()
    rows = []
    for name, r in res.items():
        rate = pop_size / r["median"]
        rows.append([name, f"{r['median'] * 1e3:.2f}", f"{rate:,.0f}",
                     f"{1 / r['ratio']:.1f}x", f"{res['loop']['min'] / r['min']:.1f}x"])
    speedup = 1 / res["vmap"]["ratio"]
    verdict = "meets" if speedup >= TARGET else "misses"
    table = _bench.md_table(["variant", "ms per population (median)", "model evals / s",
                             "speed-up vs loop (median of rounds)", "speed-up (min times)"],
                            rows)
    print(table)
    text = ("# Evolution strategies: population evaluation throughput\n\n"
            f"`python benchmarks/es_throughput.py{' --quick' if args.quick else ''}`: "
            f"population {pop_size}, MLP {'-'.join(map(str, sizes))} (ReLU), batch {batch}, "
            f"chunk {chunk}, {repeats} interleaved samples per variant.\n\n"
            + _bench.machine_md(info) + f"\nCorrectness first: {note}.\n\n" + table
            + f"\nvmap is {speedup:.1f}x the Python loop's evaluations per second: it "
            f"{verdict} the target of {TARGET:.0f}x. The loop pays one dispatch of a compiled "
            "program per member; the vmapped program evaluates the population as batched "
            "matmuls. `es step` adds evosax's sampling and update to the vmapped "
            "evaluation, plus one forward at the mean.\n")
    _bench.write_result(args.out or (None if args.quick else _bench.RESULTS), "es_throughput.md",
                        text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
