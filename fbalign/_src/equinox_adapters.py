"""Equinox layers whose backward pass is a feedback rule (FA, sign symmetry, KP, DFA taps).

`Linear` and `Conv` subclass ``eqx.nn.Linear`` and ``eqx.nn.Conv``: same fields, same
``(dout, din)`` / ``(out, in / groups, *window)`` weight orientation, same forward. At every
call a layer asks its rule's core `TapeRule` (``fbalign.rules.get_rule(rule).backward``) for the
`fbalign._src.backward.Backward` object and runs its linear map through ``Backward.linear``, so
the rule logic is the core's (`LinearFeedback` for fa/kp, `SignFeedback` for usf/frsf, plain
`Backward` for bp). The DFA taps run `DirectFeedback.tap`/``output``.

Fixed feedback (fa's ``B``, frsf's magnitudes, a DFA tap's ``B``) is a `FixedFeedback`: its
values are stored as their bit pattern in an unsigned-integer array, so
``eqx.filter(model, eqx.is_inexact_array)`` (what Equinox users hand to optax) and
``eqx.filter_grad`` never see it, and weight decay cannot reach it. Kolen-Pollack's ``B`` is a
plain float array on purpose: it gets ``W``'s gradient, so the optimizer gives ``W`` and ``B``
the same update and decay, which is the rule (Akrout et al. 2019).

Under ``jax.vmap`` over examples a DFA carrier made inside the mapped function would be an
unbatched constant, and JAX sums the cotangent of an unbatched input over the batch: every
example would receive the batch's summed error. `dfa_carrier`, `DFATap` and `dfa_output` make
the carrier batched like the activations they travel with, so each example gets its own error.

This module imports equinox; ``import fbalign`` never does.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Float, PRNGKeyArray

from fbalign._src.backward import Backward
from fbalign._src.base import Array
from fbalign._src.checks import check_choice
from fbalign._src.feedback_init import Initializer, glorot_std, matched_feedback
from fbalign._src.primitives import batched_like
from fbalign._src.registry import get_rule
from fbalign._src.rules.feedback_alignment import draw_feedback
from fbalign._src.rules.sign_symmetry import DISTRIBUTIONS, draw_magnitude

RULES = ("bp", "fa", "kp", "usf", "sign", "frsf")  # the names a layer's ``rule`` accepts
DFA_RULES = ("dfa",)  # what `convert` also accepts, for an ``eqx.nn.MLP``
_KERNEL = "kernel"  # the weight's key in a layer's `Backward` feedback mapping
_TAP = "tap"


class FixedFeedback(eqx.Module):
    """Fixed feedback weights that no optimizer or gradient filter sees.

    The values are kept as their bit pattern in an unsigned integer array (``uint32`` for
    ``float32``), so ``eqx.is_inexact_array`` is False for the leaf: ``eqx.filter(model,
    eqx.is_inexact_array)``, ``eqx.filter_grad`` and an optax optimizer built on them (with
    weight decay) leave it alone, while ``eqx.filter_jit``, ``eqx.filter_vmap`` and
    serialisation still carry it as an array. ``value`` gives the float array back (exactly;
    a bitcast), with ``jax.lax.stop_gradient``.
    """

    bits: Array
    dtype: str = eqx.field(static=True)

    def __init__(self, value: Float[Array, "*shape"]):
        value = jnp.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"FixedFeedback holds floating-point feedback, got dtype {value.dtype}")
        unsigned = jnp.dtype(f"uint{value.dtype.itemsize * 8}")
        self.bits = jax.lax.bitcast_convert_type(value, unsigned)
        self.dtype = jnp.dtype(value.dtype).name

    @property
    def value(self) -> Float[Array, "*shape"]:
        """The feedback as floats (no gradient flows into it)."""
        return jax.lax.stop_gradient(
            jax.lax.bitcast_convert_type(self.bits, jnp.dtype(self.dtype)))


def feedback_array(layer: Any) -> Float[Array, "*shape"] | None:
    """The float feedback of a `Linear`, `Conv` or `DFATap`: ``B`` (fa, kp, dfa), the
    magnitudes ``M`` (frsf) or None (bp, usf)."""
    fb = layer.feedback
    return fb.value if isinstance(fb, FixedFeedback) else fb


def check_rule(rule: str, valid: Sequence[str] = RULES) -> str:
    """``rule`` as the core registry names it (``"sign"`` is ``"usf"``); a ValueError naming
    the valid names otherwise."""
    check_choice("fbalign.equinox", "rule", rule, valid)
    return "usf" if rule == "sign" else rule


@functools.cache
def _core_rule(rule: str):
    return get_rule(rule)


def _core_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The core (row-major) shape ``(*window, din, dout)`` of an Equinox weight of shape
    ``(dout, din, *window)``."""
    return (*shape[2:], shape[1], shape[0])


def _to_equinox(b: Array) -> Array:
    """A core-orientation ``(*window, din, dout)`` array in Equinox's ``(dout, din, *window)``."""
    n = b.ndim - 2
    return jnp.transpose(b, (n + 1, n, *range(n)))


def make_feedback(rule: str, key: PRNGKeyArray | None, weight: Array,
                  init: str | Initializer = "matched", scale: float | None = None,
                  distribution: str = "uniform") -> FixedFeedback | Array | None:
    """A layer's feedback under ``rule``, in the weight's orientation and dtype.

    fa, kp: ``B`` drawn with ``init="matched"`` (default) by `matched_feedback`: Gaussian
    entries with the weight's own RMS (times ``scale`` if given), so that the errors sent down
    start at backprop's magnitude (the core's variance-preserving std ``1/sqrt(fan_out)`` made
    a Flax CNN's hidden errors 5-18x backprop's; `fbalign.flax.compare_to_backprop`); any other
    ``init`` goes to the core FA initialiser (`draw_feedback`: ``init``/``scale``, e.g.
    ``"gaussian"`` for std ``1/sqrt(fan_out)``, the window included for a kernel). A
    `FixedFeedback` for fa and a plain (trainable) array for kp. frsf: magnitudes ``|R|`` with
    ``R`` of std ``scale`` or Glorot's (`draw_magnitude`). bp, usf: None.
    """
    rule = check_rule(rule)
    if rule in ("bp", "usf"):
        return None
    if key is None:
        raise ValueError(f"rule {rule!r} draws random feedback: pass key=jax.random.key(...)")
    check_choice("fbalign.equinox", "magnitude_distribution", distribution, DISTRIBUTIONS)
    shape = _core_shape(weight.shape)
    if rule == "frsf":
        std = glorot_std(shape) if scale is None else scale
        return FixedFeedback(_to_equinox(draw_magnitude(key, shape, weight.dtype, std,
                                                        distribution)))
    if isinstance(init, str) and init == "matched":
        b = matched_feedback(key, weight) * (1.0 if scale is None else scale)
    else:
        b = _to_equinox(draw_feedback(key, [shape], init, scale, weight.dtype, fan_axis=1)[0])
    return b if rule == "kp" else FixedFeedback(b.astype(weight.dtype))


def layer_backward(rule: str, weight: Array, feedback: Any,
                   sign_scale: float | None) -> Backward:
    """The core rule's `Backward` for one layer, its weight keyed ``"kernel"``: ``B`` for
    fa/kp, the magnitude (``sign_scale`` or the Glorot std of the kernel) for usf, the stored
    magnitudes for frsf."""
    if rule == "bp":
        return _core_rule("bp").backward(None, None)
    if rule == "usf":
        b = glorot_std(_core_shape(weight.shape)) if sign_scale is None else sign_scale
    else:
        b = (feedback.value if isinstance(feedback, FixedFeedback) else feedback)
        b = b.astype(weight.dtype)
    return _core_rule(rule).backward({_KERNEL: b}, None)


def linear_op(x: Float[Array, "*batch din"], w: Float[Array, "dout din"]
              ) -> Float[Array, "*batch dout"]:
    """``x @ w.T``: ``eqx.nn.Linear``'s map for one example ``(din,)`` or a batch
    ``(..., din)``; one function object, so `fbalign.ops.feedback_op` caches on it."""
    return jnp.matmul(x, w.T)


@functools.cache
def conv_op(stride: tuple[int, ...], padding: Any, dilation: tuple[int, ...],
            groups: int) -> Callable[[Array, Array], Array]:
    """``eqx.nn.Conv``'s convolution ``op(x, w)`` (channels first, ``(out, in / groups,
    *window)`` kernels) for one example ``(C, *spatial)`` or a batch ``(N, C, *spatial)``;
    cached per configuration so `fbalign.ops.feedback_op` caches too."""

    def op(x: Array, w: Array) -> Array:
        batched = x.ndim == w.ndim
        y = jax.lax.conv_general_dilated(
            x if batched else x[None], w, window_strides=stride, padding=padding,
            rhs_dilation=dilation, feature_group_count=groups)
        return y if batched else y[0]

    return op


def _static_padding(p: Any) -> Any:
    return p if isinstance(p, str) else tuple(tuple(int(i) for i in q) for q in p)


class Linear(eqx.nn.Linear):
    r"""``eqx.nn.Linear`` whose backward is a feedback rule; the forward is unchanged.

    ``y = W x + b`` with ``W`` of shape ``(dout, din)``. With ``g = dL/dy`` the weight gets its
    ordinary gradient ``g x^T``; the input receives ``B^T g`` instead of ``W^T g``:

    * ``"fa"``: ``B`` fixed random (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic
      feedback weights support error backpropagation for deep learning");
    * ``"kp"``: ``B`` also receives ``W``'s gradient, so an optimizer gives both the same update
      and weight decay (Kolen & Pollack 1994; Akrout et al. 2019, "Deep learning without weight
      transport"); ``B`` is a trainable float array;
    * ``"usf"``/``"sign"``: ``B = s\,\mathrm{sign}(W)``, ``s = sign_scale`` or Glorot's
      ``sqrt(2 / (din + dout))``; ``"frsf"``: ``B = |R| \odot \mathrm{sign}(W)`` with ``|R|``
      fixed (Liao, Leibo & Poggio 2016, "How important is weight symmetry in backpropagation?");
    * ``"bp"``: ``B = W``.

    Accepts one example ``(din,)`` (the Equinox way, under ``jax.vmap``) or a batch
    ``(..., din)``. Prefer the batch: under ``vmap`` the rule's ``custom_vjp`` forms one
    ``(dout, din)`` outer product per example before summing them. Fixed feedback is a
    `FixedFeedback` (invisible to ``eqx.is_inexact_array``). ``key`` draws the weights as
    ``eqx.nn.Linear(..., key=key)`` does; the feedback comes from ``fold_in(key, 1)``.
    """

    rule: str = eqx.field(static=True)
    feedback: FixedFeedback | Array | None
    sign_scale: float | None = eqx.field(static=True)

    def __init__(self, in_features: int | str, out_features: int | str, use_bias: bool = True,
                 dtype: Any = None, *, rule: str, key: PRNGKeyArray,
                 feedback_init: str | Initializer = "matched",
                 feedback_scale: float | None = None, sign_scale: float | None = None,
                 magnitude_distribution: str = "uniform"):
        super().__init__(in_features, out_features, use_bias, dtype, key=key)
        self.rule = check_rule(rule)
        self.sign_scale = sign_scale
        self.feedback = make_feedback(self.rule, jax.random.fold_in(key, 1), self.weight,
                                      feedback_init, feedback_scale, magnitude_distribution)

    def __call__(self, x: Float[Array, "*batch din"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*batch dout"]:
        del key
        if self.in_features == "scalar":
            x = x[..., None]
        elif x.ndim == 0 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"fbalign.equinox.Linear expects inputs (..., {self.weight.shape[1]}),"
                             f" got shape {tuple(x.shape)}")
        backward = layer_backward(self.rule, self.weight, self.feedback, self.sign_scale)
        y = backward.linear(_KERNEL, linear_op, x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y[..., 0] if self.out_features == "scalar" else y


class Conv(eqx.nn.Conv):
    """``eqx.nn.Conv`` whose backward is a feedback rule; the forward is unchanged.

    Rules as `Linear`, with ``B`` of the kernel's shape ``(out, in / groups, *window)`` and the
    input receiving the VJP of the same convolution evaluated at ``B``. The default FA scale
    and the Glorot sign magnitude count the window (fans ``window * in``, ``window * out``).
    Accepts one example ``(C, *spatial)`` or a batch ``(N, C, *spatial)``.
    """

    rule: str = eqx.field(static=True)
    feedback: FixedFeedback | Array | None
    sign_scale: float | None = eqx.field(static=True)

    def __init__(self, num_spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: Any = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                 use_bias: bool = True, padding_mode: str = "ZEROS", dtype: Any = None, *,
                 rule: str, key: PRNGKeyArray, feedback_init: str | Initializer = "matched",
                 feedback_scale: float | None = None, sign_scale: float | None = None,
                 magnitude_distribution: str = "uniform"):
        super().__init__(num_spatial_dims, in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, use_bias, padding_mode, dtype, key=key)
        self.rule = check_rule(rule)
        self.sign_scale = sign_scale
        self.feedback = make_feedback(self.rule, jax.random.fold_in(key, 1), self.weight,
                                      feedback_init, feedback_scale, magnitude_distribution)

    def __call__(self, x: Float[Array, "*batch c ..."], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "*batch o ..."]:
        del key
        n = self.num_spatial_dims
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(f"fbalign.equinox.Conv expects (C, *spatial) or (N, C, *spatial) "
                             f"with {n} spatial dims, got shape {tuple(x.shape)}")
        padding = self.padding
        if self.padding_mode != "ZEROS":
            x = self._nonzero_pad(x) if x.ndim == n + 1 else jax.vmap(self._nonzero_pad)(x)
            padding = "VALID"
        op = conv_op(tuple(self.stride), _static_padding(padding), tuple(self.dilation),
                     self.groups)
        backward = layer_backward(self.rule, self.weight, self.feedback, self.sign_scale)
        y = backward.linear(_KERNEL, op, x, self.weight)
        return y + self.bias if self.use_bias else y


class Conv2d(Conv):
    """`Conv` with ``num_spatial_dims=2`` (as ``eqx.nn.Conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: Any = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "ZEROS", dtype: Any = None, *, rule: str,
                 key: PRNGKeyArray, **feedback: Any):
        super().__init__(2, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, use_bias, padding_mode, dtype, rule=rule, key=key, **feedback)


# ---------------------------------------------------------------------------------------------
# Direct feedback alignment.


def dfa_carrier(x: Array, n_out: int, *, batch_ndim: int = 0,
                dtype: Any = None) -> Float[Array, "*batch n_out"]:
    """The all-zeros error carrier of direct feedback alignment (Nokland 2016, "Direct
    feedback alignment provides learning in deep neural networks"), made from the input ``x``.

    Shape ``(*x.shape[:batch_ndim], n_out)``: ``batch_ndim=0`` (default) for a model that
    takes one example and is ``jax.vmap``-ed over the batch, 1 for a model called on a batch.
    Unlike ``fbalign.ops.dfa_carrier`` it is batched under ``vmap`` like ``x``, so hidden layer
    ``l`` of example ``n`` receives ``e_n B_l`` with its own error ``e_n``.
    """
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"dfa_carrier: n_out must be a positive int, got {n_out!r}")
    if not isinstance(batch_ndim, int) or not 0 <= batch_ndim <= x.ndim:
        raise ValueError(f"dfa_carrier: batch_ndim={batch_ndim!r} for an input of shape "
                         f"{tuple(x.shape)}")
    dtype = x.dtype if dtype is None and jnp.issubdtype(x.dtype, jnp.floating) else dtype
    return batched_like(jnp.zeros((*x.shape[:batch_ndim], n_out), dtype or jnp.float32), x)


def _dfa_backward(b: Array | None) -> Backward:
    return _core_rule("dfa").backward({_TAP: b}, None)


def dfa_output(y: Float[Array, "*batch n_out"], carrier: Float[Array, "*batch n_out"]
               ) -> Float[Array, "*batch n_out"]:
    """Identity on the output pre-activation ``y``; the backward copies the error
    ``e = dL/dy`` into the carrier for the `DFATap` layers below (Nokland 2016)."""
    if carrier.shape != y.shape:
        raise ValueError(f"dfa_output: the carrier {tuple(carrier.shape)} must have the output's "
                         f"shape {tuple(y.shape)} (dfa_carrier(x, n_out={y.shape[-1]}, "
                         "batch_ndim=...))")
    return _dfa_backward(None).output(y, batched_like(carrier, y))


class DFATap(eqx.Module):
    r"""A direct-feedback tap on a hidden activation ``h_l``: identity forward; the backward
    replaces the error arriving at ``h_l`` by ``e B_l`` (Nokland 2016).

    .. math:: \delta_l = (e B_l) \odot f'(a_l), \qquad \Delta W_l = \delta_l x_l^\top

    ``B_l`` has shape ``(n_out, *feature_shape)`` (``feature_shape`` is one example's shape of
    ``h_l``, e.g. ``(width,)`` or ``(C, H, W)``), a `FixedFeedback` drawn by the core DFA
    initialiser (std ``1/sqrt(n_out)``, Glorot's ``sqrt(2 / (n_out + n_l))`` for feature
    maps, or ``init``/``scale``). Call it as ``h, carrier = tap(h, carrier)`` on one example or
    a batch.
    """

    feedback: FixedFeedback

    def __init__(self, n_out: int, feature_shape: Sequence[int], *, key: PRNGKeyArray,
                 init: str | Initializer = "gaussian", scale: float | None = None,
                 dtype: Any = None):
        shape = (int(n_out), *(int(d) for d in feature_shape))
        dtype = jnp.float32 if dtype is None else dtype
        b = draw_feedback(key, [shape], init, scale, dtype, fan_axis=0,
                          glorot=len(shape) > 2)[0]
        self.feedback = FixedFeedback(b)

    def __call__(self, h: Array, carrier: Array) -> tuple[Array, Array]:
        b = self.feedback.value
        feature = b.shape[1:]
        if h.shape[h.ndim - len(feature):] != feature or carrier.shape[-1] != b.shape[0]:
            raise ValueError(f"DFATap with B of shape {tuple(b.shape)} expects h (..., "
                             f"{', '.join(map(str, feature))}) and a carrier (..., {b.shape[0]}),"
                             f" got {tuple(h.shape)} and {tuple(carrier.shape)}")
        return _dfa_backward(b.astype(h.dtype)).tap(_TAP, h, batched_like(carrier, h))


def _layer_activation(activation: Any, i: int) -> Any:
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, activation)


def _elementwise(f: Any, x: Array) -> Array:
    return eqx.filter_vmap(lambda g, v: g(v))(f, x)


class DirectFeedbackMLP(eqx.Module):
    """An ``eqx.nn.MLP`` trained by direct feedback alignment (Nokland 2016): its layers run
    as backprop, and a `DFATap` after every hidden activation sends the output error there.

    ``mlp`` is the original model (same call: one example ``(in_size,)``, ``jax.vmap`` over
    the batch); ``taps[l]`` holds ``B_l`` of shape ``(out_size, width_size)``. Its gradients
    are `fbalign.rules.direct_feedback_alignment`'s updates on the same weights. Build it with
    ``convert(mlp, "dfa", key=...)``.
    """

    mlp: eqx.nn.MLP
    taps: tuple[DFATap, ...]

    def __init__(self, mlp: eqx.nn.MLP, *, key: PRNGKeyArray,
                 init: str | Initializer = "gaussian", scale: float | None = None):
        if not isinstance(mlp, eqx.nn.MLP):
            raise TypeError(f"DirectFeedbackMLP wraps an eqx.nn.MLP, got {type(mlp).__name__}")
        if mlp.scan:
            raise ValueError("DirectFeedbackMLP does not support eqx.nn.MLP(..., scan=True): "
                             "build the MLP with scan=False")
        n_out = 1 if mlp.out_size == "scalar" else mlp.out_size
        keys = jax.random.split(key, max(mlp.depth, 1))
        dtype = mlp.layers[0].weight.dtype
        self.mlp = mlp
        self.taps = tuple(DFATap(n_out, (mlp.width_size,), key=k, init=init, scale=scale,
                                 dtype=dtype) for k in keys[:mlp.depth])

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        del key
        m = self.mlp
        scalar_out = m.out_size == "scalar"
        carrier = dfa_carrier(x, 1 if scalar_out else m.out_size, dtype=m.layers[0].weight.dtype)
        for i, (layer, tap) in enumerate(zip(m.layers[:-1], self.taps, strict=True)):
            h = _elementwise(_layer_activation(m.activation, i), layer(x))
            x, carrier = tap(h, carrier)
        y = m.layers[-1](x)
        if scalar_out:
            return m.final_activation(dfa_output(y.reshape(1), carrier).reshape(()))
        return _elementwise(m.final_activation, dfa_output(y, carrier))


# ---------------------------------------------------------------------------------------------
# convert.


def _is_target(node: Any) -> bool:
    return isinstance(node, (eqx.nn.Linear, eqx.nn.Conv))


def _children(node: Any) -> list[tuple[Any, Any]]:
    """``(step, child)`` pairs of a module (fields), a sequence (index) or a dict (key)."""
    if isinstance(node, eqx.Module):
        return [(("attr", f.name), getattr(node, f.name, None)) for f in dataclasses.fields(node)]
    if isinstance(node, (list, tuple)):
        return [(("item", i), c) for i, c in enumerate(node)]
    if isinstance(node, dict):
        return [(("item", k), c) for k, c in node.items()]
    return []


def _walk(node: Any, path: tuple = ()):
    """Yields ``(path, node)`` for every target layer and every other module under ``node``,
    not looking inside target layers."""
    if _is_target(node) or isinstance(node, eqx.Module):
        yield path, node
    if _is_target(node):
        return
    for step, child in _children(node):
        yield from _walk(child, (*path, step))


def _get(node: Any, path: tuple) -> Any:
    for kind, k in path:
        node = getattr(node, k) if kind == "attr" else node[k]
    return node


def path_name(path: tuple) -> str:
    """``layers[0].weight``-style text for a `convert` path."""
    out = ""
    for kind, k in path:
        out += f".{k}" if kind == "attr" else f"[{k!r}]"
    return out.lstrip(".") or "<model>"


def _left_alone_reason(module: Any) -> str | None:
    """Why a non-target module holding a weight matrix or kernel stays backprop (None when it
    holds none: normalisation scales, activations, containers)."""
    if isinstance(module, eqx.nn.Embedding):
        return None  # its integer input receives no error
    heavy = [name for step, v in _children(module)
             for name in [step[1]] if eqx.is_inexact_array(v) and v.ndim >= 2]
    if not heavy:
        return None
    return f"{type(module).__name__} holds {', '.join(map(str, heavy))}: not a layer convert knows"


def _convert_one(layer: Any, key: PRNGKeyArray | None, rule: str, options: dict) -> Any:
    """A `Linear`/`Conv` under ``rule`` with ``layer``'s weights (a layer stacked by
    ``eqx.nn.MLP(..., scan=True)`` is converted slice by slice)."""
    if layer.weight.ndim > (2 if isinstance(layer, eqx.nn.Linear) else layer.num_spatial_dims + 2):
        keys = None if key is None else jax.random.split(key, layer.weight.shape[0])
        return eqx.filter_vmap(lambda lyr, k: _convert_one(lyr, k, rule, options))(layer, keys)
    k = jax.random.key(0) if key is None else key  # bp/usf draw nothing from it
    dtype = layer.weight.dtype
    if isinstance(layer, eqx.nn.Linear):
        new = Linear(layer.in_features, layer.out_features, layer.use_bias, dtype, rule=rule,
                     key=k, **options)
    else:
        new = Conv(layer.num_spatial_dims, layer.in_channels, layer.out_channels,
                   layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                   layer.use_bias, layer.padding_mode, dtype, rule=rule, key=k, **options)
    return eqx.tree_at(lambda m: (m.weight, m.bias), new, (layer.weight, layer.bias),
                       is_leaf=lambda v: v is None)


@eqx.filter_jit
def _convert_layers(layers: list, keys: list, rule: str, options: dict) -> list:
    """`_convert_one` on every layer, compiled as one program (eagerly, each weight draw,
    transpose and bitcast of every shape would be compiled on its own)."""
    return [_convert_one(lyr, k, rule, options) for lyr, k in zip(layers, keys, strict=True)]


def convert(model: Any, rule: str, *, key: PRNGKeyArray | None = None,
            feedback_init: str | Initializer | None = None, feedback_scale: float | None = None,
            sign_scale: float | None = None, magnitude_distribution: str = "uniform",
            warn: bool = True) -> Any:
    """Returns ``model`` with every ``eqx.nn.Linear`` and ``eqx.nn.Conv`` (``Conv1d/2d/3d``,
    and this module's `Linear`/`Conv`, switched to the new rule) replaced by a `Linear`/`Conv`
    under ``rule``, weights unchanged (``eqx.tree_at``); the forward is the same.

    ``rule``: one of `RULES` (see `Linear` for the equations and papers), or ``"dfa"`` for an
    ``eqx.nn.MLP`` (returns a `DirectFeedbackMLP`: Nokland 2016). ``key`` draws the feedback
    (required but for ``"bp"``/``"usf"``); ``feedback_init``/``feedback_scale`` as in
    `make_feedback` (None: ``"matched"``, the weight's own scale) or, for ``"dfa"``, `DFATap`'s
    ``init``/``scale`` (None: ``"gaussian"``).
    Every other module holding a weight matrix or kernel (``eqx.nn.ConvTranspose``, RNN cells,
    raw weight arrays) stays backprop, with a warning naming its path (``warn=False`` hides
    it). The input is not modified. Works on a model built under ``eqx.filter_vmap`` (an
    ensemble over seeds) when called under the same ``filter_vmap`` with one key per member.
    """
    rule = check_rule(rule, RULES + DFA_RULES)
    if feedback_init is None:  # DFA taps: the core's gaussian; FA/KP: the weight's own scale
        feedback_init = "gaussian" if rule == "dfa" else "matched"
    if key is None and rule not in ("bp", "usf"):
        raise ValueError(f"convert(model, {rule!r}) draws random feedback: pass "
                         "key=jax.random.key(...)")
    if rule == "dfa":
        if not isinstance(model, eqx.nn.MLP):
            raise ValueError("convert(model, 'dfa') supports an eqx.nn.MLP; for other models put "
                             f"DFATap layers after the hidden activations (got "
                             f"{type(model).__name__})")
        return DirectFeedbackMLP(model, key=key, init=feedback_init, scale=feedback_scale)
    options = dict(feedback_init=feedback_init, feedback_scale=feedback_scale,
                   sign_scale=sign_scale, magnitude_distribution=magnitude_distribution)
    found = list(_walk(model))
    targets = [p for p, m in found if _is_target(m)]
    left = [(p, r) for p, m in found if not _is_target(m)
            for r in [_left_alone_reason(m)] if r is not None]
    if warn and left:
        warnings.warn(f"convert(..., {rule!r}) left these layers as backprop (their input error "
                      f"is backprop's, not the rule's): "
                      + "; ".join(f"{path_name(p)} ({r})" for p, r in left),
                      UserWarning, stacklevel=2)
    keys = [None] * len(targets) if key is None else list(jax.random.split(key, len(targets)))
    new = _convert_layers([_get(model, p) for p in targets], keys, rule, options)
    if targets == [()]:
        return new[0]
    if not targets:
        return model
    return eqx.tree_at(lambda m: [_get(m, p) for p in targets], model, new)
