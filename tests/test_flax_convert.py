"""fbalign.flax.convert in one call: direct-feedback rules, every linear layer type, dtypes."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from flax import nnx

import fbalign as fb
import fbalign.flax as ff
from fbalign import ops


def _rand(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _rngs(seed):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


class Dense3(nnx.Module):
    """A plain NNX MLP 4-6-5-3 (tanh), written as a user would."""

    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in [(4, 6), (6, 5), (5, 3)]])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


# convert's rule -> the core MLP's jax.grad mode (`fbalign._src.modes`)
_CORE_MODE = {"dfa": "dfa", "srbp": "dfa", "asrbp": "adfa", "drtp": "drtp", "bdfa": "bdfa"}


def test_direct_feedback_rules_convert_in_one_call_and_equal_the_core_mlp():
    x = _rand(1, (5, 4))[0]
    labels = jnp.array([0, 1, 2, 0, 1])
    core = fb.mlp((4, 6, 5, 3), "tanh")
    original = Dense3(_rngs(0))
    params = [{"w": m.kernel[...], "b": m.bias[...]} for m in original.layers]
    bp = jax.grad(lambda p: fb.cross_entropy(core.apply(p, x), labels))(params)
    for rule, mode in _CORE_MODE.items():
        # The sample input has another batch size: only the feature shapes are traced.
        model = ff.convert(original, rule, _rngs(2), num_outputs=3,
                           sample_input=jax.ShapeDtypeStruct((2, 4), jnp.float32))
        assert isinstance(model, ff.DirectFeedbackModel)
        inner = model.model.layers
        assert inner[0].dfa_feedback is None  # the first layer's input is the data
        feedback = [inner[1].dfa_feedback[...], inner[2].dfa_feedback[...], None]
        assert [f.shape for f in feedback[:2]] == [(3, 6), (3, 5)]
        np.testing.assert_allclose(model.predict(x), original(x), rtol=1e-6)
        kw = {"labels": labels} if rule in ("drtp", "bdfa") else {}

        def loss(m, kw=kw):
            return fb.cross_entropy(m(x, **kw), labels)

        both = nnx.DiffState(0, nnx.Any(nnx.Param, ff.Feedback))
        got = nnx.grad(loss, argnums=both)(model)
        want, want_fb = jax.grad(
            lambda p, f, mode=mode: fb.cross_entropy(core.apply(p, x, f, mode, labels=labels),
                                                     labels), (0, 1))(params, feedback)
        for i in range(3):
            g = got["model"]["layers"][i]
            assert_trees_close((g["kernel"][...], g["bias"][...]),
                               (want[i]["w"], want[i]["b"]), 1e-5, 1e-7)
        assert not np.allclose(got["model"]["layers"][0]["kernel"][...], bp[0]["w"], atol=1e-4)
        for i in (1, 2):  # asrbp's and bdfa's B learn (feedback_grads), the others' do not
            g_b = got["model"]["layers"][i]["dfa_feedback"][...]
            np.testing.assert_allclose(g_b, want_fb[i - 1], rtol=1e-5, atol=1e-7)
            assert np.any(g_b != 0) == (rule in ("asrbp", "bdfa")), rule


class SmallCNN(nnx.Module):
    """Flax-example style: conv, tanh, conv, tanh, flatten, dense."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(36, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv1(x))
        h = jnp.tanh(self.norm(self.conv2(h)))
        return self.head(h.reshape(h.shape[0], -1))


def test_dfa_conv_model_taps_traced_feature_maps():
    original = SmallCNN(_rngs(3))
    x, r = _rand(4, (2, 6, 6, 2), (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing with weights is left alone here
        model = ff.convert(original, "dfa", _rngs(5), sample_input=x[:1])
    assert model.num_outputs == 3
    inner = model.model
    b2, b3 = inner.conv2.dfa_feedback[...], inner.head.dfa_feedback[...]
    assert inner.conv1.dfa_feedback is None
    assert b2.shape == (3, 6, 6, 3) and b3.shape == (3, 36)
    np.testing.assert_allclose(model(x), original(x), rtol=1e-6)
    got = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * r)))(model)["model"]

    # Nokland (2016): the error e = dL/dy = r reaches each tapped input as e @ B_l; below the
    # tap it follows the ordinary chain rule (tanh, norm, conv) down to the layer's weights.
    def below_head(k2):
        o = original
        h = jnp.tanh(o.conv1(x))
        z = jax.lax.conv_general_dilated(h, k2, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(o.norm(z + o.conv2.bias[...])).reshape(2, -1)

    def below_conv2(k1):
        z = jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(z + original.conv1.bias[...])

    k1, k2 = original.conv1.kernel[...], original.conv2.kernel[...]
    want_k2 = jax.vjp(below_head, k2)[1](r @ b3)[0]
    want_k1 = jax.vjp(below_conv2, k1)[1](jnp.tensordot(r, b2, 1))[0]
    np.testing.assert_allclose(got["conv2"]["kernel"][...], want_k2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["conv1"]["kernel"][...], want_k1, rtol=1e-4, atol=1e-6)
    h = below_head(k2)
    np.testing.assert_allclose(got["head"]["kernel"][...], h.T @ r, rtol=1e-5, atol=1e-6)
    text = str(ff.summary(model))
    assert "conv2" in text and "dfa tap, B (3, 6, 6, 3)" in text and "no tap" in text


def test_the_output_primitive_cannot_be_forgotten():
    original = Dense3(_rngs(6))
    x = _rand(7, (4, 4))[0]
    model = ff.convert(original, "dfa", _rngs(8), sample_input=x)
    # The converted layers refuse to run outside the DirectFeedbackModel (whose output is
    # closed by dfa_output): no way to get silent zero gradients below the taps.
    with pytest.raises(RuntimeError, match="DirectFeedbackModel"):
        nnx.grad(lambda m: jnp.sum(m(x)))(model.model)
    # predict: the forward alone; a gradient through it raises instead of being zero.
    np.testing.assert_allclose(model.predict(x), original(x), rtol=1e-6)
    with pytest.raises(ValueError, match="predict is for evaluation"):
        nnx.grad(lambda m: jnp.sum(m.predict(x)))(model)
    drtp = ff.convert(original, "drtp", _rngs(8), sample_input=x)
    with pytest.raises(ValueError, match="labels="):
        drtp(x)
    with pytest.raises(ValueError, match="labels must be"):
        drtp(x, labels=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="num_outputs=4"):
        ff.convert(original, "dfa", _rngs(8), num_outputs=4, sample_input=x)

    class TwoHeads(Dense3):
        def __call__(self, x):
            return super().__call__(x), x

    with pytest.raises(ValueError, match="one array"):
        ff.convert(TwoHeads(_rngs(6)), "dfa", _rngs(8), sample_input=x)
    with pytest.raises(ValueError, match="'bdfa'.*batch, num_outputs"):
        ff.convert(original, "bdfa", _rngs(8), sample_input=x[None])


class Mixed(nnx.Module):
    """Layers convert used to skip: a LoRALinear (an nnx.Linear subclass), a user subclass,
    LinearGeneral, Einsum, attention, a ConvTranspose, plus a circular-padded ConvTranspose and
    a standalone LoRA it cannot convert."""

    def __init__(self, rngs):
        self.lora = nnx.LoRALinear(4, 6, lora_rank=2, b_initializer=nnx.initializers.normal(),
                                   rngs=rngs)
        self.general = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        self.einsum = nnx.Einsum("btd,dk->btk", (3, 4), (4,), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 4, qkv_features=4, decode=False, rngs=rngs)
        self.convt = nnx.ConvTranspose(4, 3, (2,), strides=2, padding=((1, 0),), rngs=rngs)
        self.circ = nnx.ConvTranspose(3, 2, (2,), padding="CIRCULAR", rngs=rngs)
        self.side = nnx.LoRA(2, 1, 2, b_initializer=nnx.initializers.normal(), rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.lora(x))               # (b, 6)
        h = jnp.tanh(self.general(h))            # (b, 2, 3)
        h = jnp.tanh(self.einsum(h))             # (b, 2, 4)
        h = self.attn(h)                          # (b, 2, 4)
        return self.side(self.circ(self.convt(h))).sum(1)   # (b, 2)


def test_convert_reaches_subclasses_general_layers_and_attention_and_warns_on_the_rest():
    original = Mixed(_rngs(9))
    x, r = _rand(10, (3, 4), (3, 2))
    with pytest.warns(UserWarning) as record:
        model = ff.convert(original, "fa", _rngs(11))
    message = " ".join(str(w.message) for w in record)
    assert "circ (ConvTranspose with CIRCULAR" in message and "side (LoRA" in message
    assert "lora/lora (LoRA" in message  # LoRALinear's low-rank branch stays backprop
    assert "general" not in message and "attn" not in message and "convt" not in message
    np.testing.assert_allclose(model(x), original(x), rtol=1e-5, atol=1e-6)
    s = ff.summary(model)
    converted = {p for p, _, what in s.converted if what == "rule fa"}
    assert converted == {"lora", "general", "einsum", "attn/query", "attn/key", "attn/value",
                         "attn/out", "convt"}
    assert {p for p, _, _ in s.left_alone} == {"lora/lora", "circ", "side"}

    # The transposed conv: its kernel's ordinary gradient, its input's error through B (the
    # VJP of lax.conv_transpose with B in W's place), the forward unchanged.
    ct = model.convt
    xt, gt = _rand(15, (3, 2, 4), (3, 3, 3))
    conv_t = lambda x, w: jax.lax.conv_transpose(  # noqa: E731
        x, w, (2,), ((1, 0),), rhs_dilation=(1,))
    np.testing.assert_allclose(ct(xt), conv_t(xt, ct.kernel[...]) + ct.bias[...], rtol=1e-5,
                               atol=1e-6)
    got = nnx.grad(lambda m, x: jnp.sum(m(x) * gt), argnums=(0, 1))(ct, xt)
    gw = jax.vjp(lambda w: conv_t(xt, w), ct.kernel[...])[1](gt)[0]
    gx = jax.vjp(lambda x: conv_t(x, ct.feedback[...]), xt)[1](gt)[0]
    assert_trees_close((got[0]["kernel"][...], got[1]), (gw, gx), 1e-5, 1e-6)
    assert not np.allclose(gx, jax.vjp(lambda x: conv_t(x, ct.kernel[...]), xt)[1](gt)[0])

    # Each converted layer equals the core feedback op on its own weights and feedback.
    lo = model.lora
    a, b = lo.lora.lora_a[...], lo.lora.lora_b[...]

    def core_lora(w, c, x):  # FA on the base kernel, the low-rank branch as backprop
        return fb.fa_matmul(x, w, lo.feedback[...]) + c + x @ a @ b

    def core_general(w, c, x):  # LinearGeneral 6 -> (2, 3) is the einsum "bi,ijk->bjk"
        return ops.fa_einsum("bi,ijk->bjk", x, w, model.general.feedback[...], c)

    for name, core, xx in (("lora", core_lora, x), ("general", core_general, _rand(12, (3, 6))[0])):
        layer = getattr(model, name)
        w, c = layer.kernel[...], layer.bias[...]
        rr = _rand(14, core(w, c, xx).shape)[0]
        got = nnx.grad(lambda m, x, rr=rr: jnp.sum(m(x) * rr), argnums=(0, 1))(layer, xx)
        want = jax.grad(lambda w, c, x, core=core, rr=rr: jnp.sum(core(w, c, x) * rr),
                        (0, 1, 2))(w, c, xx)
        assert_trees_close((got[0]["kernel"][...], got[0]["bias"][...], got[1]), want,
                           1e-5, 1e-6)
        plain = getattr(original, name)
        bp = jax.grad(lambda x, plain=plain, rr=rr: jnp.sum(plain(x) * rr))(xx)
        assert not np.allclose(got[1], bp, atol=1e-5)  # the input error is FA's, not BP's

    # Attention: the error below it (at the einsum layer's output) is the projections' FA
    # error, not backprop's; with B = W in every layer the whole model's updates are backprop's.
    grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * r)))  # one compile, not one per op
    want = grad(original)
    got = grad(model)
    assert not np.allclose(got["einsum"]["kernel"][...], want["einsum"]["kernel"][...],
                           atol=1e-5)
    for _, m in nnx.iter_modules(model):
        if getattr(m, "feedback", None) is not None:
            m.feedback[...] = m.kernel[...]
    assert_trees_close(grad(model), want, 1e-5, 1e-6)


def test_convert_keeps_dtype_param_dtype_and_precision():
    x = _rand(15, (2, 5, 5, 3))[0]
    hi = jax.lax.Precision.HIGHEST
    layers = [nnx.Linear(3, 4, dtype=jnp.bfloat16, precision=hi, rngs=_rngs(16)),
              nnx.Conv(3, 4, (3, 3), dtype=jnp.bfloat16, rngs=_rngs(17)),
              nnx.Linear(3, 4, param_dtype=jnp.bfloat16, rngs=_rngs(18)),
              nnx.LinearGeneral(3, 4, dtype=jnp.bfloat16, precision=hi, rngs=_rngs(19))]
    for layer, rule in zip(layers, ("fa", "fa", "fa", "brsf"), strict=True):
        if True:
            new = ff.convert(layer, rule, _rngs(20))
            y0, y = layer(x), new(x)
            assert y.dtype == y0.dtype, (type(layer), rule, y.dtype)
            assert (y.dtype == jnp.bfloat16) == (layer.dtype == jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
            assert new.kernel[...].dtype == layer.kernel[...].dtype
            assert new.precision == layer.precision
            if new.feedback is not None:
                assert new.feedback[...].dtype == layer.param_dtype
            g, gx = nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32)),
                             argnums=(0, 1))(new, x)
            assert g["kernel"][...].dtype == layer.param_dtype and gx.dtype == x.dtype
    # A bfloat16 model converted to dfa keeps a bfloat16 output.
    model = ff.convert(Dense3(_rngs(21)), "dfa", _rngs(22), sample_input=x[:, 0, 0, :1]
                       .repeat(4, -1))
    for m in model.model.layers:
        m.dtype = jnp.bfloat16
    assert model(jnp.ones((2, 4))).dtype == jnp.bfloat16


def test_dfa_docstrings_name_only_what_fbalign_flax_exports():
    for fn in (ff.dfa_carrier, ff.dfa_output, ff.DFATap, ff.DirectFeedbackModel):
        for name in re.findall(r"(?<!`)`([A-Za-z_]\w*)`(?!`)", fn.__doc__):
            places = (ff, fb, fb.rules, ops)
            assert any(hasattr(p, name) for p in places), (fn, name)
