"""Quick budgets of the issue-21 feedback-learning recipes: phaseless alignment learning
(max2024pal) and dynamic inversion (podlaski2020) learn, and their claims hold: PAL's learned
feedback beats fixed random feedback on a narrow hidden layer, dynamic inversion beats training
the output layer alone."""

from __future__ import annotations

import json

import pytest
from conftest import final_errors
from conftest import quick_reproduction_unread as quick_reproduction

pytest.importorskip("matplotlib")


@pytest.mark.slow  # an end-to-end run (16 s under pytest on 2 cores): `pytest -m slow`
def test_max2024pal_quick_budget_pal_beats_fixed_feedback_on_a_narrow_layer(tmp_path, capsys):
    out = quick_reproduction("max2024pal", tmp_path, capsys)
    err = final_errors(out / "mnist-784-100-10", ["fa", "pal"])
    # by a margin: PAL with its feedback frozen (learning_rate 1e-7) is FA with another draw of
    # B and scored 29.5 against FA's 29.8, which the plain ordering of the claims lets pass
    assert err["pal"] < err["fa"] - 5.0, err  # measured 12.5 against 29.8
    pal = json.loads((out / "mnist-784-100-10" / "pal" / "config.json").read_text())
    assert pal["rule_args"] == {"steps": 100, "tau_xi": 10.0, "tau_hp": 10.0, "dt": 1.0,
                                "noise_std": 1.0, "learning_rate": 0.01}
    assert pal["hidden"] == [10] and pal["output_activation"] == "sigmoid"


@pytest.mark.slow  # an end-to-end run (8 s under pytest on 2 cores): `pytest -m slow`
def test_podlaski2020_quick_budget_dynamic_inversion_learns_the_hidden_layer(tmp_path, capsys):
    out = quick_reproduction("podlaski2020", tmp_path, capsys)
    err = final_errors(out / "mnist-784-1000-10", ["dyninv", "shallow"])
    assert err["dyninv"] < err["shallow"] - 2.0, err  # measured 3.1 against 6.7
    di = json.loads((out / "mnist-784-1000-10" / "dyninv" / "config.json").read_text())
    assert di["rule_args"] == {"alpha": 3.0, "dt": 0.05, "steps": 100}
    assert di["activation"] == "tanh" and di["weight_decay"] == 1e-3
