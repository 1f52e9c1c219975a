"""Any model as an fbalign network (`fbalign._src.wrap`): NNX, Linen, Equinox, plain functions."""

from __future__ import annotations

import sys
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from flax import nnx

from fbalign._src.models import mlp
from fbalign._src.wrap import (
    EquinoxNetwork,
    FunctionNetwork,
    LinenNetwork,
    NNXNetwork,
    as_network,
    from_equinox,
    from_function,
    from_linen,
    from_nnx,
    is_seeded,
)

DIN, HID, DOUT, BATCH = 3, 5, 2, 4
KEY = jax.random.PRNGKey(0)
X = jax.random.normal(jax.random.PRNGKey(1), (BATCH, DIN))
T = jax.random.normal(jax.random.PRNGKey(2), (BATCH, DOUT))
KEYS = jnp.stack([jax.random.PRNGKey(s) for s in (3, 4, 5)])


def loss(y):
    return 0.5 * jnp.mean((y - T) ** 2)


# ---- the same 2-layer tanh MLP in every framework -------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(DIN, HID, rngs=rngs)
        self.l2 = nnx.Linear(HID, DOUT, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class NNXBatchNormMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(DIN, HID, rngs=rngs)
        self.bn = nnx.BatchNorm(HID, rngs=rngs)
        self.l2 = nnx.Linear(HID, DOUT, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DOUT)(jnp.tanh(nn.Dense(HID)(x)))


class LinenBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DOUT)(nn.BatchNorm(use_running_average=False)(nn.Dense(HID)(x)))


def eqx_mlp(key):
    return eqx.nn.MLP(DIN, DOUT, HID, depth=1, activation=jnp.tanh, key=key)


class EqxBatchLinear(eqx.Module):
    """Acts on the whole batch: ``x @ w``."""

    w: jax.Array

    def __call__(self, x):
        return x @ self.w


class EqxAxisSum(eqx.Module):
    """Sums ``x * w`` over the first axis of what it is given."""

    w: jax.Array

    def __call__(self, x):
        return jnp.sum(x * self.w, axis=0, keepdims=True)


def fn_init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (DIN, HID)) / np.sqrt(DIN), "b1": jnp.zeros(HID),
            "w2": jax.random.normal(k2, (HID, DOUT)) / np.sqrt(HID), "b2": jnp.zeros(DOUT)}


def fn_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def nnx_factory(rngs):
    return NNXMLP(rngs)


# Every wrapper kind, built by a factory that draws per-seed weights, and the original model
# called directly with the weights drawn from a key.
def _direct_nnx(key, x):
    return NNXMLP(nnx.Rngs(key))(x)


def _direct_linen(key, x):
    m = LinenMLP()
    return m.apply(m.init(key, X[:1]), x)


def _direct_eqx(key, x):
    return jax.vmap(eqx_mlp(key))(x)


def _direct_fn(key, x):
    return fn_apply(fn_init(key), x)


KINDS = {
    "nnx": (lambda: from_nnx(nnx_factory), _direct_nnx),
    "linen": (lambda: from_linen(LinenMLP(), X[:1]), _direct_linen),
    "equinox": (lambda: from_equinox(eqx_mlp), _direct_eqx),
    "function": (lambda: from_function(fn_apply, fn_init), _direct_fn),
}


@pytest.fixture(params=list(KINDS))
def kind(request):
    make, direct = KINDS[request.param]
    return make(), direct


# ---- forward and gradient equal the framework's own --------------------------------------------


def test_apply_matches_original(kind):
    net, direct = kind
    for key in (KEY, KEYS[1]):
        got = net.apply(net.init(key), X)
        assert got.shape == (BATCH, DOUT)
        np.testing.assert_allclose(got, direct(key, X), rtol=1e-6, atol=1e-6)


def test_nnx_grad_matches_nnx_grad():
    net = from_nnx(nnx_factory)
    params = net.init(KEY)
    got = jax.grad(lambda p: loss(net.apply(p, X)))(params)
    model = NNXMLP(nnx.Rngs(KEY))
    assert_trees_close(params, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    want = nnx.grad(lambda m: loss(m(X)))(model)
    assert_trees_close(got, nnx.to_pure_dict(want), rtol=1e-5, atol=1e-7)
    assert jnp.abs(got["l1"]["kernel"]).sum() > 0


def test_linen_grad_matches_linen_grad():
    module = LinenMLP()
    net = from_linen(module, X[:1])
    params = net.init(KEY)
    assert_trees_close(params, module.init(KEY, X)["params"])
    got = jax.grad(lambda p: loss(net.apply(p, X)))(params)
    want = jax.grad(lambda p: loss(module.apply({"params": p}, X)))(module.init(KEY, X)["params"])
    assert_trees_close(got, want)


def test_equinox_grad_matches_filter_grad():
    net = from_equinox(eqx_mlp)
    params = net.init(KEY)
    got = jax.grad(lambda p: loss(net.apply(p, X)))(params)
    want = eqx.filter_grad(lambda m: loss(jax.vmap(m)(X)))(eqx_mlp(KEY))
    assert_trees_close(got, want)
    assert len(jax.tree.leaves(got)) == 4  # two weights, two biases: nothing else is a param


def test_function_grad_matches_hand_backprop():
    net = from_function(fn_apply, fn_init)
    p = net.init(KEY)
    got = jax.grad(lambda q: loss(net.apply(q, X)))(p)
    h = jnp.tanh(X @ p["w1"] + p["b1"])
    e = (h @ p["w2"] + p["b2"] - T) / T.size
    d1 = (e @ p["w2"].T) * (1 - h**2)
    want = {"w1": X.T @ d1, "b1": d1.sum(0), "w2": h.T @ e, "b2": e.sum(0)}
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


# ---- seeds ---------------------------------------------------------------------------------


def test_factory_init_depends_on_key(kind):
    net, _ = kind
    assert is_seeded(net) and net.seeded
    a, b, a2 = net.init(KEYS[0]), net.init(KEYS[1]), net.init(KEYS[0])
    assert_trees_close(a, a2, rtol=0, atol=0)
    weights = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
               if not np.all(np.asarray(x) == 0)]  # biases start at zero for every key
    assert weights and all(not np.allclose(x, y) for x, y in weights)


@pytest.mark.parametrize("wrap", ["nnx", "equinox"])
def test_instance_init_returns_instance_weights(wrap):
    if wrap == "nnx":
        model = NNXMLP(nnx.Rngs(7))
        net = from_nnx(model)
        want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        direct = model(X)
    else:
        model = eqx_mlp(jax.random.PRNGKey(7))
        net = from_equinox(model)
        want = eqx.filter(model, eqx.is_inexact_array)
        direct = jax.vmap(model)(X)
    assert net.seeded is False and not is_seeded(net)
    assert_trees_close(net.init(KEYS[0]), want, rtol=0, atol=0)
    assert_trees_close(net.init(KEYS[1]), want, rtol=0, atol=0)
    np.testing.assert_allclose(net.apply(net.init(KEYS[2]), X), direct, rtol=1e-6, atol=1e-6)


def test_nnx_instance_is_a_snapshot_and_apply_is_pure():
    model = NNXMLP(nnx.Rngs(7))
    net = from_nnx(model)
    before = net.apply(net.init(KEY), X)
    model.l1.kernel[...] = jnp.zeros((DIN, HID))  # mutating the instance later ...
    np.testing.assert_array_equal(net.apply(net.init(KEY), X), before)  # ... does not leak in
    assert not np.allclose(model(X), before)


def test_nnx_state_updates_warn_once_and_never_leak():
    model = NNXBatchNormMLP(nnx.Rngs(0))  # training mode: BatchNorm updates its statistics
    net = from_nnx(model)
    with pytest.warns(UserWarning, match=r"bn/mean.*discarded"):
        net.apply(net.init(KEY), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y1 = net.apply(net.init(KEY), X)  # warned once already
        y2 = net.apply(net.init(KEY), X)
    np.testing.assert_array_equal(y1, y2)  # statistics not carried from call to call
    np.testing.assert_array_equal(model.bn.mean[...], jnp.zeros(HID))  # nor into the instance
    with pytest.raises(ValueError, match="bn/var"):
        from_nnx(model, on_state_update="error").apply(net.init(KEY), X)
    model.eval()  # running averages: nothing is updated, nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaled = from_nnx(model, on_state_update="error")
        np.testing.assert_allclose(evaled.apply(evaled.init(KEY), X), model(X), rtol=1e-6)


# ---- transformations -----------------------------------------------------------------------


def test_vmap_init_and_apply_equal_per_key(kind):
    net, _ = kind

    @jax.jit
    def ensemble(keys):
        params = jax.vmap(net.init)(keys)
        return params, jax.vmap(net.apply, in_axes=(0, None))(params, X)

    params, ys = ensemble(KEYS)
    assert ys.shape == (len(KEYS), BATCH, DOUT)
    assert not np.allclose(ys[0], ys[1]) and not np.allclose(ys[1], ys[2])  # one net per seed
    for i, k in enumerate(KEYS):  # one seed at a time
        p_i = net.init(k)
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], params), p_i)
        np.testing.assert_allclose(ys[i], net.apply(p_i, X), rtol=1e-5, atol=1e-6)


def test_jit_traces_once(kind):
    net, _ = kind
    traces = []

    opt = optax.sgd(0.5)

    @jax.jit
    def step(p, s, x):
        traces.append(None)
        value, g = jax.value_and_grad(lambda q: loss(net.apply(q, x)))(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, value

    p = net.init(KEY)
    s = opt.init(p)
    losses = []
    for _ in range(3):
        p, s, value = step(p, s, X)
        losses.append(float(value))
    assert len(traces) == 1
    assert losses[-1] < losses[0]  # and the steps do descend

    static = []

    @jax.jit
    def ev(p, x):
        return net.apply(p, x)

    f = jax.jit(lambda n, p, x: (static.append(None), n.apply(p, x))[1], static_argnums=0)
    for _ in range(2):
        np.testing.assert_allclose(f(net, p, X), ev(p, X), rtol=1e-6)
    assert len(static) == 1  # hashable as a static argument, cache hit on the second call


# ---- dtype, flags -----------------------------------------------------------------------------


def test_init_dtype():
    cast = from_function(fn_apply, fn_init).init(KEY, jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    seen = []

    def init_with_dtype(key, dtype=jnp.float32):
        seen.append(dtype)
        return {"w": jnp.ones((DIN, DOUT), dtype)}

    net = from_function(lambda p, x: x @ p["w"], init_with_dtype)
    assert net.init(KEY, jnp.float16)["w"].dtype == jnp.float16 and seen == [jnp.float16]
    assert net.init(KEY)["w"].dtype == jnp.float32  # default: as the user's init makes it
    for wrapped in (from_nnx(nnx_factory), from_equinox(eqx_mlp)):
        leaves = jax.tree.leaves(wrapped.init(KEY, jnp.float16))
        assert leaves and all(a.dtype == jnp.float16 for a in leaves)
    with pytest.raises(ValueError, match="floating"):
        from_nnx(nnx_factory).init(KEY, jnp.int32)


def test_layer_structure_flag(kind):
    net, _ = kind
    assert net.layer_structure is False
    assert not hasattr(net, "forward")
    for cls in (FunctionNetwork, NNXNetwork, LinenNetwork, EquinoxNetwork):
        assert cls.layer_structure is False


# ---- dispatch and errors ----------------------------------------------------------------------


def test_as_network_dispatch():
    fb = mlp([DIN, HID, DOUT])
    assert as_network(fb) is fb
    net = from_function(fn_apply, fn_init)
    assert as_network(net) is net
    nnx_net = as_network(NNXMLP(nnx.Rngs(0)))
    assert isinstance(nnx_net, NNXNetwork) and not nnx_net.seeded
    eqx_net = as_network(eqx_mlp(KEY))
    assert isinstance(eqx_net, EquinoxNetwork) and not eqx_net.batched
    lin = as_network(LinenMLP(), X[:1])
    assert isinstance(lin, LinenNetwork)
    np.testing.assert_allclose(lin.apply(lin.init(KEY), X), _direct_linen(KEY, X), rtol=1e-6)


def test_as_network_rejects_other_objects():
    with pytest.raises(TypeError) as e:
        as_network(42)
    msg = str(e.value)
    for kind in ("int", "fbalign network", "flax.linen.Module", "nnx.Module", "eqx.Module",
                 "from_function"):
        assert kind in msg
    with pytest.raises(TypeError, match=r"from_nnx.*from_equinox.*from_function"):
        as_network(nnx_factory)  # a factory: which framework? ambiguous
    with pytest.raises(TypeError, match="init and apply"):
        as_network(FunctionNetwork)  # the class, not a network


def test_linen_needs_example_input():
    with pytest.raises(ValueError, match="example_input"):
        as_network(LinenMLP())
    with pytest.raises(ValueError, match="example_input"):
        from_linen(LinenMLP(), None)


def test_linen_rejects_batch_stats():
    with pytest.raises(ValueError, match="batch_stats"):
        from_linen(LinenBatchNorm(), X[:1])
    with pytest.raises(ValueError, match="batch_stats"):
        as_network(LinenBatchNorm(), X[:1])


def test_equinox_batched_vs_unbatched():
    per_example = eqx_mlp(KEY)
    assert per_example(X[0]).shape == (DOUT,)
    unbatched = from_equinox(per_example)
    assert unbatched.apply(unbatched.init(KEY), X).shape == (BATCH, DOUT)
    batched = from_equinox(per_example, batched=True)
    with pytest.raises(TypeError) as e:
        batched.apply(batched.init(KEY), X)  # the MLP contracts its weight with the batch axis
    assert any("batched=False" in n for n in getattr(e.value, "__notes__", []))

    w = jax.random.normal(KEY, (DIN, DOUT))
    whole = from_equinox(EqxBatchLinear(w), batched=True)
    np.testing.assert_allclose(whole.apply(whole.init(KEY), X), X @ w, rtol=1e-6)
    # a reducing model shows which axis it saw: batched sums over the batch, vmapped per row
    for flag, shape in ((True, (1, DIN)), (False, (BATCH, 1))):
        net = from_equinox(EqxAxisSum(jnp.ones(DIN)), batched=flag)
        assert net.apply(net.init(KEY), X).shape == shape


def test_equinox_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # import equinox now raises ImportError
    with pytest.raises(ImportError, match=r"pip install equinox.*fbalign\[equinox\]"):
        from_equinox(lambda key: None)


def test_factories_must_build_modules():
    with pytest.raises(TypeError, match="nnx.Module"):
        from_nnx(lambda rngs: 3)
    with pytest.raises(TypeError, match="eqx.Module"):
        from_equinox(lambda key: 3)
    with pytest.raises(TypeError, match="from_function needs two callables"):
        from_function(fn_apply, None)


def test_nnx_apply_checks_params_structure():
    net = from_nnx(nnx_factory)
    p = net.init(KEY)
    del p["l2"]
    with pytest.raises(ValueError, match="structure"):
        net.apply(p, X)
