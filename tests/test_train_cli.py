"""Training harness and the ``fbalign train`` command."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign.cli import build_parser, main
from fbalign.data import load_digits, load_teacher
from fbalign.train import evaluate, fit


@pytest.fixture(scope="module")
def small():
    return load_teacher(seed=0, n_train=256, n_test=128, input_dim=8, output_dim=3)


def test_fit_is_deterministic_given_seed(small, tmp_path):
    m = fb.mlp((8, 16, 3))
    a = fit(m, "dfa", optax.adam(1e-2), small, epochs=2, batch_size=32, seed=3, progress=False,
            log_every=3, out_dir=tmp_path)
    b = fit(m, "dfa", optax.adam(1e-2), small, epochs=2, batch_size=32, seed=3, progress=False)
    c = fit(m, "dfa", optax.adam(1e-2), small, epochs=2, batch_size=32, seed=4, progress=False)
    assert_trees_close(a.state.params, b.state.params, 0, 0)
    assert not np.allclose(a.state.params[0]["w"], c.state.params[0]["w"])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines == a.history
    assert all(r["kind"] == "epoch" for r in lines)
    assert {"train_loss", "train_accuracy", "test_loss", "test_error", "step"} <= set(lines[0])
    assert lines[-1]["step"] == 2 * (256 // 32)


def test_chunked_device_loop_equals_plain_python_loop(small):
    """fit's lax.scan chunks (with a remainder chunk) do exactly the steps a Python loop does."""
    from fbalign.train import init_train_state, make_train_step

    m, opt = fb.mlp((8, 16, 3)), optax.sgd(0.1)
    res = fit(m, "fa", opt, small, epochs=1, batch_size=32, seed=0, progress=False, log_every=3)
    k_init, k_shuffle = jax.random.split(jax.random.PRNGKey(0))
    state = init_train_state(m, "fa", opt, k_init)
    step = make_train_step(m, "fa", opt)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, 0), 256))
    for i in range(256 // 32):
        idx = perm[i * 32:(i + 1) * 32]
        state, _ = step(state, small.x_train[idx], small.y_train[idx])
    assert_trees_close(res.state.params, state.params, 1e-5, 1e-6)


def test_grad_form_trains_like_explicit_form(small):
    m = fb.mlp((8, 16, 16, 3))
    a = fit(m, "dfa", optax.sgd(0.1), small, epochs=2, batch_size=32, progress=False)
    b = fit(m, "dfa", optax.sgd(0.1), small, epochs=2, batch_size=32, progress=False,
            form="grad")
    assert_trees_close(a.state.params, b.state.params, 1e-4, 1e-5)


def test_evaluate_matches_numpy(small):
    m = fb.mlp((8, 16, 3))
    params = m.init(jax.random.PRNGKey(0))
    out = np.asarray(m.apply(params, jnp.asarray(small.x_test)))
    acc = np.mean(out.argmax(1) == small.y_test)
    r = evaluate(m, params, small.x_test, small.y_test, batch_size=50)  # uneven last batch
    assert r["accuracy"] == pytest.approx(acc) and r["error"] == pytest.approx(100 * (1 - acc))


def test_batch_larger_than_dataset_is_refused(small):
    with pytest.raises(ValueError, match="batch_size 1000 is larger than the training set"):
        fit(fb.mlp((8, 3)), "bp", optax.sgd(0.1), small, batch_size=1000, progress=False)


def test_cli_train_writes_run_and_prints_test_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--rule", "fa", "--dataset", "digits", "--hidden", "32", "--epochs", "2",
            "--lr", "0.01",
            "--out", str(out), "--no-progress", "--seed", "1"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fa on digits: test error ") and str(out) in line
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rule"] == "fa" and cfg["hidden"] == [32] and cfg["loss"] == "cross_entropy"
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[-1]["test_error"] < 30
    # The same run again refuses to overwrite, and keeps what was saved.
    before = (out / "metrics.jsonl").read_text()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("flag,value,msg", [
    ("--rule", "xfa", "unknown rule 'xfa'; valid: bp, fa, dfa"),
    ("--dataset", "cifar", "unknown dataset 'cifar'; valid: digits, mnist"),
    ("--activation", "swish", "unknown activation 'swish'; valid: tanh"),
    ("--optimizer", "lion", "unknown optimizer 'lion'; valid: sgd, adam, rmsprop"),
    ("--hidden", "8,x", "comma-separated positive integers"),
    ("--epochs", "0", "expected a positive int"),
])
def test_cli_rejects_bad_names_listing_valid_ones(flag, value, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", flag, value])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--rule", "bfa", "--model", "lenet5", "--form", "grad"], "rule 'bfa' updates its "
     "feedback from the activations its explicit form records, which --model lenet5 cannot "
     "provide"),
    (["--rule", "bfa", "--form", "grad"], "which --form grad cannot provide"),
    (["--rule", "dni", "--model", "lenet5", "--form", "grad"], "rule 'dni' has no jax.grad form"),
    # explicit forms stated for dense layers only, refused on LeNet-5 before any data is read
    (["--rule", "bfa", "--model", "lenet5"], "explicit form is stated for dense layers"),
    (["--rule", "dni", "--model", "lenet5"], "dni's explicit form is stated for dense layers"),
    # a rule's option that cannot apply to LeNet-5 (no conv map is a module top): a usage error
    (["--rule", "mdfa", "--rule-arg", "dilation=2", "--model", "lenet5"],
     "--rule mdfa on --model lenet5: dilation=2 sparsifies"),
    (["--rule", "cdni", "--model", "lenet5"], "convolutional synthesizers"),
])
def test_cli_refuses_rules_without_a_usable_grad_form(argv, msg, capsys, tmp_path):
    code = main(["train", "--dataset", "digits", "--no-progress", "--out",
                 str(tmp_path / "run"), *argv])
    assert code != 0
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_help_documents_every_option():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for action in train._actions:
        for opt in action.option_strings:
            assert opt in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"


def test_digits_default_run_learns():
    res = fit(fb.mlp((64, 64, 10)), "dfa", optax.adam(3e-3), load_digits(), epochs=8,
              batch_size=32, progress=False)
    assert res.history[-1]["test_error"] < 12.0


@pytest.mark.parametrize("rule,impl", [("fa", "vmap"), ("dfa", "vmap"), ("dfa", "map")])
def test_seed_ensemble_equals_separate_runs(small, rule, impl):
    m = fb.mlp((8, 16, 3))
    ens = fit(m, rule, optax.sgd(0.1), small, epochs=2, batch_size=32, seed=5, seeds=3,
              progress=False, ensemble_impl=impl)
    for i in range(3):
        single = fit(m, rule, optax.sgd(0.1), small, epochs=2, batch_size=32, seed=5 + i,
                     progress=False)
        got = jax.tree.map(lambda a, i=i: a[i], ens.state.params)
        assert_trees_close(got, single.state.params, 1e-4, 1e-5)
        assert ens.history[-1]["test_error"][i] == pytest.approx(
            single.history[-1]["test_error"], abs=1e-6)
    rec = ens.history[-1]
    assert rec["seeds"] == [5, 6, 7]
    assert rec["test_error_mean"] == pytest.approx(np.mean(rec["test_error"]))
    assert rec["test_error_std"] == pytest.approx(np.std(rec["test_error"]))


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
def test_ensemble_impl_choice_and_lenet_loop_equals_single_steps():
    """auto: a loop over networks for conv nets on CPU, vmap for dense nets; a LeNet-5
    ensemble step of either impl gives every network its own single step."""
    from fbalign.train import TrainState, ensemble_step, make_train_step, resolve_ensemble_impl

    lenet = fb.lenet5()
    assert resolve_ensemble_impl("auto", lenet) == (
        "map" if jax.default_backend() == "cpu" else "vmap")
    assert resolve_ensemble_impl("auto", fb.mlp((4, 3))) == "vmap"
    assert resolve_ensemble_impl("vmap", lenet) == "vmap"
    with pytest.raises(ValueError, match="unknown ensemble impl 'pmap'"):
        resolve_ensemble_impl("pmap", lenet)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        ensemble_step(lambda s: s, "auto")
    opt = optax.sgd(0.05)

    def init(k):
        k1, k2 = jax.random.split(k)
        p = lenet.init(k1)
        return TrainState(p, opt.init(p), lenet.init_rule_state("fa", k2, p), k,
                          jnp.zeros((), jnp.int32))

    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    ens = jax.vmap(init)(keys)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 28, 28, 1))
    y = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    step = make_train_step(lenet, "fa", opt, form="grad", jit=False)
    singles = [jax.jit(step)(init(k), x[i], y[i])[0] for i, k in enumerate(keys)]
    for impl in ("map", "vmap"):
        new, _ = jax.jit(ensemble_step(step, impl))(ens, x, y)
        for i in range(2):
            assert_trees_close(jax.tree.map(lambda a, i=i: a[i], new.params), singles[i].params,
                               1e-5, 1e-6)


def test_probe_runs_every_n_steps_and_is_logged(small, tmp_path):
    m = fb.mlp((8, 16, 3))
    probe = jax.jit(lambda st: {"w0_norm": jnp.linalg.norm(st.params[0]["w"])})
    res = fit(m, "fa", optax.sgd(0.1), small, epochs=2, batch_size=32, progress=False,
              probe_fn=probe, probe_every=4, out_dir=tmp_path)
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [4, 8, 12, 16]
    assert probes[-1]["w0_norm"] == pytest.approx(
        float(jnp.linalg.norm(res.state.params[0]["w"])), rel=1e-6)


def test_grad_form_of_label_driven_rule_and_refusal_for_stateful_rules(small):
    m = fb.mlp((8, 16, 3))
    a = fit(m, "drtp", optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False)
    b = fit(m, "drtp", optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
            form="grad")
    assert_trees_close(a.state.params, b.state.params, 1e-4, 1e-5)
    stateful = [k for k, spec in fb.RULES.items() if spec.stateful]
    refused = [k for k in stateful if fb.get_rule(k).advance is None]
    assert refused == ["bfa"]  # its top-down generative network needs a dense chain
    for name in refused:
        with pytest.raises(ValueError, match="form='explicit'"):
            fit(m, name, optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
                form="grad")
    # The others advance their state in the grad form too: one epoch equals the explicit form.
    for name in ("kp", "wm"):
        a = fit(m, name, optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False)
        b = fit(m, name, optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
                form="grad")
        assert_trees_close((a.state.params, a.state.rule_state),
                           (b.state.params, b.state.rule_state), 1e-4, 1e-5)


def test_metrics_jsonl_is_strict_json_even_with_nan_probes(small, tmp_path):
    m = fb.mlp((8, 16, 3))
    probe = jax.jit(lambda st: {"nan_metric": jnp.nan, "ok": jnp.float32(1.0)})
    fit(m, "fa", optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
        probe_fn=probe, probe_every=4, out_dir=tmp_path)

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    recs = [json.loads(s, parse_constant=reject)
            for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if r["kind"] == "probe"]
    assert probes and all(r["nan_metric"] is None and r["ok"] == 1.0 for r in probes)


@pytest.mark.parametrize("flag,value,msg", [
    ("--lr", "nan", "expected a positive float, got"),
    ("--lr", "inf", "expected a positive float, got"),
    ("--momentum", "-1", r"expected a finite float in \[0, 1\)"),
    ("--momentum", "nan", r"expected a finite float in \[0, 1\)"),
    ("--weight-decay", "-5", r"expected a finite float in \[0, inf\)"),
    ("--feedback-scale", "0", "expected a positive float"),
    ("--feedback-scale", "-1", "expected a positive float"),
    ("--feedback-scale", "nan", "expected a positive float"),
    ("--seed", str(10**20), r"expected a finite int in \[0, 4294967296\)"),
    ("--seed", "-3", r"expected a finite int in \[0, 4294967296\)"),
    ("--hidden", "", "--hidden is empty"),
])
def test_numeric_options_out_of_range_are_refused_by_the_parser(flag, value, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", f"{flag}={value}"])
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)


def test_lenet5_refuses_hidden_instead_of_ignoring_it(capsys, tmp_path):
    assert main(["train", "--model", "lenet5", "--hidden", "5", "--out",
                 str(tmp_path / "run")]) == 2
    assert "drop --hidden" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "linear", "--val-fraction", "0.1"], "the linear task has no validation split"),
    (["--dataset", "linear", "--loss", "cross_entropy"], "use --loss squared_error"),
    (["--dataset", "teacher", "--loss", "cross_entropy"], None),  # teacher classifies: fine
])
def test_dataset_and_loss_combinations_that_make_no_sense_are_refused(argv, msg, capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", *argv, "--epochs", "1", "--hidden", "8", "--no-progress", "--out",
                 str(out)])
    if msg is None:
        assert code == 0
        return
    assert code == 2 and msg in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_admm_run_gets_its_defaults_said_and_saved_and_a_probe_with_indices(tmp_path, capsys):
    """--rule admm without options: ReLU, squared error, sgd(1.0), the whole training set as one
    batch, warm_start and num_examples; each said once on stderr and kept in config.json. The
    alignment probe passes the probe examples' indices (ADMM refuses a batch without them)."""
    out = tmp_path / "admm"
    assert main(["train", "--rule", "admm", "--dataset", "digits", "--hidden", "32", "--epochs",
                 "12", "--out", str(out), "--no-progress", "--log-alignment-every", "4"]) == 0
    err = capsys.readouterr().err
    assert ("--rule admm defaults to --activation relu --loss squared_error --optimizer sgd "
            "--lr 1") in err
    assert "--rule-arg warm_start=10 --batch-size 1438 (the whole training set)" in err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["activation"], cfg["optimizer"], cfg["lr"], cfg["batch_size"]) == (
        "relu", "sgd", 1.0, 1438)
    assert cfg["rule_args"] == {"num_examples": 1438, "warm_start": 10}
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "probe" for r in recs)
    assert recs[-1]["test_error"] < 30  # closed-form solves on the full batch: ~5% (chance 90%)


@pytest.mark.parametrize("given,said", [
    (["--loss", "hinge"], "--rule-arg output_loss=hinge (for --loss hinge)"),
    (["--rule-arg", "output_loss=hinge"], "--loss hinge (for --rule-arg output_loss=hinge)"),
])
def test_admm_with_the_papers_hinge_loss_from_either_flag(given, said, tmp_path, capsys):
    """Taylor et al.'s binary hinge: --loss hinge and ADMM's output block solved for it go
    together, whichever of the two the command line names."""
    out = tmp_path / "admm"
    assert main(["train", "--rule", "admm", "--dataset", "digits", "--hidden", "16", "--epochs",
                 "1", "--out", str(out), "--no-progress", *given]) == 0
    assert said in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["loss"] == "hinge" and cfg["rule_args"]["output_loss"] == "hinge"


@pytest.mark.parametrize("argv,msg", [
    # an option the rule cannot work with, given explicitly, is refused by the rule by name
    (["--rule", "admm", "--activation", "tanh"], "ReLU only; the network has activation='tanh'"),
    (["--rule", "ff", "--hidden", "16", "--rule-arg", "skip_first_layer=true"],
     "scores labels by all but the first hidden layer"),
    (["--rule", "ff", "--activation", "tanh", "--hidden", "8,8"], "ReLU"),
])
def test_rules_refuse_networks_they_cannot_train_before_the_run(argv, msg, capsys, tmp_path):
    code = main(["train", "--dataset", "digits", "--no-progress", "--out",
                 str(tmp_path / "run"), *argv])
    assert code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sign_optimizers_from_the_cli_are_fbalign_s():
    """--optimizer rprop/signsgd/signum: the first two RProp steps on a constant gradient are
    lr and lr * 1.2 (optax 0.2.8's rprop would give 0 first); signsgd is -lr sign(g); signum
    with --momentum 0 keeps its 0.9 (0.9 * m + 0.1 * g, then the sign)."""
    from fbalign._src.cli import make_optimizer

    g = {"w": jnp.array([2.0, -3.0])}
    rp = make_optimizer("rprop", 0.1)
    st = rp.init(g)
    steps = []
    for _ in range(2):
        u, st = rp.update(g, st)
        steps.append(np.asarray(u["w"]))
    np.testing.assert_allclose(steps, [[-0.1, 0.1], [-0.12, 0.12]], rtol=1e-6)
    sg = make_optimizer("signsgd", 0.5)
    np.testing.assert_allclose(sg.update(g, sg.init(g))[0]["w"], [-0.5, 0.5])
    sm = make_optimizer("signum", 0.5)
    st = sm.init(g)
    _, st = sm.update(g, st)
    u, _ = sm.update({"w": jnp.array([-1.0, 1.0])}, st)  # 0.09*g + 0.1*(-1, 1) keeps g's sign
    np.testing.assert_allclose(u["w"], [-0.5, 0.5])


def test_ensemble_member_equals_its_single_run_with_the_shared_data_seed(tmp_path):
    """Issue 17 item 6: an ensemble shares one dataset (the teacher task and the validation
    split are drawn from --seed); member k equals the single run --seed SEED+k --data-seed
    SEED, on a dataset whose draw depends on the seed."""
    common = ["train", "--rule", "fa", "--dataset", "teacher", "--hidden", "8", "--epochs", "1",
              "--val-fraction", "0.2", "--no-progress", "--log-alignment-every", "0"]

    def last(out):
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    assert main(common + ["--seeds", "2", "--out", str(tmp_path / "ens")]) == 0
    assert main(common + ["--seed", "1", "--data-seed", "0", "--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--seed", "1", "--out", str(tmp_path / "own")]) == 0
    ens, one, own = (last(tmp_path / d) for d in ("ens", "one", "own"))
    for key in ("train_loss", "val_loss", "test_loss"):
        np.testing.assert_allclose(ens[key][1], one[key], rtol=1e-5, err_msg=key)
    assert not np.isclose(ens["val_loss"][1], own["val_loss"], rtol=1e-5)  # its own task
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert (cfg["seed"], cfg["data_seed"]) == (1, 0)


def test_no_progress_keeps_a_line_per_epoch_and_ctrl_c_says_how_to_resume(tmp_path, capsys,
                                                                          monkeypatch):
    """Issue 17 item 16: --no-progress hides the bar but keeps one line per epoch (stderr);
    "after 1 epoch"; Ctrl-C names the last checkpoint's step and the exact --resume command."""
    import fbalign._src.train as T

    out = tmp_path / "run"
    args = ["train", "--rule", "fa", "--dataset", "digits", "--hidden", "8", "--epochs", "1",
            "--no-progress", "--log-alignment-every", "0", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert re.search(r"^epoch 1: train loss \d\.\d{4}  test error \d+\.\d\d%$", captured.err,
                     flags=re.M)
    assert " after 1 epoch (" in captured.out
    real_fit = T.fit

    def fit_then_ctrl_c(*a, **kw):  # the run (a checkpoint after each epoch), then Ctrl-C
        real_fit(*a, **{**kw, "resume": False})
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "fit", fit_then_ctrl_c)
    assert main(args[:-1] + [str(tmp_path / "cut"), "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    steps = 3 * (1438 // 64)
    assert (f"interrupted; the last checkpoint is step {steps} "
            f"({tmp_path / 'cut' / 'checkpoints' / f'ckpt-{steps:09d}.msgpack'}); continue "
            f"with: fbalign train --resume {tmp_path / 'cut'}") in err


def test_out_that_is_a_file_or_cannot_be_made_is_named(tmp_path, capsys):
    """Issue 17 item 13: --out naming a file, or a path under a file, is a usage error naming
    the path (no traceback, nothing written)."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    args = ["train", "--rule", "fa", "--dataset", "digits", "--epochs", "1", "--no-progress"]
    assert main(args + ["--out", str(f)]) == 2
    assert f"--out {f} is a file, not a directory" in capsys.readouterr().err
    assert main(args + ["--out", str(f / "run")]) == 2
    assert f"cannot use --out {f / 'run'}: Not a directory" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_a_write_that_fails_mid_run_is_named_not_a_traceback(tmp_path, capsys, monkeypatch):
    import fbalign._src.cli as cli

    def full(args, out, *a):
        raise OSError(28, "No space left on device", str(out / "config.json"))

    monkeypatch.setattr(cli, "_write_config", full)
    assert main(["train", "--rule", "fa", "--dataset", "digits", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert (f"fbalign: error: cannot write {tmp_path / 'run' / 'config.json'}: No space left on "
            "device; files written before it are kept") in capsys.readouterr().err


def test_a_run_too_big_for_the_machine_fails_fast_with_the_estimate(tmp_path, capsys,
                                                                      monkeypatch):
    """Issue 17 item 12: --hidden 100000000 stops in about a second, before any allocation or
    run directory, with the estimate and the memory available."""
    import fbalign._src.cli as cli

    args = ["train", "--rule", "fa", "--dataset", "digits", "--epochs", "1", "--no-progress"]
    assert main(args + ["--hidden", "100000000", "--out", str(tmp_path / "huge")]) == 2
    err = capsys.readouterr().err
    # 64 x 1e8 + 1e8 x 10 weights, with bias, Adam's two moments and FA's feedback: ~88 GiB
    assert re.search(r"this run needs about \d+\.\d GiB \(1 x 8[78]\.\d\d GiB of params", err)
    assert "use smaller --hidden, --batch-size or --seeds" in err
    assert not (tmp_path / "huge").exists()
    # A run that fits here (~0.4 MiB, the data included), on a 64 KiB machine: refused.
    monkeypatch.setattr(cli, "_available_memory", lambda: (2**16, "a 64 KiB test machine"))
    assert main(args + ["--hidden", "32", "--out", str(tmp_path / "small")]) == 2
    assert "more than the 0.0 GiB of a 64 KiB test machine" in capsys.readouterr().err


def test_the_memory_check_counts_an_evolution_strategys_population(tmp_path, capsys,
                                                                    monkeypatch):
    """The estimate holds the population's params and noise and the members evaluated at once:
    256 members x a batch of 64 do not fit an 8 MiB machine, and the error names chunk_size;
    with chunk_size=2 the same run passes the check (it reaches the run directory)."""
    import fbalign._src.cli as cli

    monkeypatch.setattr(cli, "_available_memory", lambda: (8 * 2**20, "an 8 MiB test machine"))

    class Passed(Exception):
        pass

    def reached(args):
        raise Passed

    monkeypatch.setattr(cli, "prepare_out", reached)
    args = ["train", "--rule", "es", "--dataset", "digits", "--hidden", "32", "--epochs", "1",
            "--batch-size", "64", "--no-progress", "--out", str(tmp_path / "es"),
            "--rule-arg", "population_size=256"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "of the population" in err and "--rule-arg chunk_size=N (N < 256)" in err
    with pytest.raises(Passed):
        main(args + ["--rule-arg", "chunk_size=2"])
    # a conv net's feature maps count too (they counted 0 before: LeNet-5 has no `sizes`)
    lenet = fb.models.lenet5()
    mnist_like = load_digits()._replace(x_train=np.zeros((2, 784), np.float32))
    assert cli._activation_bytes(lenet, lenet.init(jax.random.PRNGKey(0)),
                                 mnist_like) >= 2 * 28 * 28 * 6 * 4  # conv 1: pre, out
