"""Reliability: non-finite guards, input validation with clear messages, property-based tests."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fbalign as fb
from fbalign import checkpoint as C
from fbalign._src.cli import make_optimizer
from fbalign.cli import main
from fbalign.data import linear_task, load_dataset, load_teacher
from fbalign.losses import get_loss, squared_error
from fbalign.models import get_activation
from fbalign.rules import FeedbackDtypeError, FeedbackShapeError, check_state_dtypes
from fbalign.train import (
    NonFiniteError,
    compute_updates,
    fit,
    init_train_state,
    make_train_step,
    nonfinite_leaf_names,
)

PROPS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Non-finite values


def test_step_flags_nonfinite_on_device_and_skip_keeps_the_old_state():
    m, opt = fb.mlp((3, 5, 2)), optax.sgd(0.1)
    st0 = init_train_state(m, "fa", opt, jax.random.PRNGKey(0))
    x = jnp.ones((4, 3)).at[1, 2].set(jnp.nan)
    y = jnp.zeros((4,), jnp.int32)
    names = nonfinite_leaf_names(st0.params, st0.rule_state)
    assert names[:2] == ["params[0]['b']", "params[0]['w']"]
    assert names[-3:] == ["rule_state.feedback[1]", "opt_state", "loss"]
    stop = jax.jit(make_train_step(m, "fa", opt, on_nonfinite="stop", jit=False))
    new, metrics = stop(st0, x, y)
    bad = [n for n, f in zip(names, np.asarray(metrics["nonfinite"]), strict=True) if f]
    assert "params[0]['w']" in bad and "loss" in bad and "rule_state.feedback[1]" not in bad
    assert not np.isfinite(np.asarray(new.params[0]["w"])).all()
    skip = jax.jit(make_train_step(m, "fa", opt, on_nonfinite="skip", jit=False))
    new, metrics = skip(st0, x, y)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(st0.params), strict=True):
        assert np.array_equal(a, b)
    assert int(new.step) == 1 and not np.array_equal(new.key, st0.key)  # schedule advances
    new, metrics = skip(st0, jnp.ones((4, 3)), y)  # a finite batch does update
    assert not np.asarray(metrics["nonfinite"]).any()
    assert not np.array_equal(new.params[0]["w"], st0.params[0]["w"])
    with pytest.raises(ValueError, match="unknown on_nonfinite 'ignore'; valid: None, stop, skip"):
        make_train_step(m, "fa", opt, on_nonfinite="ignore")


@pytest.fixture(scope="module")
def diverging():
    """sgd with lr 1e4 on a linear regression through a relu net: overflows within 3 steps."""
    return linear_task(n_train=512, n_test=64), fb.mlp((30, 16, 10), activation="relu")


def test_divergence_stops_with_step_and_layer_and_keeps_last_good_checkpoint(diverging,
                                                                             tmp_path):
    data, m = diverging
    with pytest.raises(NonFiniteError) as e:
        fit(m, "fa", optax.sgd(1e4), data, loss="squared_error", epochs=2, batch_size=32,
            log_every=2, progress=False, out_dir=tmp_path, checkpoint_every=2)
    msg = str(e.value)
    assert e.value.step == 3 and e.value.leaf == "params[1]['w']"
    assert msg.startswith("non-finite values (NaN or Inf) at step 3 (epoch 1), first in "
                          "params[1]['w']")
    assert "Lower the learning rate" in msg and "on_nonfinite='skip'" in msg
    assert f"last good checkpoint (step 2) in {tmp_path / 'checkpoints'} is intact" in msg
    ck = C.load_checkpoint(tmp_path / "checkpoints")
    assert ck.step == 2 and [p.name for p in C.list_checkpoints(tmp_path / "checkpoints")] == [
        "ckpt-000000002.msgpack"]
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(ck.state))


def test_skip_drops_bad_updates_and_logs_them(diverging, tmp_path):
    data, m = diverging
    with pytest.warns(RuntimeWarning, match=r"skipped \d+ update\(s\) with NaN/Inf.*the first at "
                                            r"step 3, in params\[1\]\['w'\]"):
        res = fit(m, "fa", optax.sgd(1e4), data, loss="squared_error", epochs=1, batch_size=32,
                  log_every=8, progress=False, out_dir=tmp_path, on_nonfinite="skip",
                  checkpoint_every=0)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(res.state.params))
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r["kind"] == "nonfinite"]
    assert skipped[0]["step"] == 3 and skipped[0]["first"] == "params[1]['w']"
    assert recs[-1]["kind"] == "epoch" and C.load_checkpoint(tmp_path / "checkpoints").step == 16


def test_skip_stops_after_max_skips_updates_in_a_row(diverging, tmp_path):
    data, m = diverging
    with pytest.warns(RuntimeWarning), pytest.raises(
            fb.train.NonFiniteError, match=r"4 updates in a row \(steps 3-6\) had NaN or Inf.*"
                                           r"max_skips=3"):
        fit(m, "fa", optax.sgd(1e4), data, loss="squared_error", epochs=1, batch_size=32,
            log_every=8, progress=False, out_dir=tmp_path, on_nonfinite="skip",
            checkpoint_every=0, max_skips=3)
    with pytest.raises(ValueError, match="max_skips must be an integer >= 0"):
        fit(m, "fa", optax.sgd(0.1), data, epochs=1, progress=False, max_skips=-1)


def test_summary_json_is_strict_json_even_with_a_nan_test_loss(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "linear", "--activation", "relu", "--hidden", "16",
                 "--optimizer", "sgd", "--lr", "1e4", "--epochs", "1", "--on-nonfinite", "skip",
                 "--max-skips", "100000", "--out", str(out), "--no-progress"])
    assert code == 0
    text = (out / "summary.json").read_text()

    def refuse(name):
        raise AssertionError(f"summary.json holds a bare {name}")

    summary = json.loads(text, parse_constant=refuse)
    assert "test_loss" in summary


def test_cli_divergence_exits_3_naming_step_layer_and_lr(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "linear", "--activation", "relu", "--hidden", "16",
                 "--optimizer", "sgd", "--lr", "1e4", "--epochs", "1", "--log-every", "2",
                 "--checkpoint-every", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite values (NaN or Inf) at step 3" in err and "params[1]['w']" in err
    assert "--on-nonfinite skip" in err and "--lr 10000" in err
    assert C.load_checkpoint(out / "checkpoints").step == 2


# ----------------------------------------------------------------------------------------------
# Input validation: every mistake ends in a message saying what is wrong


@pytest.fixture(scope="module")
def net():
    m = fb.mlp((4, 6, 5, 3))
    params = m.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    out, tape = m.forward(params, x)
    return m, params, tape, jax.grad(lambda o: squared_error(o, jnp.zeros_like(o)))(out)


def test_wrong_feedback_shapes_name_layer_and_orientation(net):
    m, params, tape, err = net
    fa, dfa = fb.feedback_alignment(), fb.direct_feedback_alignment()
    s = fa.init(jax.random.PRNGKey(2), params)
    t = s._replace(feedback=(None, s.feedback[1].T, s.feedback[2]))
    with pytest.raises(FeedbackShapeError, match=r"feedback_alignment: feedback for layer 1 has "
                       r"shape \(5, 6\), expected \(6, 5\) \(B_l has the shape of W_l.*It looks "
                       r"transposed"):
        fa.update(params, t, tape, err)
    with pytest.raises(FeedbackShapeError, match="got 2 feedback matrices for a network that "
                                                 "needs 3"):
        fa.update(params, s._replace(feedback=s.feedback[:2]), tape, err)
    with pytest.raises(FeedbackShapeError, match=r"layer 2 needs a feedback matrix of shape "
                                                 r"\(5, 3\).*but got None"):
        fa.update(params, s._replace(feedback=(None, s.feedback[1], None)), tape, err)
    d = dfa.init(jax.random.PRNGKey(2), params)
    with pytest.raises(FeedbackShapeError, match=r"direct_feedback_alignment: feedback for layer "
                                                 r"0 has shape \(6, 3\), expected \(3, 6\)"):
        dfa.update(params, d._replace(feedback=(d.feedback[0].T, *d.feedback[1:])), tape, err)
    # Params of another network than the feedback was drawn for.
    other = fb.mlp((4, 7, 5, 3)).init(jax.random.PRNGKey(0))
    _, tape2 = fb.mlp((4, 7, 5, 3)).forward(other, jnp.ones((2, 4)))
    with pytest.raises(FeedbackShapeError, match=r"layer 0 has shape \(3, 6\), expected \(3, 7\)"):
        dfa.update(other, d, tape2, err)


def test_mismatched_dtypes_name_both(net):
    m, params, tape, err = net
    p16 = jax.tree.map(lambda a: a.astype(jnp.float16), params)
    out16, tape16 = m.forward(p16, jnp.ones((2, 4), jnp.float16))
    s32 = fb.feedback_alignment().init(jax.random.PRNGKey(2), params)  # float32 feedback
    with pytest.raises(FeedbackDtypeError, match="feedback for layer 1 has dtype float32 but the "
                                                 "params have dtype float16"):
        fb.feedback_alignment().update(p16, s32, tape16, out16)
    d32 = fb.direct_feedback_alignment().init(jax.random.PRNGKey(2), params)
    with pytest.raises(FeedbackDtypeError, match="dtype float32 but the params have dtype "
                                                 "float16"):
        fb.direct_feedback_alignment().update(p16, d32, tape16, out16)
    with pytest.raises(TypeError, match="fa_matmul: feedback b has dtype float32 but w has dtype "
                                        "float16"):
        fb.fa_matmul(jnp.ones((2, 3), jnp.float16), jnp.ones((3, 4), jnp.float16),
                     jnp.ones((3, 4)))
    # The harness checks every rule's state (here Kolen-Pollack) before tracing the rule.
    kp = fb.get_rule("kp")
    with pytest.raises(FeedbackDtypeError, match=r"rule state.*has dtype float32 but the params "
                                                 r"\(e.g. params\[0\]\['b'\]\) have dtype float16"):
        compute_updates(m, kp, squared_error, p16, kp.init(jax.random.PRNGKey(0), params),
                        jnp.ones((2, 4), jnp.float16), jnp.zeros((2, 3), jnp.float16))
    check_state_dtypes(p16, jax.tree.map(lambda a: a.astype(jnp.float16), s32))  # consistent: ok


def test_state_that_does_not_fit_the_model_is_refused_before_training():
    data = load_teacher(n_train=64, n_test=16, input_dim=4, output_dim=3)
    opt = optax.sgd(0.1)
    wrong = init_train_state(fb.mlp((4, 8, 3)), "fa", opt, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"state\['params'\]\[0\]\['b'\] has shape \(8,\) and "
                                         r"dtype float32; this model and rule needs shape \(6,\)"):
        fit(fb.mlp((4, 6, 3)), "fa", opt, data, state=wrong, progress=False)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: fb.get_rule("xfa"), ValueError, "unknown rule 'xfa'; valid: bp, fa, dfa"),
    (lambda: get_activation("swish"), ValueError, "unknown activation 'swish'; valid: tanh"),
    (lambda: get_loss("huber"), ValueError, "unknown loss 'huber'; valid: cross_entropy"),
    (lambda: make_optimizer("lion", 0.1), ValueError,
     "unknown optimizer 'lion'; valid: sgd, adam, rmsprop"),
    (lambda: load_dataset("cifar"), ValueError, "unknown dataset 'cifar'; valid: digits, mnist"),
    (lambda: fb.mlp((4, 0, 3)), ValueError, "layer sizes must be positive integers"),
    (lambda: fb.mlp((4, 2.5, 3)), ValueError, "layer sizes must be positive integers"),
    (lambda: fb.mlp((4, 5), activation="gelu"), ValueError, "unknown activation 'gelu'"),
])
def test_unknown_names_and_bad_sizes_list_the_valid_ones(call, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        call()


@given(batch=st.one_of(st.integers(-3, 0), st.integers(65, 10_000),
                       st.floats(0.5, 64.5).filter(lambda v: v != int(v))))
@PROPS
def test_bad_batch_sizes_are_refused_before_any_work(batch):
    data = load_teacher(n_train=64, n_test=8, input_dim=3, output_dim=2)
    with pytest.raises(ValueError, match="batch_size"):
        fit(fb.mlp((3, 2)), "bp", optax.sgd(0.1), data, batch_size=batch, progress=False)


@pytest.mark.parametrize("kwargs,msg", [
    ({"on_nonfinite": "ignore"}, "unknown on_nonfinite 'ignore'; valid: None, stop, skip"),
    ({"checkpoint_every": -1}, "checkpoint_every must be None or an integer >= 0"),
    ({"checkpoint_every": 5}, "need out_dir or checkpoint_dir"),
    ({"form": "implicit"}, "unknown form 'implicit'; valid: explicit, grad"),
    ({"epochs": -1}, "epochs must be >= 0"),
    ({"seeds": 0}, "seeds must be a positive integer"),
])
def test_bad_fit_options_are_refused(kwargs, msg):
    data = load_teacher(n_train=64, n_test=8, input_dim=3, output_dim=2)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fit(fb.mlp((3, 2)), "bp", optax.sgd(0.1), data, batch_size=8, progress=False, **kwargs)


@pytest.mark.parametrize("argv,msg", [
    (["--checkpoint-every", "-1"], "expected an integer >= 0, got -1"),
    (["--on-nonfinite", "ignore"], "argument --on-nonfinite: invalid choice: 'ignore'"),
    (["--hidden", "8,0"], "hidden sizes must be positive"),
    (["--loss", "huber"], "unknown loss 'huber'; valid: cross_entropy, squared_error, hinge"),
    (["--lr", "-1"], "expected a positive float, got -1"),
])
def test_cli_rejects_bad_reliability_options(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the training set (1438 "
                               "examples of digits); use --batch-size <= 1438"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
    (["--devices", "64"], "--devices 64 but only 1 cpu device(s) are available"),
])
def test_cli_usage_errors_before_any_work(argv, msg, tmp_path, capsys):
    assert main(["train", "--dataset", "digits", *argv, "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was written


# ----------------------------------------------------------------------------------------------
# Property-based tests: shapes, dtypes, batch sizes


DTYPES = st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16])
# Sizes come from small sets so that examples share compiled ops (each new shape compiles).
DIMS = st.sampled_from([1, 2, 5])


@jax.jit  # module level: examples with the same shapes reuse the compiled function
def _fa_matmul_and_grads(x, w, b):
    y = fb.fa_matmul(x, w, b)
    gx, gw = jax.grad(lambda x_, w_: jnp.sum(jnp.sin(fb.fa_matmul(x_, w_, b))), (0, 1))(x, w)
    return y, gx, gw


@given(batch=DIMS, din=DIMS, dout=DIMS, dtype=DTYPES,
       seed=st.integers(0, 2**16), corrupt=st.sampled_from([None, None, "shape", "dtype"]))
@settings(PROPS, max_examples=20)
def test_fa_matmul_properties(batch, din, dout, dtype, seed, corrupt):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k[0], (batch, din), dtype)
    w = jax.random.normal(k[1], (din, dout), dtype)
    b = jax.random.normal(k[2], (din, dout), dtype)
    if corrupt == "shape":
        b = jnp.ones((din + 1, dout), dtype)
        with pytest.raises(ValueError, match="fa_matmul: feedback b must have the shape of w"):
            fb.fa_matmul(x, w, b)
        return
    if corrupt == "dtype":
        b = b.astype(jnp.float32 if dtype != jnp.float32 else jnp.float16)
        with pytest.raises(TypeError, match="fa_matmul: feedback b has dtype"):
            fb.fa_matmul(x, w, b)
        return
    y, gx, gw = _fa_matmul_and_grads(x, w, b)
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert y.shape == (batch, dout) and gx.shape == x.shape and gw.shape == w.shape
    for a in (y, gx, gw):
        assert np.isfinite(np.asarray(a, np.float32)).all()
    if dtype == jnp.float32:  # the backward sends the error through b, not w
        g = np.cos(np.asarray(x @ w))
        np.testing.assert_allclose(gx, g @ np.asarray(b).T, rtol=1e-4, atol=1e-5)


@jax.jit
@jax.grad
def _dfa_tap_grad(h, b, v):
    carrier = fb.dfa_carrier((h.shape[0], v.shape[1]), h.dtype)
    h2, carrier = fb.dfa_hidden(h, carrier, b)
    y = fb.dfa_output(h2.reshape(h.shape[0], -1) @ v, carrier)
    return jnp.sum(y.astype(jnp.float32) ** 2) / 2


@given(batch=st.sampled_from([1, 3]), hwc=st.sampled_from([(1, 1, 1), (2, 1, 3), (2, 2, 2)]),
       n_out=st.sampled_from([1, 4]), flat=st.booleans(), dtype=DTYPES,
       seed=st.integers(0, 2**16),
       bad=st.sampled_from([False, False, False, True]))
@settings(PROPS, max_examples=12)
def test_dfa_taps_properties(batch, hwc, n_out, flat, dtype, seed, bad):
    """`dfa_output`/`dfa_hidden` on a feature map: the map receives ``e @ B`` (finite, its own
    shape and dtype); a B of the wrong size is the documented ValueError."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k[0], (batch, *hwc), dtype)
    n_h = int(np.prod(hwc)) + (1 if bad else 0)
    b = jax.random.normal(k[1], (n_out, n_h) if flat or bad else (n_out, *hwc), dtype)
    v = jax.random.normal(k[2], (int(np.prod(hwc)), n_out), dtype)
    if bad:
        with pytest.raises(ValueError, match="dfa_hidden: e @ b has shape"):
            _dfa_tap_grad(h, b, v)
        return
    g = _dfa_tap_grad(h, b, v)
    assert g.shape == h.shape and g.dtype == dtype
    assert np.isfinite(np.asarray(g, np.float32)).all()
    if dtype == jnp.float32:
        e = np.asarray(h.reshape(batch, -1) @ v)  # dL/dy for 0.5 * sum(y^2)
        want = (e @ np.asarray(b).reshape(n_out, -1)).reshape(h.shape)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


_RULES = {name: fb.get_rule(name) for name in ("bp", "fa", "dfa")}  # name = grad mode too


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rule_both(m, rule, params, state, x, y):
    out, tape = m.forward(params, x)
    loss, err = jax.value_and_grad(lambda o: squared_error(o, y))(out)
    updates, _ = _RULES[rule].update(params, state, tape, err)
    grads = jax.grad(lambda p: squared_error(
        m.apply(p, x, getattr(state, "feedback", None), rule), y))(params)
    return loss, updates, grads


@given(rule=st.sampled_from(sorted(_RULES)),
       sizes=st.lists(DIMS, min_size=2, max_size=4),
       batch=st.sampled_from([1, 3]), dtype=DTYPES,
       activation=st.sampled_from(["tanh", "relu", "sigmoid", "linear"]),
       seed=st.integers(0, 2**16),
       corrupt=st.sampled_from([None, None, "transpose", "drop", "dtype"]))
@settings(PROPS, max_examples=12)
def test_rules_properties(rule, sizes, batch, dtype, activation, seed, corrupt):
    """bp/fa/dfa on random MLPs: finite updates of the params' shapes and dtype, equal to the
    ``jax.grad`` form in float32; corrupted feedback raises only the documented errors."""
    m = fb.mlp(tuple(sizes), activation=activation)
    r = _RULES[rule]
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = m.init(k[0], dtype)
    state = r.init(k[1], params)
    x = jax.random.normal(k[2], (batch, sizes[0]), dtype)
    y = jax.random.normal(k[3], (batch, sizes[-1]), dtype)
    fbk = getattr(state, "feedback", None)
    if corrupt is not None and fbk is not None:
        i = max(j for j, f in enumerate(fbk) if f is not None) if any(
            f is not None for f in fbk) else None
        if i is not None:
            if corrupt == "transpose" and fbk[i].shape[0] != fbk[i].shape[1]:
                bad, exc = fbk[:i] + (fbk[i].T,) + fbk[i + 1:], FeedbackShapeError
            elif corrupt == "drop":
                bad, exc = fbk[:-1], FeedbackShapeError
            elif corrupt == "dtype":
                other = jnp.float32 if dtype != jnp.float32 else jnp.bfloat16
                bad, exc = tuple(None if f is None else f.astype(other) for f in fbk), \
                    FeedbackDtypeError
            else:
                bad = None
            if bad is not None:
                out, tape = m.forward(params, x)
                with pytest.raises(exc):
                    r.update(params, state._replace(feedback=bad), tape, out - y)
                return
    loss, updates, grads = _rule_both(m, rule, params, state, x, y)
    assert np.isfinite(np.asarray(loss, np.float32))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
        assert np.isfinite(np.asarray(u, np.float32)).all()
    if dtype == jnp.float32:  # two forms, one truth
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, g, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Targets the network cannot be trained on give an error, not zero loss and zero gradient.


def _digits():
    return load_dataset("digits")


def test_fit_refuses_labels_beyond_the_output_width_naming_the_split():
    d = _digits()
    with pytest.raises(ValueError, match=r"digits y_train: \d+ labels lie outside \[0, 5\)"):
        fb.train.fit(fb.mlp((64, 16, 5)), "bp", optax.sgd(0.1), d, epochs=1, progress=False)


@pytest.mark.parametrize("bad,msg", [
    (lambda y: np.full(len(y), 12), r"labels lie outside \[0, 10\) \(min 12, max 12\)"),
    (lambda y: np.where(np.arange(len(y)) == 3, -1, y), r"1 labels lie outside"),
    (lambda y: y.astype(float), r"Class labels must be integers"),
    (lambda y: y[:-1], r"entries but the inputs have"),
])
def test_evaluate_refuses_targets_that_cannot_fit_the_outputs(bad, msg):
    d = _digits()
    model = fb.mlp((64, 10))
    params = model.init(jax.random.PRNGKey(0))
    assert fb.train.evaluate(model, params, d.x_test, d.y_test)["loss"] > 0  # the good case
    with pytest.raises(ValueError, match=msg):
        fb.train.evaluate(model, params, d.x_test, bad(d.y_test))


def test_regression_targets_must_have_the_outputs_shape():
    d = _digits()
    model = fb.mlp((64, 1))
    params = model.init(jax.random.PRNGKey(0))
    y = d.y_test.astype(np.float32)
    with pytest.raises(ValueError, match=r"Reshape them to \(\d+, 1\)"):  # would broadcast
        fb.train.evaluate(model, params, d.x_test, y, loss="squared_error")
    ok = fb.train.evaluate(model, params, d.x_test, y[:, None], loss="squared_error")
    assert np.isfinite(ok["loss"])


# ----------------------------------------------------------------------------------------------
# metrics.jsonl cut in the middle of a line


def _small_fit(out, epochs, **kw):
    d = _digits()
    return fb.train.fit(fb.mlp((64, 8, 10)), "fa", optax.sgd(0.1), d, epochs=epochs,
                        batch_size=256, log_every=2, progress=False, out_dir=out,
                        checkpoint_every=0, **kw)


def test_resume_repairs_a_record_cut_mid_line_and_keeps_every_later_record(tmp_path):
    from fbalign.plot import load_run

    out = tmp_path / "run"
    _small_fit(out, 2)
    path = out / "metrics.jsonl"
    whole = path.read_bytes()
    n_records = whole.count(b"\n")
    path.write_bytes(whole[:-7])  # the last record loses its end (and its newline)
    before = [json.loads(s) for s in whole.decode().splitlines()]
    with pytest.warns(RuntimeWarning) as caught:
        _small_fit(out, 3, resume=True)
    said = " ".join(str(w.message) for w in caught)
    assert "metrics.jsonl: dropped a partial last record" in said
    assert f"{n_records - 1} complete records before it are kept" in said
    recs = [json.loads(s) for s in path.read_text().splitlines()]  # every line is whole
    assert recs[:n_records - 1] == before[:n_records - 1]  # nothing complete was lost
    assert recs[-1]["kind"] == "epoch" and recs[-1]["epoch"] == 3  # on a line of its own
    assert load_run(out)["epochs"][-1]["epoch"] == 3


def test_plot_names_the_file_and_line_of_a_broken_record(tmp_path):
    from fbalign.plot import load_run

    out = tmp_path / "run"
    _small_fit(out, 3)
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20] + lines[2]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        load_run(out)


@pytest.mark.parametrize("build, option", [
    (lambda: fb.rules.kolen_pollack(weight_decay=-1.0), "weight_decay"),
    (lambda: fb.rules.kolen_pollack(learning_rate=float("nan")), "learning_rate"),
    (lambda: fb.rules.weight_mirror(noise_std=-1.0), "noise_std"),
    (lambda: fb.rules.weight_mirror(noise_std=0.0), "noise_std"),
    (lambda: fb.rules.adaptive_random_backprop(learning_rate=-1.0), "learning_rate"),
    (lambda: fb.rules.adaptive_skipped_random_backprop(learning_rate=-0.1), "learning_rate"),
    (lambda: fb.rules.random_backprop(learning_rate=float("inf")), "learning_rate"),
    (lambda: fb.rules.bidirectional_feedback_alignment(learning_rate=-1.0), "learning_rate"),
    (lambda: fb.rules.bidirectional_direct_feedback_alignment(learning_rate="x"),
     "learning_rate"),
    (lambda: fb.rules.sign_symmetry(scale=-1.0), "scale"),
    (lambda: fb.rules.synthetic_gradients(learning_rate=-1e-3), "learning_rate"),
])
def test_rule_options_out_of_range_are_refused_when_built(build, option):
    """Issue 17's adversarial pass: a negative weight decay, learning rate or noise, a NaN or a
    string was accepted and trained silently (kp with weight_decay=-1 grows B and W). Each is
    refused when the rule is built, naming the option."""
    with pytest.raises(ValueError, match=rf": {option} must be"):
        build()


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_feedback_scale_out_of_range_is_refused(scale):
    """``scale`` of every rule's feedback initialiser must be positive and finite (a zero scale
    gives zero feedback: no error reaches the hidden layers)."""
    params = fb.mlp((4, 5, 3)).init(jax.random.PRNGKey(0))
    for rule in (fb.rules.feedback_alignment(scale=scale),
                 fb.rules.direct_feedback_alignment(scale=scale)):
        with pytest.raises(ValueError, match="scale must be > 0"):
            rule.init(jax.random.PRNGKey(0), params)
    ok = fb.rules.kolen_pollack(learning_rate=0.0)  # 0 is allowed: the feedback stays fixed
    assert ok.init(jax.random.PRNGKey(0), params).feedback[1].shape == (5, 3)


def test_cli_rule_arg_out_of_range_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "--rule", "kp", "--rule-arg", "weight_decay=-1", "--hidden", "8",
                 "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "weight_decay must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
