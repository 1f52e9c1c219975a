"""Target propagation (TP, DTP, DRL, L-DRL) on conv chains (`fb.models.sequential` of Conv,
pooling, Flatten and Dense blocks): one step of each feedback loss against a NumPy reference
written with loops from the papers' equations and scalingDTP's block inverse (max-unpool with
the forward indices -> activation -> transposed convolution); with the maps set to the exact
transposes of a linear conv net DTP's targets are backprop's; feedback training lowers the
conv reconstruction loss and L-DRL aligns J_g with J_f^T on a conv block; fit trains two seeds
(vmap) on 8x8 digits and the maps survive a checkpoint; unsupported networks are refused by
name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign import checkpoint as C
from fbalign._src.base import Batch, StepContext
from fbalign._src.convnet import max_pool_2x2
from fbalign._src.losses import cross_entropy
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
from fbalign._src.rules.target_propagation_conv import (
    block_forward,
    chain_forward,
    chain_inverse,
    chain_reconstruction_loss,
    conv_chain,
    max_pool_routes,
    unpool,
)
from fbalign._src.sequential import (
    AvgPool,
    Conv,
    Dense,
    Flatten,
    MaxPool,
    Residual,
    sequential,
)

RULES = {"tp": tp, "dtp": dtp, "drl": drl, "ldrl": ldrl}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _step(rule, model, params, state, x, y, key=None):
    key = jax.random.PRNGKey(7) if key is None else key
    return rule.step(params, state, Batch(x, y), key, StepContext(model, cross_entropy))


def _relu_net():
    """8x8x1 -> conv 3x3x2 relu, maxpool -> 4x4x2 -> conv 3x3x3 relu, maxpool -> 2x2x3 ->
    flatten -> dense 3 (SAME padding): a conv map (unpool, relu, transposed conv) under a dense
    one."""
    return sequential([Conv(2, (3, 3), activation="relu"), MaxPool(),
                       Conv(3, (3, 3), activation="relu"), MaxPool(), Flatten(), Dense(3)],
                      (8, 8, 1))


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def _numpy_params(shapes, seed, bias=0.05, inverse=False, dtype=np.float64):
    """``[{"w": N(0, 2/fan_in), "b": bias}]`` drawn by NumPy (no compile); a map's bias has
    one entry per input channel of its layer (``inverse``)."""
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.normal(size=s) * np.sqrt(2 / np.prod(s[:-1])), dtype),
             "b": jnp.asarray(np.full((s[-2] if inverse else s[-1],), bias), dtype)}
            for s in shapes]


# ------------------------------------------------------------------------------------------
# NumPy reference (float64, loops)
# ------------------------------------------------------------------------------------------


def _np_conv(x, w, pad):
    """Stride-1 convolution (cross-correlation, NHWC, HWIO) with ``pad`` zeros each side."""
    kh, kw, _, co = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, co))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j, :] = np.einsum("nabc,abcd->nd", xp[:, i:i + kh, j:j + kw, :], w)
    return out


def _np_conv_t(u, w, pad, in_hw):
    """The transpose of `_np_conv` (scatter each output back over its window)."""
    kh, kw, ci, _ = w.shape
    h, wd = in_hw
    xp = np.zeros((u.shape[0], h + 2 * pad, wd + 2 * pad, ci))
    for i in range(u.shape[1]):
        for j in range(u.shape[2]):
            xp[:, i:i + kh, j:j + kw, :] += np.einsum("nd,abcd->nabc", u[:, i, j, :], w)
    return xp[:, pad:pad + h, pad:pad + wd, :]


def _np_conv_wgrad(x, g, pad, shape):
    """d/dw of sum(g * conv(x, w))."""
    kh, kw = shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dw = np.zeros(shape)
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            dw += np.einsum("nabc,nd->abcd", xp[:, i:i + kh, j:j + kw, :], g[:, i, j, :])
    return dw


def _np_pool(z):
    """2x2 max pooling and the mask of each window's first maximum (row-major)."""
    n, h, w, c = z.shape
    out, mask = np.zeros((n, h // 2, w // 2, c)), np.zeros_like(z)
    for b in range(n):
        for i in range(h // 2):
            for j in range(w // 2):
                for k in range(c):
                    win = z[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].ravel()
                    a = int(np.argmax(win))
                    out[b, i, j, k] = win[a]
                    mask[b, 2 * i + a // 2, 2 * j + a % 2, k] = 1.0
    return out, mask


def _np_unpool(y, mask):
    return np.repeat(np.repeat(y, 2, axis=1), 2, axis=2) * mask


class _NpNet:
    """`_relu_net` in NumPy: blocks, their inverses (scalingDTP's unpool -> phi ->
    conv^T for the conv block, phi -> dense map -> reshape for the dense block; phi the block's
    activation unless ``phi`` is given) and the inverses' gradients."""

    pads = (1, 1)

    def __init__(self, params, n, phi=None):
        self.ws = [np.asarray(p["w"], np.float64) for p in params]
        self.bs = [np.asarray(p["b"], np.float64) for p in params]
        self.n = n
        self.phis = {2: phi or (lambda a: np.maximum(a, 0.0)), 3: phi or (lambda a: a)}

    def block(self, ll, h):
        """(h_l, pool mask, pre-activation, op input)."""
        if ll < 3:
            a = _np_conv(h, self.ws[ll - 1], self.pads[ll - 1]) + self.bs[ll - 1]
            y, mask = _np_pool(np.maximum(a, 0.0))
            return y, mask, a, h
        inp = h.reshape(self.n, -1)
        a = inp @ self.ws[2] + self.bs[2]
        return a, None, a, inp

    def g(self, ll, g, y, mask):
        """(g_l(y), the input of its linear part)."""
        if ll == 2:
            s = self.phis[2](_np_unpool(y, mask))
            return _np_conv_t(s, g["w"], 1, (4, 4)) + g["b"], s
        s = self.phis[3](y)
        return (s @ g["w"].T + g["b"]).reshape(self.n, 2, 2, 3), s

    def g_grad(self, ll, g, terms):
        """Gradient wrt (V, c) of a loss whose derivative wrt g(y_k) is G_k."""
        dv, dc = np.zeros_like(g["w"]), np.zeros_like(g["b"])
        for y, mask, big_g in terms:
            _, s = self.g(ll, g, y, mask)
            if ll == 2:  # <conv^T(s, V), G> = <s, conv(G, V)>; c: one per input channel
                dv += _np_conv_wgrad(big_g, s, 1, g["w"].shape)
                dc += big_g.reshape(-1, big_g.shape[-1]).sum(0)
            else:  # g(y) = reshape(phi(y) V^T + c): c one per input unit
                dv += big_g.reshape(self.n, -1).T @ s
                dc += big_g.reshape(self.n, -1).sum(0)
        return {"w": dv, "b": dc}

    def updates(self, hs, ts, eta):
        out = []
        for ll in (1, 2, 3):
            y, mask, a, inp = self.block(ll, hs[ll - 1])
            d = (y - ts[ll]) / (eta * self.n)
            if ll < 3:
                d = _np_unpool(d, mask) * (a > 0)
                out.append({"w": _np_conv_wgrad(inp, d, self.pads[ll - 1],
                                                self.ws[ll - 1].shape), "b": d.sum((0, 1, 2))})
            else:
                out.append({"w": inp.T @ d, "b": d.sum(0)})
        return out


def _np_feedback_terms(net, name, ll, inv, hs, masks, noise, sigma, lam):
    """[(y_k, mask_k, dLoss/dg_l(y_k))] of map ``ll``'s feedback loss."""
    n = net.n
    eps = noise(ll, hs[ll - 1].shape)
    if name in ("tp", "dtp"):
        ht = hs[ll - 1] + sigma * eps
        yn, mn, _, _ = net.block(ll, ht)
        return [(yn, mn, 2 * (net.g(ll, inv[ll - 2], yn, mn)[0] - ht) / n)]
    if name == "ldrl":
        dx, dy = sigma * eps, sigma * noise(ll, hs[ll].shape, 1)
        yn, mn, _, _ = net.block(ll, hs[ll - 1] + dx)
        g = inv[ll - 2]
        a = net.g(ll, g, hs[ll] + dy, masks[ll])[0] - net.g(ll, g, hs[ll], masks[ll])[0]
        return [(yn, mn, -2 * dx / n), (hs[ll], masks[ll], (2 * dx - 2 * a) / n),
                (hs[ll] + dy, masks[ll], 2 * a / n)]

    def down(r):  # drl: the fixed difference maps above, forward masks
        for k in range(3, ll, -1):
            r = hs[k - 1] + (net.g(k, inv[k - 2], r, masks[k])[0]
                             - net.g(k, inv[k - 2], hs[k], masks[k])[0])
        return r

    def rec(r):
        g = inv[ll - 2]
        return hs[ll - 1] + net.g(ll, g, r, masks[ll])[0] - net.g(ll, g, hs[ll], masks[ll])[0]

    ht = hs[ll - 1] + sigma * eps
    y = ht
    for k in range(ll, 4):
        y = net.block(k, y)[0]
    c = 2 / (sigma**2 * n)
    r = down(y)
    d = rec(r) - ht
    terms = [(r, masks[ll], c * d), (hs[ll], masks[ll], -c * d)]
    if lam:
        r2 = down(hs[3] + sigma * noise(ll, hs[3].shape, 1))
        d2 = rec(r2) - hs[ll - 1]
        terms += [(r2, masks[ll], lam * c * d2), (hs[ll], masks[ll], -lam * c * d2)]
    return terms


def _numpy_step(name, params, inverses, x, labels, key, eta, sigma, lr, lam, phi):
    """One step on `_relu_net` from the equations: feedback by one SGD step, then
    targets, then the forward updates; returns (updates, new maps, output, whether the map's
    relu clipped a target)."""
    net = _NpNet(params, len(x), phi)
    inv = [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in inverses]
    hs, masks = [x], [None]
    for ll in (1, 2, 3):
        y, mask, _, _ = net.block(ll, hs[-1])
        hs.append(y)
        masks.append(mask)

    wanted = sorted({(ll, d, hs[i].shape) for ll in (2, 3)
                     for d, i in ((0, ll - 1), (1, ll), (1, 3))})
    drawn = jax.jit(lambda k: [feedback_noise(k, 0, ll, shape, jnp.float64, d)
                               for ll, d, shape in wanted])(key)  # one compile, not one a draw
    table = {w: np.asarray(a) for w, a in zip(wanted, drawn, strict=True)}

    def noise(ll, shape, draw=0):
        return table[(ll, draw, shape)]

    new = []
    for ll in (2, 3):
        terms = _np_feedback_terms(net, name, ll, inv, hs, masks, noise, sigma, lam)
        grad = net.g_grad(ll, inv[ll - 2], terms)
        new.append({k: inv[ll - 2][k] - lr * grad[k] for k in grad})
    p = np.exp(hs[3] - hs[3].max(1, keepdims=True))
    e = p / p.sum(1, keepdims=True) - np.eye(3)[labels]  # per-example dCE/dlogits
    ts = {3: hs[3] - eta * e}
    for ll in (3, 2):
        gt = net.g(ll, new[ll - 2], ts[ll], masks[ll])[0]
        ts[ll - 1] = gt if name == "tp" else (
            hs[ll - 1] + gt - net.g(ll, new[ll - 2], hs[ll], masks[ll])[0])
    clipped = bool(np.any(_np_unpool(ts[2], masks[2]) < 0))
    return net.updates(hs, ts, eta), new, hs[3], clipped


_REFERENCE_RULES = {"dtp": {}, "ldrl": {}, "drl": {"drl_lambda": 0.3, "inverse_activation": "tanh"}}


def test_one_conv_step_of_each_feedback_loss_matches_a_numpy_reference_in_float64():
    # dtp (reconstruction loss), ldrl (L-DRL) and drl (DRL with its damping term, tanh maps):
    # one program for the three steps, which share the forward pass and the noise.
    eta, sigma, lr = 0.3, 0.2, 0.05
    with jax.enable_x64(True):
        model = _relu_net()
        params = _numpy_params(model.param_shapes, 0)
        x = jnp.asarray(_normal(1, (3, 8, 8, 1)))
        y = jnp.array([0, 2, 1])
        rules = {name: RULES[name](target_lr=eta, noise=sigma, feedback_lr=lr, feedback_steps=1,
                                   feedback_optimizer="sgd", diagnostics=False, **kw)
                 for name, kw in _REFERENCE_RULES.items()}
        # maps shaped as rule.init makes them (V_l like W_l, c_l per input channel), drawn here
        inv = tuple(_numpy_params(model.param_shapes[1:], 3, bias=0.1, inverse=True))
        st = TargetPropState(inv, tuple(optax.sgd(lr).init(g) for g in inv))
        for rule in rules.values():
            made = jax.eval_shape(lambda r=rule: r.init(jax.random.PRNGKey(3), params, model))
            assert jax.tree.structure(made) == jax.tree.structure(st)
            assert ([a.shape for a in jax.tree.leaves(made)]
                    == [a.shape for a in jax.tree.leaves(st)])
        key = jax.random.PRNGKey(5)
        steps = jax.jit(lambda p, s: {n: _step(r, model, p, s, x, y, key)
                                      for n, r in rules.items()})(params, st)
        for name, kw in _REFERENCE_RULES.items():
            upd, st2, out = steps[name]
            phi = np.tanh if "inverse_activation" in kw else None
            want_upd, want_inv, want_out, clipped = _numpy_step(
                name, params, st.inverses, np.asarray(x), np.asarray(y), key, eta, sigma, lr,
                kw.get("drl_lambda", 0.0), phi)
            assert all(a.dtype == jnp.float64 for a in jax.tree.leaves((upd, st2)))
            np.testing.assert_allclose(np.asarray(out.output), want_out, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(_flat(st2.inverses), _flat(want_inv), rtol=1e-9,
                                       atol=1e-12, err_msg=f"{name}: feedback maps")
            np.testing.assert_allclose(_flat(upd), _flat(want_upd), rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name}: forward updates")
            assert np.abs(_flat(upd[:2])).max() > 1e-3  # the conv layers did get targets
            assert clipped or name != "dtp"  # the map's relu acts: a target below zero
            assert float(out.metrics["targets_finite"]) == 1.0


# ------------------------------------------------------------------------------------------
# Exact transposes on a linear conv net: DTP's targets are backprop's
# ------------------------------------------------------------------------------------------

def test_exact_transposes_on_a_linear_conv_net_give_backprop_targets():
    # Linear blocks (identity activations) with max pooling, a strided conv and average
    # pooling; maps g_l = the exact transposes (V_l = W_l, c_l = 0): the difference targets'
    # displacements are backprop's, t_l - h_l = -eta N dL/dh_l, at every eta.
    layers = [Conv(2, (3, 3), padding="VALID"), MaxPool(), Conv(4, (3, 3), strides=2),
              AvgPool(), Flatten(), Dense(3)]
    with jax.enable_x64(True):
        model = sequential(layers, (10, 10, 1))
        params = _numpy_params(model.param_shapes, 0)
        x = jnp.asarray(_normal(1, (4, 10, 10, 1)))
        y = jnp.array([0, 1, 2, 1])
        n = len(x)
        inv = tuple({"w": p["w"], "b": jnp.zeros(p["w"].shape[-2], jnp.float64)}
                    for p in params[1:])
        chain = conv_chain(model, "dtp")
        rests = [sequential(layers[2:], (4, 4, 2)), sequential(layers[4:], (1, 1, 4))]
        rule = dtp(target_lr=0.5, feedback_steps=0)

        @jax.jit
        def run(eta):
            hs, routes = chain_forward(chain, params, x)
            e = n * jax.grad(lambda o: cross_entropy(o, y))(hs[-1])
            inverse = lambda ll, h: chain_inverse(  # noqa: E731
                chain.blocks[ll - 1], inv[ll - 2], h, routes[ll - 1], lambda a: a)
            ts = layer_targets("dtp", hs, hs[-1] - eta * e, inverse)
            # backprop's dL/dh_l, independently: the rest of the network as its own Sequential
            bp_h = [jax.grad(lambda h, r=r, ll=ll: cross_entropy(r.apply(params[ll:], h), y))(
                hs[ll]) for ll, r in ((1, rests[0]), (2, rests[1]))]
            # the rule's step with these maps (at its own eta 0.5) and backprop's gradient
            st = rule.init(jax.random.PRNGKey(3), params, model)._replace(inverses=inv)
            bp = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
            return [ts[i] - hs[i + 1] for i in range(2)], bp_h, _step(rule, model, params, st,
                                                                     x, y), bp

        for eta in (0.5, 1e-3):
            disp, bp_h, (upd, _, out), bp = run(eta)
            for d, gh in zip(disp, bp_h, strict=True):
                b = -eta * n * np.ravel(gh)
                ratio = np.dot(np.ravel(d), b) / np.dot(b, b)
                assert abs(ratio - 1) < 1e-10, (eta, ratio)
                np.testing.assert_allclose(np.ravel(d), b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
        np.testing.assert_allclose(_flat(upd), _flat(bp), rtol=1e-9, atol=1e-13)
        assert float(out.metrics["angle_1"]) < 1e-5 and float(out.metrics["angle_2"]) < 1e-5


# ------------------------------------------------------------------------------------------
# Feedback training
# ------------------------------------------------------------------------------------------


def _fixed_problem(batch=16):
    model = _relu_net()  # h_2 is 2x2x3
    params = _numpy_params(model.param_shapes, 0, bias=0.0, dtype=np.float32)
    x = jnp.asarray(_normal(1, (batch, 8, 8, 1)), jnp.float32)
    y = jnp.arange(batch) % 3
    return model, params, x, y


def _jacobian_cosines(block, p, g, hs, routes):
    """cos of the angle between J_g at h_2 and J_f^T (f = the conv block 2, g its map) for each
    example, and whether J_f is non-zero (relu and pooling leave some examples none)."""

    def one(h1, h2, r):
        jf = jax.jacobian(lambda h: block_forward(block, p, h[None])[0][0])(h1)
        jg = jax.jacobian(lambda u: chain_inverse(block, g, u[None], tuple(a[None] for a in r),
                                                  jax.nn.relu)[0])(h2)
        jf, jg = jf.reshape(h2.size, h1.size), jg.reshape(h1.size, h2.size)
        norm = jnp.linalg.norm(jg) * jnp.linalg.norm(jf)
        return jnp.sum(jg * jf.T) / jnp.maximum(norm, 1e-30), norm > 0

    return jax.vmap(one)(hs[1], hs[2], routes[1])


def test_feedback_training_lowers_the_conv_reconstruction_loss_and_ldrl_aligns_jacobians():
    # One program: DTP's inverse training on the conv block's map g_2 (unpool -> relu ->
    # transposed conv), measured on noise of the test's own; L-DRL's training of the same map,
    # measured by the angle between J_g at h_2 and J_f^T at h_1 per example.
    model, params, x, y = _fixed_problem()
    chain = conv_chain(model, "dtp")
    block = chain.blocks[1]
    eps = jnp.asarray(_normal(9, (16, 4, 4, 2)), jnp.float32)
    rec_rule = dtp(feedback_steps=60, feedback_lr=3e-2, noise=0.1, diagnostics=False)
    ali_rule = ldrl(feedback_steps=(300, 1), noise=(0.05, 0.1), feedback_lr=1e-2,
                    diagnostics=False)

    @jax.jit
    def run(key):
        hs, routes = chain_forward(chain, params, x)

        def recon(g):
            return chain_reconstruction_loss(
                lambda u, r: chain_inverse(block, g, u, r, jax.nn.relu),
                lambda h: block_forward(block, params[1], h), hs[1], eps, 0.1)

        st = rec_rule.init(key, params, model)
        _, st_rec, out = _step(rec_rule, model, params, st, x, y)
        _, st_ali, _ = _step(ali_rule, model, params, st, x, y)
        return ((recon(st.inverses[0]), recon(st_rec.inverses[0]), out.metrics["recon_2"]),
                [_jacobian_cosines(block, params[1], g, hs, routes)
                 for g in (st.inverses[0], st_ali.inverses[0])])

    (before, after, own), cosines = run(jax.random.PRNGKey(3))
    assert float(after) < 0.5 * float(before), (before, after)
    assert float(own) < 0.6 * float(before)  # the rule's own, at its last iteration
    angles = [np.degrees(np.arccos(np.clip(np.asarray(c)[np.asarray(live)], -1, 1)))
              for c, live in cosines]
    assert len(angles[0]) >= 8, angles
    assert np.mean(angles[0]) > 75 and np.mean(angles[1]) < 35, angles


# ------------------------------------------------------------------------------------------
# Harness, LeNet-5, refusals
# ------------------------------------------------------------------------------------------


def test_fit_two_seeds_on_8x8_digits_and_checkpoint_roundtrip(tmp_path):
    d = fb.data.load_digits()
    data = d._replace(x_train=d.x_train[:256], y_train=d.y_train[:256], x_test=d.x_test[:64],
                      y_test=d.y_test[:64])
    model = sequential([Conv(4, (3, 3), activation="relu"), MaxPool(),
                        Conv(8, (3, 3), activation="relu"), MaxPool(), Flatten(), Dense(10)],
                       (8, 8, 1))
    rule = dtp(target_lr=0.1, feedback_lr=1e-2, feedback_steps=2, diagnostics=False)
    res = fb.train.fit(model, rule, optax.sgd(0.05), data, epochs=3, batch_size=32, seeds=2,
                       progress=False)
    first = np.asarray(res.history[0]["train_loss"])
    last = np.asarray(res.history[-1]["train_loss"])
    assert first.shape == (2,) and np.all(last < 0.85 * first), (first, last)
    st = res.state.rule_state
    assert isinstance(st, TargetPropState)
    assert st.inverses[0]["w"].shape == (2, 3, 3, 4, 8)  # V_2 shaped like W_2, one per seed
    assert st.inverses[1]["w"].shape == (2, 32, 10)
    C.save_checkpoint(tmp_path, res.state, {"step": 3})
    back = C.load_checkpoint(tmp_path, target=jax.tree.map(jnp.zeros_like, res.state)).state
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(res.state), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert type(back.rule_state) is TargetPropState


def test_unpooling_is_the_transpose_of_the_networks_pooling_ties_included():
    # U_l routes as LeNet-5's and sequential's 2x2 max pooling sends its error (to each
    # window's first maximum: relu leaves many tied zeros), and spreads evenly for averages.
    z = jnp.asarray(np.maximum(np.round(_normal(4, (3, 6, 6, 4))), 0.0), jnp.float32)
    ct = jnp.asarray(_normal(5, (3, 3, 3, 4)), jnp.float32)
    blocks = {kind: conv_chain(sequential([Conv(4, (1, 1)), pool, Flatten(), Dense(2)],
                                          (6, 6, 4)), "dtp").blocks[0]
              for kind, pool in (("max", MaxPool()), ("avg", AvgPool()))}

    @jax.jit
    def both():
        mine = [unpool(blocks["max"], ct, (max_pool_routes(z, 2),)),
                unpool(blocks["avg"], ct, (None,))]
        avg = lambda h: h.reshape(3, 3, 2, 3, 2, 4).mean(axis=(2, 4))  # noqa: E731
        return mine, [jax.vjp(max_pool_2x2, z)[1](ct)[0], jax.vjp(avg, z)[1](ct)[0]]

    mine, theirs = both()
    assert float(jnp.mean(z == 0)) > 0.3  # many ties
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lenet5_is_a_chain_of_five_blocks():
    model = fb.models.lenet5(activation="relu")
    chain = conv_chain(model, "dtp")
    assert [b.out_shape for b in chain.blocks] == [(14, 14, 6), (5, 5, 16), (120,), (84,), (10,)]
    x = jnp.asarray(_normal(1, (1, 784)), jnp.float32)

    params = _numpy_params(model.param_shapes, 0, dtype=np.float32)
    mine, theirs = jax.jit(lambda p: (chain_forward(chain, p, x)[0][-1], model.apply(p, x)))(
        params)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)
    st = jax.eval_shape(lambda p: dtp().init(jax.random.PRNGKey(0), p, model), params)
    assert [g["w"].shape for g in st.inverses] == [p["w"].shape for p in params[1:]]


def test_networks_it_cannot_train_are_refused_by_name():
    key = jax.random.PRNGKey(0)  # every refusal comes before the params are read
    res = sequential([Conv(2, (3, 3), activation="relu"),
                      Residual((Conv(2, (3, 3), activation="relu"), Conv(2, (3, 3))), "relu"),
                      Flatten(), Dense(3)], (4, 4, 1))
    with pytest.raises(TypeError, match="'dtp' needs .*layers\\[1\\] is a Residual block"):
        dtp().init(key, None, res)
    pooled = sequential([MaxPool(), Conv(2, (3, 3)), Flatten(), Dense(3)], (4, 4, 1))
    with pytest.raises(TypeError, match="'ldrl' needs .*pools the input"):
        ldrl().init(key, None, pooled)
    net = _relu_net()
    with pytest.raises(TypeError, match="'ddtp' needs a dense fbalign.models.mlp.*dtp, drl"):
        ddtp().init(key, None, net)
    with pytest.raises(TypeError, match="'tp' needs a dense fbalign.models.mlp network, a "
                                        "fbalign.models.sequential chain"):
        tp().init(key, None, object())
    one = sequential([Flatten(), Dense(3)], (4, 4, 1))
    with pytest.raises(ValueError, match="'drl' needs at least one hidden layer"):
        drl().init(key, None, one)
    with pytest.raises(ValueError, match="noise has 3 entries.*2 feedback maps"):
        ldrl(noise=(0.1, 0.1, 0.1)).init(key, None, net)
