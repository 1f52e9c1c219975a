"""Local error signals (Nøkland & Eidnes 2019): the losses equal a NumPy reference written from
the paper (similarity matrices, pred, sim, predsim, the bio variant), every layer's update is the
finite-difference gradient of its own loss and ignores everything above it, the heads train and
survive a checkpoint, and bad options or networks raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

import fbalign as fb
from fbalign import checkpoint as C
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy
from fbalign._src.rules.local_losses import (
    layer_local_loss,
    local_error_signals,
    similarity_matrix,
)
from fbalign.data import load_teacher
from fbalign.train import fit, init_train_state

SIZES = (6, 5, 4, 3)


# ---------------------------------------------------------------- NumPy reference (the paper)

def np_sim(h):
    """S_ij = cos of the per-example mean-centred rows (the paper's adjusted cosine)."""
    hc = h - h.mean(axis=1, keepdims=True)
    hn = hc / (1e-8 + np.sqrt((hc ** 2).sum(axis=1, keepdims=True)))
    return np.clip(hn @ hn.T, -1.0, 1.0)


def np_ce(logits, onehot):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(onehot * logp).sum(axis=1).mean()


def np_bce(logits, t):
    return np.mean(np.maximum(logits, 0) - logits * t + np.log1p(np.exp(-np.abs(logits))))


def np_local(head, h, onehot, loss, beta, bio, proj=None):
    head = {k: np.asarray(v, np.float64) for k, v in head.items()}
    pred = sim = None
    if loss in ("pred", "predsim"):
        logits = h @ head["pred_w"] + head["pred_b"]
        pred = np_bce(logits, (onehot @ proj > 0).astype(float)) if bio else np_ce(logits, onehot)
    if loss in ("sim", "predsim"):
        z, t = (h, onehot @ proj) if bio else (h @ head["sim_w"], onehot)
        sim = np.mean((np_sim(z) - np_sim(t)) ** 2)
    return {"pred": pred, "sim": sim, "predsim": None if pred is None or sim is None
            else (1 - beta) * pred + beta * sim}[loss]


def np_hidden(params, x, upto):
    """h_upto of a tanh MLP, in NumPy."""
    h = np.asarray(x, np.float64)
    for layer in params[:upto + 1]:
        h = np.tanh(h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64))
    return h


# ---------------------------------------------------------------- helpers

def _problem(dtype=jnp.float32, seed=0, batch=10):
    """A tanh MLP with NumPy-drawn params and data (eager JAX draws would each compile)."""
    model = fb.mlp(SIZES, activation="tanh")
    rng = np.random.default_rng(seed)
    params = [{"w": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), dtype),
               "b": jnp.asarray(0.1 * rng.normal(size=o), dtype)}
              for i, o in zip(SIZES[:-1], SIZES[1:], strict=True)]
    x = jnp.asarray(rng.normal(size=(batch, SIZES[0])), dtype)
    y = jnp.asarray(np.arange(batch) % SIZES[-1])
    return model, params, x, y


def _random_heads(state, seed=5):
    """Heads with random (non-zero) values, so that every term sends an error (NumPy draws:
    eager JAX ops compile one by one, the slow part of small tests)."""
    rng = np.random.default_rng(seed)
    return state._replace(heads=jax.tree.map(
        lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), state.heads))


def _init(rule, model, params):
    """``rule.init`` jitted once per rule and model (one compile instead of one per op)."""
    if ("init", rule, model) not in _JITTED:
        _JITTED["init", rule, model] = jax.jit(lambda k, p: rule.init(k, p, model))
    return _JITTED["init", rule, model](jax.random.PRNGKey(1), params)


BETA = 0.7
# One rule per variant, shared by the tests so that each compiles once per dtype; predsim's
# heads hold every head the other losses use, SGD(1) makes the heads' step their gradient.
RULES = {bio: local_error_signals("predsim", beta=BETA, bio=bio, target_proj_size=8,
                                  head_optimizer=optax.sgd(1.0)) for bio in (False, True)}
_JITTED: dict = {}


def _step(rule, model, params, state, x, y):
    """The rule's step, jitted once per rule and model (eager dispatch is the slow part)."""
    if (rule, model) not in _JITTED:
        _JITTED[rule, model] = jax.jit(lambda p, s, x, y: rule.step(
            p, s, Batch(x, y), jax.random.PRNGKey(3), StepContext(model, cross_entropy)))
    return _JITTED[rule, model](params, state, x, y)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("bio", [False, True])
def test_losses_match_numpy_reference(bio):
    with jax.enable_x64(True):
        model, params, x, y = _problem(jnp.float64)
        onehot = np.eye(SIZES[-1])[np.asarray(y)]
        h = np_hidden(params, x, 0)
        # Same-label examples have similarity 1 in the one-hot matrix; with C = 3 classes the
        # centred one-hot rows of different labels have cosine -1/2.
        s_y = np_sim(onehot)
        assert np.allclose(np.diag(s_y), 1) and np.isclose(s_y[0, 1], -0.5)
        rule = RULES[bio]
        st = _random_heads(_init(rule, model, params))
        proj = np.asarray(st.label_proj[0]) if bio else None

        @jax.jit
        def ours(h, onehot):
            out = {loss: layer_local_loss(
                st.heads[0], h, onehot, loss=loss, beta=BETA, bio=bio,
                label_proj=st.label_proj[0] if bio else None,
                feedback=st.feedback[0] if bio else None)[0] for loss in ("pred", "sim",
                                                                          "predsim")}
            return {**out, "S": similarity_matrix(h)}

        got = ours(jnp.asarray(h), jnp.asarray(onehot))
        np.testing.assert_allclose(got["S"], np_sim(h), atol=1e-12)
        for loss in ("pred", "sim", "predsim"):
            want = np_local(st.heads[0], h, onehot, loss, BETA, bio, proj)
            np.testing.assert_allclose(got[loss], want, rtol=1e-10, err_msg=loss)
        # The step's metrics are the layers' terms averaged over the hidden layers; its loss is
        # the output layer's global loss.
        _, _, out = _step(rule, model, params, st, x, y)
        for term in ("pred", "sim"):
            ref = np.mean([np_local(st.heads[i], np_hidden(params, x, i), onehot, term, BETA,
                                    bio, np.asarray(st.label_proj[i]) if bio else None)
                           for i in range(2)])
            np.testing.assert_allclose(out.metrics[f"local_{term}_loss"], ref, rtol=1e-10)
        logits = np_hidden(params, x, 1) @ np.asarray(params[2]["w"]) + np.asarray(params[2]["b"])
        np.testing.assert_allclose(out.loss, np_ce(logits, onehot), rtol=1e-10)


def _fd(fn, arr, eps=1e-6):
    arr = np.array(arr, np.float64)
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        up, dn = arr.copy(), arr.copy()
        up[idx] += eps
        dn[idx] -= eps
        g[idx] = (fn(up) - fn(dn)) / (2 * eps)
    return g


@pytest.mark.parametrize("bio", [False, True])
def test_updates_equal_finite_differences_of_the_local_losses(bio):
    # In the bio variant the prediction head's error reaches h through the fixed B: the update
    # is the gradient of the local loss when B equals the head's weights (see the next test).
    with jax.enable_x64(True):
        model, params, x, y = _problem(jnp.float64)
        onehot = np.eye(SIZES[-1])[np.asarray(y)]
        rule = RULES[bio]
        st = _random_heads(_init(rule, model, params))
        if bio:
            st = st._replace(feedback=tuple(h["pred_w"] for h in st.heads))
        updates, new_st, _ = _step(rule, model, params, st, x, y)
        for i in range(2):
            h_in = np_hidden(params, x, i - 1) if i else np.asarray(x, np.float64)
            proj = np.asarray(st.label_proj[i]) if bio else None

            def local(w, b, head, h_in=h_in, proj=proj):
                return np_local(head, np.tanh(h_in @ w + b), onehot, "predsim", BETA, bio, proj)

            w, b, head = (np.asarray(params[i]["w"]), np.asarray(params[i]["b"]),
                          {k: np.asarray(v) for k, v in st.heads[i].items()})
            np.testing.assert_allclose(
                updates[i]["w"], _fd(lambda v, b=b, head=head: local(v, b, head), w), atol=1e-8)
            np.testing.assert_allclose(
                updates[i]["b"], _fd(lambda v, w=w, head=head: local(w, v, head), b), atol=1e-8)
            # The heads took one SGD(1) step along their own local gradient.
            for k in head:
                fd = _fd(lambda v, k=k, w=w, b=b, head=head: local(w, b, {**head, k: v}),
                         head[k])
                np.testing.assert_allclose(head[k] - np.asarray(new_st.heads[i][k]), fd,
                                           atol=1e-8)
        # The output layer: the global loss's gradient on its own (constant) input.
        h2 = np_hidden(params, x, 1)
        w2, b2 = np.asarray(params[2]["w"]), np.asarray(params[2]["b"])
        np.testing.assert_allclose(updates[2]["w"], _fd(lambda v: np_ce(h2 @ v + b2, onehot),
                                                        w2), atol=1e-8)


def test_bio_pred_error_reaches_the_layer_through_the_fixed_feedback():
    # With a random B (the rule's own draw) the update is no longer the local loss's gradient.
    with jax.enable_x64(True):
        model, params, x, y = _problem(jnp.float64)
        onehot = np.eye(SIZES[-1])[np.asarray(y)]
        rule = RULES[True]
        st = _random_heads(_init(rule, model, params))
        x0 = np.asarray(x, np.float64)
        w, b, head = (np.asarray(params[0]["w"]), np.asarray(params[0]["b"]),
                      {k: np.asarray(v) for k, v in st.heads[0].items()})
        proj = np.asarray(st.label_proj[0])
        fd = _fd(lambda v: np_local(head, np.tanh(x0 @ v + b), onehot, "predsim", BETA, True,
                                    proj), w)
        got, new_st, _ = _step(rule, model, params, st, x, y)
        assert np.abs(np.asarray(got[0]["w"]) - fd).max() > 1e-3
        # B and the label projections are fixed; the heads move.
        assert_trees_close(new_st.feedback, st.feedback, rtol=0, atol=0)
        assert_trees_close(new_st.label_proj, st.label_proj, rtol=0, atol=0)
        assert not np.allclose(new_st.heads[0]["pred_w"], st.heads[0]["pred_w"])


@pytest.mark.parametrize("bio", [False, True])
def test_no_gradient_crosses_a_layer(bio):
    model, params, x, y = _problem()
    rule = RULES[bio]
    st = _random_heads(_init(rule, model, params))
    base, _, _ = _step(rule, model, params, st, x, y)
    for layer in range(2):
        # Perturb every weight and head above `layer` (and, in bio, the others' projections):
        # the updates up to `layer` are exactly the same.
        # (NumPy arithmetic: eager JAX ops would each compile.)
        p2 = [dict(p) if i <= layer else jax.tree.map(lambda a: 3 * np.asarray(a) + 1, p)
              for i, p in enumerate(params)]
        heads = tuple(h if i <= layer else jax.tree.map(lambda a: -2 * np.asarray(a) + 0.3, h)
                      for i, h in enumerate(st.heads))
        st2 = st._replace(heads=heads)
        if bio:
            st2 = st2._replace(
                label_proj=tuple(p if i <= layer else -np.asarray(p)
                                 for i, p in enumerate(st.label_proj)),
                feedback=tuple(f if i <= layer else 2 * np.asarray(f)
                               for i, f in enumerate(st.feedback)))
        got, _, _ = _step(rule, model, p2, st2, x, y)
        assert_trees_close(got[:layer + 1], base[:layer + 1], rtol=0, atol=0)
        assert not np.allclose(got[layer + 1]["w"], base[layer + 1]["w"])
    # Perturbing a lower layer does change the layers above (their inputs move).
    p3 = [jax.tree.map(lambda a: 1.5 * np.asarray(a), params[0]), *params[1:]]
    got, _, _ = _step(rule, model, p3, st, x, y)
    assert not np.allclose(got[1]["w"], base[1]["w"])
    if bio:  # layer 0's own projection and feedback do matter to it
        flipped = st._replace(label_proj=(-np.asarray(st.label_proj[0]), st.label_proj[1]))
        assert not np.allclose(_step(rule, model, params, flipped, x, y)[0][0]["w"],
                               base[0]["w"])


def test_fit_trains_and_the_heads_survive_a_checkpoint(tmp_path):
    data = load_teacher(seed=1, n_train=256, n_test=128, input_dim=8, hidden=16, output_dim=3)
    model = fb.mlp((8, 24, 24, 3), activation="relu")
    rule = local_error_signals(head_lr=3e-3)
    res = fit(model, rule, optax.adam(1e-2), data, epochs=4, batch_size=32, progress=False,
              log_every=8)
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < 0.6 * first["train_loss"]
    assert last["test_accuracy"] > 0.6  # 3 classes: chance is about 1/3 (backprop: 0.76)
    assert np.abs(np.asarray(res.state.rule_state.heads[0]["pred_w"])).max() > 1e-3  # from 0
    C.save_checkpoint(tmp_path, res.state, {"step": 32})
    target = init_train_state(model, rule, optax.adam(3e-3), jax.random.PRNGKey(7))
    back = C.load_checkpoint(tmp_path, target=target).state
    assert type(back.rule_state) is type(res.state.rule_state)
    for a, b in zip(jax.tree.leaves(back.rule_state), jax.tree.leaves(res.state.rule_state),
                    strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "predsimm"}, "unknown loss 'predsimm'; valid: pred, sim, predsim"),
    ({"beta": 1.5}, "beta must be a number in \\[0, 1\\]"),
    ({"bio": "yes"}, "bio must be True or False"),
    ({"head_lr": 0.0}, "head_lr must be a positive number"),
    ({"target_proj_size": 0}, "target_proj_size must be a positive integer"),
    ({"num_classes": 2.5}, "num_classes must be a positive integer"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        local_error_signals(**kwargs)


def test_networks_it_cannot_train_are_refused():
    rule = local_error_signals()
    key = jax.random.PRNGKey(0)
    net = fb.lenet5()
    with pytest.raises(TypeError, match="local_error_signals.*dense fbalign.models.mlp.*conv"):
        rule.init(key, None, net)
    flat = fb.mlp((4, 3))
    with pytest.raises(TypeError, match="no hidden layer"):
        rule.init(key, flat.init(key), flat)
    model, params, x, _ = _problem()
    st = rule.init(key, params, model)
    with pytest.raises(ValueError, match="needs class labels"):
        _step(rule, model, params, st, x, jnp.zeros((10,)))
