"""Alignment diagnostics (`fbalign.metrics`), the training probe, and the plot/compare commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign.cli import main
from fbalign.data import load_teacher
from fbalign.metrics import (
    angle,
    cosine,
    downstream_products,
    feedback_kind,
    feedback_matrices,
    feedback_metrics,
    lillicrap_criterion,
    make_alignment_probe,
    norm_ratio,
    rule_deltas,
    update_gradient_metrics,
)
from fbalign.train import fit, init_train_state


def np_angle(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return jax.random.normal(k1, (16, 6)), jax.random.randint(k2, (16,), 0, 4)


# ----------------------------------------------------------------------------------------------
# Vectors


def test_angle_exact_at_identical_opposite_and_orthogonal():
    v = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
    assert float(angle(v, v)) == 0.0
    assert float(angle(v, 3.0 * v)) == pytest.approx(0.0, abs=1e-5)
    assert float(angle(v, -v)) == pytest.approx(180.0, abs=1e-4)
    e = jnp.eye(4)
    assert float(angle(e[0], e[1])) == pytest.approx(90.0, abs=1e-6)
    assert np.isnan(float(angle(v, jnp.zeros_like(v))))
    assert np.isnan(float(cosine(jnp.zeros(3), jnp.ones(3))))


def test_angle_cosine_ratio_match_numpy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=(6, 9)).astype(np.float32), rng.normal(size=(6, 9)).astype(
            np.float32)
        assert float(angle(a, b)) == pytest.approx(np_angle(a, b), abs=1e-3)
        assert float(cosine(a, b)) == pytest.approx(np.cos(np.radians(np_angle(a, b))),
                                                    abs=1e-5)
        assert float(norm_ratio(a, b)) == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b),
                                                        rel=1e-5)
    # Pytrees are concatenated into one vector.
    t1, t2 = {"a": a[:2], "b": a[2:]}, {"a": b[:2], "b": b[2:]}
    assert float(angle(t1, t2)) == pytest.approx(np_angle(a, b), abs=1e-3)


def test_lillicrap_criterion_matches_paper_notation():
    """The paper's e^T W B e with W (n_out x n_h), B (n_h x n_out), one column e per example."""
    rng = np.random.default_rng(1)
    e = rng.normal(size=(200, 3))
    w_ours, b_ours = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))  # (din, dout) each
    w_paper, b_paper = w_ours.T, b_ours  # paper: y = W h, hidden signal B e
    want = np.mean([ei @ w_paper @ b_paper @ ei > 0 for ei in e])
    assert 0.05 < want < 0.95  # a non-trivial case
    got = lillicrap_criterion(jnp.asarray(e, jnp.float32), jnp.asarray(w_ours, jnp.float32),
                              jnp.asarray(b_ours, jnp.float32))
    assert float(got) == pytest.approx(want)
    assert float(lillicrap_criterion(jnp.asarray(e), jnp.asarray(w_ours),
                                     jnp.asarray(w_ours))) == 1.0


def test_update_gradient_metrics_per_layer_against_numpy():
    rng = np.random.default_rng(2)
    u = [{"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)} for _ in range(3)]
    g = [{"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)} for _ in range(3)]
    m = update_gradient_metrics(u, g)
    for i in range(3):
        assert float(m[f"update_angle_l{i}"]) == pytest.approx(np_angle(u[i]["w"], g[i]["w"]),
                                                               abs=1e-4)
        assert float(m[f"update_norm_ratio_l{i}"]) == pytest.approx(
            np.linalg.norm(u[i]["w"]) / np.linalg.norm(g[i]["w"]), rel=1e-5)
    z = [jax.tree.map(np.zeros_like, u[0])] + u[1:]
    m = update_gradient_metrics(z, g)
    assert np.isnan(float(m["update_angle_l0"])) and float(m["update_norm_ratio_l0"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Feedback


def _explicit(model, rule, state, x, y):
    out, tape = model.forward(state.params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, y))(out)
    ups, _ = rule.update(state.params, state.rule_state, tape, err, key=state.key)
    return tape, err, ups


def test_fa_with_b_equal_w_is_backprop_everywhere(batch):
    x, y = batch
    model = fb.mlp((6, 8, 7, 4))
    st = init_train_state(model, "fa", optax.sgd(0.1), jax.random.PRNGKey(0))
    fbk = (None,) + tuple(p["w"] for p in st.params[1:])
    st = st._replace(rule_state=fb.FeedbackAlignmentState(fbk))
    m = make_alignment_probe(model, "fa", "cross_entropy", x, y)(st)
    for i in range(3):
        assert float(m[f"update_angle_l{i}"]) == pytest.approx(0.0, abs=0.05)
        assert float(m[f"update_norm_ratio_l{i}"]) == pytest.approx(1.0, rel=1e-4)
    for i in (1, 2):
        assert float(m[f"feedback_angle_l{i}"]) == pytest.approx(0.0, abs=1e-3)
        assert float(m[f"feedback_norm_ratio_l{i}"]) == pytest.approx(1.0)
        assert float(m[f"criterion_l{i}"]) == 1.0
    assert "feedback_angle_l0" not in m


def test_dfa_one_hidden_layer_with_b_equal_w_out_transposed_is_backprop(batch):
    x, y = batch
    model = fb.mlp((6, 9, 4))
    st = init_train_state(model, "dfa", optax.sgd(0.1), jax.random.PRNGKey(0))
    st = st._replace(rule_state=fb.DirectFeedbackAlignmentState((st.params[1]["w"].T, None)))
    m = make_alignment_probe(model, "dfa", "cross_entropy", x, y)(st)
    assert float(m["update_angle_l0"]) == pytest.approx(0.0, abs=0.05)
    assert float(m["feedback_angle_l0"]) == pytest.approx(0.0, abs=1e-3)
    assert float(m["criterion_l0"]) == 1.0


def test_dfa_compares_b_with_transposed_downstream_product():
    """B_l (n_out, n_l) is compared with (W_{l+1} ... W_{L-1})^T; square shapes must not hide a
    transposition."""
    model = fb.mlp((5, 4, 4, 4))
    params = model.init(jax.random.PRNGKey(1))
    w = [np.asarray(p["w"], np.float64) for p in params]
    prods = downstream_products(params)
    np.testing.assert_allclose(prods[0], w[1] @ w[2], rtol=1e-5)
    np.testing.assert_allclose(prods[1], w[2], rtol=1e-6)
    assert prods[2] is None
    good = (prods[0].T, prods[1].T, None)
    m = feedback_metrics(params, good, "dfa")
    assert float(m["feedback_angle_l0"]) == pytest.approx(0.0, abs=1e-3)
    assert float(m["feedback_angle_l1"]) == pytest.approx(0.0, abs=1e-3)
    bad = (prods[0], prods[1], None)  # transposed: same (square) shape, wrong orientation
    m = feedback_metrics(params, bad, "dfa")
    assert float(m["feedback_angle_l0"]) > 1.0 and float(m["feedback_angle_l1"]) > 1.0
    pairs = feedback_matrices(params, good, "dfa")
    assert [i for i, _, _ in pairs] == [0, 1]


def test_wrong_kind_names_the_expected_shape():
    params = fb.mlp((5, 6, 3)).init(jax.random.PRNGKey(0))
    st = fb.direct_feedback_alignment().init(jax.random.PRNGKey(1), params)
    with pytest.raises(ValueError, match=r"expected \(6, 3\)"):
        feedback_metrics(params, (None, st.feedback[0]), "fa")
    with pytest.raises(ValueError, match="unknown feedback kind"):
        feedback_metrics(params, st.feedback, "xfa")


@pytest.mark.parametrize("name,kind", [("fa", "fa"), ("dfa", "dfa"), ("usf", "sign"),
                                       ("brsf", "sign")])
def test_rule_deltas_reproduce_the_rules_own_updates(batch, name, kind):
    """The per-example deltas used by the criterion are the ones the rule itself computes."""
    x, y = batch
    model = fb.mlp((6, 8, 7, 4))
    rule = fb.get_rule(name)
    st = init_train_state(model, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    tape, err, ups = _explicit(model, rule, st, x, y)
    feedback = fb.rules.rule_feedback(rule, st.params, st.rule_state)  # brSF: hashed from a key
    deltas = rule_deltas(st.params, feedback, kind, tape, err)
    for i in range(3):
        np.testing.assert_allclose(tape.inputs[i].T @ deltas[i], ups[i]["w"], rtol=1e-4,
                                   atol=1e-6)


def test_multilayer_fa_criterion_against_numpy(batch):
    x, y = batch
    model = fb.mlp((6, 8, 7, 4))
    rule = fb.feedback_alignment()
    st = init_train_state(model, rule, optax.sgd(0.1), jax.random.PRNGKey(2))
    tape, err, _ = _explicit(model, rule, st, x, y)
    fbk = st.rule_state.feedback
    m = feedback_metrics(st.params, fbk, "fa", tape, err)
    d = np.asarray(err * tape.derivs[-1], np.float64)
    for i in (2, 1):
        wi, bi = np.asarray(st.params[i]["w"], np.float64), np.asarray(fbk[i], np.float64)
        want = np.mean([(dn @ bi.T) @ (dn @ wi.T) > 0 for dn in d])
        assert float(m[f"criterion_l{i}"]) == pytest.approx(want)
        assert float(m[f"feedback_angle_l{i}"]) == pytest.approx(np_angle(bi, wi), abs=1e-3)
        d = (d @ bi.T) * np.asarray(tape.derivs[i - 1])


def test_feedback_kind_by_name_and_by_shape():
    params = fb.mlp((5, 6, 6, 3)).init(jax.random.PRNGKey(0))
    k = jax.random.PRNGKey(1)
    for name, want in [("fa", "fa"), ("dfa", "dfa"), ("kp", "fa"), ("usf", "sign"),
                       ("drtp", "dfa"), ("bp", None), ("brsf", "sign")]:
        st = fb.get_rule(name).init(k, params)
        assert feedback_kind(name, params, st) == want, name
    assert feedback_kind(fb.feedback_alignment(), params,
                         fb.feedback_alignment().init(k, params)) == "fa"
    assert feedback_kind(fb.direct_feedback_alignment(), params,
                         fb.direct_feedback_alignment().init(k, params)) == "dfa"


# ----------------------------------------------------------------------------------------------
# The probe in `fit`


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(seed=0, n_train=256, n_test=64, input_dim=8, hidden=16, output_dim=3)


def test_probe_logs_alignment_into_metrics_jsonl(teacher, tmp_path):
    model = fb.mlp((8, 16, 16, 3))
    probe = make_alignment_probe(model, "dfa", "cross_entropy", teacher.x_train[:64],
                                 teacher.y_train[:64])
    fit(model, "dfa", optax.sgd(0.1), teacher, epochs=2, batch_size=32, progress=False,
        probe_fn=probe, probe_every=4, out_dir=tmp_path)
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [4, 8, 12, 16]
    for key in ("update_angle_l0", "update_angle_l1", "feedback_angle_l0", "feedback_angle_l1",
                "feedback_norm_ratio_l0", "criterion_l1", "probe_loss"):
        assert all(np.isfinite(r[key]) for r in probes), key
    assert all(0.0 <= r["criterion_l0"] <= 1.0 for r in probes)
    assert len([r for r in recs if r["kind"] == "epoch"]) == 2


def test_probe_on_a_seed_ensemble_equals_the_single_runs(teacher):
    model = fb.mlp((8, 16, 3))
    probe = make_alignment_probe(model, "fa", "cross_entropy", teacher.x_train[:64],
                                 teacher.y_train[:64])
    ens = fit(model, "fa", optax.sgd(0.1), teacher, epochs=1, batch_size=32, seed=3, seeds=2,
              progress=False)
    m = probe(ens.state)
    assert m["update_angle_l0"].shape == (2,)
    for i in range(2):
        one = probe(jax.tree.map(lambda a, i=i: a[i], ens.state))
        for k, v in one.items():
            assert float(m[k][i]) == pytest.approx(float(v), rel=1e-4, abs=1e-4), k


def test_cli_log_alignment_every(tmp_path, capsys):
    base = ["train", "--rule", "fa", "--dataset", "teacher", "--hidden", "16", "--epochs", "1",
            "--batch-size", "64", "--no-progress"]
    assert main(base + ["--log-alignment-every", "8", "--out", str(tmp_path / "a")]) == 0
    recs = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [8, 16, 24, 32]
    assert "feedback_angle_l1" in probes[0] and "criterion_l1" in probes[0]
    assert main(base + ["--log-alignment-every", "0", "--out", str(tmp_path / "b")]) == 0
    recs = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["epoch"]
    pytest.importorskip("matplotlib")  # single-seed runs, with and without probes, plot too
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "p.png")]) == 0
    assert _is_png(tmp_path / "p.png")


# ----------------------------------------------------------------------------------------------
# Plot and compare


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (
        path.stat().st_size > 5000)


def test_plot_and_compare_commands_write_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    args = ["compare", "--rules", "bp,dfa", "--seeds", "2", "--dataset", "digits",
            "--hidden", "16", "--epochs", "2", "--batch-size", "128", "--lr", "0.01",
            "--log-alignment-every", "4", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    for rule in ("bp", "dfa"):
        row = next(line for line in md.splitlines() if line.startswith(f"| `{rule}` |"))
        assert row in printed
        mean, std = (float(v) for v in row.split("|")[2].split("+-"))
        summ = json.loads((out / rule / "summary.json").read_text())
        assert mean == pytest.approx(np.mean(summ["test_error"]), abs=0.01)
        assert std == pytest.approx(np.std(summ["test_error"]), abs=0.01)
    assert "Machine:" in md and _is_png(out / "compare.png")
    assert main(args) == 2  # an existing comparison is not overwritten
    assert "already exists" in capsys.readouterr().err
    png = tmp_path / "plot.png"
    assert main(["plot", str(out / "bp"), str(out / "dfa"), "--out", str(png),
                 "--labels", "BP,DFA"]) == 0
    assert _is_png(png)
    assert main(["plot", str(tmp_path / "nope"), "--out", str(png)]) == 2


def test_compare_checks_every_rule_first_and_records_a_stopped_rule(tmp_path, capsys,
                                                                    monkeypatch):
    """Issue 17 item 10: a rule that cannot run is refused before any rule trains; a rule that
    stops (diverges) is recorded in the table while the others still run, and the command
    exits non-zero."""
    import fbalign._src.cli as cli
    from fbalign.cli import main

    base = ["compare", "--dataset", "digits", "--hidden", "8", "--epochs", "1", "--seeds", "1",
            "--no-progress", "--log-alignment-every", "0"]
    assert main(base + ["--rules", "bp,bfa", "--form", "grad", "--out", str(tmp_path / "a")]) == 2
    assert "rule 'bfa' updates its feedback" in capsys.readouterr().err
    assert not (tmp_path / "a" / "bp").exists()  # refused before bp trained
    real = cli.cmd_train

    def diverging_fa(sub):
        return 3 if sub.rule == "fa" else real(sub)

    monkeypatch.setattr(cli, "cmd_train", diverging_fa)
    assert main(base + ["--rules", "fa,dfa", "--out", str(tmp_path / "b")]) == 3
    md = (tmp_path / "b" / "compare.md").read_text()
    assert re.search(r"^\| `fa` \| stopped \(exit code 3; see .*\) \|", md, flags=re.M)
    assert re.search(r"^\| `dfa` \| \d+\.\d+ \+- ", md, flags=re.M)
    assert (tmp_path / "b" / "compare.png").is_file()
    assert "fa stopped before finishing" in capsys.readouterr().err


def _fake_run(d, records, config=None):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (d / "config.json").write_text(config)
    return d


def test_plots_never_hide_a_run_silently(tmp_path):
    """Issue 17 item 15: a single probe point gets a marker; an empty metrics.jsonl is an error
    naming the run; an all-NaN run warns and is marked in the legend; classification and
    regression runs together get both an error and a test-loss panel; a bad config.json line is
    named."""
    import warnings

    from matplotlib.figure import Figure

    from fbalign._src import plot as P

    ax = Figure().subplots()
    assert P._draw(ax, [5], [30.0], [0.0]).get_marker() == "o"
    assert P._draw(ax, [5, 6], [30.0, 31.0], [0.0, 0.0]).get_marker() in ("None", None, "")
    cls = _fake_run(tmp_path / "cls", [{"kind": "epoch", "epoch": 1, "step": 10,
                                        "train_loss": 1.0, "test_loss": 1.1,
                                        "test_error": 30.0}])
    reg = _fake_run(tmp_path / "reg", [{"kind": "epoch", "epoch": 1, "step": 10,
                                        "train_loss": 0.5, "test_loss": 0.6}])
    both = [P.load_run(cls), P.load_run(reg)]
    assert P._Panels.of(both, False).panels == ["loss", "error", "test_loss"]
    assert P.plot_runs([cls, reg], tmp_path / "mix.png").is_file()
    _fake_run(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="nothing to plot for empty: its metrics.jsonl has no"):
        P.plot_runs([cls, tmp_path / "empty"], tmp_path / "e.png")
    nan = _fake_run(tmp_path / "nan", [{"kind": "epoch", "epoch": 1, "step": 10,
                                        "train_loss": None, "test_loss": None,
                                        "test_error": None}])
    runs = [P.load_run(cls), P.load_run(nan)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P.plot_runs(runs, tmp_path / "nan.png")
    assert any("run nan has no finite loss" in str(w.message) for w in caught)
    assert runs[1]["label"].endswith("(no finite values)")
    bad = _fake_run(tmp_path / "badcfg", [{"kind": "epoch", "epoch": 1, "train_loss": 1.0}],
                    config='{"rule": "fa",\n "lr": }')
    with pytest.raises(ValueError, match=f"{bad / 'config.json'}, line 2: not valid JSON"):
        P.load_run(bad)


def test_compare_resume_extends_and_continues_an_interrupted_comparison(tmp_path, capsys,
                                                                        monkeypatch):
    """Issue 17 item 10: ``compare --resume DIR`` continues a comparison: an interrupted rule
    from its checkpoint (or from the start when it has none), finished rules kept as they are,
    and ``--epochs`` extends every rule; the table equals that of an uninterrupted comparison."""
    pytest.importorskip("matplotlib")
    import fbalign._src.cli as cli
    from fbalign.cli import main

    base = ["compare", "--dataset", "digits", "--hidden", "8", "--seeds", "1", "--batch-size",
            "128", "--lr", "0.01", "--no-progress", "--log-alignment-every", "0",
            "--rules", "bp,fa"]
    assert main(base + ["--epochs", "2", "--out", str(tmp_path / "ref")]) == 0
    ref = (tmp_path / "ref" / "compare.md").read_text()
    real, trained = cli.cmd_train, []

    def interrupted_fa(sub):
        trained.append(sub.rule)
        return 130 if sub.rule == "fa" else real(sub)

    monkeypatch.setattr(cli, "cmd_train", interrupted_fa)
    out = tmp_path / "cmp"
    assert main(base + ["--epochs", "1", "--out", str(out)]) == 130
    assert f"fbalign compare --resume {out}" in capsys.readouterr().err
    assert not (out / "compare.md").exists()
    def spy(sub):  # a resumed run's rule is read from its config later: name it by its directory
        trained.append(Path(sub.resume).name if sub.resume else sub.rule)
        return real(sub)

    monkeypatch.setattr(cli, "cmd_train", spy)
    trained.clear()
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    assert trained == ["fa"]  # bp finished its epoch: kept, not trained again
    one = (out / "compare.md").read_text()
    assert re.search(r"^\| `fa` \| \d+\.\d+ \+- .* \| 1 \|", one, flags=re.M)
    trained.clear()
    assert main(["compare", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert trained == ["bp", "fa"]
    assert all(json.loads((out / r / "config.json").read_text())["epochs"] == 2
               for r in ("bp", "fa"))

    def errors(md):  # the table's test errors and epochs, without wall times
        return [line.split("|")[1:6] for line in md.splitlines() if line.startswith("| `")]

    assert errors((out / "compare.md").read_text()) == errors(ref)
    # what --resume refuses, each before training anything
    trained.clear()
    assert main(["compare", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["compare", "--resume", str(out), "--epochs", "1"]) == 2
    assert "fewer than the 2" in capsys.readouterr().err
    assert main(["compare", "--resume", str(tmp_path / "ref" / "bp")]) == 2
    assert "no compare.json" in capsys.readouterr().err
    assert trained == []
