"""``fbalign train --rule-arg NAME=VALUE``: typed constructor options of the rule."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Sequence
from typing import Literal

import pytest

from fbalign._src import cli
from fbalign._src.cli import UsageError, build_parser, main
from fbalign._src.registry import RULES
from fbalign._src.rule_args import parse_rule_args, parse_rule_value

TINY = ["--dataset", "digits", "--hidden", "8", "--epochs", "1", "--no-progress",
        "--log-alignment-every", "0"]


def _spy_on(monkeypatch: pytest.MonkeyPatch, rule: str) -> list[dict]:
    """Replaces ``RULES[rule].make`` by a wrapper (same signature) recording its kwargs."""
    spec, calls = RULES[rule], []

    @functools.wraps(spec.make)
    def make(*args, **kwargs):
        calls.append(kwargs)
        return spec.make(*args, **kwargs)

    monkeypatch.setitem(RULES, rule, spec._replace(make=make))
    return calls


def _metrics(run) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def kp_runs(tmp_path_factory):
    """One epoch of KP with ``--rule-arg weight_decay=0.5`` (constructor spied) and without."""
    base = tmp_path_factory.mktemp("kp")
    with pytest.MonkeyPatch.context() as mp:
        calls = _spy_on(mp, "kp")
        assert main(["train", "--rule", "kp", "--rule-arg", "weight_decay=0.5",
                     "--out", str(base / "wd"), *TINY]) == 0
    assert main(["train", "--rule", "kp", "--out", str(base / "plain"), *TINY]) == 0
    return base / "wd", base / "plain", calls


# ----------------------------------------------------------------------------------------------
# The option reaches the rule, is saved, and changes training


def test_rule_arg_reaches_constructor_typed_and_is_saved(kp_runs):
    wd, plain, calls = kp_runs
    assert calls, "the kp constructor was never called"
    for kwargs in calls:  # every build of the rule (check, fit, ...) got the typed option
        assert kwargs["weight_decay"] == 0.5 and type(kwargs["weight_decay"]) is float
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["rule_args"] == {"weight_decay": 0.5}
    assert "rule_arg" not in cfg  # the raw NAME=VALUE strings are not saved
    assert json.loads((plain / "config.json").read_text())["rule_args"] == {}
    a, b = _metrics(wd)[-1], _metrics(plain)[-1]
    assert a["train_loss"] != b["train_loss"]  # strong feedback/weight decay changes training


def test_resume_rebuilds_rule_with_saved_options(kp_runs, tmp_path, monkeypatch):
    run = tmp_path / "wd"
    shutil.copytree(kp_runs[0], run)
    calls = _spy_on(monkeypatch, "kp")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress",
                 "--rule-arg", "weight_decay=5e-1"]) == 0  # the same value is fine
    assert calls and all(kw.get("weight_decay") == 0.5 for kw in calls)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["rule_args"] == {"weight_decay": 0.5}


def test_resume_refuses_changed_rule_arg(kp_runs, capsys):
    run = str(kp_runs[0])
    ns = build_parser().parse_args(["train", "--resume", run, "--rule-arg", "weight_decay=0.4"])
    with pytest.raises(UsageError, match=r"drop --rule-arg weight_decay=0.4 \(the run has "
                                         r"weight_decay=0.5"):
        cli._resume_args(ns)
    # An option the run did not set differs from the constructor default it was built with.
    ns = build_parser().parse_args(["train", "--resume", run, "--rule-arg", "learning_rate=0.5"])
    with pytest.raises(UsageError, match="drop --rule-arg learning_rate=0.5"):
        cli._resume_args(ns)
    ns = build_parser().parse_args(["train", "--resume", run, "--rule-arg", "learning_rate=0.01"])
    assert cli._resume_args(ns).rule_args == {"weight_decay": 0.5}
    before = (kp_runs[0] / "metrics.jsonl").read_text()
    assert main(["train", "--resume", run, "--epochs", "3", "--rule-arg",
                 "weight_decay=0.4"]) == 2
    assert "--rule-arg weight_decay=0.4" in capsys.readouterr().err
    assert (kp_runs[0] / "metrics.jsonl").read_text() == before  # nothing trained


def test_resume_of_run_without_rule_args_in_config(kp_runs, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(kp_runs[1], run)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["rule_args"]  # a run written before --rule-arg existed
    (run / "config.json").write_text(json.dumps(cfg))
    ns = build_parser().parse_args(["train", "--resume", str(run)])
    assert cli._resume_args(ns).rule_args == {}
    assert "weight_decay" not in cli._rule_kwargs(cli._resume_args(ns))
    ns = build_parser().parse_args(["train", "--resume", str(run), "--rule-arg",
                                    "weight_decay=0.5"])
    with pytest.raises(UsageError, match="the run has weight_decay=0.001"):
        cli._resume_args(ns)


# ----------------------------------------------------------------------------------------------
# Usage errors, before any data loads


@pytest.mark.parametrize("items,msg", [
    (["decay=1"], "rule 'kp' has no option 'decay'; valid: learning_rate, weight_decay, init, "
                  "scale, decay_params"),
    (["weight_decay=abc"], "option 'weight_decay' of rule 'kp': expected a float, got 'abc'"),
    (["weight_decay=none"], "expected a float, got 'none'"),
    (["decay_params=maybe"], "expected a bool (true/false, yes/no, 1/0), got 'maybe'"),
    (["weight_decay=1", "weight_decay=1"], "--rule-arg weight_decay given twice"),
])
def test_bad_rule_args_are_usage_errors_before_data_loads(items, msg, tmp_path, capsys,
                                                          monkeypatch):
    import fbalign._src.data as data

    def no_data(*a, **k):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(data, "load_dataset", no_data)
    argv = ["train", "--rule", "kp", "--out", str(tmp_path / "run"), *TINY]
    for item in items:
        argv += ["--rule-arg", item]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_equals_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--rule", "kp", "--rule-arg", "weight_decay"])
    assert e.value.code == 2
    assert "argument --rule-arg: expected NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_rule_args("kp", ["=3"])


def test_options_the_rule_refuses_are_usage_errors(tmp_path, capsys):
    argv = ["train", "--rule", "dni", "--rule-arg", "warmup_mode=sometimes", "--out",
            str(tmp_path / "run"), *TINY]
    assert main(argv) == 2
    assert "warmup_mode must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_flag_options_given_both_ways(capsys):
    def ns(*argv):
        args = build_parser().parse_args(["train", "--rule", "dfa", *argv])
        cli._set_rule_args(args)
        return args

    with pytest.raises(UsageError, match="contradicts --feedback-scale 0.3; set scale with "
                                         "--feedback-scale only"):
        ns("--feedback-scale", "0.3", "--rule-arg", "scale=0.5")
    with pytest.raises(UsageError, match="set init with --feedback-init only"):
        ns("--feedback-init", "uniform", "--rule-arg", "init=orthogonal")
    args = ns("--feedback-scale", "0.5", "--rule-arg", "scale=0.5")  # the same value: fine
    assert cli._rule_kwargs(args) == {"init": "gaussian", "scale": 0.5}
    args = ns("--rule-arg", "scale=0.5", "--rule-arg", "init=uniform")  # only one way: fine
    assert (args.feedback_scale, args.feedback_init) == (0.5, "uniform")
    assert cli._rule_kwargs(args) == {"init": "uniform", "scale": 0.5}


def test_help_documents_rule_arg_with_example():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    assert "--rule-arg NAME=VALUE" in text
    assert "--rule kp --rule-arg weight_decay=1e-3" in text


# ----------------------------------------------------------------------------------------------
# Parsing values by the constructor's signature


@pytest.mark.parametrize("text,hint,want", [
    ("3", int, 3), ("-2", int, -2), ("0.5", float, 0.5), ("1e-3", float, 1e-3), ("2", float, 2.0),
    ("true", bool, True), ("YES", bool, True), ("1", bool, True),
    ("False", bool, False), ("no", bool, False), ("0", bool, False),
    ("none", float | None, None), ("None", int | None, None), ("4", int | None, 4),
    ("none", str, "none"), ("adam", str, "adam"),
    ("3,4", tuple[int, ...], (3, 4)), ("(3, 4)", tuple[int, ...], (3, 4)),
    ("[1,2,3]", tuple[int, ...], (1, 2, 3)), ("7", tuple[int, ...], (7,)),
    ("(5,)", tuple[int, ...], (5,)), ("()", tuple[int, ...], ()),
    ("3,4", tuple[int, int], (3, 4)), ("0,-1", Sequence[int] | None, (0, -1)),
    ("rademacher", Literal["normal", "rademacher"], "rademacher"),
    ("2", Literal[1, 2], 2),
])
def test_parse_rule_value_by_annotation(text, hint, want):
    got = parse_rule_value(text, hint)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("text,hint,msg", [
    ("1.5", int, "expected an int"), ("x", float, "expected a float"),
    ("maybe", bool, "expected a bool"), ("2", bool, "expected a bool"),
    ("none", float, "expected a float"), ("none", bool, "expected a bool"),
    ("3", tuple[int, int], "expected a tuple of 2 ints such as 3,4"),
    ("3,x", tuple[int, ...], "expected a tuple of ints such as 3,4"),
    ("uniform", Literal["normal", "rademacher"], "expected one of 'normal', 'rademacher'"),
    ("x", float | None, "expected a float or none, got 'x'"),
])
def test_parse_rule_value_rejects(text, hint, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_rule_value(text, hint)


def test_defaults_type_decides_without_usable_annotations():
    def make(steps: Undefined = 3, rate=0.5, flag=False, sizes=(1, 2), name=None):  # noqa: F821
        return None

    opts = cli.rule_options(make)  # get_type_hints fails on `Undefined`: defaults decide
    got = {k: parse_rule_value(v, *opts[k]) for k, v in
           {"steps": "4", "rate": "1", "flag": "yes", "sizes": "5,6", "name": "none"}.items()}
    assert got == {"steps": 4, "rate": 1.0, "flag": True, "sizes": (5, 6), "name": None}
    assert type(got["rate"]) is float
    with pytest.raises(ValueError, match="expected an int"):
        parse_rule_value("4.5", *opts["steps"])


def test_parse_rule_args_types_each_rules_options():
    assert parse_rule_args("kp", ["weight_decay=0.5", "decay_params=No", "scale=none",
                                  "learning_rate=1"]) == {
        "weight_decay": 0.5, "decay_params": False, "scale": None, "learning_rate": 1.0}
    got = parse_rule_args("rbp", ["nonzeros=3", "error_bits=None", "skip=yes"])
    assert got == {"nonzeros": 3, "error_bits": None, "skip": True}
    assert type(got["nonzeros"]) is int
    assert parse_rule_args("wm", ["weight_decay=none", "steps=2"]) == {
        "weight_decay": None, "steps": 2}


def test_keyword_forwarding_constructors_expose_the_callees_named_options():
    """``dni(**kwargs)`` passes its options on to `synthetic_gradients`; ``**kwargs`` itself is
    not an option, and what the wrapper fixes (``conditioned``, SRBP's ``skip``) is refused."""
    assert parse_rule_args("dni", ["layers=(0,)", "mix=0.25", "warmup_mode=backprop",
                                   "warmup_steps=5"]) == {
        "layers": (0,), "mix": 0.25, "warmup_mode": "backprop", "warmup_steps": 5}
    with pytest.raises(UsageError, match="rule 'dni' has no option 'conditioned'; valid: layers,"):
        parse_rule_args("dni", ["conditioned=true"])
    with pytest.raises(UsageError, match="rule 'dni' has no option 'kwargs'"):
        parse_rule_args("dni", ["kwargs=1"])
    with pytest.raises(UsageError, match="'synthesizer' of rule 'dni' has no command-line form"):
        parse_rule_args("dni", ["synthesizer=linear"])
    with pytest.raises(UsageError, match="rule 'srbp' has no option 'skip'"):
        parse_rule_args("srbp", ["skip=false"])
    assert parse_rule_args("srbp", ["adaptive=true"]) == {"adaptive": True}
    with pytest.raises(UsageError, match=r"rule 'bp' has no option 'x'; valid: none"):
        parse_rule_args("bp", ["x=1"])


def test_resume_restores_tuple_options_from_json_lists(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"rule": "dni",
                                                 "rule_args": {"layers": [0], "mix": 0.1}}))
    ns = build_parser().parse_args(["train", "--resume", str(run), "--rule-arg", "layers=(0,)"])
    resumed = cli._resume_args(ns)
    assert resumed.rule == "dni" and resumed.rule_args == {"layers": (0,), "mix": 0.1}
    assert type(resumed.rule_args["layers"]) is tuple
    ns = build_parser().parse_args(["train", "--resume", str(run), "--rule-arg", "layers=0,1"])
    with pytest.raises(UsageError, match=r"drop --rule-arg layers=\(0, 1\) \(the run has "
                                         r"layers=\(0,\)"):
        cli._resume_args(ns)


def test_kolen_pollack_warns_when_the_optimizer_breaks_its_guarantee(tmp_path, capsys):
    """Issue 18 item 6: KP's B steps by plain SGD at its learning_rate and the rule adds its own
    weight decay, so another optimizer, another rate or a second decay silently keep W and B
    apart. The CLI says so once, naming what breaks it, and stays quiet when nothing does."""
    base = ["train", "--rule", "kp", "--hidden", "8", "--epochs", "1", "--no-progress",
            "--log-alignment-every", "0"]
    cases = [(["--optimizer", "adam"], "--optimizer adam steps W while B steps by plain SGD"),
             (["--optimizer", "sgd", "--lr", "0.1"], "W steps at --lr 0.1 and B at "
                                                     "learning_rate=0.01"),
             (["--optimizer", "sgd", "--lr", "0.01", "--weight-decay", "1e-4"],
              "adds a second decay")]
    for i, (extra, msg) in enumerate(cases):
        assert main(base + extra + ["--out", str(tmp_path / str(i))]) == 0
        assert msg in capsys.readouterr().err
    assert main(base + ["--optimizer", "sgd", "--lr", "0.05", "--rule-arg",
                        "learning_rate=0.05", "--out", str(tmp_path / "ok")]) == 0
    assert "Kolen-Pollack's W and B converge" not in capsys.readouterr().err
