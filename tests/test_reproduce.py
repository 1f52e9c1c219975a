"""``fbalign reproduce``: recipes are data checked when loaded, each recipe's quick budget runs
and its checks hold, the report puts the paper's numbers beside ours, and a reproduction
resumes."""

from __future__ import annotations

import json

import pytest
from conftest import mnist_dir
from conftest import quick_reproduction as _quick

import fbalign._src.cli as cli
from fbalign._src.reproduce import (
    RecipeError,
    load_recipe,
    recipes,
)
from fbalign.cli import main

pytest.importorskip("matplotlib")

GOOD = """
name = "toy"
title = "toy"
cite = "nobody 2026"
[defaults]
dataset = "digits"
hidden = [16]
epochs = 1
[[experiment]]
name = "e"
rules = ["bp", "fa"]
paper = { bp = 1.0 }
"""


def _write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads_and_names_what_it_cites():
    found = recipes()
    assert {"lillicrap2016", "akrout2019", "biotorch2021", "luo2017", "nokland2016",
            "jaderberg2017"} <= set(found)
    for recipe in found.values():
        for exp in recipe["experiment"]:
            assert exp.get("source"), (recipe["name"], exp["name"])
            assert set(exp.get("paper", {})) <= set(exp["rules"])


@pytest.mark.parametrize("change, msg", [
    (("hidden = [16]", "hiden = [16]"), "unknown option 'hiden'; valid: .*hidden"),
    (("epochs = 1", "epochs = -1"), r"epochs = -1 is not a valid --epochs"),
    (("hidden = [16]", "optimizer = \"adamw2\""), "optimizer .* valid: .*adam"),
    (('rules = ["bp", "fa"]', 'rules = ["bp", "fax"]'), "unknown rule\\(s\\) fax"),
    (("paper = { bp = 1.0 }", "paper = { dfa = 1.0 }"), "paper number for 'dfa'"),
    (("paper = { bp = 1.0 }", 'quick_claims = [["bp", "<<", "fa"]]'), "quick_claims entries"),
    (('name = "e"', 'name = "e"\nrule_options = { dfa = { lr = 0.1 } }'), "not in its rules"),
    (('title = "toy"', 'titel = "toy"'), "unknown key\\(s\\) titel"),
    # rule_args are parsed and the rule built when the recipe loads, not when the rule trains
    (('rules = ["bp", "fa"]', 'rules = ["bp", "dtp"]\nrule_args = { dtp = { noise = -0.1 } }'),
     "rule_args.dtp: rule 'dtp' refuses the options noise=-0.1"),
    # a value per feedback map parses (dtp's noise was typed as one float before)
    (('rules = ["bp", "fa"]',
      'rules = ["bp", "dtp"]\nrule_args = { dtp = { noise = [0.1, 0.2] } }'), None),
    (('name = "e"', 'name = "e"\nrule_args = { fa = { scael = 1.0 } }'), "rule_args.fa: .*scael"),
    (('name = "e"', 'name = "e"\nrule_args = { fa = { scale = -1.0 } }'),
     "rule_args.fa: .*scale must be"),
    (('name = "e"', 'name = "e"\nrule_args = { fa = { init = "bogus" } }'),
     "rule_args.fa: .*unknown feedback init 'bogus'"),
    (('name = "e"', 'name = "e"\nrule_args = { dfa = { scale = 1.0 } }'),
     "rule_args for 'dfa', which is not in its rules"),
])
def test_a_recipe_naming_an_unknown_option_or_a_bad_value_is_refused_when_loaded(
        tmp_path, change, msg):
    load_recipe(_write(tmp_path, GOOD))  # the unchanged recipe loads
    if msg is None:
        load_recipe(_write(tmp_path, GOOD.replace(*change)))
        return
    with pytest.raises(RecipeError, match=msg):
        load_recipe(_write(tmp_path, GOOD.replace(*change)))


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
@pytest.mark.skipif(mnist_dir() is None, reason="needs ../shared/data/mnist.npz")
def test_lillicrap2016_quick_budget_learns_and_shallow_stays_behind(tmp_path, capsys):
    _quick("lillicrap2016", tmp_path, capsys)


def test_akrout2019_quick_budget_learns_and_kp_beats_fa(tmp_path, capsys, monkeypatch):
    out = _quick("akrout2019", tmp_path, capsys)
    kp = json.loads((out / "mnist-784-500-10" / "kp" / "config.json").read_text())
    assert kp["rule_args"] == {"learning_rate": 0.3, "weight_decay": 0.0} and kp["lr"] == 0.3
    # --resume with the same options: every run finished, nothing trains, the report is rewritten
    trained = []
    monkeypatch.setattr(cli, "cmd_train", lambda ns: trained.append(ns) or 0)
    (out / "report.md").unlink()
    assert main(["reproduce", "akrout2019", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert trained == [] and (out / "report.md").is_file()
    assert main(["reproduce", "akrout2019", "--out", str(out), "--resume", "--seeds", "2"]) == 2
    assert "started with other options: seeds 1 (now 2)" in capsys.readouterr().err
    assert main(["reproduce", "akrout2019", "--out", str(out)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(mnist_dir() is None, reason="needs ../shared/data/mnist.npz")
def test_biotorch2021_quick_budget_learns_on_lenet(tmp_path, capsys):
    _quick("biotorch2021", tmp_path, capsys)


def test_list_and_unknown_names(capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in recipes())
    assert main(["reproduce", "nope"]) == 2
    assert "unknown recipe 'nope'; valid: " in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
def test_luo2017_quick_budget_learns_with_bidirectional_feedback(tmp_path, capsys):
    out = _quick("luo2017", tmp_path, capsys)
    report = (out / "report.md").read_text()
    assert report.count("Not run at the quick budget.") == 5  # quick_skip: one experiment runs
    bfa = json.loads((out / "mnist-1x400" / "bfa" / "config.json").read_text())
    assert bfa["rule_args"]["activation"] == "tanh"


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
def test_innocenti2024_quick_budget_predictive_coding_learns(tmp_path, capsys):
    out = _quick("innocenti2024", tmp_path, capsys)
    pc = json.loads((out / "mnist-784-300-300-10" / "pc" / "config.json").read_text())
    assert pc["rule_args"] == {"steps": 200, "step_size": 0.1} and pc["hidden"] == [32, 32]


def test_scellier2017_quick_budget_equilibrium_propagation_learns(tmp_path, capsys):
    out = _quick("scellier2017", tmp_path, capsys)
    ep = json.loads((out / "mnist-784-500-10" / "ep" / "config.json").read_text())
    assert ep["model"] == "hopfield" and ep["rule_args"]["random_sign"] is True
    assert ep["lr_scales"] == [1.0, 0.5]  # the paper's per-layer rates 0.1, 0.05
    assert not (out / "mnist-784-500-500-10").exists()  # quick_skip


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
@pytest.mark.parametrize("name, exp, rules", [
    ("laborieux2021", "mnist-784-512-10", ("ep", "bp")),
    ("laborieux2022holo", "mnist-784-256-256-10", ("ep",)),
])
def test_laborieux_quick_budgets_train_the_prototypical_network(tmp_path, capsys, name, exp,
                                                                rules):
    out = _quick(name, tmp_path, capsys)  # every rule below the recipe's quick_max_error
    for rule in rules:
        cfg = json.loads((out / exp / rule / "config.json").read_text())
        assert cfg["hopfield_dynamics"] == "prototypical"
        assert cfg["activation"] == "steep_sigmoid"


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
def test_millidge2020ar_quick_budget_activation_relaxation_learns(tmp_path, capsys):
    out = _quick("millidge2020ar", tmp_path, capsys)
    ar = json.loads((out / "mnist-784-300-300-100-10" / "ar" / "config.json").read_text())
    assert ar["rule_args"] == {"steps": 100, "step_size": 0.1} and ar["lr"] == 0.1


@pytest.mark.slow  # an end-to-end run (about a minute): `pytest -m slow`
def test_kunin2020_quick_budget_learned_feedback_beats_fa(tmp_path, capsys):
    out = _quick("kunin2020", tmp_path, capsys)
    ia = json.loads((out / "mnist-4x256-relu" / "ia" / "config.json").read_text())
    assert ia["rule_args"] == {"source": "noise"}


@pytest.mark.slow  # an end-to-end LeNet-5 run (about two minutes): `pytest -m slow`
@pytest.mark.skipif(mnist_dir() is None, reason="needs ../shared/data/mnist.npz")
def test_han2020_quick_budget_modular_and_hybrid_dfa_beat_dfa(tmp_path, capsys):
    out = _quick("han2020", tmp_path, capsys)
    mdfa = json.loads((out / "mnist-lenet" / "mdfa" / "config.json").read_text())
    assert mdfa["rule_args"] == {"modules": [2, 3]}
