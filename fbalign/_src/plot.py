"""Plots and reports of runs: ``fbalign plot`` and ``fbalign compare`` (lazy matplotlib).

A run directory is what ``fbalign train --out DIR`` (or ``fit(..., out_dir=DIR)``) writes:
``metrics.jsonl`` with ``"kind": "epoch"`` records (losses, test error) and ``"kind": "probe"``
records (alignment metrics, `fbalign.metrics.make_alignment_probe`), plus ``config.json``.
Seed ensembles store per-seed lists with ``<key>_mean``/``<key>_std``; plots show the mean with
a band of one standard deviation.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fbalign._src import cli
from fbalign._src.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from fbalign._src.rule_args import UsageError

LINESTYLES = ("-", "--", ":", "-.")


class RunData(dict):
    """A loaded run: ``label``, ``config`` (dict), ``epochs`` and ``probes`` (lists of records)."""


def load_run(run_dir: str | Path) -> RunData:
    """Reads ``metrics.jsonl`` (and ``config.json`` if present) of a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a run directory (fbalign train "
                                "--out)?")
    recs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not a JSON record ({err.msg} at column "
                             f"{err.colno}); the file was cut or edited. `fbalign train "
                             "--resume` repairs a record cut mid-write; else delete the line"
                             ) from None
    cfg_path = path.parent / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}, line {err.lineno}: not valid JSON ({err.msg} at column "
                         f"{err.colno}); fix or delete the file") from None
    run = RunData(
        config=cfg,
        epochs=[r for r in recs if r.get("kind", "epoch") == "epoch"],
        probes=[r for r in recs if r.get("kind") == "probe"],
        name=path.parent.name,
    )
    run["label"] = default_label(run)
    return run


def default_label(run: RunData) -> str:
    """``rule hidden [xK seeds]`` from the run's config, else the directory name."""
    cfg = run["config"]
    if "rule" not in cfg:
        return run["name"]
    hidden = cfg.get("hidden")
    label = cfg["rule"]
    if hidden:
        label += " " + "x".join(str(h) for h in hidden) if len(set(hidden)) > 1 else (
            f" {len(hidden)}x{hidden[0]}")
    if cfg.get("seeds", 1) and cfg.get("seeds", 1) > 1:
        label += f" ({cfg['seeds']} seeds)"
    return label


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """``(steps, mean, std)`` of ``key`` over records that have it (std 0 for a single seed)."""
    steps, mean, std = [], [], []
    for r in records:
        if f"{key}_mean" in r:
            m, s = r[f"{key}_mean"], r.get(f"{key}_std", 0.0)
        elif key in r and not isinstance(r[key], list):
            m, s = r[key], 0.0
        else:
            continue
        steps.append(r.get("step", len(steps)))
        mean.append(_num(m))
        std.append(_num(s))
    return steps, mean, std


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _layer_keys(runs: Sequence[RunData], prefix: str) -> list[str]:
    pat = re.compile(rf"^{prefix}_l(\d+)$")
    layers = set()
    for run in runs:
        for r in run["probes"]:
            for k in r:
                m = pat.match(k)
                if m:
                    layers.add(int(m.group(1)))
    return [f"{prefix}_l{i}" for i in sorted(layers)]


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _moves(values: Sequence[float]) -> bool:
    """Some finite value away from 0 (an angle that is not identically backprop's)."""
    return any(math.isfinite(v) and abs(v) > 1e-3 for v in values)


def _maybe_log(ax) -> None:
    """Log scale when the plotted positive values span more than a decade."""
    import numpy as np

    ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    ys = np.concatenate(ys) if ys else np.array([])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size and ys.max() / ys.min() > 10:
        ax.set_yscale("log")


def _draw(ax, steps, mean, std, **kw):
    import numpy as np

    if len(steps) == 1:  # one point: a line would draw nothing
        kw.setdefault("marker", "o")
    (line,) = ax.plot(steps, mean, **kw)
    m, s = np.asarray(mean), np.asarray(std)
    if np.any(s > 0):
        ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.18, linewidth=0)
    return line


def _matplotlib():
    """Imports matplotlib, or raises an ImportError saying what to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'fbalign[plots]' (or "
                          "pip install matplotlib)") from err
    return matplotlib


def plot_runs(
    runs: Sequence[str | Path | RunData],
    out: str | Path,
    labels: Sequence[str] | None = None,
    bar: bool = False,
    title: str | None = None,
) -> Path:
    """Writes a figure of runs overlaid: loss, test error and per-layer alignment angles.

    Panels (those with data): training loss (solid) and test loss (dashed); test error (%);
    the angle between each layer's update and the true gradient (``update_angle_l*``, one line
    style per layer); the angle between feedback and forward weights (``feedback_angle_l*``);
    with ``bar=True``, a bar chart of the final test error (mean and std over seeds).

    Args:
      runs: run directories (or `load_run` results).
      out: the image file (format from its suffix, e.g. ``.png``).
      labels: one legend label per run (default `default_label`).
      bar: add the final test error bar chart (used by ``fbalign compare``).
      title: a figure title.

    Returns:
      The path written.
    """
    # A bare Figure (no pyplot): no GUI backend, and a notebook's backend is left alone.
    mpl = _matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs = _labelled_runs(runs, labels)
    _check_drawable(runs)
    layout = _Panels.of(runs, bar)
    ncols = 2 if len(layout.panels) in (2, 4) else min(len(layout.panels), 3)
    nrows = math.ceil(len(layout.panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(layout.panels):]:
        ax.set_visible(False)
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r["label"]: colors[i % len(colors)] for i, r in enumerate(runs)}
    handles = [Line2D([], [], color=color[r["label"]], label=r["label"]) for r in runs]
    for ax, panel in zip(axes, layout.panels, strict=False):
        _draw_panel(ax, panel, runs, layout, color, handles)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _check_drawable(runs: Sequence[RunData]) -> None:
    """A `ValueError` when a run has no epoch record (an empty ``metrics.jsonl``: nothing to
    draw); a `RuntimeWarning` when all of a run's losses are NaN/Inf (it diverged: it stays in
    the legend, marked, but has no line)."""
    import warnings

    empty = [r["name"] for r in runs if not r["epochs"] and not r["probes"]]
    if empty:
        raise ValueError(f"nothing to plot for {', '.join(empty)}: its metrics.jsonl has no "
                         "records (the run was stopped before its first epoch ended)")
    for r in runs:
        if r["epochs"] and not any(_finite(series(r["epochs"], k)[1])
                                   for k in ("train_loss", "test_loss")):
            warnings.warn(f"run {r['name']} has no finite loss (it diverged): it is in the "
                          "legend, marked 'no finite values', with no line", RuntimeWarning,
                          stacklevel=3)
            r["label"] = f"{r['label']} (no finite values)"


def _labelled_runs(runs: Sequence[str | Path | RunData],
                   labels: Sequence[str] | None) -> list[RunData]:
    """The runs, loaded where given as directories, with their legend labels: ``labels`` if
    given, and equal labels told apart by the run's directory name."""
    runs = [r if isinstance(r, RunData) else load_run(r) for r in runs]
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
        for r, lab in zip(runs, labels, strict=True):
            r["label"] = lab
    names = [r["label"] for r in runs]
    for r in runs:  # disambiguate equal labels by directory name
        if names.count(r["label"]) > 1:
            r["label"] = f"{r['label']} [{r['name']}]"
    return runs


class _Panels(NamedTuple):
    """Which panels `plot_runs` draws, in order, and the per-layer angle keys they show."""

    panels: list[str]
    has_error: bool
    upd_keys: list[str]
    fb_keys: list[str]

    @classmethod
    def of(cls, runs: Sequence[RunData], bar: bool) -> _Panels:
        has_error = any(_finite(series(r["epochs"], "test_error")[1]) for r in runs)
        # Layers whose update is backprop's in every run (the output layer of the FA family)
        # add nothing but a line at 0: leave them out.
        upd_keys = [k for k in _layer_keys(runs, "update_angle")
                    if any(_moves(series(r["probes"], k)[1]) for r in runs)]
        fb_keys = _layer_keys(runs, "feedback_angle")
        # A mix of classification and regression runs shows both panels, each with its runs.
        loss_only = any(not _finite(series(r["epochs"], "test_error")[1])
                        and _finite(series(r["epochs"], "test_loss")[1]) for r in runs)
        panels = ["loss", *(["error"] if has_error else []),
                  *(["test_loss"] if loss_only or not has_error else [])]
        if upd_keys:
            panels.append("update")
        if fb_keys:
            panels.append("feedback")
        if bar and has_error:
            panels.append("bar")
        return cls(panels, has_error, upd_keys, fb_keys)


def _draw_panel(ax, panel: str, runs: Sequence[RunData], layout: _Panels, color: dict[str, Any],
                handles: list) -> None:
    """One panel of `plot_runs` on ``ax``; ``handles`` are the runs' legend entries."""
    if panel == "loss":
        _draw_loss(ax, runs, layout.has_error, color, handles)
    elif panel in ("error", "test_loss"):
        _draw_test_metric(ax, panel, runs, color, handles)
    elif panel in ("update", "feedback"):
        keys = layout.upd_keys if panel == "update" else layout.fb_keys
        _draw_angles(ax, panel, keys, runs, color, handles)
    elif panel == "bar":
        _draw_final_error(ax, runs, color)
    if panel != "bar":
        ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _draw_loss(ax, runs: Sequence[RunData], has_error: bool, color: dict[str, Any],
               handles: list) -> None:
    for r in runs:
        _draw(ax, *series(r["epochs"], "train_loss"), color=color[r["label"]], marker=".")
        st, m, s = series(r["epochs"], "test_loss")
        if st and has_error:
            _draw(ax, st, m, s, color=color[r["label"]], linestyle="--")
    _maybe_log(ax)
    ax.set_title("Loss (solid: train, dashed: test)" if has_error else "Training loss")
    ax.set_ylabel("loss")
    ax.legend(handles=handles, fontsize=8)


def _draw_test_metric(ax, panel: str, runs: Sequence[RunData], color: dict[str, Any],
                      handles: list) -> None:
    """Test error (panel ``"error"``) or, for runs without one, test loss (``"test_loss"``)."""
    key = "test_error" if panel == "error" else "test_loss"
    for r in runs:
        if panel == "test_loss" and _finite(series(r["epochs"], "test_error")[1]):
            continue  # a classification run: in the error panel
        _draw(ax, *series(r["epochs"], key), color=color[r["label"]], marker=".")
    if panel == "test_loss":
        _maybe_log(ax)
    ax.set_title("Test error (%)" if panel == "error" else "Test loss")
    ax.set_ylabel("test error (%)" if panel == "error" else "test loss")
    ax.legend(handles=handles, fontsize=8)


def _draw_angles(ax, panel: str, keys: Sequence[str], runs: Sequence[RunData],
                 color: dict[str, Any], handles: list) -> None:
    """Per-layer angles (``keys``, one line style per layer) of the runs where they move."""
    from matplotlib.lines import Line2D

    drawn = []
    for r in runs:
        curves = [(j, series(r["probes"], k)) for j, k in enumerate(keys)]
        if not any(_moves(c[1]) for _, c in curves):
            continue  # no feedback, or exactly backprop (bp): nothing to see
        drawn.append(r["label"])
        for j, (st, m, s) in curves:
            if st and _finite(m):
                _draw(ax, st, m, s, color=color[r["label"]],
                      linestyle=LINESTYLES[j % len(LINESTYLES)])
    ax.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("angle (degrees)")
    ax.set_title("Update vs backprop gradient" if panel == "update" else
                 "Feedback B vs forward weights (DFA: vs W product)")
    layer_handles = [Line2D([], [], color="black", linestyle=LINESTYLES[j % 4],
                            label=f"layer {k.rsplit('_l', 1)[1]}")
                     for j, k in enumerate(keys)]
    ax.legend(handles=[h for h in handles if h.get_label() in drawn] + layer_handles,
              fontsize=8)


def _draw_final_error(ax, runs: Sequence[RunData], color: dict[str, Any]) -> None:
    """Bars of the final test error, mean and std over seeds."""
    means, stds = [], []
    for r in runs:
        _, m, s = series(r["epochs"], "test_error")
        means.append(m[-1] if m else float("nan"))
        stds.append(s[-1] if s else 0.0)
    xs = range(len(runs))
    ax.bar(xs, means, yerr=stds, capsize=4, color=[color[r["label"]] for r in runs])
    ax.set_xticks(list(xs), [r["label"] for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_title("Final test error (mean +- std over seeds)")
    ax.set_ylabel("test error (%)")


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_plot(args) -> int:
    """``fbalign plot RUN_DIR ... --out FILE.png``."""
    labels = args.labels.split(",") if args.labels else None
    try:
        runs = [load_run(d) for d in args.runs]
        path = plot_runs(runs, args.out, labels=labels)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {path} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


def readable_epoch_axes(ax) -> None:
    """Plain numbers on a log y axis (2, 3, 5 rather than 2 x 10^0) and whole epochs on x."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def machine_line() -> str:
    """``machine, date, jax version`` for reports."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores visible, "
            f"jax {jax.__version__} ({jax.default_backend()}), "
            f"{datetime.date.today().isoformat()}")


def _fmt(v: Any, pct: bool) -> str:
    return f"{v:.2f}" if pct else f"{v:.4g}"


def compare_table(rows: Sequence[dict], key: str) -> str:
    """A Markdown table of ``rows`` (``rule``, ``mean``, ``std``, ``per_seed``, ...)."""
    pct = key == "test_error"
    head = "test error (%)" if pct else key.replace("_", " ")
    lines = [f"| rule | {head}, mean +- std | per seed | final train loss | epochs | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| `{r['rule']}` | {r['failed']} | | | | |")
            continue
        per = ", ".join(_fmt(v, pct) for v in r["per_seed"])
        lines.append(f"| `{r['rule']}` | {_fmt(r['mean'], pct)} +- {_fmt(r['std'], pct)} | "
                     f"{per} | {r['train_loss']:.4g} | {r['epochs']} | {r['wall']:.1f} |")
    return "\n".join(lines)


COMPARE_CONFIG = "compare.json"  # the options of a comparison, what --resume reads back
# What `fbalign compare --resume` may be given besides the directory (as `train --resume`).
_COMPARE_RESUMABLE = ("epochs", "on_nonfinite", "max_skips", "no_progress", "resume")


def cmd_compare(args) -> int:
    """``fbalign compare --rules bp,fa,dfa --seeds K [train options]``, or ``fbalign compare
    --resume DIR [--epochs N]``: continues every rule's run in DIR from its newest checkpoint
    (finished rules are kept as they are, or extended to more epochs)."""
    try:
        _matplotlib()  # fail before training, not after
    except ImportError as err:
        raise cli.UsageError(str(err)) from err
    base, subs, epochs = _resume_compare(args) if args.resume else _new_compare(args)
    rows, failed = [], []
    for rule, sub in subs:
        code = 0 if sub is None else cli.cmd_train(sub)
        if code == 130:  # Ctrl-C: the other rules are not started
            print(f"fbalign: compare interrupted while training {rule}; every rule's run so far "
                  f"is kept; continue the comparison with: fbalign compare --resume {base}",
                  file=sys.stderr)
            return 130
        if code != 0 or not (base / rule / "summary.json").is_file():
            failed.append(rule)
            rows.append({"rule": rule, "failed": f"stopped (exit code {code}; see "
                                                  f"{base / rule})"})
            continue
        rows.append(_compare_row(rule, base / rule, epochs))
    _write_comparison(args, base, rows, epochs)
    if failed:
        print(f"fbalign: error: {', '.join(failed)} stopped before finishing; the table "
              "records it and the other rules' results", file=sys.stderr)
        return 3
    return 0


def _new_compare(args) -> tuple[Path, list, int]:
    """A new comparison: its directory (made), ``compare.json``, and one ``train`` namespace per
    rule, every rule's options checked before the first one trains."""
    base = Path(args.out) if args.out else Path("runs") / (
        f"compare-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    spec = copy.copy(args)
    spec.out, spec.rule = str(base), "compare"
    base = cli.prepare_out(spec)  # refuses a non-empty directory unless --overwrite
    subs = [(rule, _compare_sub(args, rule, base)) for rule in args.rules]
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
              if k not in ("func", "given_options", "resume", "overwrite", "out")}
    config["given_options"] = sorted(getattr(args, "given_options", None) or ())
    (base / COMPARE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return base, subs, args.epochs


def _compare_sub(args, rule: str, base: Path):
    """The ``fbalign train`` namespace of ``rule``'s run in a comparison (checked)."""
    sub = copy.copy(args)
    sub.rule, sub.out, sub.overwrite, sub.resume = rule, str(base / rule), True, None
    cli.check_run_options(sub)
    return sub


def _resume_compare(args) -> tuple[Path, list, int]:
    """The comparison in ``args.resume`` and what each rule still needs: nothing (finished at
    the epochs asked for), ``train --resume`` of its run (a checkpoint exists), or a new run
    (never started, or stopped before its first checkpoint; said on stderr)."""
    import argparse

    base, config = _compare_config(args)
    extend = {k for k in ("epochs", "on_nonfinite", "max_skips")
              if k in (getattr(args, "given_options", None) or ())}
    epochs = args.epochs if "epochs" in extend else config["epochs"]
    if epochs != config["epochs"]:
        (base / COMPARE_CONFIG).write_text(json.dumps({**config, "epochs": epochs}, indent=2)
                                           + "\n")
    fresh = argparse.Namespace(**{**vars(args), **{
        k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}})
    fresh.given_options = set(config.get("given_options", ()))
    fresh.epochs, fresh.no_progress = epochs, args.no_progress
    for k in extend - {"epochs"}:
        setattr(fresh, k, getattr(args, k))
    subs = []
    for rule in config["rules"]:
        run = base / rule
        if run_finished(run, epochs):
            subs.append((rule, None))
        elif (run / "config.json").is_file() and latest_checkpoint(run / CHECKPOINT_DIR):
            argv = ["train", "--resume", str(run)] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in sorted(extend)]
            argv += ["--no-progress"] if args.no_progress else []
            parser = cli.build_parser()
            sub = parser.parse_args(argv)
            sub.given_options = cli.given_options(parser, argv)
            subs.append((rule, sub))
        else:
            if run.exists():
                print(f"fbalign: compare: {run} has no checkpoint to continue from; training "
                      f"{rule} again from the start", file=sys.stderr)
            subs.append((rule, _compare_sub(fresh, rule, base)))
    return base, subs, epochs


def _compare_config(args) -> tuple[Path, dict]:
    """The directory and ``compare.json`` of ``fbalign compare --resume DIR``; usage errors for
    a directory that is not a comparison and for options that would change it."""
    base = Path(args.resume)
    path = base / COMPARE_CONFIG
    if args.overwrite:
        raise cli.UsageError("--resume continues a comparison and --overwrite replaces it; pass "
                             "only one")
    if not path.is_file():
        raise cli.UsageError(f"cannot resume {base}: it has no {COMPARE_CONFIG} (pass a "
                             "directory written by fbalign compare)")
    try:
        config = json.loads(path.read_text())
        rules, start = list(config["rules"]), int(config["epochs"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise cli.UsageError(f"cannot resume {base}: {path} is not a comparison's options "
                             f"({type(err).__name__}: {err}); start a new comparison") from None
    named = set(getattr(args, "given_options", None) or ()) - set(_COMPARE_RESUMABLE)
    if named:
        raise cli.UsageError(
            f"--resume takes the comparison's options from {path} (only --epochs, "
            "--on-nonfinite, --max-skips may change); drop "
            + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(named)))
    if args.epochs < start and "epochs" in (getattr(args, "given_options", None) or ()):
        raise cli.UsageError(f"--epochs {args.epochs} is fewer than the {start} the comparison in "
                             f"{base} was started with; --resume can only extend it")
    if not rules:
        raise cli.UsageError(f"cannot resume {base}: {path} names no rules")
    return base, config


def run_finished(run: Path, epochs: int) -> bool:
    """Whether a run (of a comparison, a reproduction) finished ``epochs`` epochs: its summary
    (written last) is of that epoch (a run extended by ``--resume --epochs`` and stopped
    part-way still holds the summary of the epoch before)."""
    try:
        return json.loads((run / "summary.json").read_text()).get("epoch") == epochs
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _compare_row(rule: str, run: Path, epochs: int) -> dict:
    """A row of the comparison table from a finished run's ``summary.json``."""
    import numpy as np

    summ = json.loads((run / "summary.json").read_text())
    key = "test_error" if "test_error" in summ else "test_loss"
    vals = summ[key] if isinstance(summ[key], list) else [summ[key]]
    tl = summ.get("train_loss")
    return {"rule": rule, "key": key, "per_seed": vals, "mean": float(np.mean(vals)),
            "std": float(np.std(vals)), "epochs": epochs,
            "train_loss": float(np.mean(tl)) if tl is not None else float("nan"),
            "wall": summ.get("wall_time_s", float("nan"))}


def _write_comparison(args, base: Path, rows: list[dict], epochs: int) -> None:
    """``compare.md`` (the table, the setup and the machine) and ``compare.png``; prints the
    table."""
    config = json.loads((base / COMPARE_CONFIG).read_text())
    done = [r for r in rows if "failed" not in r]
    key = done[0]["key"] if done else "test_error"
    table = compare_table(rows, key)
    hidden = ",".join(map(str, config["hidden"])) or "none"
    seeds = config["seeds"]
    setup = (f"{config['dataset']}, {config['model']} hidden {hidden} ({config['activation']}), "
             f"{config['optimizer']} lr {config['lr']}, batch {config['batch_size']}, {epochs} "
             f"epochs, {seeds} seed{'s' if seeds > 1 else ''} from {config['seed']}")
    md = (f"# fbalign compare\n\n{setup}\n\nMachine: {machine_line()}\n\n{table}\n\n"
          f"![comparison](compare.png)\n")
    (base / "compare.md").write_text(md)
    if done:
        plot_runs([base / r["rule"] for r in done], base / "compare.png",
                  labels=[r["rule"] for r in done], bar=True, title=setup)
    print(table)
    print(f"wrote {base / 'compare.md'}" + (f" and {base / 'compare.png'}" if done else ""))
