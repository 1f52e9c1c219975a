"""Sweeps (issue 20 item 1): a grid of configurations trained in one compiled program, each
configuration equal to its own single `fit` run; the grid's order; refused axes; the CLI."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign._src.sweep import add_sweep_command
from fbalign.data import Dataset
from fbalign.sweep import check_grid, grid_configs, parse_grid, sweep
from fbalign.train import fit

EPOCHS, BATCH = 2, 16


def _data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    return Dataset("toy", x[:64], y[:64], x[:0], y[:0], x[64:], y[64:], 3)


DATA = _data()
MODEL = fb.mlp((6, 8, 3), activation="tanh")


def _single(rule, optimizer, cfg, **rule_kwargs):
    return fit(MODEL, rule, optimizer, DATA, seed=cfg.get("seed", 0), rule_kwargs=rule_kwargs,
               epochs=EPOCHS, batch_size=BATCH, progress=False, on_nonfinite=None)


def _assert_same_run(result, i, single):
    """Configuration ``i`` of the sweep ended where the single run ended, epoch by epoch."""
    got = result.state(i)
    assert_trees_close(got.params, single.state.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(got.rule_state, single.state.rule_state, rtol=1e-5, atol=1e-6)
    assert int(got.step) == int(single.state.step) == EPOCHS * (len(DATA.x_train) // BATCH)
    for mine, theirs in zip(result.history[i], single.history, strict=True):
        for k in ("train_loss", "train_accuracy", "test_loss", "test_error"):
            np.testing.assert_allclose(mine[k], theirs[k], rtol=1e-5, err_msg=k)


def test_every_configuration_equals_its_single_fit_run_with_traced_rule_options():
    # kp's learning_rate/weight_decay are Python floats in its closure: built from tracers
    # inside the vmapped function, so the whole 2x2x2 grid is one program. chunk=3 runs it as
    # lax.map over vmapped chunks of 3 (with a remainder of 2).
    grid = {"seed": [0, 1], "lr": [0.05, 0.2], "weight_decay": [0.0, 0.01]}
    with jax.default_matmul_precision("highest"):
        res = sweep(MODEL, "kp", DATA, grid=grid, optimizer="sgd", epochs=EPOCHS,
                    batch_size=BATCH, chunk=3)
        assert res.programs == 1 and res.static_axes == ()
        assert res.configs == grid_configs(grid)
        for i in (0, 7):  # every value of every axis appears in these two
            c = res.configs[i]
            _assert_same_run(res, i, _single("kp", optax.sgd(c["lr"]), c,
                                             weight_decay=c["weight_decay"]))
    # the configurations really differ (the traced options took effect)
    p = [np.asarray(res.state(i).params[0]["w"]) for i in range(8)]
    assert all(not np.allclose(p[0], p[j]) for j in range(1, 8))
    # the table: one row per configuration in grid order, the lowest test error in bold
    rows = res.table().splitlines()[2:]
    assert len(rows) == 8
    errs = [r["test_error"] for r in res.final]
    best = [row for row in rows if "**" in row]
    assert len(best) == 1 and f"**{min(errs):.2f}**" in best[0]
    assert rows[5].startswith("| 5 | 1 | 0.05 | 0.01 |")


def test_feedback_scale_and_adam_learning_rate_are_traced_and_equal_single_runs():
    grid = {"feedback_scale": [0.5, 2.0], "lr": [0.003, 0.03]}
    with jax.default_matmul_precision("highest"):
        res = sweep(MODEL, "fa", DATA, grid=grid, optimizer="adam", epochs=EPOCHS,
                    batch_size=BATCH, impl="vmap")
        assert res.programs == 1
        c = res.configs[3]
        assert c == {"feedback_scale": 2.0, "lr": 0.03}
        _assert_same_run(res, 3, _single("fa", optax.adam(0.03), c, scale=2.0))
    # FA's B is scale * N(0, 1) from the seed's key and never moves: scale 2 is 4x scale 0.5
    b_small = res.state(0).rule_state.feedback[1]
    b_large = res.state(2).rule_state.feedback[1]
    np.testing.assert_allclose(np.asarray(b_large), 4.0 * np.asarray(b_small), rtol=1e-6)


def test_an_option_the_rule_cannot_trace_runs_as_separate_programs():
    # sparse RBP's density sets how many channel weights each unit keeps (a count, taken with
    # round() at init): it cannot be traced, so each value is its own program; the feedback
    # scale still rides along traced.
    grid = {"density": [0.5, 1.0], "feedback_scale": [0.5, 1.0]}
    with jax.default_matmul_precision("highest"):
        res = sweep(MODEL, "sparse_rbp", DATA, grid=grid, epochs=EPOCHS, batch_size=BATCH,
                    lr=0.1, impl="map")
        assert res.static_axes == ("density",) and res.programs == 2
        c = res.configs[3]
        assert c == {"density": 1.0, "feedback_scale": 1.0}
        _assert_same_run(res, 3, _single("sparse_rbp", optax.sgd(0.1), c, density=1.0,
                                         scale=1.0))


def test_the_grid_is_the_cartesian_product_with_the_last_axis_fastest():
    grid = {"lr": [0.1, 0.01], "seed": [3, 4], "weight_decay": [0.0, 1e-3]}
    want = [
        {"lr": 0.1, "seed": 3, "weight_decay": 0.0}, {"lr": 0.1, "seed": 3, "weight_decay": 1e-3},
        {"lr": 0.1, "seed": 4, "weight_decay": 0.0}, {"lr": 0.1, "seed": 4, "weight_decay": 1e-3},
        {"lr": 0.01, "seed": 3, "weight_decay": 0.0},
        {"lr": 0.01, "seed": 3, "weight_decay": 1e-3},
        {"lr": 0.01, "seed": 4, "weight_decay": 0.0},
        {"lr": 0.01, "seed": 4, "weight_decay": 1e-3},
    ]
    assert grid_configs(grid) == want
    assert grid_configs({"seed": [5]}) == [{"seed": 5}]
    assert parse_grid(["lr=0.1,0.01", "seed=3,4"]) == {"lr": [0.1, 0.01], "seed": [3, 4]}


@pytest.mark.parametrize("axis", ["hidden", "depth", "batch_size"])
def test_a_shape_changing_axis_is_refused_naming_it(axis):
    with pytest.raises(ValueError, match=rf"grid axis '{axis}' changes the networks' shapes"):
        sweep(MODEL, "fa", DATA, grid={"lr": [0.1], axis: [8, 16]}, epochs=1, batch_size=BATCH)
    # a rule option of that name is the rule's, not the network's: weight mirror's noise batch
    assert check_grid({"batch_size": [8, 16]}, "wm").option == {"batch_size": "batch_size"}


def test_unknown_or_bad_axes_are_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown grid axis 'wieght_decay'") as err:
        check_grid({"wieght_decay": [0.1]}, "kp")
    for name in ("seed", "lr", "feedback_scale", "learning_rate", "weight_decay"):
        assert name in str(err.value).split("valid:")[1]
    with pytest.raises(ValueError, match="'bp' takes no 'scale' option"):
        check_grid({"feedback_scale": [1.0]}, "bp")
    with pytest.raises(ValueError, match="'init'.*is not numeric"):
        check_grid({"init": [1.0]}, "kp")
    with pytest.raises(ValueError, match="given built"):
        check_grid({"weight_decay": [0.1]}, fb.get_rule("kp"))
    with pytest.raises(ValueError, match="also set in rule_kwargs"):
        check_grid({"weight_decay": [0.1]}, "kp", {"weight_decay": 0.2})
    for grid, msg in (({"lr": [-0.1]}, "not positive"), ({"seed": [1.5]}, "not an integer"),
                      ({"lr": []}, "non-empty"), ({"steps": [1.5]}, "takes integers"),
                      ({"lr": [float("nan")]}, "not finite")):
        with pytest.raises(ValueError, match=msg):
            check_grid(grid, "wm")
    # a value the rule's constructor refuses is named with its configuration, before compiling
    with pytest.raises(ValueError, match=r"refuses the grid configuration \{'beta': 0.0\}"):
        sweep(fb.models.hopfield((6, 8, 3)), "ep", DATA, grid={"beta": [0.5, 0.0]}, epochs=1,
              batch_size=BATCH)


def test_cli_writes_results_and_summary(tmp_path):
    parser = argparse.ArgumentParser(prog="fbalign")
    add_sweep_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "sw"
    args = parser.parse_args(["sweep", "--rule", "fa", "--grid", "lr=0.01,0.1", "--grid",
                              "seed=0,1", "--epochs", "1", "--hidden", "8", "--batch-size",
                              "256", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["lr"], r["seed"]) for r in recs] == [(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    summary = (out / "summary.md").read_text()
    for r in recs:
        assert r["finite"] and len(r["history"]) == 1 and 0 <= r["test_error"] <= 100
        assert f"| {r['config']} | {r['lr']:g} | {r['seed']} | {r['train_loss']:.4g} |" in summary
    assert json.loads((out / "config.json").read_text())["grid"] == {"lr": [0.01, 0.1],
                                                                   "seed": [0, 1]}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in summary
    else:
        assert (out / "sweep.png").stat().st_size > 1000
    bad = parser.parse_args(["sweep", "--grid", "lr", "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="NAME=V1,V2"):  # a UsageError: fbalign exits 2
        bad.func(bad)


def test_fit_with_grid_trains_the_sweep_and_each_configuration_equals_its_single_run():
    """`fbalign.train.fit(..., grid=...)` (issue 20 item 1): a ready-made optimizer with seed and
    feedback-scale axes; configuration i equals fit(seed=..., rule_kwargs={scale: ...})."""
    grid = {"seed": [0, 3], "feedback_scale": [0.5, 1.5]}
    with jax.default_matmul_precision("highest"):
        res = fit(MODEL, "fa", optax.sgd(0.1), DATA, grid=grid, epochs=EPOCHS,
                  batch_size=BATCH, progress=False)
        assert res.configs == grid_configs(grid) and res.programs == 1
        c = res.configs[2]
        assert c == {"seed": 3, "feedback_scale": 0.5}
        _assert_same_run(res, 2, _single("fa", optax.sgd(0.1), c, scale=0.5))
        # a learning-rate axis takes the optimizer as a factory
        lrs = fit(MODEL, "bp", optax.sgd, DATA, grid={"lr": [0.05, 0.3]}, epochs=EPOCHS,
                  batch_size=BATCH, progress=False)
        _assert_same_run(lrs, 1, _single("bp", optax.sgd(0.3), {}))


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": optax.sgd(0.1), "grid": {"lr": [0.1, 0.2]}}, "pass a name"),
    ({"optimizer": "sgd", "grid": {"seed": [0, 1]}}, "must have an 'lr' axis"),
    ({"optimizer": optax.sgd(0.1), "grid": {"seed": [0]}, "seeds": 2}, "seeds=2.*'seed' axis"),
    ({"optimizer": optax.sgd(0.1), "grid": {"seed": [0]}, "on_nonfinite": "skip"},
     "on_nonfinite must be"),
    ({"optimizer": optax.sgd(0.1), "grid": {"seed": [0]}, "out_dir": "x"}, "out_dir='x'"),
    ({"optimizer": "sgd"}, "takes an optax transformation"),
])
def test_fit_with_grid_refuses_what_a_grid_run_cannot_do(kwargs, match):
    optimizer = kwargs.pop("optimizer")
    with pytest.raises((ValueError, TypeError), match=match):
        fit(MODEL, "fa", optimizer, DATA, epochs=1, batch_size=BATCH, progress=False, **kwargs)
