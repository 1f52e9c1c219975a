"""Modular and hybrid DFA (Han, Park, Ryu & Yoo 2020): identities (one module per layer is DFA,
one module is backprop), a NumPy reference of an intermediate partition, the dilated (sparse)
feedback to conv maps and the grouped error propagation inside modules, each against a
reference written here from the equations, in both forms (explicit ``update`` on the tape and
``jax.grad`` of ``apply`` with the rule's backward)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from jax import lax

import fbalign as fb
from fbalign._src.metrics import feedback_kind, make_alignment_probe, rule_deltas
from fbalign._src.rules.modular_dfa import (
    bp_partition,
    dilated_error,
    grouped_op,
    hybrid_dfa,
    modular_dfa,
    module_sizes,
)
from fbalign.models import Conv, Dense, Flatten, MaxPool, sequential
from fbalign.rules import random_backprop
from fbalign.train import init_train_state

SIZES = (5, 7, 6, 4, 3)  # a 4-layer MLP
# A LeNet-like net on 12x12 inputs: conv(4) pool conv(6) pool flatten fc5 fc4 out3.
CONV = sequential([Conv(4, (3, 3), padding="SAME", activation="tanh"), MaxPool(),
                   Conv(6, (3, 3), padding="VALID", activation="tanh"), MaxPool(), Flatten(),
                   Dense(5, "tanh"), Dense(4, "tanh"), Dense(3)], input_shape=(12, 12, 1))
LABELS = np.array([0, 2, 1])
TOL = dict(rtol=1e-9, atol=1e-12)


def key_of(seed):
    # RBG keys: XLA's RngBitGenerator compiles far faster than threefry inside the jitted inits
    return jax.random.key(seed, impl="rbg")


def mlp_setup():
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i)),
               "b": jnp.asarray(0.1 * rng.normal(size=o))}
              for i, o in zip(SIZES[:-1], SIZES[1:], strict=True)]
    x = jnp.asarray(rng.normal(size=(3, SIZES[0])))
    return fb.mlp(SIZES, "tanh"), params, x


def conv_setup(dtype=np.float64):
    rng = np.random.default_rng(1)
    params = [{"w": jnp.asarray(rng.normal(size=s) / np.sqrt(math.prod(s[:-1])), dtype),
               "b": jnp.asarray(0.1 * rng.normal(size=s[-1]), dtype)}
              for s in CONV.param_shapes]
    x = jnp.asarray(rng.normal(size=(3, 12, 12, 1)), dtype)
    return CONV, params, x


def np_error(y):
    """``e = dL/dy`` of the batch-mean softmax cross-entropy, in NumPy."""
    y = np.asarray(y)
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p - np.eye(y.shape[1])[LABELS]) / y.shape[0]


class Run(dict):
    """What `run_rules` returns: ``run[name] = (state, explicit, grad)`` for each rule, with
    ``run.tape`` (the recorded forward pass) and ``run.bp`` (``jax.grad`` of the loss)."""

    tape = bp = None


def run_rules(model, rules, key, params, x, grads=(), bp=False):
    """Each rule's state (told the feature maps on a conv net), its explicit update on the tape
    and, for the names in ``grads``, ``jax.grad`` of the loss of ``apply`` run with its backward;
    plus the tape and (``bp``) backprop's gradient. A batch of keys runs the rules vmapped over
    them (one seed per key). One jitted program per call: the tests spend their time compiling,
    and one program compiles faster than one per rule (or an eager kernel per op)."""
    kw = {"feature_shapes": model.feature_shapes} if hasattr(model, "feature_shapes") else {}

    def loss(p, back=None):
        return fb.cross_entropy(model.apply(p, x, backward=back), LABELS)

    @jax.jit
    def go(key, params, x):
        y, tape = model.forward(params, x)
        err = jax.grad(lambda o: fb.cross_entropy(o, LABELS))(y)

        def per_seed(key):
            out = {}
            for name, rule in rules.items():
                state = rule.init(key, params, **kw)
                grad = None
                if name in grads:
                    back = rule.backward(fb.rules.rule_feedback(rule, params, state), LABELS)
                    grad = jax.grad(loss)(params, back)
                out[name] = (state, rule.update(params, state, tape, err)[0], grad)
            return out

        out = jax.vmap(per_seed)(key) if key.ndim else per_seed(key)
        return out, tape, jax.grad(loss)(params) if bp else None

    out, tape, grad = go(key, params, x)
    run = Run(out)
    run.tape, run.bp = tape, grad
    return run


def np_modular_mlp(params, x, tops, feedback):
    """Modular DFA on a tanh MLP with a linear output, from the equations: the error reaching
    h_l is e B_l at module tops, delta_{l+1} W_{l+1}^T inside a module."""
    ws = [np.asarray(p["w"]) for p in params]
    bs = [np.asarray(p["b"]) for p in params]
    hs, acts = [np.asarray(x)], []
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        acts.append(hs[-1] @ w + b)
        hs.append(np.tanh(acts[-1]) if i < len(ws) - 1 else acts[-1])
    e = np_error(hs[-1])
    grads, delta = [None] * len(ws), e
    for i in reversed(range(len(ws))):
        grads[i] = {"w": hs[i].T @ delta, "b": delta.sum(0)}
        if i:
            eps = e @ np.asarray(feedback[i - 1]) if i - 1 in tops else delta @ ws[i].T
            delta = eps * (1 - np.tanh(acts[i - 1]) ** 2)
    return grads


# ---------------------------------------------------------------------------------------------
# One jitted program per network: every rule of the MLP tests, every rule of the conv tests.

MLP_RULES = {
    "dfa": fb.direct_feedback_alignment(),
    "per_layer": modular_dfa((1, 1, 1, 1)),
    "one": modular_dfa(1),
    "m22": modular_dfa((2, 2)),
    "m121": modular_dfa((1, 2, 1)),
    "sparse": modular_dfa((2, 2), nonzeros=1),
    "srbp": random_backprop(skip=True, nonzeros=1),
    "hybrid": hybrid_dfa((1,)),
}
CONV_RULES = {
    "dfa": fb.direct_feedback_alignment(),
    "per_layer": modular_dfa(5),
    "one": modular_dfa((5,)),
    "dilated": modular_dfa((1, 1, 3), dilation=3),
    "grouped": modular_dfa((2, 1, 1, 1), groups=2, dilation=2),
}
SEEDS = 2  # the conv rules run vmapped over two seeds


@pytest.fixture(scope="module")
def mlp_run():
    with jax.enable_x64(True):
        model, params, x = mlp_setup()
        grads = ("per_layer", "one", "m22", "m121", "sparse", "hybrid")
        return params, x, run_rules(model, MLP_RULES, key_of(3), params, x, grads, bp=True)


@pytest.fixture(scope="module")
def conv_run():
    """Every conv rule vmapped over ``SEEDS`` keys (``run[name]`` leaves have a leading seed
    axis; `seed` takes one out)."""
    with jax.enable_x64(True):
        model, params, x = conv_setup()
        keys = jax.random.split(key_of(4), SEEDS)
        grads = ("per_layer", "dilated", "grouped")
        return params, x, run_rules(model, CONV_RULES, keys, params, x, grads, bp=True)


def seed(tree, k):
    return jax.tree.map(lambda a: np.asarray(a)[k], tree)


# ---------------------------------------------------------------------------------------------
# Identities


def test_one_module_per_layer_is_dfa_and_one_module_is_backprop_on_an_mlp(mlp_run):
    assert module_sizes(4, 4) == (1, 1, 1, 1) and module_sizes(1, 4) == (4,)
    assert module_sizes(3, 7) == (3, 2, 2)  # the modules nearest the input take the extra layer
    params, x, run = mlp_run
    s_dfa, want, _ = run["dfa"]
    state, *forms = run["per_layer"]
    assert_trees_close(state.feedback, s_dfa.feedback, 0, 0)  # the same B
    for got in forms:
        assert_trees_close(got, want, **TOL)
    state, *forms = run["one"]
    assert all(b is None for b in state.feedback)
    for got in forms:
        assert_trees_close(got, run.bp, **TOL)
    # the NumPy reference with no module top but the output is backprop too
    assert_trees_close(np_modular_mlp(params, x, set(), None), run.bp, **TOL)
    assert not np.allclose(want[0]["w"], run.bp[0]["w"])


def test_one_module_per_layer_is_dfa_and_one_module_is_backprop_on_a_conv_net(conv_run):
    _, _, run = conv_run
    for k in range(SEEDS):
        s_dfa, want, _ = seed(run["dfa"], k)
        state, *forms = seed(run["per_layer"], k)
        assert [None if b is None else b.shape for b in state.feedback] == [
            (3, 12, 12, 4), (3, 4, 4, 6), (3, 5), (3, 4), None]
        assert_trees_close(state.feedback, s_dfa.feedback, 0, 0)
        for got in forms:
            assert_trees_close(got, want, **TOL)
        # one module: backprop (its jax.grad form, no taps, is checked on the MLP)
        assert_trees_close(seed(run["one"][1], k), run.bp, **TOL)
        assert not np.allclose(want[0]["w"], run.bp[0]["w"])


@pytest.mark.parametrize("modules", [(2, 2), (1, 2, 1)])
def test_partition_matches_numpy_reference(mlp_run, modules):
    params, x, run = mlp_run
    state, *forms = run["m" + "".join(map(str, modules))]
    tops = set(np.cumsum(modules) - 1)
    assert [b is not None for b in state.feedback] == [i in tops for i in range(3)] + [False]
    want = np_modular_mlp(params, x, tops, state.feedback)
    for got in forms:
        assert_trees_close(got, want, **TOL)
    bp = np_modular_mlp(params, x, set(), None)  # no module top but the output: backprop
    assert not np.allclose(want[0]["w"], bp[0]["w"])


def test_sparse_dense_feedback_is_sparse_srbp_mask_and_matches_reference(mlp_run):
    params, x, run = mlp_run
    state, *forms = run["sparse"]
    b = np.asarray(state.feedback[1])
    assert b.shape == (3, 6) and ((b != 0).sum(0) == 1).all()  # one per receiving unit
    np.testing.assert_array_equal(b, run["srbp"][0].feedback[1])  # sparse SRBP's draw
    want = np_modular_mlp(params, x, {1, 3}, state.feedback)
    for got in forms:
        assert_trees_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# Hybrid DFA is a partition


def test_hybrid_dfa_is_the_modular_partition_it_names(mlp_run):
    _, cparams, _ = conv_setup(np.float32)
    assert bp_partition("conv")(cparams) == (3, 1, 1)  # conv stack by BP below DFA classifier
    assert bp_partition("dense")(cparams) == (1, 1, 3)  # the reverse
    assert bp_partition((0, -4))(cparams) == (3, 1, 1)
    assert bp_partition(1)(cparams) == (1, 2, 1, 1)
    params, x, run = mlp_run
    assert bp_partition((0,))(params) == (2, 1, 1)
    assert bp_partition((0, 1))(params) == (3, 1)
    assert bp_partition((1,))(params) == (1, 2, 1)
    s_h, *forms = run["hybrid"]
    s_m, same, _ = run["m121"]  # the same key: the same feedback and updates
    assert_trees_close(s_h, s_m, 0, 0)
    want = np_modular_mlp(params, x, {0, 2, 3}, s_m.feedback)
    for got in (*forms, same):
        assert_trees_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# Dilated feedback to conv maps and grouped error propagation


def np_conv_kernel_grad(x, delta, k, pad):
    """dW[i, j, c, o] = sum_{n,y,x} xpad[n, y+i, x+j, c] delta[n, y, x, o] (stride 1)."""
    x = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = delta.shape[1:3]
    return np.stack([np.stack([np.einsum("nyxc,nyxo->co", x[:, i:i + ho, j:j + wo], delta)
                               for j in range(k)]) for i in range(k)])


def np_dilate(e, b, map_shape, d):
    out = np.zeros((e.shape[0], *map_shape))
    out[:, ::d, ::d, :] = np.einsum("nk,kyxc->nyxc", e, np.asarray(b))
    return out


@pytest.mark.parametrize("hw,d", [((5, 7), 2), ((6, 4), 4), ((3, 3), 1)])
def test_dilated_error_places_e_b_on_the_grid(hw, d):
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        shape = (*hw, 2)
        coarse = (-(-hw[0] // d), -(-hw[1] // d), 2)
        e, b = rng.normal(size=(3, 4)), rng.normal(size=(4, *coarse))
        got = np.asarray(dilated_error(jnp.asarray(e), jnp.asarray(b), shape, d))
        np.testing.assert_allclose(got, np_dilate(e, b, shape, d), **TOL)
        off_grid = np.ones(got.shape, bool)
        off_grid[:, ::d, ::d, :] = False
        assert not got[off_grid].any()  # zeros between the grid points


def test_dilated_feedback_matches_reference_and_has_the_stated_size(conv_run):
    """modules (1, 1, 3): both conv layers are module tops; with dilation=3 each hears e B_l on
    every third row and column of its map, zeros between; fc1, fc2 and the output learn by
    backprop inside the last module."""
    d = 3
    params, _, run = conv_run
    (state, *forms), tape = seed(run["dilated"], 1), run.tape
    maps = CONV.feature_shapes[:2]
    for b, m in zip(state.feedback[:2], maps, strict=True):
        assert b.shape == (3, math.ceil(m[0] / d), math.ceil(m[1] / d), m[2])
        assert b.size == 3 * math.ceil(m[0] / d) * math.ceil(m[1] / d) * m[2]
    assert sum(b.size for b in state.feedback[:2]) == 3 * (4 * 4 * 4 + 2 * 2 * 6)
    e = np_error(tape.output)
    acts = [np.asarray(a) for a in tape.preacts]
    ins = [np.asarray(v) for v in tape.inputs]
    want = [None] * 5
    for i, pad in ((0, 1), (1, 0)):  # the module tops: dilated direct feedback
        delta = np_dilate(e, state.feedback[i], acts[i].shape[1:], d) * (
            1 - np.tanh(acts[i]) ** 2)
        want[i] = {"w": np_conv_kernel_grad(ins[i], delta, 3, pad),
                   "b": delta.sum((0, 1, 2))}
    delta = e
    for i in (4, 3, 2):  # backprop inside the last module
        want[i] = {"w": ins[i].T @ delta, "b": delta.sum(0)}
        if i > 2:
            delta = delta @ np.asarray(params[i]["w"]).T * (1 - np.tanh(acts[i - 1]) ** 2)
    for got in forms:
        assert_trees_close(got, want, **TOL)


def np_max_pool_vjp(h, g):
    """2x2 max pooling's VJP: each window's error goes to its first maximum (row-major)."""
    n, hh, ww, c = h.shape
    blocks = h.reshape(n, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    first = blocks.reshape(*blocks.shape[:4], 4).argmax(-1)
    out = np.zeros_like(blocks.reshape(*blocks.shape[:4], 4))
    np.put_along_axis(out, first[..., None], g[..., None], -1)
    out = out.reshape(n, hh // 2, ww // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return out.reshape(h.shape)


def np_transposed_valid_conv(delta, kernel, in_shape):
    """The error a stride-1 VALID conv sends to its input through ``kernel``:
    dx[n, y+i, x+j, c] += delta[n, y, x, o] kernel[i, j, c, o]."""
    out = np.zeros(in_shape)
    k, (ho, wo) = kernel.shape[0], delta.shape[1:3]
    for i in range(k):
        for j in range(k):
            out[:, i:i + ho, j:j + wo] += np.einsum("nyxo,co->nyxc", delta, kernel[i, j])
    return out


def np_grouped_modules(tape, params, e, feedback, kernel, d):
    """modules (2, 1, 1, 1) on CONV: fc1 and fc2 hear e B_l, conv2 hears e B_2 on every d-th row
    and column of its map, the output learns from e, and conv1 hears conv2's delta sent down
    through ``kernel`` (in place of W_2), then pooling."""
    acts = [np.asarray(a) for a in tape.preacts]
    ins = [np.asarray(v) for v in tape.inputs]
    fprime = [1 - np.tanh(a) ** 2 for a in acts]
    deltas = {4: e}
    for i in (3, 2):
        deltas[i] = e @ np.asarray(feedback[i]) * fprime[i]
    deltas[1] = np_dilate(e, feedback[1], acts[1].shape[1:], d) * fprime[1]
    err_x1 = np_transposed_valid_conv(deltas[1], kernel, ins[1].shape)
    deltas[0] = np_max_pool_vjp(np.tanh(acts[0]), err_x1) * fprime[0]
    grads = [None] * 5
    for i, pad in ((0, 1), (1, 0)):
        grads[i] = {"w": np_conv_kernel_grad(ins[i], deltas[i], 3, pad),
                    "b": deltas[i].sum((0, 1, 2))}
    for i in (2, 3, 4):
        grads[i] = {"w": ins[i].T @ deltas[i], "b": deltas[i].sum(0)}
    return grads


def block_diagonal(kern, g):
    """The full ``(kh, kw, cin, cout)`` kernel of a grouped one: input channel group j feeds
    output group j, every other block is zero."""
    kh, kw, cin_g, cout = kern.shape
    full = np.zeros((kh, kw, cin_g * g, cout))
    cout_g = cout // g
    for j in range(g):
        full[:, :, cin_g * j:cin_g * (j + 1), cout_g * j:cout_g * (j + 1)] = (
            kern[:, :, :, cout_g * j:cout_g * (j + 1)])
    return full


def test_grouped_op_is_feature_group_count_and_a_block_diagonal_conv():
    g = 2
    with jax.enable_x64(True):
        rng = np.random.default_rng(12)
        x1, kern = rng.normal(size=(2, 6, 6, 4)), rng.normal(size=(3, 3, 2, 6))
        op = CONV.layer_ops()[1].op  # the network's own VALID conv (im2col on CPU)
        dn = ("NHWC", "HWIO", "NHWC")

        @jax.jit
        def three(x1, kern, full):
            lax_g = lax.conv_general_dilated(x1, kern, (1, 1), "VALID", dimension_numbers=dn,
                                             feature_group_count=g)
            return lax_g, grouped_op(op, g)(x1, kern), op(x1, full)

        lax_g, ours, full_conv = three(x1, kern, block_diagonal(kern, g))
        np.testing.assert_allclose(ours, lax_g, **TOL)
        np.testing.assert_allclose(full_conv, lax_g, **TOL)


def test_grouped_dilated_modules_vmapped_over_seeds_match_reference(conv_run):
    """modules (2, 1, 1, 1), groups=2, dilation=2 on the conv net, vmapped over two seeds:
    conv2 (4 -> 6 channels) is a module top that hears e B_2 on every other row and column of
    its 4x4 map, and sends its error down to conv1 through a fixed (3, 3, 2, 6) kernel G with
    feature_group_count=2 (the full kernel with the off-diagonal channel blocks zero); fc1 and
    fc2 hear e B_l. Both forms against the NumPy reference, seed by seed."""
    g, d = 2, 2
    params, _, run = conv_run
    (states, *forms), tape = run["grouped"], run.tape
    assert [a.shape for a in jax.tree.leaves(states)] == [
        (2, 3, 2, 2, 6), (2, 3, 5), (2, 3, 4), (2, 3, 3, 2, 6)]
    assert all(k is None for i, k in enumerate(states.kernels) if i != 1)
    e = np_error(tape.output)
    for k in range(SEEDS):
        state = seed(states, k)
        want = np_grouped_modules(tape, params, e, state.feedback,
                                  block_diagonal(state.kernels[1], g), d)
        for got in forms:
            assert_trees_close(seed(got, k), want, **TOL)
    for leaf in jax.tree.leaves((states, forms[0][:-1])):  # the output learns from e alone
        leaf = np.asarray(leaf)
        assert not np.allclose(leaf[0], leaf[1])  # each seed its own feedback and updates
    # backprop inside the module (W_2 in place of G) would differ
    bp_inside = np_grouped_modules(tape, params, e, state.feedback, np.asarray(params[1]["w"]),
                                   d)
    assert not np.allclose(want[0]["w"], bp_inside[0]["w"])


# ---------------------------------------------------------------------------------------------
# Refused options


def test_bad_options_are_refused():
    """Each refusal names the option; those that need the network raise in ``init`` (checked
    with eval_shape: the errors come at trace time, nothing compiles)."""
    _, params, _ = mlp_setup()
    _, cparams, _ = conv_setup(np.float32)
    key = key_of(0)
    shapes = CONV.feature_shapes

    def init(rule, p=params, **kw):
        return jax.eval_shape(lambda k: rule.init(k, p, **kw), key)

    with pytest.raises(ValueError, match="sums to 5 .* network has 4 layers"):
        init(modular_dfa((2, 3)))
    with pytest.raises(ValueError, match="modules=5: a network of 4 layers"):
        init(modular_dfa(5))
    for bad in (0, (2, 0), (2.0, 2)):
        with pytest.raises(ValueError, match="modules"):
            modular_dfa(bad)
    with pytest.raises(TypeError, match="modules"):
        modular_dfa("2,2")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="dilation"):
            modular_dfa(2, dilation=bad)
    with pytest.raises(ValueError, match="groups"):
        modular_dfa(2, groups=0)
    with pytest.raises(ValueError, match="nonzeros"):
        modular_dfa(2, nonzeros=0)
    with pytest.raises(ValueError, match=r"groups=3 must divide .* layer 1 \(cin=4, cout=6\)"):
        init(modular_dfa((2, 1, 1, 1), groups=3), cparams, feature_shapes=shapes)
    with pytest.raises(ValueError, match="groups=2 .* this partition has none"):
        init(modular_dfa(5, groups=2), cparams, feature_shapes=shapes)
    with pytest.raises(ValueError, match="dilation=2 .* no module top"):
        init(modular_dfa(2, dilation=2))
    with pytest.raises(ValueError, match="feature_shapes"):
        init(modular_dfa(5), cparams)
    with pytest.raises(ValueError, match="bp_layers='conv'.* no hidden conv layer"):
        init(hybrid_dfa("conv"))
    with pytest.raises(ValueError, match="output layer 3"):
        init(hybrid_dfa((0, 3)))
    with pytest.raises(ValueError, match="bp_layers"):
        hybrid_dfa("pool")
    # a state drawn for another partition
    model, params, x = mlp_setup()
    y, tape = jax.eval_shape(model.forward, params, x)
    state = init(modular_dfa(4))
    with pytest.raises(ValueError, match=r"does not fit the partition \(2, 2\)"):
        jax.eval_shape(modular_dfa((2, 2)).update, params, state, tape, y)
    # grouped kernels drawn for groups=2, used by the rule without groups
    y, tape = jax.eval_shape(CONV.forward, cparams, jnp.zeros((2, 12, 12, 1)))
    state = init(modular_dfa((2, 1, 1, 1), groups=2), cparams, feature_shapes=shapes)
    with pytest.raises(ValueError, match=r"groups=None .* kernels at \[1\], expected at \[\]"):
        jax.eval_shape(modular_dfa((2, 1, 1, 1)).update, cparams, state, tape, y)


# ---------------------------------------------------------------------------------------------
# Alignment probes


def test_probes_compare_module_tops_with_dfa_and_backprop_inside_modules():
    """The probe reads modular DFA's module-top feedback like DFA's (angle of ``B_l`` to
    ``P_l^T``, the DFA criterion) and reports no angle for the layers inside a module; the
    per-example deltas behind the criterion are the rule's own (backprop inside a module)."""
    model = fb.mlp((6, 8, 7, 5, 4), "tanh")
    rule = modular_dfa((2, 2))  # tops: layer 1 (hidden) and 3 (the output)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 16))
    st = init_train_state(model, rule, optax.sgd(0.1), jax.random.PRNGKey(0))
    assert feedback_kind(rule, st.params, st.rule_state) == "dfa"
    m = make_alignment_probe(model, rule, "cross_entropy", x, y)(st)
    assert [k for k in m if k.startswith("feedback_angle")] == ["feedback_angle_l1"]
    w = [np.asarray(p["w"], np.float64) for p in st.params]
    b1 = np.asarray(st.rule_state.feedback[1], np.float64)
    p1 = w[2] @ w[3]  # the weights downstream of hidden layer 1
    cos = np.sum(b1 * p1.T) / np.linalg.norm(b1) / np.linalg.norm(p1)
    assert float(m["feedback_angle_l1"]) == pytest.approx(np.degrees(np.arccos(cos)), abs=1e-2)
    out, tape = model.forward(st.params, x)
    err = jax.grad(lambda o: fb.cross_entropy(o, y))(out)
    e = np.asarray(err * tape.derivs[-1], np.float64)
    want = np.mean([(en @ p1.T) @ (en @ b1) > 0 for en in e])
    assert float(m["criterion_l1"]) == pytest.approx(want)
    ups, _ = rule.update(st.params, st.rule_state, tape, err)
    deltas = rule_deltas(st.params, st.rule_state.feedback, "dfa", tape, err)
    for i in range(4):  # layers 0 and 2 are inside modules: backprop from the layer above
        np.testing.assert_allclose(tape.inputs[i].T @ deltas[i], ups[i]["w"], rtol=1e-4,
                                   atol=1e-6)
