"""Recurrent DNI on the copy and repeat-copy tasks (Jaderberg et al. 2017, Table 1, RNN part).

Tasks (Graves et al. 2014 style, generated in code with `jax.random`):

* **copy**: ``N`` random ``bits``-bit characters, a delimiter step, then the model must output
  the ``N`` characters (its inputs are zero meanwhile). Sequence length ``2N + 1``.
* **repeat copy**: ``N`` characters, a delimiter step whose extra input channel holds
  ``R / R_max`` (``R`` uniform in ``1..R_max`` per sequence), then the characters ``R`` times,
  then one step on which an extra "end" output must fire. Length ``N + RN + 2``.

Every sequence starts from the zero state. The loss is the binary cross-entropy of the output
bits (plus the end flag in repeat copy). Curriculum: ``N`` starts at 1 and grows by one each
time the mean error over a chunk of training batches is below ``--threshold`` bits per
character; the score is the largest ``N`` passed within the budget of training sequences.

Methods, all with windows of ``T`` steps and an update after every window: truncated BPTT,
DNI (zero-initialised linear synthesizer of the LSTM state at each window boundary) and
DNI + Aux (also predicts the synthetic gradient at the window's end from its first state).

    python benchmarks/dni_copy.py            # reduced full run, writes results/dni_copy.md
    python benchmarks/dni_copy.py --quick    # seconds

Why this is a script and not a recipe (the feedforward half of the paper is
``fbalign reproduce jaderberg2017``, run by ``dni_mnist.py``): the copy and repeat-copy tasks are
generated per batch with a length that grows by a curriculum, the score is the largest length
passed within a budget of sequences, and the model is fbalign's recurrent DNI
(``fbalign._src.recurrent_dni``: an LSTM trained in windows of ``T`` steps with a synthesizer
of its state). ``fbalign train`` has no sequence tasks, no curriculum and no recurrent-DNI rule
(its ``rnn`` model reads MNIST rows), so a recipe would need all three.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import fbalign
from fbalign._src.recurrent_dni import lstm_cell, make_train_step, recurrent_dni, rnn_cell

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
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------
# Tasks: every array is time-major and padded to a static length; N and R are traced.
# ------------------------------------------------------------------------------------------


def copy_batch(key, n, batch, length, bits):
    """Returns ``xs (L, B, bits+2)``, ``targets (L, B, 2 (bits+1))``, ``valid (L, B)``.

    ``targets`` packs the wanted outputs (``bits + 1`` channels, the last one the end flag) and
    their per-channel loss weights, unpacked by `weighted_bce`.
    """
    t = jnp.arange(length)[:, None]  # (L, 1)
    chars = jax.random.bernoulli(key, 0.5, (length, batch, bits)).astype(jnp.float32)
    x_chars = chars * (t < n)[..., None]
    delim = jnp.broadcast_to((t == n).astype(jnp.float32), (length, batch))[..., None]
    xs = jnp.concatenate([x_chars, delim, jnp.zeros_like(delim)], axis=-1)
    out = (t >= n + 1) & (t <= 2 * n)  # (L, 1)
    src = jnp.clip(t - n - 1, 0, length - 1)[:, 0]
    want = chars[src] * out[..., None]
    w_bits = jnp.broadcast_to(out[..., None], want.shape).astype(jnp.float32)
    zeros = jnp.zeros((length, batch, 1), jnp.float32)
    targets = jnp.concatenate([want, zeros, w_bits, zeros], axis=-1)
    valid = jnp.broadcast_to(t <= 2 * n, (length, batch)).astype(jnp.float32)
    return xs, targets, valid


def repeat_copy_batch(key, n, batch, length, bits, r_max):
    """Repeat copy with ``R`` uniform in ``1..r_max`` per sequence (see the module docstring)."""
    k1, k2 = jax.random.split(key)
    t = jnp.arange(length)[:, None]  # (L, 1)
    r = jax.random.randint(k2, (1, batch), 1, r_max + 1)  # (1, B)
    chars = jax.random.bernoulli(k1, 0.5, (length, batch, bits)).astype(jnp.float32)
    x_chars = chars * (t < n)[..., None]
    is_delim = jnp.broadcast_to(t == n, (length, batch))
    delim = is_delim.astype(jnp.float32)[..., None]
    rep = (is_delim * r / r_max).astype(jnp.float32)[..., None]
    xs = jnp.concatenate([x_chars, delim, rep], axis=-1)
    end_t = n + r * n + 1  # (1, B)
    out = (t >= n + 1) & (t < end_t)  # (L, B)
    src = jnp.mod(jnp.clip(t - n - 1, 0, None), jnp.maximum(n, 1))  # (L, 1)
    src = jnp.broadcast_to(src, (length, batch))
    want = jnp.take_along_axis(chars, src[..., None], axis=0) * out[..., None]
    w_bits = jnp.broadcast_to(out[..., None], want.shape).astype(jnp.float32)
    end_want = (t == end_t).astype(jnp.float32)[..., None]
    w_end = ((t >= n + 1) & (t <= end_t)).astype(jnp.float32)[..., None]
    targets = jnp.concatenate([want, end_want, w_bits, w_end], axis=-1)
    valid = (t <= end_t).astype(jnp.float32)
    return xs, targets, valid


def weighted_bce(logits, packed):
    """Per-step loss: BCE of each output channel times its weight, summed: ``(batch,)``."""
    k = logits.shape[-1]
    want, weight = packed[..., :k], packed[..., k:]
    return jnp.sum(weight * optax.sigmoid_binary_cross_entropy(logits, want), axis=-1)


def bits_per_char(params, model, xs, targets):
    """Mean over output characters of the characters' bits' BCE in bits (end flag excluded)."""
    ys, _ = model.apply(params, xs)
    k = ys.shape[-1]
    bits = k - 1
    want, w = targets[..., :bits], targets[..., k:k + bits]
    bce = jnp.sum(w * optax.sigmoid_binary_cross_entropy(ys[..., :bits], want), axis=-1)
    n_chars = jnp.sum(w[..., 0])
    return jnp.sum(bce) / jnp.maximum(n_chars, 1.0) / LN2


def padded_length(max_len: int, T: int) -> int:
    """Buckets lengths (powers of two from 8) rounded up to a multiple of ``T``: few compiles."""
    b = 8
    while b < max_len:
        b *= 2
    return int(math.ceil(b / T) * T)


# ------------------------------------------------------------------------------------------
# One curriculum run
# ------------------------------------------------------------------------------------------


def _build(task, method, T, args, seed):
    """Model, optimizer and a jitted ``chunk`` of ``args.chunk`` training batches."""
    bits = args.bits
    cell = lstm_cell(args.hidden) if args.cell == "lstm" else rnn_cell(args.hidden)
    model = recurrent_dni(
        cell, bits + 1, T, loss=weighted_bce, learning_rate=args.synth_lr,
        synthetic=method != "bptt", aux=method == "dni_aux", aux_weight=args.aux_weight,
    )
    opt = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(args.lr))
    key = jax.random.PRNGKey(seed)
    k_init, key = jax.random.split(key)
    params, dstate = model.init(k_init, bits + 2)
    train_step = make_train_step(model, opt, per_window=True)
    if task == "copy":
        gen, max_len = partial(copy_batch, bits=bits), lambda n: 2 * n + 1
    else:
        gen = partial(repeat_copy_batch, bits=bits, r_max=args.r_max)
        max_len = lambda n: n + args.r_max * n + 2  # noqa: E731

    @partial(jax.jit, static_argnums=(4,))
    def chunk(params, ostate, dstate, key, length, n):
        def body(c, k):
            p, o, d = c
            xs, tg, valid = gen(k, n, args.batch, length)
            err = bits_per_char(p, model, xs, tg)  # measured before the update: generalisation
            p, o, d, _ = train_step(p, o, d, xs, tg, None, valid)
            return (p, o, d), err

        (params, ostate, dstate), errs = jax.lax.scan(
            body, (params, ostate, dstate), jax.random.split(key, args.chunk)
        )
        return params, ostate, dstate, jnp.mean(errs)

    return (params, opt.init(params), dstate, key), chunk, max_len


def curriculum(task, method, T, args, seed=0):
    """Trains one model with the curriculum.

    Returns ``(max N solved, sequences used, seconds, history)`` where ``history`` lists
    ``(N, sequences seen when N was passed)``.
    """
    (params, ostate, dstate, key), chunk, max_len = _build(task, method, T, args, seed)
    t0 = time.perf_counter()
    n, used, solved, history = 1, 0, 0, []
    while used < args.budget and n <= args.max_n:
        key, sub = jax.random.split(key)
        length = padded_length(max_len(n), T)
        params, ostate, dstate, err = chunk(params, ostate, dstate, sub, length, n)
        used += args.chunk * args.batch
        if float(err) < args.threshold:
            solved = n
            history.append((n, used))
            n += 1
    return solved, used, time.perf_counter() - t0, history


def fixed_length(task, method, T, args, n, seed=0):
    """Trains at the fixed length ``n`` for ``args.fixed_batches`` batches (no curriculum).

    Returns the error (bits/char) of the last chunk, measured before each batch's update.
    """
    (params, ostate, dstate, key), chunk, max_len = _build(task, method, T, args, seed)
    length = padded_length(max_len(n), T)
    err = None
    for _ in range(max(1, args.fixed_batches // args.chunk)):
        key, sub = jax.random.split(key)
        params, ostate, dstate, err = chunk(params, ostate, dstate, sub, length, n)
    return float(err)


def run(args) -> dict:
    res = {}
    for task in args.tasks:
        for T in args.truncations:
            for method in args.methods:
                solved, used, sec, hist = curriculum(task, method, T, args, args.seed)
                res[(task, T, method)] = solved
                res[("history", task, T, method)] = hist
                print(f"{task:11s} T={T} {method:8s} max N solved {solved:3d}  "
                      f"({used} sequences, {sec:5.1f}s)  passed at {hist}", flush=True)
    if args.fixed_n:
        for T in args.fixed_truncations:
            for method in args.methods:
                err = fixed_length("copy", method, T, args, args.fixed_n, args.seed)
                res[("fixed", T, method)] = err
                print(f"copy N={args.fixed_n} fixed T={T} {method:8s} error {err:.3f} bits/char",
                      flush=True)
    return res


def to_markdown(args, res, seconds) -> str:
    names = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI + Aux"}
    lines = [
        "# Recurrent DNI on copy / repeat copy (benchmarks/dni_copy.py)",
        "",
        f"- date: {datetime.date.today().isoformat()}; jax {jax.__version__}, fbalign "
        f"{fbalign.__version__}; backend {jax.default_backend()}; machine: {machine()}",
        f"- command: `python benchmarks/dni_copy.py {' '.join(sys.argv[1:])}`",
        f"- model: {args.cell.upper()} with {args.hidden} units, {args.bits}-bit characters, "
        f"linear readout; Adam {args.lr} (global-norm clip {args.clip}) after every window; "
        f"synthesizer zero-initialised linear, Adam {args.synth_lr}; aux weight "
        f"{args.aux_weight}; batch {args.batch}; repeat copy R in 1..{args.r_max}",
        f"- curriculum: N += 1 when the mean error over {args.chunk} batches is below "
        f"{args.threshold} bits/char; budget {args.budget} sequences per run (N <= "
        f"{args.max_n}); seed {args.seed}",
        f"- wall time {seconds:.0f}s",
        "",
    ]
    for task in args.tasks:
        lines += [
            f"## {task}: largest sequence length N solved",
            "",
            "| method | " + " | ".join(f"T={T}" for T in args.truncations) + " |",
            "|---" * (len(args.truncations) + 1) + "|",
        ]
        for m in args.methods:
            lines.append(f"| {names[m]} | "
                         + " | ".join(str(res[(task, T, m)]) for T in args.truncations) + " |")
        lines.append("")
    if args.fixed_n:
        lines += [
            f"## copy at the fixed length N={args.fixed_n} (no curriculum): error in bits/char "
            f"after {args.fixed_batches} batches",
            "",
            f"Sequence length {2 * args.fixed_n + 1}; full BPTT (one window) is the T="
            f"{padded_length(2 * args.fixed_n + 1, 1)} column where shown.",
            "",
            "| method | " + " | ".join(f"T={T}" for T in args.fixed_truncations) + " |",
            "|---" * (len(args.fixed_truncations) + 1) + "|",
        ]
        for m in args.methods:
            lines.append(f"| {names[m]} | " + " | ".join(
                f"{res[('fixed', T, m)]:.3f}" for T in args.fixed_truncations) + " |")
        lines.append("")
    lines += [
        "Paper (Jaderberg et al. 2017, Table 1, LSTM 256 units, far longer training): e.g. copy "
        "T=3: BPTT 8, DNI 14, DNI + Aux 17; repeat copy T=3: 5, 33, 59. The budget here is "
        "orders of magnitude smaller, so absolute lengths are not comparable; the comparison "
        "is between methods at equal T and budget.",
        "",
    ]
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    ap.add_argument("--tasks", nargs="+", default=["copy", "repeat_copy"],
                    choices=["copy", "repeat_copy"])
    ap.add_argument("--truncations", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=["bptt", "dni", "dni_aux"],
                    choices=["bptt", "dni", "dni_aux"])
    ap.add_argument("--cell", default="lstm", choices=["lstm", "rnn"])
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--synth-lr", type=float, default=1e-2,
                    help="synthesizer Adam step (1e-3, the library default, learns too slowly "
                         "here)")
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--r-max", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--chunk", type=int, default=None, help="batches between curriculum checks")
    ap.add_argument("--budget", type=int, default=None, help="training sequences per run")
    ap.add_argument("--max-n", type=int, default=None)
    ap.add_argument("--fixed-n", type=int, default=None,
                    help="also train copy at this fixed length without curriculum (0: skip)")
    ap.add_argument("--fixed-truncations", type=int, nargs="+", default=None)
    ap.add_argument("--fixed-batches", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.truncations = args.truncations or ([2, 8] if q else [2, 3, 4, 5, 8])
    args.hidden = args.hidden or (32 if q else 64)
    args.bits = args.bits or 4
    args.batch = args.batch or (16 if q else 64)
    args.r_max = args.r_max or 2
    args.chunk = args.chunk or (20 if q else 25)
    args.budget = args.budget or (16 * 20 * 8 if q else 64 * 25 * 160)
    args.max_n = args.max_n or (8 if q else 40)
    args.fixed_n = (0 if q else 4) if args.fixed_n is None else args.fixed_n
    args.fixed_truncations = args.fixed_truncations or [2, 4, 8, 16]
    args.fixed_batches = args.fixed_batches or 2000
    args.out = args.out or str(RESULTS / ("dni_copy_quick.md" if q else "dni_copy.md"))
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
