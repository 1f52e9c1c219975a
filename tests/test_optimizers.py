"""Sign-based optimizers: RProp against a NumPy reference of the algorithm (torch.optim.Rprop's
form, Riedmiller & Braun 1993 / iRprop-), signSGD and Signum against their definitions
(Bernstein et al. 2018), optax's own RProp held to the same reference, and each optimizer
training a network with feedback alignment through `fit`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.optimizers import rprop, signsgd, signum
from fbalign.train import init_train_state


def rprop_reference(grads, lr, eta_plus=1.2, eta_minus=0.5, min_step=1e-6, max_step=50.0):
    """The updates of RProp without backtracking, one row per step, from the algorithm: every
    weight starts with step ``lr`` and no previous gradient; same sign as the previous gradient:
    step * eta_plus; opposite sign: step * eta_minus and the gradient counts as 0 (no move now,
    no sign change next time); step clipped to [min_step, max_step]; move -sign(g) * step."""
    grads = np.asarray(grads, np.float64)
    step = np.full(grads.shape[1:], lr)
    prev = np.zeros(grads.shape[1:])
    out = []
    for g in grads:
        g = g.copy()
        for i in np.ndindex(g.shape):
            if g[i] * prev[i] > 0:
                step[i] *= eta_plus
            elif g[i] * prev[i] < 0:
                step[i] *= eta_minus
                g[i] = 0.0
            step[i] = min(max(step[i], min_step), max_step)
        out.append(-np.sign(g) * step)
        prev = g
    return np.array(out)


def _run(opt, grads, params=None):
    """The updates ``opt`` emits for the gradient sequence ``grads`` (one jitted update)."""
    params = jnp.zeros(np.shape(grads)[1:]) if params is None else params
    update = jax.jit(opt.update)
    state, out = opt.init(params), []
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        out.append(np.asarray(u))
    return np.array(out)


SEQUENCE = [[1.0], [1.0], [1.0], [-1.0], [1.0]]


def test_rprop_reference_sequence():
    # worked by hand: 0.1, 0.1 * 1.2, 0.12 * 1.2, flip -> 0.072 and no move, 0.072 again
    ref = rprop_reference(SEQUENCE, 0.1)
    np.testing.assert_allclose(np.abs(ref[:, 0]), [0.1, 0.12, 0.144, 0.0, 0.072], rtol=1e-12)
    np.testing.assert_allclose(ref[:, 0], [-0.1, -0.12, -0.144, 0.0, -0.072], rtol=1e-12)
    np.testing.assert_allclose(_run(rprop(0.1), SEQUENCE), ref, rtol=1e-6)


def test_rprop_matches_the_reference_on_random_signs_zeros_and_clipping():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(12, 3, 4)) * (rng.uniform(size=(12, 3, 4)) > 0.2)  # some zeros
    g[:6, 0] = np.abs(g[:6, 0]) + 0.1  # a run of kept signs: the step grows into max_step
    kw = {"eta_plus": 1.5, "eta_minus": 0.4, "min_step": 0.02, "max_step": 0.3}
    ref = rprop_reference(g, 0.1, **kw)
    assert ref.max() == pytest.approx(0.3) and np.isclose(np.abs(ref), 0.02).any()
    np.testing.assert_allclose(_run(rprop(0.1, **kw), g), ref, rtol=1e-5, atol=1e-7)
    # on a pytree of parameters, every leaf follows the same reference
    tree = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    opt = rprop(0.1, **kw)
    state, update = opt.init(tree), jax.jit(opt.update)
    flat = g.reshape(12, -1)[:, :8]
    want = rprop_reference(flat, 0.1, **kw)
    for t in range(12):
        gt = {"w": jnp.asarray(flat[t, :6].reshape(3, 2), jnp.float32),
              "b": jnp.asarray(flat[t, 6:], jnp.float32)}
        u, state = update(gt, state)
        got = np.concatenate([np.ravel(u["w"]), np.ravel(u["b"])])
        np.testing.assert_allclose(got, want[t], rtol=1e-5, atol=1e-7)


@pytest.mark.xfail(strict=True, reason="optax 0.2.8 scale_by_rprop emits the previous step's "
                   "update (its first update is zero); fbalign ships its own rprop. This "
                   "xpasses, and fails the suite, once optax is fixed: then use optax.rprop.")
def test_optax_rprop_matches_the_reference():
    np.testing.assert_allclose(_run(optax.rprop(0.1), SEQUENCE), rprop_reference(SEQUENCE, 0.1),
                               rtol=1e-6)


def test_signsgd_is_minus_lr_times_the_sign():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 5, 4)) * (rng.uniform(size=(3, 5, 4)) > 0.3)
    np.testing.assert_array_equal(_run(signsgd(0.03), g), -np.float32(0.03) * np.sign(g))
    sched = optax.linear_schedule(0.1, 0.0, 2)  # schedules work: steps 0.1, 0.05, 0
    np.testing.assert_allclose(_run(signsgd(sched), g),
                               -np.array([0.1, 0.05, 0.0])[:, None, None] * np.sign(g), atol=1e-7)


def test_signum_is_the_sign_of_the_momentum_of_gradients():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(8, 6)) + 0.3 * np.sin(np.arange(8))[:, None]
    lr, beta = 0.01, 0.8
    m, want = np.zeros(6), []
    for gt in g:  # Bernstein et al. 2018, Algorithm 2
        m = beta * m + (1 - beta) * gt
        want.append(-lr * np.sign(m))
    want = np.array(want)
    assert (np.sign(want) != -np.sign(g)).any()  # momentum changes some signs here
    np.testing.assert_allclose(_run(signum(lr, beta), g), want, rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: rprop(0.01), lambda: signsgd(0.01),
                                  lambda: signum(0.01, 0.5)], ids=["rprop", "signsgd", "signum"])
def test_trains_feedback_alignment_through_fit(make):
    data = fb.data.load_teacher(n_train=96, n_test=64, input_dim=6, hidden=8, output_dim=3)
    model, opt = fb.mlp((6, 12, 3)), make()
    start = init_train_state(model, "fa", opt, jax.random.PRNGKey(0))
    loss = lambda p: float(fb.cross_entropy(model.apply(p, data.x_test), data.y_test))
    before = loss(start.params)
    res = fb.train.fit(model, "fa", opt, data, epochs=1, batch_size=16, state=start,
                       progress=False)
    assert loss(res.state.params) < before


@pytest.mark.parametrize("build,match", [
    (lambda: rprop(0.0), "rprop: learning_rate must be a positive number, got 0.0"),
    (lambda: rprop(0.1, eta_plus=1.0), "eta_plus must be > 1, got 1.0"),
    (lambda: rprop(0.1, eta_minus=1.5), r"eta_minus must be in \(0, 1\), got 1.5"),
    (lambda: rprop(0.1, eta_minus=0.0), "eta_minus must be a positive number"),
    (lambda: rprop(0.1, min_step=1.0, max_step=0.5), "min_step must be <= max_step"),
    (lambda: signsgd(-1.0), "signsgd: learning_rate must be a positive number, got -1.0"),
    (lambda: signum(0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (lambda: signum("fast"), "signum: learning_rate"),
])
def test_bad_options_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules in epochs (fb.optimizers.lr_schedule; --lr-schedule)

def _ref_schedule(kind, lr, t, spe, decay=None, every=1, milestones=(), horizon=None, warmup=0):
    """The schedules' formulas, written out per step ``t`` (``spe`` steps an epoch)."""
    w = warmup * spe
    if t < w:
        return lr * t / w
    s = t - w
    if kind == "constant":
        return lr
    if kind == "cosine":
        return lr * 0.5 * (1 + np.cos(np.pi * min(s, horizon * spe) / (horizon * spe)))
    if kind == "exponential":
        return lr * decay ** (s // (every * spe))
    return lr * decay ** sum(s >= m * spe for m in milestones)


@pytest.mark.parametrize("kind,kw", [
    ("constant", {"warmup": 2}),
    ("cosine", {"horizon": 4}),
    ("cosine", {"horizon": 3, "warmup": 1}),
    ("exponential", {"decay": 0.5, "every": 2}),
    ("step", {"decay": 0.1, "milestones": (2, 5)}),
])
def test_lr_schedule_follows_its_formula_in_epochs(kind, kw):
    spe, lr = 7, 0.3
    sched = fb.optimizers.lr_schedule(lr, kind, steps_per_epoch=spe, **kw)
    for t in range(0, 9 * spe):
        np.testing.assert_allclose(float(sched(t)), _ref_schedule(kind, lr, t, spe, **kw),
                                   rtol=1e-5, atol=1e-8, err_msg=f"{kind} {kw} step {t}")
    assert fb.optimizers.lr_schedule(lr) == lr  # constant without warm-up: the plain rate


@pytest.mark.parametrize("kw,msg", [
    ({"kind": "cosine", "decay": 0.5, "horizon": 3}, "'cosine' does not use decay"),
    ({"kind": "step", "decay": 0.5}, "needs milestones"),
    ({"kind": "step", "decay": 0.5, "milestones": (3, 2)}, "increasing epochs"),
    ({"kind": "exponential"}, "needs decay"),
    ({"kind": "exponential", "decay": 1.5}, "needs decay, a factor in"),
    ({"kind": "cosine"}, "needs horizon"),
    ({"kind": "linear"}, "unknown kind 'linear'"),
    ({"kind": "constant", "warmup": -1}, "warmup must be"),
])
def test_lr_schedule_refuses_what_it_would_ignore_or_cannot_do(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fb.optimizers.lr_schedule(0.1, **kw)


def test_cli_schedules_decay_the_rate_by_epoch_and_are_saved(tmp_path, capsys):
    """--lr-schedule through `fbalign train`: a step schedule that zeroes the rate after epoch 1
    leaves the params of epoch 2 where epoch 1 left them; a cosine run saves its length, so a
    resumed run keeps it; flags the schedule does not use are refused."""
    import json

    from fbalign.cli import main

    base = ["train", "--rule", "fa", "--dataset", "digits", "--hidden", "16", "--no-progress",
            "--optimizer", "sgd", "--lr", "0.05"]
    out = tmp_path / "step"
    assert main(base + ["--epochs", "2", "--out", str(out), "--lr-schedule", "step",
                        "--lr-milestones", "1", "--lr-decay", "1e-30"]) == 0
    runs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in runs if r.get("kind") == "epoch"]
    assert len(ends) == 2 and ends[0]["test_error"] == ends[1]["test_error"], ends
    out = tmp_path / "cos"
    assert main(base + ["--epochs", "1", "--out", str(out), "--lr-schedule", "cosine"]) == 0
    assert json.loads((out / "config.json").read_text())["lr_decay_epochs"] == 1
    # resumed with more epochs, the cosine keeps its length (its rate stays 0 past it)
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_decay_epochs"] == 1 and cfg["epochs"] == 2
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in recs if r.get("kind") == "epoch"]
    assert len(ends) == 2 and ends[0]["test_error"] == ends[1]["test_error"], ends
    capsys.readouterr()
    assert main(base + ["--epochs", "1", "--out", str(tmp_path / "bad"), "--lr-schedule",
                        "cosine", "--lr-milestones", "2"]) == 2
    assert "--lr-schedule cosine does not use --lr-milestones" in capsys.readouterr().err
    assert main(base + ["--epochs", "1", "--out", str(tmp_path / "bad2"), "--lr-schedule",
                        "step", "--lr-milestones", "2"]) == 2
    assert "needs --lr-decay" in capsys.readouterr().err


@pytest.mark.parametrize("make", [
    lambda lr: optax.adam(lr),
    lambda lr: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(lr, momentum=0.9)),
])
def test_scale_by_layer_equals_one_optimizer_per_layer_at_its_own_rate(make):
    """Per-layer rates: optimizer(lr) then scale_by_layer(s) equals, layer by layer, the same
    optimizer at lr * s_l (an independent composition: optax.multi_transform)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = [{"w": jax.random.normal(keys[0], (3, 4)), "b": jnp.ones(4)},
              {"w": jax.random.normal(keys[1], (4, 2)), "b": jnp.zeros(2)}]
    lr, scales = 0.1, (1.0, 0.03)
    ours = optax.chain(make(lr), fb.optimizers.scale_by_layer(scales))
    labels = [jax.tree.map(lambda _, i=i: str(i), p) for i, p in enumerate(params)]
    ref = optax.multi_transform({str(i): make(lr * s) for i, s in enumerate(scales)}, labels)
    p1, p2, s1, s2 = params, params, ours.init(params), ref.init(params)
    for t in range(4):
        g = jax.tree.map(lambda a, t=t: jnp.sin(a * (t + 1)), params)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the scales matter: layer 1 moved 1/0.03 times less than at the shared rate
    plain = optax.apply_updates(params, make(lr).update(g, make(lr).init(params), params)[0])
    assert not np.allclose(np.asarray(p1[1]["w"]), np.asarray(plain[1]["w"]), atol=1e-3)


def test_scale_by_layer_refuses_a_wrong_number_of_layers():
    params = [{"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 1))}]
    with pytest.raises(ValueError, match="3 scales .* of 2 layers"):
        fb.optimizers.scale_by_layer((1.0, 1.0, 1.0)).init(params)
    with pytest.raises(ValueError, match="of a dict"):
        fb.optimizers.scale_by_layer((1.0,)).init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="positive"):
        fb.optimizers.scale_by_layer((1.0, 0.0))


def test_cli_lr_scales_set_each_layers_rate(tmp_path, capsys):
    """--lr-scales through `fbalign train`: rates of ~0 on every layer freeze training (the
    test error of epoch 2 is epoch 1's); a wrong number of factors is a usage error."""
    import json

    from fbalign.cli import main

    base = ["train", "--rule", "bp", "--dataset", "digits", "--hidden", "16", "--no-progress",
            "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2"]
    out = tmp_path / "frozen"
    assert main(base + ["--out", str(out), "--lr-scales", "1e-30,1e-30"]) == 0
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in recs if r.get("kind") == "epoch"]
    assert len(ends) == 2 and ends[0]["test_error"] == ends[1]["test_error"], ends
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "bad"), "--lr-scales", "1,1,1"]) == 2
    assert "--lr-scales gives 3 factors" in capsys.readouterr().err
