"""Target propagation (TP, DTP, DRL, DDTP, L-DRL): DTP with transposed feedback is backprop
(exactly on a linear net, to O(eta) with nonlinear feedback), exact inverses give Gauss-Newton
targets, feedback training lowers each rule's feedback loss (L-DRL aligns J_g with J_f^T), one
step of every rule matches a NumPy reference written from the papers' equations, and the
harness trains, vmaps, jits and checkpoints the rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign import checkpoint as C
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.rules.target_propagation import (
    TargetPropState,
    ddtp,
    drl,
    dtp,
    feedback_noise,
    layer_targets,
    ldrl,
    tp,
)

RULES = {"tp": tp, "dtp": dtp, "drl": drl, "ddtp": ddtp, "ldrl": ldrl}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _step(rule, model, params, state, x, y, loss=squared_error, key=None):
    key = jax.random.PRNGKey(7) if key is None else key
    return rule.step(params, state, Batch(x, y), key, StepContext(model, loss))


def _bp_activity_grads(model, params, x, y, loss):
    """dL/dh_l for every hidden layer by jax.grad through offsets added to the activities."""
    acts = model.activations()

    def f(offsets):
        h = x
        for i, (p, a) in enumerate(zip(params, acts, strict=True)):
            h = a(h @ p["w"] + p["b"])
            if i < len(params) - 1:
                h = h + offsets[i]
        return loss(h, y)

    hs = []
    h = x
    for p, a in zip(params[:-1], acts[:-1], strict=True):
        h = a(h @ p["w"] + p["b"])
        hs.append(jnp.zeros_like(h))
    return jax.grad(f)(hs)


# ------------------------------------------------------------------------------------------
# Reduces to backprop
# ------------------------------------------------------------------------------------------


def test_dtp_with_transposed_feedback_is_exactly_backprop_on_a_linear_network():
    # Linear network, g_l(h) = h W_l^T: the difference correction makes every displacement
    # t_l - h_l = -eta N dL/dh_l for every eta (DTP propagates displacements linearly), so
    # the forward updates are backprop's gradient.
    with jax.enable_x64(True):
        model = fb.mlp((4, 6, 5, 3), activation="linear")
        params = model.init(jax.random.PRNGKey(0), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (8, 4), jnp.float64)
        y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 3)
        bp = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        gh = _bp_activity_grads(model, params, x, y, cross_entropy)
        for eta in (0.5,):  # a large step: exact, no O(eta) term
            rule = dtp(target_lr=eta, feedback_steps=0, inverse_activation="linear")
            st = rule.init(jax.random.PRNGKey(3), params, model)
            inv = tuple({"w": params[j + 1]["w"].T, "b": jnp.zeros(params[j]["w"].shape[1],
                                                                   jnp.float64)}
                        for j in range(2))
            st = st._replace(inverses=inv)
            upd, _, out = _step(rule, model, params, st, x, y, cross_entropy)
            np.testing.assert_allclose(_flat(upd), _flat(bp), rtol=1e-10, atol=1e-12)
            for ll in (1, 2):
                assert float(out.metrics[f"angle_{ll}"]) < 1e-5
        assert np.linalg.norm(_flat(gh)) > 1e-3


def _tanh_transposed_state(rule, model, params, x, c0=0.5):
    """g_l(h) = tanh((h - h_l) V_l + c0) with V_l = diag(f'(a_l)) W_l^T / tanh'(c0), for a
    batch of one: the map's Jacobian at h_l is backprop's transpose, and it is nonlinear (with
    a second-order term, as tanh is not odd about c0) away from h_l."""
    st = rule.init(jax.random.PRNGKey(3), params, model)
    h, hs, ds = x, [x], []
    for p, f in zip(params, model.activations(), strict=True):
        a = h @ p["w"] + p["b"]
        ds.append(jax.vmap(jax.grad(f))(a[0]))
        h = f(a)
        hs.append(h)
    inv = []
    for j in range(len(params) - 1):
        ll = j + 2
        v = ds[ll - 1][:, None] * params[ll - 1]["w"].T / (1 - np.tanh(c0) ** 2)
        inv.append({"w": v, "b": c0 - (hs[ll][0] @ v)})
    return st._replace(inverses=tuple(inv))


def test_dtp_approaches_backprop_linearly_as_eta_shrinks():
    with jax.enable_x64(True):
        model = fb.mlp((4, 6, 5, 3), activation="tanh")
        params = model.init(jax.random.PRNGKey(0), jnp.float64)
        params = jax.tree.map(lambda a: 2.0 * a, params)  # a stronger nonlinearity
        x = jax.random.normal(jax.random.PRNGKey(1), (1, 4), jnp.float64)
        y = jax.random.normal(jax.random.PRNGKey(2), (1, 3), jnp.float64) * 3.0
        gh = _bp_activity_grads(model, params, x, y, squared_error)
        bp = jax.grad(lambda p: squared_error(model.apply(p, x), y))(params)
        etas = np.array([0.1, 0.05, 0.025, 0.0125, 0.00625])
        rule = dtp(target_lr=float(etas[-1]), feedback_steps=0, inverse_activation="tanh")
        st = _tanh_transposed_state(rule, model, params, x)
        inv = lambda ll, h: jnp.tanh(h @ st.inverses[ll - 2]["w"]  # noqa: E731
                                     + st.inverses[ll - 2]["b"])
        hs, h = [x], x
        for p, f in zip(params, model.activations(), strict=True):
            h = f(h @ p["w"] + p["b"])
            hs.append(h)
        e = jax.grad(lambda o: squared_error(o, y))(hs[-1])
        want = np.concatenate([np.ravel(g) for g in gh])
        errs = []
        for eta in etas:
            ts = layer_targets("dtp", hs, hs[-1] - eta * e, inv)
            disp = np.concatenate([np.ravel(ts[i] - hs[i + 1]) for i in range(2)])
            errs.append(np.linalg.norm(disp / -eta - want) / np.linalg.norm(want))
        errs = np.array(errs)
        assert errs[0] > 0.05, errs  # really nonlinear
        assert np.all(np.diff(errs) < 0), errs
        slopes = errs / etas  # O(eta): halving eta halves the error
        assert np.ptp(slopes[2:]) < 0.1 * slopes[-1], slopes
        # the rule's step with these maps: updates within O(eta) of backprop's gradient
        upd, _, _ = _step(rule, model, params, st, x, y)
        uerr = np.linalg.norm(_flat(upd) - _flat(bp)) / np.linalg.norm(_flat(bp))
        assert uerr < 2 * errs[-1] and uerr < 0.05, (uerr, errs)


# ------------------------------------------------------------------------------------------
# Gauss-Newton targets with exact inverses
# ------------------------------------------------------------------------------------------


def test_exact_inverses_give_gauss_newton_targets():
    # Square tanh layers with exact inverses g_l(h) = (artanh(h) - b_l) W_l^{-1}: TP and DTP
    # targets coincide, map exactly onto the output target, and for small eta the displacement
    # is the Gauss-Newton step -eta e M_l^{-1}, M_l = prod_k W_k diag(f'(a_k)) (row form),
    # to O(eta) (Meulemans et al. 2020).
    rng = np.random.default_rng(0)
    n, L = 4, 3
    ws = [np.eye(n) + 0.3 * rng.normal(size=(n, n)) for _ in range(L)]
    bs = [0.1 * rng.normal(size=n) for _ in range(L)]
    x = 0.5 * rng.normal(size=(3, n))
    y = rng.normal(size=(3, n))
    acts = [np.tanh] * (L - 1) + [lambda a: a]
    inv_acts = [np.arctanh] * (L - 1) + [lambda h: h]
    hs, pre = [x], []
    for w, b, f in zip(ws, bs, acts, strict=True):
        pre.append(hs[-1] @ w + b)
        hs.append(f(pre[-1]))
    e = hs[-1] - y  # per-example gradient of 0.5||y_hat - y||^2
    inverse = lambda ll, h: (inv_acts[ll - 1](h) - bs[ll - 1]) @ np.linalg.inv(ws[ll - 1])  # noqa
    derivs = [1 - np.tanh(a) ** 2 for a in pre[:-1]] + [np.ones_like(pre[-1])]
    errs = []
    etas = np.array([0.02, 0.01, 0.005])
    for eta in etas:
        t_out = hs[-1] - eta * e
        ts_tp = layer_targets("tp", hs, t_out, inverse)
        ts_dtp = layer_targets("dtp", hs, t_out, inverse)
        err = 0.0
        for ll in (1, 2):
            np.testing.assert_allclose(ts_tp[ll - 1], ts_dtp[ll - 1], rtol=1e-9, atol=1e-12)
            h = ts_tp[ll - 1]  # run the target forward: it lands on t_L
            for k in range(ll, L):
                h = acts[k](h @ ws[k] + bs[k])
            np.testing.assert_allclose(h, t_out, rtol=1e-9, atol=1e-12)
            for i in range(len(x)):
                m = np.eye(n)
                for k in range(ll, L):
                    m = m @ ws[k] * derivs[k][i][None, :]
                gn = -eta * e[i] @ np.linalg.inv(m)
                d = ts_tp[ll - 1][i] - hs[ll][i]
                err = max(err, np.linalg.norm(d - gn) / np.linalg.norm(gn))
        errs.append(err)
    errs = np.array(errs)
    assert np.all(np.diff(errs) < 0) and errs[-1] < 0.02, errs
    np.testing.assert_allclose(errs[:-1] / errs[1:], 2.0, rtol=0.1)  # O(eta)


# ------------------------------------------------------------------------------------------
# Feedback training
# ------------------------------------------------------------------------------------------


def _fixed_problem(sizes=(5, 8, 7, 3), batch=32):
    model = fb.mlp(sizes, activation="tanh")
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    y = jax.random.normal(jax.random.PRNGKey(2), (batch, sizes[-1]))
    return model, params, x, y


@pytest.mark.parametrize("name,kw", [("tp", {}), ("drl", {}), ("ddtp", {})])
def test_feedback_training_lowers_the_feedback_loss(name, kw):
    model, params, x, y = _fixed_problem()
    common = dict(feedback_lr=3e-2, noise=0.1, **kw)
    train = RULES[name](feedback_steps=80, **common)
    probe = RULES[name](feedback_steps=0, **common)
    st = train.init(jax.random.PRNGKey(3), params, model)
    key = jax.random.PRNGKey(11)
    _, _, before = _step(probe, model, params, st, x, y, key=key)
    _, st2, _ = jax.jit(lambda s: _step(train, model, params, s, x, y, key=key))(st)
    _, _, after = _step(probe, model, params, st2, x, y, key=key)  # same noise as `before`
    names = [k for k in before.metrics if k.startswith("recon_")]
    assert len(names) == 2
    for k in names:
        assert float(after.metrics[k]) < 0.6 * float(before.metrics[k]), (k, before.metrics,
                                                                          after.metrics)


def _jacobian_angle(model, params, inverses, x, ll):
    """Mean over examples of the angle between J_g at h_l and J_f^T (f = layer l)."""
    acts = model.activations()
    hs = [x]
    for p, f in zip(params, acts, strict=True):
        hs.append(f(hs[-1] @ p["w"] + p["b"]))
    f = lambda h: acts[ll - 1](h @ params[ll - 1]["w"] + params[ll - 1]["b"])  # noqa: E731
    g = lambda h: jnp.tanh(h @ inverses[ll - 2]["w"] + inverses[ll - 2]["b"])  # noqa: E731
    angles = []
    for i in range(4):
        jf = np.asarray(jax.jacobian(f)(hs[ll - 1][i]))
        jg = np.asarray(jax.jacobian(g)(hs[ll][i]))
        cos = np.sum(jg * jf.T) / (np.linalg.norm(jg) * np.linalg.norm(jf))
        angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    return np.mean(angles)


def test_ldrl_aligns_the_feedback_jacobian_with_the_forward_transpose():
    model, params, x, y = _fixed_problem()
    rule = ldrl(feedback_steps=(300, 200), noise=(0.05, 0.1), feedback_lr=1e-2,
                diagnostics=False)
    st = rule.init(jax.random.PRNGKey(3), params, model)
    before = [_jacobian_angle(model, params, st.inverses, x, ll) for ll in (2, 3)]
    _, st2, out = jax.jit(lambda s: _step(rule, model, params, s, x, y))(st)
    after = [_jacobian_angle(model, params, st2.inverses, x, ll) for ll in (2, 3)]
    assert min(before) > 60 and max(after) < 25, (before, after)
    assert set(out.metrics) == {"recon_2", "recon_3", "targets_finite", "target_finite_1",
                                "target_finite_2", "target_finite_3"}


# ------------------------------------------------------------------------------------------
# One step against NumPy, from the papers' equations
# ------------------------------------------------------------------------------------------


def _np_g(g, u, phi):
    a = u @ g["w"] + (g["b"] if "b" in g else 0.0)
    return phi(a)


def _np_map_grad(g, terms, dphi):
    """Gradient wrt (V, c) of a loss whose derivative wrt g(u_k) is G_k, g(u) = phi(uV + c)."""
    dv = sum(u.T @ (G * dphi(u @ g["w"] + g.get("b", 0.0))) for u, G in terms)
    out = {"w": dv}
    if "b" in g:
        out["b"] = sum(np.sum(G * dphi(u @ g["w"] + g["b"]), axis=0) for u, G in terms)
    return out


def _numpy_step(name, params, inverses, x, y, key, eta, sigma, lr, lam, linear, rl=None):
    """One step from the papers' equations for a tanh MLP with linear output, squared error,
    feedback by one SGD step; returns (forward updates, new inverses). ``rl``: DDTP-RHL's fixed
    random layer {"w": R, "b": r}: the direct maps to layers below L-1 read tanh(y R + r)."""
    ws = [np.asarray(p["w"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    inv = [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in inverses]
    L, N = len(ws), len(x)
    acts = [np.tanh] * (L - 1) + [lambda a: a]
    dacts = [lambda a: 1 - np.tanh(a) ** 2] * (L - 1) + [np.ones_like]
    phi, dphi = ((lambda a: a), np.ones_like) if linear else (np.tanh,
                                                              lambda a: 1 - np.tanh(a) ** 2)
    hs, pre = [x], []
    for w, b, f in zip(ws, bs, acts, strict=True):
        pre.append(hs[-1] @ w + b)
        hs.append(f(pre[-1]))

    def fwd(h, m):  # layers m+1..L from h_m
        for k in range(m, L):
            h = acts[k](h @ ws[k] + bs[k])
        return h

    def noise(ll, shape, draw=0):
        return np.asarray(feedback_noise(key, 0, ll, shape, jnp.float64, draw))

    direct = name == "ddtp"

    def lift(ll, u):  # what the direct map to layer ll reads of an output-space u
        if rl is None or ll >= L - 1:
            return u
        return np.tanh(u @ np.asarray(rl["w"], np.float64) + np.asarray(rl["b"], np.float64))

    new_inv = []
    for j, g in enumerate(inv):
        ll = j + 1 if direct else j + 2
        if name in ("tp", "dtp"):
            ht = hs[ll - 1] + sigma * noise(ll, hs[ll - 1].shape)
            z = acts[ll - 1](ht @ ws[ll - 1] + bs[ll - 1])
            terms = [(z, 2 * (_np_g(g, z, phi) - ht) / N)]
        elif name == "ldrl":
            dx = sigma * noise(ll, hs[ll - 1].shape)
            dy = sigma * noise(ll, hs[ll].shape, 1)
            yn = acts[ll - 1]((hs[ll - 1] + dx) @ ws[ll - 1] + bs[ll - 1])
            a = _np_g(g, hs[ll] + dy, phi) - _np_g(g, hs[ll], phi)
            terms = [(yn, -2 * dx / N), (hs[ll], (2 * dx - 2 * a) / N), (hs[ll] + dy, 2 * a / N)]
        elif name == "ddtp":
            ht = hs[ll] + sigma * noise(ll, hs[ll].shape)
            yt, hl = lift(ll, fwd(ht, ll)), lift(ll, hs[L])
            d = hs[ll] + _np_g(g, yt, phi) - _np_g(g, hl, phi) - ht
            c = 2 / (sigma**2 * N)
            terms = [(yt, c * d), (hl, -c * d)]
            if lam:
                yn = lift(ll, hs[L] + sigma * noise(ll, hs[L].shape, 1))
                a = _np_g(g, yn, phi) - _np_g(g, hl, phi)
                terms += [(yn, lam * c * a), (hl, -lam * c * a)]
        else:  # drl
            def down(r, ll=ll):
                for k in range(L, ll, -1):
                    r = hs[k - 1] + _np_g(inv[k - 2], r, phi) - _np_g(inv[k - 2], hs[k], phi)
                return r

            ht = hs[ll - 1] + sigma * noise(ll, hs[ll - 1].shape)
            r = down(fwd(ht, ll - 1))
            d = hs[ll - 1] + _np_g(g, r, phi) - _np_g(g, hs[ll], phi) - ht
            c = 2 / (sigma**2 * N)
            terms = [(r, c * d), (hs[ll], -c * d)]
            if lam:
                r2 = down(hs[L] + sigma * noise(ll, hs[L].shape, 1))
                d2 = hs[ll - 1] + _np_g(g, r2, phi) - _np_g(g, hs[ll], phi) - hs[ll - 1]
                terms += [(r2, lam * c * d2), (hs[ll], -lam * c * d2)]
        grad = _np_map_grad(g, terms, dphi)
        new_inv.append({k: g[k] - lr * grad[k] for k in g})
    # targets with the updated maps
    e = hs[L] - y
    ts = [None] * (L + 1)
    ts[L] = hs[L] - eta * e
    for ll in (range(1, L) if direct else range(L, 1, -1)):
        if direct:
            g = new_inv[ll - 1]
            ts[ll] = hs[ll] + _np_g(g, lift(ll, ts[L]), phi) - _np_g(g, lift(ll, hs[L]), phi)
        elif name == "tp":
            ts[ll - 1] = _np_g(new_inv[ll - 2], ts[ll], phi)
        else:
            g = new_inv[ll - 2]
            ts[ll - 1] = hs[ll - 1] + _np_g(g, ts[ll], phi) - _np_g(g, hs[ll], phi)
    upd = []
    for ll in range(1, L + 1):
        delta = (hs[ll] - ts[ll]) * dacts[ll - 1](pre[ll - 1]) / (eta * N)
        upd.append({"w": hs[ll - 1].T @ delta, "b": delta.sum(0)})
    return upd, new_inv


@pytest.mark.parametrize("name,kw", [
    ("tp", {}), ("dtp", {}), ("drl", {}), ("drl", {"drl_lambda": 0.3}),
    ("ddtp", {"feedback": "nonlinear"}), ("ddtp", {"drl_lambda": 0.5}),
    ("ddtp", {"feedback": "rhl", "hidden_feedback_dimension": 6, "drl_lambda": 0.5}),
    ("ldrl", {})])
def test_one_step_matches_a_numpy_reference_in_float64(name, kw):
    eta, sigma, lr = 0.3, 0.2, 0.05
    with jax.enable_x64(True):
        # three hidden layers: DDTP-RHL's random layer feeds the maps to layers 1 and 2
        model = fb.mlp((3, 4, 5, 4, 2) if kw.get("feedback") == "rhl" else (3, 4, 5, 2),
                       activation="tanh")
        params = model.init(jax.random.PRNGKey(0), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
        y = jax.random.normal(jax.random.PRNGKey(2), (5, 2), jnp.float64)
        rule = RULES[name](target_lr=eta, noise=sigma, feedback_lr=lr, feedback_steps=1,
                           feedback_optimizer="sgd", **kw)
        st = rule.init(jax.random.PRNGKey(3), params, model)
        # give the biases of the maps a non-zero value, so that they are tested too
        st = st._replace(inverses=tuple({k: v + 0.1 if k == "b" else v for k, v in g.items()}
                                        for g in st.inverses))
        key = jax.random.PRNGKey(5)
        upd, st2, out = _step(rule, model, params, st, x, y, key=key)
        linear = name == "ddtp" and kw.get("feedback", "linear") in ("linear", "rhl")
        want_upd, want_inv = _numpy_step(name, params, st.inverses, np.asarray(x), np.asarray(y),
                                         key, eta, sigma, lr, kw.get("drl_lambda", 0.0), linear,
                                         st.random_layer)
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves((upd, st2)))
        np.testing.assert_allclose(_flat(st2.inverses), _flat(want_inv), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(_flat(upd), _flat(want_upd), rtol=1e-9, atol=1e-12)
        # the output layer's update is exactly backprop's for every rule
        bp = jax.grad(lambda p: squared_error(model.apply(p, x), y))(params)
        np.testing.assert_allclose(_flat(upd[-1]), _flat(bp[-1]), rtol=1e-10, atol=1e-13)
        assert float(out.metrics["targets_finite"]) == 1.0


# ------------------------------------------------------------------------------------------
# Harness: training, jit + vmap, checkpoints, options
# ------------------------------------------------------------------------------------------


def test_every_rule_lowers_the_training_loss():
    # All five rules in one jitted program (one compile): 40 harness steps each on a fixed
    # batch of a 3-class problem.
    model = fb.mlp((6, 16, 16, 3), activation="tanh")
    opt = optax.sgd(0.1)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 6))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
    rules = {n: c(target_lr=0.5, feedback_lr=1e-2, feedback_steps=2, diagnostics=False)
             for n, c in RULES.items()}
    steps = {n: fb.train.make_train_step(model, r, opt, loss="cross_entropy")
             for n, r in rules.items()}
    states = {n: fb.train.init_train_state(model, r, opt, jax.random.PRNGKey(0))
              for n, r in rules.items()}

    @jax.jit
    def train(states):
        out = {}
        for n, s in states.items():
            _, m0 = steps[n](s, x, y)
            s, ms = jax.lax.scan(lambda c, _, n=n: steps[n](c, x, y), s, None, length=40)
            out[n] = (m0["loss"], ms["loss"][-1])
        return out

    for n, (first, last) in train(states).items():
        assert float(last) < 0.8 * float(first), (n, float(first), float(last))


@pytest.mark.parametrize("rhl", [False, True])
def test_fit_two_seeds_and_checkpoint_roundtrip(tmp_path, rhl):
    data = fb.data.load_teacher(n_train=256, n_test=128, input_dim=8, hidden=8, output_dim=3)
    model = fb.mlp((8, 16, 16, 3) if rhl else (8, 16, 3))
    rule = (ddtp(target_lr=0.5, feedback_lr=1e-2, feedback="rhl", hidden_feedback_dimension=12)
            if rhl else drl(target_lr=0.5, feedback_lr=1e-2, feedback_steps=2))
    res = fb.train.fit(model, rule, optax.sgd(0.2), data, epochs=2, batch_size=32, seeds=2,
                       progress=False)
    hist = res.history
    first = np.asarray(hist[0]["train_loss"])
    last = np.asarray(hist[-1]["train_loss"])
    assert first.shape == (2,) and np.all(last < first), (first, last)
    assert not np.allclose(_flat(res.state.params)[:10], 0.0)
    st = res.state.rule_state
    assert isinstance(st, TargetPropState)
    assert st.inverses[0]["w"].shape == ((2, 12, 16) if rhl else (2, 3, 16))  # a map per seed
    if rhl:  # each seed draws its own fixed random layer (checkpointed below with the maps)
        r = st.random_layer["w"]
        assert r.shape == (2, 3, 12) and not np.allclose(r[0], r[1])
    C.save_checkpoint(tmp_path, res.state, {"step": 3})
    back = C.load_checkpoint(tmp_path, target=jax.tree.map(jnp.zeros_like, res.state)).state
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(res.state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert type(back.rule_state) is TargetPropState


@pytest.mark.parametrize("ctor,kw,match", [
    (dtp, {"target_lr": 0.0}, "target_lr"),
    (tp, {"feedback_lr": -1.0}, "feedback_lr"),
    (drl, {"feedback_steps": -1}, "feedback_steps"),
    (ldrl, {"feedback_steps": 1.5}, "feedback_steps"),
    (drl, {"noise": 0.0}, "noise"),
    (ddtp, {"feedback_optimizer": "rmsprop"}, "feedback_optimizer.*adam, sgd.*rmsprop"),
    (dtp, {"inverse_activation": "swish"}, "inverse_activation.*tanh"),
    (ddtp, {"feedback": "mlp"}, "feedback.*nonlinear, linear"),
    (ddtp, {"drl_lambda": -0.1}, "drl_lambda"),
    (ddtp, {"feedback": "rhl", "hidden_feedback_dimension": 0}, "hidden_feedback_dimension"),
    (ddtp, {"feedback": "rhl", "hidden_feedback_activation": "tanhh"},
     "hidden_feedback_activation.*tanh, relu"),
    (dtp, {"last_hidden_by_gradient": 1}, "last_hidden_by_gradient"),
    (tp, {"diagnostics": "yes"}, "diagnostics"),
])
def test_bad_options_raise(ctor, kw, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kw)


def test_networks_it_cannot_train_are_refused_by_name():
    params = fb.mlp((4, 3)).init(jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="'dtp' needs a dense fbalign.models.mlp"):
        dtp().init(jax.random.PRNGKey(0), params, object())
    with pytest.raises(ValueError, match="'drl' needs at least one hidden layer"):
        drl().init(jax.random.PRNGKey(0), params, fb.mlp((4, 3)))
    big = fb.mlp((4, 5, 5, 3))
    with pytest.raises(ValueError, match="feedback_steps has 3 entries.*2 feedback maps"):
        ldrl(feedback_steps=(1, 2, 3)).init(jax.random.PRNGKey(0),
                                            big.init(jax.random.PRNGKey(0)), big)


def test_last_hidden_target_by_gradient_is_exact():
    model, params, x, y = _fixed_problem(batch=8)
    rule = dtp(last_hidden_by_gradient=True, feedback_steps=0)
    st = rule.init(jax.random.PRNGKey(3), params, model)
    upd, _, out = jax.jit(lambda s: _step(rule, model, params, s, x, y))(st)
    bp = jax.grad(lambda p: squared_error(model.apply(p, x), y))(params)
    np.testing.assert_allclose(_flat(upd[1:]), _flat(bp[1:]), rtol=1e-4, atol=1e-6)
    assert float(out.metrics["angle_2"]) < 0.1 and float(out.metrics["angle_1"]) > 10


def test_diverging_targets_stop_the_run_naming_the_layers_and_step():
    """Issue 14: targets that overflow stop the run at that step, and the message names the
    layers whose targets were not finite (the highest first: targets flow down), not only the
    first non-finite parameter."""
    from fbalign.data import Dataset
    from fbalign.train import NonFiniteError, fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (rng.normal(size=(64, 3)) * 1e10).astype(np.float32)  # eta * e overflows float32
    data = Dataset("toy", x, y, x[:0], y[:0], x[:8], y[:8], 0)
    with pytest.raises(NonFiniteError, match=r"at step 1 .*rule flags non-finite values in: "
                                             r"targets_finite, target_finite_3, target_finite_2"):
        fit(fb.mlp((5, 6, 6, 3)), fb.rules.dtp(target_lr=1e30), optax.sgd(0.01), data,
            loss="squared_error", epochs=1, batch_size=16, progress=False)
