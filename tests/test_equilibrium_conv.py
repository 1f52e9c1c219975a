"""Equilibrium propagation on Laborieux et al.'s (2021) convolutional Hopfield network and with
their separate cross-entropy readout: the conv energy and its state gradient against a NumPy
reference written with explicit loops, EP against implicit differentiation of the free fixed
point (bias orders of one-sided and symmetric nudging), the readout's update, jit/vmap and
training through the harness, and the refusals."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src.hopfield import hopfield
from fbalign._src.hopfield_conv import ConvHopfieldNetwork, conv_hopfield
from fbalign._src.rules.equilibrium import equilibrium_propagation
from fbalign.rules import Batch, StepContext

_RHO = {"hard_sigmoid": (lambda s: np.clip(s, 0, 1), lambda s: ((s >= 0) & (s <= 1)) * 1.0),
        "sigmoid": (lambda s: 1 / (1 + np.exp(-s)),
                    lambda s: np.exp(-s) / (1 + np.exp(-s)) ** 2)}


def _random_params(net, seed, dtype=jnp.float64, scale=1.0):
    """Uniform fan-in weights (times ``scale``) and non-zero biases (so a dropped bias term
    shows), drawn with NumPy (no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(scale * rng.uniform(-1, 1, ws) / np.sqrt(np.prod(ws[:-1])), dtype),
             "b": jnp.asarray(0.3 * rng.normal(size=bs), dtype)} for ws, bs in net.param_shapes]


def _random_states(net, batch, seed, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(0.5 + 0.6 * rng.normal(size=(batch, *s)), dtype)
            for s in net.state_shapes]


# -- NumPy reference written from the energy's equation, with explicit loops ---------------------

def _np_conv(a, w, stride, pad):
    """a: (H, W, Cin), w: (k, k, Cin, Cout) -> (H', W', Cout), zero padding, cross-correlation."""
    h, wd, _ = a.shape
    k = w.shape[0]
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((ho, wo, w.shape[3]))
    for u, v, i, j in itertools.product(range(ho), range(wo), range(k), range(k)):
        r, c = u * stride + i - pad, v * stride + j - pad
        if 0 <= r < h and 0 <= c < wd:
            out[u, v] += a[r, c] @ w[i, j]
    return out


def _np_pool(z, kind):
    """2x2 pool; also the window position each output reads (its first maximum for 'm')."""
    if kind == "i":
        return z, None
    out = np.zeros((z.shape[0] // 2, z.shape[1] // 2, z.shape[2]))
    where = {}
    for p, q, c in itertools.product(*(range(n) for n in out.shape)):
        window = [(2 * p + a, 2 * q + b) for a in range(2) for b in range(2)]
        vals = [z[r, s, c] for r, s in window]
        out[p, q, c] = max(vals) if kind == "m" else np.mean(vals)
        where[p, q, c] = [window[int(np.argmax(vals))]] if kind == "m" else window
    return out, where


def _np_conv_transpose(g, where, a_shape, w, stride, pad):
    """d/da of sum(g * P(conv(a, w))): the top-down drive through the pool and the kernel."""
    k = w.shape[0]
    z_shape = ((a_shape[0] + 2 * pad - k) // stride + 1, (a_shape[1] + 2 * pad - k) // stride + 1)
    gz = np.zeros((*z_shape, w.shape[3]))  # the error on the conv output before pooling
    if where is None:
        gz = g
    else:
        for (p, q, c), cells in where.items():
            for r, s in cells:
                gz[r, s, c] += g[p, q, c] / len(cells)
    out = np.zeros(a_shape)
    for u, v, i, j in itertools.product(range(z_shape[0]), range(z_shape[1]), range(k),
                                        range(k)):
        r, c = u * stride + i - pad, v * stride + j - pad
        if 0 <= r < a_shape[0] and 0 <= c < a_shape[1]:
            out[r, c] += w[i, j] @ gz[u, v]
    return out


def _np_energy_and_grad(net, params, x, states):
    """Per example: E = 1/2 sum |s_l|^2 - sum_conv <rho(s_l), P(conv(rho(s_{l-1}), W_l)) + b_l>
    - sum_dense (rho(s_{l-1}) W_l + b_l) . rho(s_l), rho(s_0) = x; dE/ds_l = s_l - rho'(s_l)
    (drive from below + b_l + top-down drive from above); summed over the batch."""
    rho, drho = _RHO[net.activation]
    w = [np.asarray(p["w"], np.float64) for p in params]
    b = [np.asarray(p["b"], np.float64) for p in params]
    nc, n = net.num_conv, net.num_states
    e, grads = 0.0, [np.zeros(np.shape(s)) for s in states]
    for ex in range(x.shape[0]):
        s = [np.asarray(a[ex], np.float64) for a in states]
        r = [np.asarray(x[ex], np.float64).reshape(net.input_shape)] + [rho(a) for a in s]
        up, where = [], []
        for i in range(n):
            if i < nc:
                z, wh = _np_pool(_np_conv(r[i], w[i], net.strides[i], net.paddings[i]),
                                 net.pools[i])
            else:
                z, wh = r[i].reshape(-1) @ w[i], None
            up.append(z + b[i])
            where.append(wh)
        e += 0.5 * sum((a**2).sum() for a in s) - sum((u * r[i + 1]).sum()
                                                      for i, u in enumerate(up))
        for i in range(n):
            down = 0.0
            if i + 1 < n and i + 1 < nc:
                down = _np_conv_transpose(r[i + 2], where[i + 1], r[i + 1].shape, w[i + 1],
                                          net.strides[i + 1], net.paddings[i + 1])
            elif i + 1 < n:
                down = (w[i + 1] @ r[i + 2]).reshape(r[i + 1].shape)
            grads[i][ex] = s[i] - drho(s[i]) * (up[i] + down)
    return e, grads


_NETS = {
    # two conv layers (max pool, then stride 2 without pool) and two dense layers; the hard
    # sigmoid; im2col convolutions on CPU ("auto")
    "max_stride": dict(channels=(2, 2), kernels=(3, 2), strides=(1, 2), paddings=(1, 1),
                       pools="mi", fc=(4, 3)),
    # average pool on the second conv layer, the readout (outside the energy) last; sigmoid;
    # XLA's convolutions
    "avg_readout": dict(channels=(2, 3), kernels=(3, 2), paddings=(1, 1), pools="ma",
                        fc=(4, 3), readout=True, activation="sigmoid", conv_impl="xla"),
}


@pytest.mark.parametrize("config", sorted(_NETS))
def test_conv_energy_and_its_state_gradient_match_a_loop_reference(config):
    with jax.enable_x64(True):
        net = conv_hopfield((6, 6, 1), **_NETS[config])
        params = _random_params(net, 0)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 36)))  # flat input
        states = _random_states(net, 2, 2)

        def energies(s):  # E and dE/ds from the flat input, E from the image layout
            e, g = jax.value_and_grad(lambda s: net.energy(params, x, s))(s)
            return e, g, net.energy(params, x.reshape(2, 6, 6, 1), s)

        e, g, e_img = jax.jit(energies)(states)
        e_ref, g_ref = _np_energy_and_grad(net, params, np.asarray(x), states)
        np.testing.assert_allclose(float(e), e_ref, rtol=1e-10)
        np.testing.assert_allclose(float(e_img), e_ref, rtol=1e-10)
        for got, want in zip(g, g_ref, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-12)


# -- EP against implicit differentiation of the free fixed point ---------------------------------

def _problem(readout=False):
    """6x6x1 -> conv 2 (3x3, pad 1) max pool -> conv 2 (2x2, no pool) -> dense 3; with the
    readout (one conv layer, to compile faster) 6x6x1 -> conv 2 (3x3, pad 1) max pool -> dense
    4 -> readout 3. XLA's convolutions (fewer ops to compile than im2col's)."""
    conv = dict(channels=(2,), kernels=3, paddings=1, pools="m") if readout else dict(
        channels=(2, 2), kernels=(3, 2), paddings=(1, 0), pools="mi")
    net = conv_hopfield((6, 6, 1), **conv, fc=(4, 3) if readout else (3,),
                        activation="sigmoid", step_size=0.5, readout=readout, conv_impl="xla")
    params = _random_params(net, 4, scale=3.0)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 6, 1)))
    y = jnp.array([0, 2])
    return net, params, x, y


def _step(rule, net, params, x, y, key=None, loss=fb.squared_error):
    key = jax.random.PRNGKey(3) if key is None else key
    return rule.step(params, rule.init(key, params, net), Batch(x, y), key,
                     StepContext(net, loss))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _flat_j(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


@functools.partial(jax.jit, static_argnums=(0, 5))
def _implicit_gradient(net, params, x, y, s_star, cost):
    """d/dtheta of C(output(s*(theta), theta), y) / B with ds*/dtheta = -H^-1 d2E/ds dtheta
    (reverse over reverse: the max pool has a custom VJP, no JVP)."""
    s_flat, unravel_s = jax.flatten_util.ravel_pytree(s_star)
    p_flat, unravel_p = jax.flatten_util.ravel_pytree(params)
    energy = lambda sf, pf: net.energy(unravel_p(pf), x, unravel_s(sf))
    hess = jax.jacrev(jax.grad(energy, 0), 0)(s_flat, p_flat)
    cross = jax.jacrev(jax.grad(energy, 0), 1)(s_flat, p_flat)  # (n_s, n_theta)

    def c(sf, pf):
        out = net.output(unravel_p(pf), unravel_s(sf))
        onehot = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
        if cost == "squared":
            return 0.5 * jnp.sum((out - onehot) ** 2)
        return -jnp.sum(onehot * jax.nn.log_softmax(out))

    lam = jnp.linalg.solve(hess, jax.grad(c, 0)(s_flat, p_flat))
    return (jax.grad(c, 1)(s_flat, p_flat) - lam @ cross) / x.shape[0]


def _free(net, params, x):
    return jax.jit(lambda p: net.free_phase(p, x, steps=4000, tol=1e-13).state)(params)


def _ep(net, params, x, y, beta, nudging, cost="squared"):
    """The rule's update, converged phases (tol 1e-13)."""
    rule = equilibrium_propagation(beta, 4000, free_steps=4000, nudging=nudging, cost=cost,
                                   tol=1e-13)
    return jax.jit(lambda p: _step(rule, net, p, x, y)[0])(params)


def _rel(u, true):
    return np.linalg.norm(_flat(u) - true) / np.linalg.norm(true)


def _signed_keys():
    """Two step keys whose random sign of beta is +1 and -1."""
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    signs = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (), jnp.float32))(keys))
    return jnp.stack([keys[np.argmax(signs > 0)], keys[np.argmax(signs < 0)]])


def test_conv_ep_tends_to_the_implicit_gradient_with_the_predicted_bias_orders():
    """One-sided nudging at +beta and -beta (random_sign under vmap: one compilation per
    beta): each is biased O(beta); their mean, the symmetric estimate, O(beta^2)."""
    with jax.enable_x64(True):
        net, params, x, y = _problem()
        true = np.asarray(_implicit_gradient(net, params, x, y, _free(net, params, x),
                                             "squared"))
        keys, one, sym = _signed_keys(), [], []
        for beta in (0.1, 0.05):
            rule = equilibrium_propagation(beta, 4000, free_steps=4000, random_sign=True,
                                           tol=1e-13)
            plus, minus = jax.jit(jax.vmap(lambda k, r=rule: _flat_j(
                _step(r, net, params, x, y, key=k)[0])))(keys)
            one.append(max(_rel(plus, true), _rel(minus, true)))
            sym.append(_rel((plus + minus) / 2, true))
        assert sym[1] < 5e-3 and one[1] < 0.1, (one, sym)
        # halving beta halves one-sided's bias and quarters symmetric's
        assert 1.7 < one[0] / one[1] < 2.3 and 3.4 < sym[0] / sym[1] < 4.6, (one, sym)


# -- the readout (Laborieux et al.'s softmax=True) ------------------------------------------------

def _np_readout_grad(net, params, states, y):
    """d/dtheta_out of the softmax cross-entropy of o = rho(s_last) W_out + b_out, / B."""
    r = _RHO[net.activation][0](np.asarray(states[-1], np.float64)).reshape(len(y), -1)
    o = r @ np.asarray(params[-1]["w"]) + np.asarray(params[-1]["b"])
    p = np.exp(o - o.max(1, keepdims=True))
    err = p / p.sum(1, keepdims=True) - np.eye(o.shape[1])[np.asarray(y)]
    return np.concatenate([np.ravel(err.sum(0) / len(y)), np.ravel(r.T @ err / len(y))])


def test_readout_update_is_the_cross_entropy_gradient_and_ep_tends_to_implicit_diff():
    with jax.enable_x64(True):
        net, params, x, y = _problem(readout=True)
        assert net.num_states == 2 and len(params) == 3  # the readout is params' last entry
        s_star = _free(net, params, x)
        free = _np_readout_grad(net, params, s_star, y)
        readout = lambda u: np.concatenate([np.ravel(u[-1]["b"]), np.ravel(u[-1]["w"])])
        # one-sided: the gradient at the nudged state s^beta (Laborieux et al.'s code)
        beta = 0.5
        nudge = lambda s: (net.energy(params, x, s)
                           + beta * x.shape[0] * fb.cross_entropy(net.output(params, s), y))
        s_beta = jax.jit(lambda s: net.relax_states(nudge, s, steps=4000, tol=1e-13).state)(
            s_star)
        want = _np_readout_grad(net, params, s_beta, y)
        got = readout(_ep(net, params, x, y, beta, "one_sided", "cross_entropy"))
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-11)
        assert np.abs(want - free).max() > 1e-3  # s^beta is far enough from s* to tell
        # symmetric: the readout's update tends to the gradient at the free equilibrium, and
        # the whole update to the loss's gradient through the fixed point, both as beta^2
        true = np.asarray(_implicit_gradient(net, params, x, y, s_star, "cross_entropy"))
        ups = [_ep(net, params, x, y, b, "symmetric", "cross_entropy") for b in (0.2, 0.1)]
        err = [np.linalg.norm(readout(u) - free) / np.linalg.norm(free) for u in ups]
        bias = [_rel(u, true) for u in ups]
        assert err[1] < 2e-3 and 3.0 < err[0] / err[1] < 5.0, err
        assert bias[1] < 5e-3 and 3.0 < bias[0] / bias[1] < 5.0, bias


def test_dense_network_with_readout_matches_backprop_through_the_free_phase():
    """The readout option of the dense network: EP (symmetric, small beta) against jax.grad of
    the cross-entropy through the unrolled, converged free phase."""
    net = hopfield((5, 6, 3), "sigmoid", free_steps=300, readout=True)
    params = [{"w": 2.0 * p["w"], "b": 0.1 + p["b"]} for p in net.init(jax.random.PRNGKey(0))]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    y = jnp.array([0, 1, 2, 1])
    assert [s.shape for s in net.zero_states(x)] == [(4, 6)]  # no state for the readout
    s = np.random.default_rng(0).normal(size=(4, 6))  # the logits: rho(s_1) W_2 + b_2
    np.testing.assert_allclose(np.asarray(net.output(params, [jnp.asarray(s, jnp.float32)])),
                               _RHO["sigmoid"][0](s) @ params[1]["w"] + params[1]["b"],
                               rtol=1e-5, atol=1e-6)
    loss, bptt = jax.jit(jax.value_and_grad(lambda p: fb.cross_entropy(net.apply(p, x), y)))(
        params)
    rule = equilibrium_propagation(1e-2, 300, nudging="symmetric", cost="cross_entropy")
    updates, _, out = jax.jit(lambda p: _step(rule, net, p, x, y, loss=fb.cross_entropy))(params)
    np.testing.assert_allclose(_flat(updates), _flat(bptt), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(float(out.loss), float(loss), rtol=1e-5)
    assert out.output.shape == (4, 3)  # the readout's logits


# -- jit, vmap over seeds, training ----------------------------------------------------------

def test_conv_rule_runs_under_jit_and_vmap_over_seeds_and_training_lowers_the_loss():
    net = conv_hopfield((6, 6, 1), (2,), 3, paddings=1, pools="m", fc=(3,), free_steps=20)
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1))
    y = jnp.arange(8) % 3
    rule = equilibrium_propagation(0.5, 8, random_sign=True)
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    one = jax.jit(lambda k: _flat_j(_step(rule, net, params, x, y, key=k)[0]))
    batched = np.asarray(jax.jit(jax.vmap(one))(keys))
    signs = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (), jnp.float32))(keys))
    assert 0 < (signs > 0).sum() < len(signs)  # both signs drawn
    for i, sign in enumerate(signs):  # the rows of one sign agree, the two signs differ
        np.testing.assert_allclose(batched[i], batched[np.argmax(signs == sign)], rtol=1e-5,
                                   atol=1e-7)
    assert np.abs(batched[np.argmax(signs > 0)] - batched[np.argmax(signs < 0)]).max() > 1e-3
    np.testing.assert_allclose(batched[0], np.asarray(one(keys[0])), rtol=1e-4, atol=1e-6)
    # a few harness steps with the readout (symmetric nudging, cross-entropy) lower the loss
    net = conv_hopfield((6, 6, 1), (2,), 3, paddings=1, pools="m", fc=(3,), free_steps=20,
                        readout=True)
    rule = equilibrium_propagation(0.5, 8, nudging="symmetric", cost="cross_entropy")
    opt = optax.sgd(0.5)
    state = fb.train.init_train_state(net, rule, opt, jax.random.PRNGKey(0))
    step = fb.train.make_train_step(net, rule, opt, loss="cross_entropy")
    losses = []
    for _ in range(6):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    assert float(metrics["ep_diverged"]) == 0
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.97 * losses[0], losses


# -- refusals ------------------------------------------------------------------------------

def test_bad_inputs_pools_and_readout_costs_are_refused():
    net = conv_hopfield((6, 6, 1), (2,), 3, paddings=1, fc=(3,))
    p = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 6, 6, 1\) or "
                                         r"\(batch, 36\), got \(2, 5, 5, 1\)"):
        net.apply(p, jnp.ones((2, 5, 5, 1)))
    with pytest.raises(ValueError, match="pool.*does not divide its 5x5 map"):
        conv_hopfield((7, 7, 1), (2,), 3, pools="m")
    with pytest.raises(ValueError, match="unknown pool 'x'"):
        conv_hopfield((6, 6, 1), (2,), 3, paddings=1, pools="x")
    with pytest.raises(ValueError, match="kernel 7 does not fit"):
        conv_hopfield((6, 6, 1), (2,), 7, pools="i")
    with pytest.raises(ValueError, match="kernels needs one entry per conv layer"):
        conv_hopfield((6, 6, 1), (2, 2), (3,), pools="i")
    with pytest.raises(ValueError, match="unknown activation"):
        conv_hopfield((6, 6, 1), (2,), 3, paddings=1, activation="swish2")
    with pytest.raises(ValueError, match="readout=True .* at least one hidden layer"):
        hopfield((4, 3), readout=True)
    readout = conv_hopfield((6, 6, 1), (2,), 3, paddings=1, fc=(3,), readout=True)
    rule = equilibrium_propagation(cost="squared")
    with pytest.raises(ValueError, match="readout=True.*cost='squared'.*cost='cross_entropy'"):
        fb.train.init_train_state(readout, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    p, key = readout.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="readout=True.*cost='squared'"):  # the step checks too
        rule.step(p, rule.init(key, p), Batch(jnp.ones((2, 36)), jnp.zeros(2, int)), key,
                  StepContext(readout, fb.squared_error))
    mlp = fb.mlp((4, 3))
    with pytest.raises(TypeError, match="equilibrium_propagation.*conv_hopfield.*MLP"):
        fb.train.init_train_state(mlp, equilibrium_propagation(), optax.sgd(0.1),
                                  jax.random.PRNGKey(0))
    assert isinstance(net, ConvHopfieldNetwork) and net.layer_structure is False
