"""Shared helpers of the benchmark scripts: thread settings, machine description, interleaved
timing with ratios, Markdown output. Import it before JAX (``configure_threads`` sets XLA_FLAGS).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def configure_threads(threads: int | None) -> None:
    """Limits XLA's CPU threads (call before importing JAX). ``1`` runs single-threaded."""
    if not threads:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine(threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on (JAX imported here, so call it after configuring)."""
    import jax

    devs = jax.devices()
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "load_average_start": load_average(),
        "jax": jax.__version__,
        "backend": f"{jax.default_backend()} ({len(devs)} x {devs[0].device_kind})",
        "python": platform.python_version(),
        "gpu": "none available in this session" if jax.default_backend() == "cpu" else "yes",
    }


def machine_md(info: dict[str, Any]) -> str:
    rows = [
        ("Date", info["date"]),
        ("CPU", f"{info['cpu']}, {info['cores']} cores (threads used: {info['threads']})"),
        ("Load average (1/5/15 min) at start / end",
         f"{info['load_average_start']} / {info.get('load_average_end', load_average())}"),
        ("JAX", f"{info['jax']}, backend {info['backend']}"),
        ("Python", info["python"]),
        ("GPU", info["gpu"]),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, reference: str | None = None
) -> dict[str, dict[str, float]]:
    """Times every ``fns[name]()`` (which must block until done) ``repeats`` times, alternating
    the order each round (forward, then reversed), so that load changes hit all variants alike.

    Returns per name: ``median`` and ``min`` seconds, and with ``reference``, ``ratio`` (median
    over rounds of ``t_name / t_reference`` measured in the same round) and ``ratio_min``
    (``min t_name / min t_reference``).
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        s = samples[n]
        out[n] = {"median": statistics.median(s), "min": min(s), "samples": len(s)}
        if reference is not None:
            ref = samples[reference]
            out[n]["ratio"] = statistics.median(a / b for a, b in zip(s, ref, strict=True))
            out[n]["ratio_min"] = min(s) / min(ref)
    return out


def time_paired(
    fns: dict[str, Callable[[], Any]], reference: str, repeats: int
) -> dict[str, dict[str, float]]:
    """Like `time_interleaved`, but every sample of a variant is taken right next to a sample
    of ``reference`` (which goes first alternates), and ``ratio`` is the median of these pairs.

    On a shared, loaded machine the load drifts over seconds; a ratio of two samples taken
    within milliseconds of each other is much less disturbed than a ratio of medians.
    """
    samples: dict[str, list[float]] = {n: [] for n in fns}
    ratios: dict[str, list[float]] = {n: [] for n in fns}
    paired_ref: dict[str, list[float]] = {n: [] for n in fns}  # the reference's partner samples

    def one(n):
        t0 = time.perf_counter()
        fns[n]()
        return time.perf_counter() - t0

    for r in range(repeats):
        for n in fns:
            if n == reference:
                continue
            if r % 2 == 0:
                tr, tn = one(reference), one(n)
            else:
                tn, tr = one(n), one(reference)
            samples[n].append(tn)
            samples[reference].append(tr)
            paired_ref[n].append(tr)
            ratios[n].append(tn / tr)
    ratios[reference] = [1.0]
    paired_ref[reference] = samples[reference]
    out = {}
    for n in fns:
        s = samples[n]
        out[n] = {"median": statistics.median(s), "min": min(s), "samples": len(s),
                  "ratio": statistics.median(ratios[n]),
                  "ratio_min": min(s) / min(paired_ref[n]),
                  "ratio_q1": _quantile(ratios[n], 0.25), "ratio_q3": _quantile(ratios[n], 0.75)}
    return out


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def write_result(out_dir: str | Path | None, name: str, text: str) -> Path | None:
    """Writes ``text`` to ``out_dir/name``; None writes nothing (quick runs)."""
    if out_dir is None:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path


def flops(compiled: Any) -> float:
    """FLOPs XLA counts for a compiled computation (``nan`` where it does not say)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return float("nan")
    if isinstance(ca, list):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def recipe_argv(recipe: str, argv: Sequence[str], description: str, *, seeds: int = 1,
                experiment: str | None = None) -> list[str]:
    """The ``fbalign reproduce`` command line a reproduction script (a thin wrapper around the
    recipe ``recipe``) runs for its own ``argv``: ``--quick`` is the quick budget, else the
    paper's; ``--epochs``, ``--seeds`` (default ``seeds``) and ``--out`` map across; any other
    flag goes to ``fbalign reproduce`` unchanged. ``experiment``: the one experiment the script
    runs (another is refused)."""
    import argparse

    ap = argparse.ArgumentParser(
        description=description,
        epilog="Any other flag goes to fbalign reproduce (see fbalign reproduce --help): "
               "--resume, --overwrite, --no-progress, --no-figures"
               + ("." if experiment else ", --experiment NAMES."))
    ap.add_argument("--quick", action="store_true", help="the recipe's quick budget (tests)")
    ap.add_argument("--epochs", type=int, default=None, help="cut every run to N epochs")
    ap.add_argument("--seeds", type=int, default=seeds, help=f"networks per rule (default {seeds})")
    ap.add_argument("--out", default=None, help="output directory")
    args, rest = ap.parse_known_args(list(argv))
    if experiment and any(a.startswith("--experiment") for a in rest):
        ap.error(f"this script runs the {experiment!r} experiment of {recipe}; for another, run "
                 f"fbalign reproduce {recipe} --experiment NAME")
    out = ["reproduce", recipe, *(["--experiment", experiment] if experiment else []),
           "--budget", "quick" if args.quick else "paper", "--seeds", str(args.seeds)]
    out += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    out += ["--out", args.out] if args.out else []
    return out + rest


def run_recipe(cmd: list[str]) -> int:
    """Prints and runs the ``fbalign`` command ``cmd``; returns its exit status."""
    from fbalign.cli import main as fbalign_main

    print("fbalign " + " ".join(cmd), flush=True)
    return fbalign_main(cmd)
