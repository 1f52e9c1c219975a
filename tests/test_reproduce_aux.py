"""Quick budgets of the issue-16 recipes: the auxiliary-variable and gradient-free rules
(online alternating minimisation, choromanska2019; E-MSA, li2018emsa; ADMM, taylor2016;
OpenAI-ES through evosax, salimans2017es) train their hidden layers on the embedded digits, and
each recipe's claims hold. None of the papers' numbers could be read, so every rule's row says
"not reported" beside ours."""

from __future__ import annotations

import pytest
from conftest import final_errors
from conftest import quick_reproduction_unread as quick_reproduction
from conftest import run_config as config

pytest.importorskip("matplotlib")


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_choromanska2019_quick_budget_alternating_minimisation_trains_the_hidden_layers(
        tmp_path, capsys):
    out = quick_reproduction("choromanska2019", tmp_path, capsys) / "mnist-2x100"
    err = final_errors(out, ["bp", "altmin", "shallow"])
    # shallow is altmin with its codes frozen (code_steps=0 leaves the hidden layers at their
    # draw, as shallow does): the margin is what the code step adds
    assert err["altmin"] < err["shallow"] - 4.0, err  # measured 2.51 against 10.58
    am = config(out, "altmin")
    assert am["rule_args"] == {"mu": 3e-5, "code_steps": 5, "code_lr": 1.5e-5,
                               "code_momentum": 0.9}
    assert am["optimizer"] == "adam" and am["lr"] == 0.002 and am["hidden"] == [100, 100]


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_li2018emsa_quick_budget_hamiltonian_maximisation_trains_the_hidden_layers(
        tmp_path, capsys):
    out = quick_reproduction("li2018emsa", tmp_path, capsys) / "mnist-2x100-tanh"
    err = final_errors(out, ["bp", "emsa", "shallow"])
    # shallow trains the output layer alone at SGD 1.0, E-MSA's summed ascent step (10 x 0.1):
    # E-MSA with its hidden updates zeroed scored 5.29 against shallow's 5.01 at 6 epochs
    assert err["emsa"] < err["shallow"] - 1.5, err  # measured 2.23 against 5.01
    em = config(out, "emsa")
    assert em["rule_args"] == {"rho": 0.1, "inner_steps": 10, "inner_lr": 0.1}
    # sgd at 1.0 applies the Hamiltonian maximisation as it is (theta_old - theta_new)
    assert em["optimizer"] == "sgd" and em["lr"] == 1.0 and em["momentum"] == 0.0


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_taylor2016_quick_budget_admm_trains_without_gradients(tmp_path, capsys):
    out = quick_reproduction("taylor2016", tmp_path, capsys) / "digits-relu"
    err = final_errors(out, ["bp", "admm", "shallow"])
    assert err["admm"] < 8.0, err  # chance is 90%; measured 4.74 (seeds 0-4: 4.7-8.6)
    assert err["admm"] < err["shallow"] - 2.0, err  # measured 4.74 against 8.64
    ad = config(out, "admm")
    # one full-batch step per epoch; sgd at 1.0 sets the weights to ADMM's solve
    assert ad["batch_size"] == ad["n_train"] == 1438
    assert ad["optimizer"] == "sgd" and ad["lr"] == 1.0 and ad["loss"] == "squared_error"
    assert ad["rule_args"] == {"beta": 1.0, "gamma": 10.0, "warm_start": 10,
                               "num_examples": 1438}


@pytest.mark.slow  # an end-to-end run: `pytest -m slow`
def test_salimans2017es_quick_budget_evolution_strategy_learns_from_losses_alone(
        tmp_path, capsys):
    out = quick_reproduction("salimans2017es", tmp_path, capsys) / "mnist-mlp"
    assert not (out.parent / "mnist-lenet5" / "es").exists()  # a GPU budget, not run quick
    err = final_errors(out, ["bp", "es", "shallow"])
    assert err["es"] < 6.0, err  # chance is 90%; measured 1.95 (seeds 0-4: 1.9-4.5)
    assert err["es"] < err["shallow"] - 5.0, err  # measured 1.95 against 11.14
    es = config(out, "es")
    assert es["rule_args"] == {"strategy": "open_es", "population_size": 256, "sigma": 0.03,
                               "antithetic": True, "fitness_shaping": "centered_rank"}
    assert es["optimizer"] == "adam" and es["lr"] == 0.01 and es["batch_size"] == 128
