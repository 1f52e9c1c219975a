"""``fbalign reproduce``: papers' experiments rerun from recipes stored as data.

A recipe (``fbalign/recipes/<name>.toml``) holds one paper's setup as ``fbalign train`` options
(``[defaults]`` for every experiment, each ``[[experiment]]``'s own, ``rule_options`` per rule,
``quick`` overrides for the seconds-long budget), the paper's numbers beside them
(``paper``, ``paper_spread``, ``source``), and what the paper leaves open or our options cannot
express (``silent``, ``cannot_express``, ``notes``). Every key and value is checked against the
``train`` options when the recipe is loaded, so a misspelt option never runs silently.

``fbalign reproduce NAME --budget quick|paper`` trains each experiment's rules (``--seeds K``
networks each, one ensemble per rule), writes one run directory per rule (checkpointed, so
``--resume`` continues an interrupted reproduction) and ``report.md``: the paper's number and
ours side by side, the setup, the machine, the budget ("reduced" when ``--epochs`` cut it), the
recipe's notes and a figure per experiment (``--no-figures`` leaves them out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fbalign._src import cli
from fbalign._src.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from fbalign._src.plot import machine_line, plot_runs, run_finished
from fbalign._src.registry import RULES
from fbalign._src.rule_args import UsageError, check_rule_builds, parse_rule_args

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BUDGETS = ("quick", "paper")
_TOP = {"name", "title", "cite", "url", "notes", "defaults", "experiment"}
_EXPERIMENT = {"name", "rules", "paper", "paper_spread", "paper_metric", "source", "silent",
               "cannot_express", "notes", "rule_options", "quick", "rule_args",
               "quick_claims", "quick_max_error", "quick_rules", "quick_skip"}
# train options a recipe may not set: where and how a run is kept, not what it computes
_NOT_IN_RECIPES = {"rule", "rule_arg", "out", "overwrite", "resume", "no_progress", "seeds",
                   "devices", "coordinator", "num_processes", "process_id", "connect_timeout",
                   "func", "help"}


class RecipeError(UsageError):
    """A recipe that names an unknown option or a value ``fbalign train`` would refuse."""


def train_actions() -> dict[str, argparse.Action]:
    """The ``fbalign train`` options a recipe can set: destination name -> argparse action."""
    sub = cli.build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    return {a.dest: a for a in sub._actions  # noqa: SLF001
            if a.option_strings and a.dest not in _NOT_IN_RECIPES}


def _as_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _check_options(options: Any, where: str, actions: dict[str, argparse.Action]) -> None:
    """RecipeError naming ``where`` and the key for an unknown option or a refused value."""
    if not isinstance(options, dict):
        raise RecipeError(f"{where}: expected a table of train options, got {options!r}")
    for key, value in options.items():
        action = actions.get(key)
        if action is None:
            raise RecipeError(f"{where}: unknown option {key!r}; valid: "
                              f"{', '.join(sorted(actions))}")
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
            continue
        try:
            typed = action.type(_as_text(value)) if callable(action.type) else _as_text(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise RecipeError(f"{where}: {key} = {value!r} is not a valid "
                              f"{action.option_strings[0]} ({err})") from None
        if action.choices is not None and typed not in action.choices:
            raise RecipeError(f"{where}: {key} = {value!r} is not a valid "
                              f"{action.option_strings[0]}; valid: "
                              f"{', '.join(map(str, action.choices))}")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe read from its TOML file and checked (`RecipeError` names what is wrong)."""
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    actions = train_actions()
    where = f"recipe {path.name}"
    unknown = set(recipe) - _TOP
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(_TOP))}")
    for key in ("name", "title", "cite"):
        if not isinstance(recipe.get(key), str):
            raise RecipeError(f"{where}: needs {key} = \"...\"")
    _check_options(recipe.get("defaults", {}), f"{where} [defaults]", actions)
    experiments = recipe.get("experiment")
    if not experiments:
        raise RecipeError(f"{where}: needs at least one [[experiment]]")
    for exp in experiments:
        _check_experiment(exp, f"{where} experiment {exp.get('name', '?')!r}", actions)
    return recipe


def _check_experiment(exp: dict, where: str, actions: dict) -> None:
    options = {k: v for k, v in exp.items() if k not in _EXPERIMENT}
    _check_options(options, where, actions)
    if not isinstance(exp.get("name"), str):
        raise RecipeError(f"{where}: needs name = \"...\"")
    rules = exp.get("rules")
    if not isinstance(rules, list) or not rules:
        raise RecipeError(f"{where}: needs rules = [\"bp\", ...]")
    bad = [r for r in rules if r not in RULES]
    if bad:
        raise RecipeError(f"{where}: unknown rule(s) {', '.join(bad)}; valid: "
                          f"{', '.join(RULES)}")
    for rule, opts in exp.get("rule_options", {}).items():
        if rule not in rules:
            raise RecipeError(f"{where}: rule_options for {rule!r}, which is not in its rules")
        _check_options(opts, f"{where} rule_options.{rule}", actions)
    _check_options(exp.get("quick", {}), f"{where} quick", actions)
    _check_rule_args(exp, rules, where)
    for rule in set(exp.get("paper", {})) | set(exp.get("paper_spread", {})):
        if rule not in rules:
            raise RecipeError(f"{where}: a paper number for {rule!r}, which is not in its rules")
    if not set(exp.get("quick_rules", rules)) <= set(rules):
        raise RecipeError(f"{where}: quick_rules must be some of its rules {rules}")
    quick_rules = exp.get("quick_rules", rules)
    for claim in exp.get("quick_claims", []):
        if (not isinstance(claim, list) or len(claim) != 3 or claim[1] not in ("<", ">")
                or not {claim[0], claim[2]} <= set(quick_rules)):
            raise RecipeError(f"{where}: quick_claims entries are [rule, \"<\" or \">\", rule] "
                              f"over the rules its quick budget runs, got {claim!r}")


def _check_rule_args(exp: dict, rules: list[str], where: str) -> None:
    """Each rule's ``rule_args`` parsed as ``--rule-arg`` parses them and the rule built with
    them, so a value the rule refuses stops the recipe when it loads, not when that rule is
    about to train (after the rules before it)."""
    for rule, kw in exp.get("rule_args", {}).items():
        if rule not in rules:
            raise RecipeError(f"{where}: rule_args for {rule!r}, which is not in its rules")
        try:
            check_rule_builds(rule, parse_rule_args(
                rule, [f"{k}={_as_text(v)}" for k, v in kw.items()]))
        except UsageError as err:
            raise RecipeError(f"{where} rule_args.{rule}: {err}") from None


def recipes() -> dict[str, dict[str, Any]]:
    """Every shipped recipe, by name (each checked when loaded)."""
    out = {}
    for path in sorted(RECIPES.glob("*.toml")):
        recipe = load_recipe(path)
        out[recipe["name"]] = recipe
    return out


def budget_rules(exp: dict, budget: str) -> list[str]:
    """The rules an experiment runs at ``budget`` (``quick_rules`` may name fewer; none with
    ``quick_skip``: a recipe's quick budget may sanity-check one experiment of several)."""
    if budget != "quick":
        return list(exp["rules"])
    return [] if exp.get("quick_skip") else list(exp.get("quick_rules", exp["rules"]))


def run_options(recipe: dict, exp: dict, rule: str, budget: str) -> dict[str, Any]:
    """The ``train`` options of one rule of one experiment at ``budget``: the recipe's
    defaults, then the experiment's, (quick) the quick overrides, and last the rule's own
    (``rule_options``: what the paper set for that rule, e.g. its learning rate, holds at every
    budget)."""
    opts = dict(recipe.get("defaults", {}))
    opts.update({k: v for k, v in exp.items() if k not in _EXPERIMENT})
    if budget == "quick":
        opts.update(exp.get("quick", {}))
    opts.update(exp.get("rule_options", {}).get(rule, {}))
    return opts


def train_namespace(recipe: dict, exp: dict, rule: str, budget: str, *, out: Path,
                    seeds: int, epochs: int | None, no_progress: bool) -> argparse.Namespace:
    """The ``fbalign train`` namespace of one run, parsed by the train parser itself (so every
    check and default of ``train`` applies; the recipe's options count as given)."""
    opts = run_options(recipe, exp, rule, budget)
    if epochs is not None:
        opts["epochs"] = epochs
    actions = train_actions()
    argv = ["train", "--rule", rule, "--out", str(out), "--seeds", str(seeds)]
    for key, value in opts.items():
        flag = actions[key].option_strings[0]
        if isinstance(actions[key], argparse._StoreTrueAction):  # noqa: SLF001
            argv += [flag] if value else []
        else:
            argv.append(f"{flag}={_as_text(value)}")
    for name, value in exp.get("rule_args", {}).get(rule, {}).items():
        argv.append(f"--rule-arg={name}={_as_text(value)}")
    argv += ["--no-progress"] if no_progress else []
    parser = cli.build_parser()
    ns = parser.parse_args(argv)
    ns.given_options = cli.given_options(parser, argv)
    return ns


def add_reproduce_command(sub) -> None:
    """``fbalign reproduce NAME|--list [--budget] [--seeds] [--epochs] [--out] [--resume]``."""
    p = sub.add_parser("reproduce", help="rerun a paper's experiments from its recipe and put the "
                                         "paper's numbers beside ours",
                       description="Rerun a paper's experiments from a recipe stored as data "
                                   "(fbalign/recipes/NAME.toml) and write report.md with the "
                                   "paper's numbers beside ours.")
    p.add_argument("name", nargs="?", default=None, help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="quick: seconds to a minute on small data (what the tests run); paper: "
                        "the paper's epochs and data (default quick)")
    p.add_argument("--experiment", default=None, metavar="NAMES",
                   help="comma-separated experiments of the recipe to run (default all)")
    p.add_argument("--seeds", type=cli.positive_int, default=1,
                   help="networks per rule (one vmapped ensemble; default 1)")
    p.add_argument("--epochs", type=cli.positive_int, default=None,
                   help="cut every run to N epochs (the report says the budget was reduced)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for report.md and one run per experiment and rule (default "
                        "runs/reproduce-NAME-BUDGET-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the reproduction in --out: finished runs are kept, interrupted "
                        "ones continue from their checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--no-figures", action="store_true",
                   help="write report.md without the per-experiment figures (no matplotlib "
                        "needed; the runs' metrics.jsonl keep every curve for fbalign plot)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    """``fbalign reproduce``."""
    if args.list:
        for name, recipe in recipes().items():
            exps = ", ".join(f"{e['name']} ({', '.join(e['rules'])})"
                             for e in recipe["experiment"])
            print(f"{name}: {recipe['title']}\n    {recipe['cite']}\n    experiments: {exps}")
        return 0
    found = recipes()
    if args.name not in found:
        raise UsageError(f"unknown recipe {args.name!r}; valid: {', '.join(found)} (fbalign "
                         "reproduce --list)")
    recipe = found[args.name]
    exps = _selected(recipe, args.experiment)
    base, spec = _prepare(args, recipe, exps)
    plan = [(exp, rule, _run_for(recipe, exp, rule, args, base / exp["name"] / rule))
            for exp in exps for rule in budget_rules(exp, args.budget)]
    failed = []
    for exp, rule, ns in plan:
        code = 0 if ns is None else cli.cmd_train(ns)
        if code == 130:
            print(f"fbalign: reproduction interrupted during {exp['name']}/{rule}; continue with: "
                  f"fbalign reproduce {recipe['name']} --out {base} --resume", file=sys.stderr)
            return 130
        if code != 0 or not (base / exp["name"] / rule / "summary.json").is_file():
            failed.append(f"{exp['name']}/{rule}")
    report = write_report(recipe, exps, base, spec, figures=not args.no_figures)
    print(report)
    print(f"wrote {base / 'report.md'}")
    if failed:
        print(f"fbalign: error: {', '.join(failed)} stopped before finishing; the report says so",
              file=sys.stderr)
        return 3
    return 0


def _selected(recipe: dict, names: str | None) -> list[dict]:
    exps = recipe["experiment"]
    if names is None:
        return exps
    want = [n.strip() for n in names.split(",") if n.strip()]
    valid = [e["name"] for e in exps]
    bad = [n for n in want if n not in valid]
    if bad or not want:
        raise UsageError(f"--experiment {names!r}: the recipe {recipe['name']} has experiments "
                         f"{', '.join(valid)}")
    return [e for e in exps if e["name"] in want]


def _prepare(args, recipe: dict, exps: list[dict]) -> tuple[Path, dict]:
    """The output directory (new, or the reproduction to resume) and its ``reproduce.json``."""
    spec = {"recipe": recipe["name"], "budget": args.budget, "seeds": args.seeds,
            "epochs": args.epochs, "experiments": [e["name"] for e in exps]}
    base = Path(args.out) if args.out else Path("runs") / (
        f"reproduce-{recipe['name']}-{args.budget}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        path = base / "reproduce.json"
        if args.overwrite or not path.is_file():
            raise UsageError(f"--resume continues the reproduction in --out; {path} is missing"
                             if not args.overwrite else "pass --resume or --overwrite, not both")
        saved = json.loads(path.read_text())
        if saved != spec:
            diff = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in spec.items()
                             if saved.get(k) != v)
            raise UsageError(f"--resume: {base} was started with other options: {diff}")
        return base, spec
    ns = argparse.Namespace(out=str(base), overwrite=args.overwrite, rule="reproduce",
                            dataset="")
    base = cli.prepare_out(ns)
    (base / "reproduce.json").write_text(json.dumps(spec, indent=2) + "\n")
    for exp in exps:  # every run checked before the first one trains
        for rule in budget_rules(exp, args.budget):
            cli.check_run_options(_namespace(recipe, exp, rule, args, base / exp["name"] / rule))
    return base, spec


def _namespace(recipe, exp, rule, args, out: Path) -> argparse.Namespace:
    ns = train_namespace(recipe, exp, rule, args.budget, out=out, seeds=args.seeds,
                         epochs=args.epochs, no_progress=args.no_progress)
    ns.overwrite = True
    return ns


def _run_for(recipe, exp, rule, args, out: Path) -> argparse.Namespace | None:
    """What one run still needs: None (finished), ``train --resume`` of its run (it has a
    checkpoint), or a new run."""
    want = _namespace(recipe, exp, rule, args, out)
    if run_finished(out, want.epochs):
        return None
    if args.resume and (out / "config.json").is_file() and latest_checkpoint(out / CHECKPOINT_DIR):
        argv = ["train", "--resume", str(out)] + (["--no-progress"] if args.no_progress else [])
        parser = cli.build_parser()
        ns = parser.parse_args(argv)
        ns.given_options = cli.given_options(parser, argv)
        return ns
    return want


def results(base: Path, exp: dict, budget: str) -> dict[str, dict | None]:
    """Each rule's finished ``summary.json`` in an experiment's directory (None if it stopped)."""
    out = {}
    for rule in budget_rules(exp, budget):
        path = base / exp["name"] / rule / "summary.json"
        out[rule] = json.loads(path.read_text()) if path.is_file() else None
    return out


def _ours(summary: dict | None, metric: str) -> list[float] | None:
    if summary is None or metric not in summary:
        return None
    v = summary[metric]
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


def check_claims(exp: dict, res: dict[str, dict | None]) -> list[str]:
    """The quick budget's checks that fail: every rule below ``quick_max_error`` (default 50%)
    test error, and each ``quick_claims`` ordering ``[a, "<", b]`` of mean test errors."""
    import numpy as np

    metric = exp.get("paper_metric", "test_error")
    means = {r: float(np.mean(v)) for r in res if (v := _ours(res[r], metric)) is not None}
    bad = [f"{r}: no result" for r in res if r not in means]
    limit = exp.get("quick_max_error", 50.0 if metric == "test_error" else None)
    bad += [f"{r}: {m:.2f} >= {limit}" for r, m in means.items()
            if limit is not None and m >= limit]
    for a, op, b in exp.get("quick_claims", []):
        if a in means and b in means and not (means[a] < means[b] if op == "<"
                                              else means[a] > means[b]):
            bad.append(f"{a} {op} {b} does not hold ({means[a]:.2f} vs {means[b]:.2f})")
    return bad


def write_report(recipe: dict, exps: Sequence[dict], base: Path, spec: dict, *,
                 figures: bool = True) -> str:
    """``report.md``: per experiment, the paper's numbers beside ours, then the notes; with
    ``figures``, each experiment's figure (``<experiment>.png``, `plot_runs`) beside it."""
    budget = spec["budget"] + (f", reduced to {spec['epochs']} epochs" if spec["epochs"] else "")
    lines = [f"# {recipe['title']}", "", recipe["cite"], "",
             f"Budget: {budget}; {spec['seeds']} seed(s) per rule. Machine: {machine_line()}", ""]
    for exp in exps:
        lines += _section(recipe, exp, base, spec, budget, figures)
    if recipe.get("notes"):
        lines += ["## Notes", "", recipe["notes"].strip(), ""]
    text = "\n".join(lines)
    (base / "report.md").write_text(text + "\n")
    return text


def _section(recipe: dict, exp: dict, base: Path, spec: dict, budget: str,
             figures: bool) -> list[str]:
    """One experiment's part of the report: setup, table, notes and (``figures``) figure."""
    rules = budget_rules(exp, spec["budget"])
    if not rules:
        return [f"## {exp['name']}", "", f"Not run at the {spec['budget']} budget.", ""]
    res = results(base, exp, spec["budget"])
    opts = run_options(recipe, exp, rules[0], spec["budget"])
    lines = [f"## {exp['name']}", "", "Setup (ours): " + ", ".join(
        f"{k}={_as_text(v)}" for k, v in opts.items()) + (
        f"; epochs cut to {spec['epochs']}" if spec["epochs"] else ""), ""]
    per_rule = {r: {**exp.get("rule_options", {}).get(r, {}),
                    **exp.get("rule_args", {}).get(r, {})} for r in rules}
    if any(per_rule.values()):
        lines += ["Per rule: " + "; ".join(
            f"{r}: " + ", ".join(f"{k}={_as_text(v)}" for k, v in o.items())
            for r, o in per_rule.items() if o) + ".", ""]
    lines += _table(exp, rules, res) + [""] + _notes(exp, spec, res)
    done = [base / exp["name"] / r for r in rules if res[r] is not None]
    if done and figures:
        plot_runs(done, base / f"{exp['name']}.png", labels=[d.name for d in done], bar=True,
                  title=f"{recipe['name']} {exp['name']} ({budget})")
        lines += [f"![{exp['name']}]({exp['name']}.png)", ""]
    return lines


def _table(exp: dict, rules: list[str], res: dict) -> list[str]:
    """The paper's number (and spread) beside our mean +- std and per-seed values, per rule."""
    import numpy as np

    metric = exp.get("paper_metric", "test_error")
    paper, spread = exp.get("paper", {}), exp.get("paper_spread", {})
    f = "{:.2f}" if metric == "test_error" else "{:.4g}"
    lines = [f"| rule | paper {metric.replace('_', ' ')} | ours, mean +- std | per seed | epochs |",
             "|---|---|---|---|---|"]
    for rule in rules:
        p = paper.get(rule)
        ptxt = "not reported" if p is None else f"{p}" + (
            f" +- {spread[rule]}" if rule in spread else "")
        ours = _ours(res[rule], metric)
        if ours is None:
            lines.append(f"| `{rule}` | {ptxt} | stopped (see {exp['name']}/{rule}) | | |")
            continue
        lines.append(f"| `{rule}` | {ptxt} | {f.format(np.mean(ours))} +- "
                     f"{f.format(np.std(ours))} | {', '.join(f.format(v) for v in ours)} | "
                     f"{res[rule].get('epoch')} |")
    return lines


def _notes(exp: dict, spec: dict, res: dict) -> list[str]:
    out = [f"Paper numbers: {exp.get('source', 'not given')}."]
    for key, head in (("silent", "Where the paper is silent (our choice)"),
                      ("cannot_express", "What our options cannot express (closest choice)")):
        if exp.get(key):
            out += ["", f"{head}:"] + [f"- {s}" for s in exp[key]]
    if exp.get("notes"):
        out += ["", exp["notes"].strip()]
    if spec["budget"] == "quick":
        bad = check_claims(exp, res)
        out += ["", "Quick-budget checks: " + ("all hold." if not bad else "; ".join(bad))]
    return out + [""]
