"""Quick budgets of the issue-15 local-objective recipes: local error signals (nokland2019), the
HSIC bottleneck (ma2020hsic), forward-forward (hinton2022ff), PEPITA (dellaferrera2022) and
forward gradients with local losses (ren2023) train their hidden layers on the embedded digits,
and each recipe's claims hold. Only nokland2019 has paper numbers (the authors' README); the
others' rows say "not reported" beside ours."""

from __future__ import annotations

import pytest
from conftest import final_errors, quick_reproduction, quick_reproduction_unread
from conftest import run_config as config

pytest.importorskip("matplotlib")


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_nokland2019_quick_budget_local_error_signals_beat_the_output_layer_alone(
        tmp_path, capsys):
    out = quick_reproduction("nokland2019", tmp_path, capsys)
    exp = out / "mnist-mlp-predsim"
    for skipped in ("mnist-mlp-pred", "mnist-mlp-sim", "mnist-mlp-predsim-bio"):
        assert not (out / skipped).exists()  # paper-budget experiments only
    err = final_errors(exp, ["bp", "lsig", "shallow"])
    # seeds 0-3: lsig 1.7-3.1, shallow 15.0-20.6
    assert err["lsig"] < err["shallow"] - 8.0, err  # measured 2.79 against 15.04
    report = (out / "report.md").read_text()
    assert "| `lsig` | 0.62 |" in report and "| `bp` | 0.75 |" in report
    ls = config(exp, "lsig")
    assert ls["rule_args"] == {"loss": "predsim", "beta": 0.99, "head_lr": 0.0005}
    assert ls["activation"] == "leaky_relu" and config(exp, "bp")["activation"] == "relu"


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_ma2020hsic_quick_budget_hsic_layers_beat_the_output_layer_alone(tmp_path, capsys):
    out = quick_reproduction_unread("ma2020hsic", tmp_path, capsys) / "mnist-7x128"
    assert not (out / "bp").exists()  # bp at the code's SGD 1e-3 runs at the paper budget only
    err = final_errors(out, ["hsic", "shallow"])
    # seeds 0-3: hsic 4.2-5.0, shallow 32.9-39.6 (the readout alone on the random 7-layer net)
    assert err["hsic"] < err["shallow"] - 20.0, err  # measured 5.01 against 35.93
    hs = config(out, "hsic")
    assert hs["rule_args"] == {"beta": 50.0, "sigma": 5.0, "normalized": True}
    assert hs["hidden"] == [128] * 7 and hs["activation"] == "relu"


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_hinton2022ff_quick_budget_forward_forward_learns_from_goodness(tmp_path, capsys):
    out = quick_reproduction_unread("hinton2022ff", tmp_path, capsys)
    assert not (out / "mnist-4x2000").exists()  # hours on a CPU: paper budget only
    exp = out / "mnist-2x500"
    err = final_errors(exp, ["bp", "ff", "shallow"])
    assert err["ff"] < 25.0, err  # chance is 90%; measured 14.21 (seeds 0-3: 10.0-14.2)
    ff = config(exp, "ff")
    assert ff["rule_args"] == {"goodness_measure": "mean", "threshold": 2.0}
    assert ff["normalize"] == "unit"


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_dellaferrera2022_quick_budget_pepita_beats_the_output_layer_alone(tmp_path, capsys):
    out = quick_reproduction_unread("dellaferrera2022", tmp_path, capsys) / "mnist-1x1024"
    err = final_errors(out, ["bp", "pepita", "shallow"])
    # seeds 0-3: pepita 11.4-17.3, shallow 25.9-46.5 (16 hidden units: random features are weak)
    assert err["pepita"] < err["shallow"] - 10.0, err  # measured 11.42 against 35.65
    pe = config(out, "pepita")
    assert pe["rule_args"] == {"feedback_scale": 0.05}
    assert pe["optimizer"] == "sgd" and pe["lr"] == 0.1 and pe["momentum"] == 0.9


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_ren2023_quick_budget_activity_perturbation_beats_weight_perturbation(tmp_path, capsys):
    out = quick_reproduction_unread("ren2023", tmp_path, capsys)
    assert not (out / "mnist-mlp-global").exists()
    exp = out / "mnist-mlp"
    err = final_errors(exp, ["bp", "fg", "lfg", "shallow"])
    # activity perturbation with local losses against weight perturbation (the paper's first
    # claim); seeds 0-3: lfg 23.1-31.5, fg 66.6-89.7. lfg does not beat shallow (24.2-32.3)
    assert err["lfg"] < err["fg"] - 25.0, err  # measured 31.48 against 80.50
    lf = config(exp, "lfg")
    assert lf["rule_args"] == {"num_tangents": 1, "local_losses": True, "perturb": "preactivation"}
