"""Networks as lists of layers: dense, conv, pooling, flatten and residual blocks.

``sequential([Conv(8, (3, 3), activation="relu"), MaxPool(), Flatten(), Dense(10)],
input_shape=(8, 8, 1))`` builds a network that every rule trains the way it trains the MLP and
LeNet-5: its ``apply(params, x, backward=...)`` calls the rule's `Backward` at each weight layer
(so ``jax.grad`` is the rule), and, for chains, ``forward`` records the `Tape` that the explicit
forms read (through `Links` for conv, pooling and flattening).

Params are ``[{"w", "b"}, ...]``, one entry per weight layer (dense or conv) in order, residual
blocks' layers included; layer ``i`` of a rule (its feedback ``B_i``, its DFA tap) is the
``i``-th weight layer.

A residual block ``Residual([... , Dense(n)], activation=f)`` computes ``h = f(x + F(x))``: the
skip path is an ordinary identity, so FA sends the error down both paths (``delta_h`` through
``B`` inside the block and unchanged around it), and DFA's tap sits on ``h``, after the add (the
tap of the block's last weight layer). A residual network is not a chain, so it records no tape:
tape rules train it through their ``jax.grad`` form (``fit``'s ``form="explicit"`` becomes
``"grad"``); rules that only have an explicit form (bfa, dni, cdni) are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.activations import get_activation
from fbalign._src.backward import Backward
from fbalign._src.base import Array, LayerOp, Params, PRNGKey, Tape, TapeRule
from fbalign._src.convnet import max_pool_2x2
from fbalign._src.layered_init import build_rule, layered_rule_state
from fbalign._src.layers import conv_op
from fbalign._src.models import matmul, record_layers


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer ``f(x @ W + b)`` with ``W`` of shape ``(din, features)``."""

    features: int
    activation: str = "linear"
    use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 2-D convolution ``f(conv(x, W) + b)`` (NHWC inputs, HWIO kernels ``(kh, kw, cin,
    features)``); ``padding`` is ``"SAME"``, ``"VALID"``, an int or ``((top, bottom), (left,
    right))``."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int | tuple[int, int] = 1
    padding: Any = "SAME"
    activation: str = "linear"
    use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """Max pooling over ``window x window`` blocks with stride ``window`` (the map's height and
    width must be multiples of it). With ``window=2`` the error goes to each window's first
    maximum (LeNet-5's pooling); other windows take ``jnp.max``'s gradient, which ties share."""

    window: int = 2


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """Average pooling over ``window x window`` blocks with stride ``window``."""

    window: int = 2


@dataclasses.dataclass(frozen=True)
class Flatten:
    """``(batch, *shape) -> (batch, prod(shape))``, before the first dense layer of a conv net."""


@dataclasses.dataclass(frozen=True)
class Residual:
    """``h = f(x + F(x))`` with ``F`` the ``layers`` (ending in a weight layer with a linear
    activation, whose output has ``x``'s shape) and ``f`` the block's ``activation``."""

    layers: tuple[Any, ...]
    activation: str = "linear"


Layer = Dense | Conv | MaxPool | AvgPool | Flatten | Residual
_WEIGHTED = (Dense, Conv)


def _pool(layer: MaxPool | AvgPool, h: Array) -> Array:
    n, height, width, c = h.shape
    k = layer.window
    if isinstance(layer, MaxPool) and k == 2:
        return max_pool_2x2(h)  # the tie-deterministic VJP
    blocks = h.reshape(n, height // k, k, width // k, k, c)
    return blocks.max(axis=(2, 4)) if isinstance(layer, MaxPool) else blocks.mean(axis=(2, 4))


def _flatten(h: Array) -> Array:
    return h.reshape(h.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class _Between:
    """The pooling and flattening between two weight layers of a chain (a `Links` entry)."""

    ops: tuple[Any, ...]

    def __call__(self, h: Array) -> Array:
        for layer in self.ops:
            h = _flatten(h) if isinstance(layer, Flatten) else _pool(layer, h)
        return h


@dataclasses.dataclass(frozen=True)
class Sequential:
    """A network given as a list of layers; build it with `sequential`.

    ``init(key)``, ``apply(params, x, backward=...)`` (its ``jax.grad`` runs any rule's
    `Backward`), ``forward(params, x) -> (y, tape)`` for chains (None for residual networks: a
    property, so that the harness trains tape rules there through their ``jax.grad`` form),
    ``layer_ops()``, ``feature_shapes`` (each weight layer's per-example output shape, where DFA
    taps) and ``init_rule_state`` (the rule's own ``init``, on conv kernels and feature maps).
    """

    layer_structure = True  # rules that send errors through layers can use it

    layers: tuple[Any, ...]
    input_shape: tuple[int, ...]

    def __post_init__(self):
        self._plan()  # every check, once

    # ----- structure ---------------------------------------------------------------------

    def _plan(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[LayerOp]]:
        """Walks the layers on shapes: each weight layer's kernel shape, output shape and
        `LayerOp`; a ValueError naming the layer for anything that does not fit."""
        kernels, outs, ops = [], [], []
        shape = tuple(self.input_shape)
        shape = self._walk(self.layers, shape, kernels, outs, ops, "layers")
        if not kernels or not isinstance(self.layers[-1], Dense | Conv):
            got = type(self.layers[-1]).__name__ if self.layers else "no layers"
            raise ValueError("a Sequential network must end in a Dense (or Conv) layer, its "
                             f"output layer; got {got}")
        return kernels, outs, ops

    def _walk(self, layers, shape, kernels, outs, ops, where) -> tuple[int, ...]:
        for j, layer in enumerate(layers):
            name = f"{where}[{j}] ({type(layer).__name__})"
            if isinstance(layer, Dense | Conv):
                shape = _weight_layer(layer, shape, name, kernels, outs, ops)
            elif isinstance(layer, MaxPool | AvgPool):
                if len(shape) != 3 or shape[0] % layer.window or shape[1] % layer.window:
                    raise ValueError(f"{name}: pooling by {layer.window} needs an (H, W, C) map "
                                     f"with H and W multiples of {layer.window}, got {shape}")
                shape = (shape[0] // layer.window, shape[1] // layer.window, shape[2])
            elif isinstance(layer, Flatten):
                shape = (math.prod(shape),)
            elif isinstance(layer, Residual):
                shape = self._walk_residual(layer, shape, kernels, outs, ops, name)
            else:
                raise TypeError(f"{name}: not a layer; use Dense, Conv, MaxPool, AvgPool, "
                                "Flatten or Residual")
        return shape

    def _walk_residual(self, block, shape, kernels, outs, ops, name) -> tuple[int, ...]:
        get_activation(block.activation)
        last = block.layers[-1] if block.layers else None
        if not isinstance(last, Dense | Conv) or last.activation != "linear":
            raise ValueError(f"{name}: a residual block must end in a Dense or Conv layer with "
                             "activation 'linear' (the block's activation comes after the add)")
        if any(isinstance(x, Residual) for x in block.layers):
            raise ValueError(f"{name}: nested residual blocks are not supported")
        inner = self._walk(block.layers, shape, kernels, outs, ops, f"{name}.layers")
        if inner != shape:
            raise ValueError(f"{name}: F(x) has shape {inner} but x has {shape}; the add needs "
                             "equal shapes")
        return shape

    @property
    def residual(self) -> bool:
        return any(isinstance(x, Residual) for x in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self._plan()[0])

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return self._plan()[0]

    @property
    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Each weight layer's per-example output shape (where DFA-style rules tap)."""
        return self._plan()[1]

    @property
    def num_classes(self) -> int:
        return self.layers[-1].features

    def layer_ops(self) -> tuple[LayerOp, ...]:
        """Each weight layer's ``op(x, w)`` and per-example input shape (`TapeRule.advance`)."""
        return tuple(self._plan()[2])

    # ----- parameters and rule state -----------------------------------------------------

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """LeCun-normal kernels (He-normal under relu), zero biases; one ``{"w", "b"}`` per
        weight layer."""
        weighted = _weight_layers(self.layers)
        keys = jax.random.split(key, len(weighted))
        params = []
        for k, layer, shape in zip(keys, weighted, self.param_shapes, strict=True):
            relu = layer.activation in ("relu", "leaky_relu")
            kinit = jax.nn.initializers.he_normal() if relu else jax.nn.initializers.lecun_normal()
            p = {"w": kinit(k, shape, dtype)}
            if layer.use_bias:
                p["b"] = jnp.zeros((shape[-1],), dtype)
            params.append(p)
        return params

    def init_rule_state(self, rule: str | TapeRule, key: PRNGKey, params: Params,
                        init: Any = "gaussian", scale: float | None = None,
                        **rule_kwargs: Any) -> Any:
        """The state of a tape rule (a registered name, built with ``init``/``scale``/
        ``rule_kwargs``, or a `TapeRule`) for this network: `layered_rule_state`."""
        rule = build_rule(rule, init, scale, rule_kwargs)
        shapes = [tuple(p["w"].shape) for p in params]
        if shapes != self.param_shapes:
            raise ValueError(f"params have kernel shapes {shapes}, expected {self.param_shapes}")
        return layered_rule_state(rule, key, params, self.num_classes, self.feature_shapes)

    # ----- forward -----------------------------------------------------------------------

    def _prepare(self, x: Array) -> Array:
        want = tuple(self.input_shape)
        if tuple(x.shape[1:]) == want:
            return x
        if x.ndim == 2 and x.shape[1] == math.prod(want):
            return x.reshape(x.shape[0], *want)
        raise ValueError(f"this Sequential network expects inputs (batch, *{want}) or (batch, "
                         f"{math.prod(want)}), got {tuple(x.shape)}")

    def apply(self, params: Params, x: Float[Array, "batch ..."], *,
              backward: Backward | None = None) -> Float[Array, "batch n_out"]:
        """The forward pass; its ``jax.grad`` runs ``backward`` (backprop when None): layer
        ``i``'s linear map is ``backward.linear(i, ...)``, its activation ``backward.hidden(i,
        ...)`` (after the add in a residual block), the last layer ``backward.output``."""
        backward = Backward() if backward is None else backward
        x = self._prepare(x)
        if len(params) != self.num_layers:
            raise ValueError(f"params have {len(params)} layers, this network {self.num_layers}")
        carrier = backward.begin(x, self.num_classes)
        ops = self.layer_ops()
        h, _ = _run(self.layers, params, ops, backward, x, carrier, [0], len(params) - 1)
        return h

    @property
    def forward(self) -> Callable[[Params, Array], tuple[Array, Tape]] | None:
        """``forward(params, x) -> (y, tape)`` of a chain; None for a residual network (it
        records no tape: tape rules use their ``jax.grad`` form there)."""
        return None if self.residual else self._forward

    def _forward(self, params: Params, x: Array) -> tuple[Array, Tape]:
        x = self._prepare(x)
        weighted = _weight_layers(self.layers)
        acts = [get_activation(layer.activation) for layer in weighted]
        gaps, pending, i = {}, [], 0
        for layer in self.layers:
            if isinstance(layer, _WEIGHTED):
                if pending:
                    gaps[i] = _Between(tuple(pending))
                pending, i = [], i + 1
            else:
                pending.append(layer)
        ops = [op.op for op in self.layer_ops()]
        if not gaps and all(op is matmul for op in ops):
            return record_layers(acts, ops, params, x)
        return record_layers(acts, ops, params, x, between=_GapTable(gaps), gaps=tuple(gaps))


@dataclasses.dataclass(frozen=True)
class _GapTable:
    """``between(i, h)`` for `record_layers`: the pooling/flattening before weight layer ``i``."""

    gaps: dict

    def __call__(self, i: int, h: Array) -> Array:
        return self.gaps[i](h)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.gaps.items())))


def _weight_layer(layer, shape, name, kernels, outs, ops) -> tuple[int, ...]:
    get_activation(layer.activation)
    if isinstance(layer, Dense):
        if len(shape) != 1:
            raise ValueError(f"{name}: a dense layer needs flat inputs, got per-example shape "
                             f"{shape}; put Flatten() before it")
        kernels.append((shape[0], layer.features))
        outs.append((layer.features,))
        ops.append(LayerOp(matmul, shape))
        return (layer.features,)
    if len(shape) != 3:
        raise ValueError(f"{name}: a conv layer needs (H, W, C) inputs, got {shape}")
    kh, kw = layer.kernel_size
    op = conv_op(2, strides=layer.strides, padding=layer.padding, impl="auto")
    kernel = (kh, kw, shape[2], layer.features)
    out = jax.eval_shape(op, jax.ShapeDtypeStruct((1, *shape), jnp.float32),
                         jax.ShapeDtypeStruct(kernel, jnp.float32)).shape[1:]
    kernels.append(kernel)
    outs.append(tuple(out))
    ops.append(LayerOp(op, shape))
    return tuple(out)


def _weight_layers(layers: Sequence[Any]) -> list[Dense | Conv]:
    out = []
    for layer in layers:
        if isinstance(layer, Residual):
            out.extend(_weight_layers(layer.layers))
        elif isinstance(layer, _WEIGHTED):
            out.append(layer)
    return out


def _run(layers, params, ops, backward: Backward, h, carrier, counter: list[int], last: int,
         block: tuple[Array, str] | None = None):
    """Runs ``layers`` from activity ``h``; ``counter`` is the next weight layer's index;
    ``block = (x, activation)`` inside a residual block (its last layer adds ``x`` first)."""
    for j, layer in enumerate(layers):
        if isinstance(layer, Flatten):
            h = _flatten(h)
        elif isinstance(layer, MaxPool | AvgPool):
            h = _pool(layer, h)
        elif isinstance(layer, Residual):
            h, carrier = _run(layer.layers, params, ops, backward, h, carrier, counter, last,
                              block=(h, layer.activation))
        else:
            i = counter[0]
            counter[0] += 1
            if i == last:
                h = backward.into_last(h)
            a = backward.linear(i, ops[i].op, h, params[i]["w"])
            if "b" in params[i]:
                a = a + params[i]["b"]
            f = get_activation(layer.activation)
            if i == last:
                return f(backward.output(a, carrier)), carrier
            if block is not None and j == len(layers) - 1:  # the add, then the block's f
                a, f = block[0] + a, get_activation(block[1])
            h, carrier = backward.hidden(i, f, a, carrier)
    return h, carrier


def sequential(layers: Sequence[Any], input_shape: Sequence[int]) -> Sequential:
    """Builds a `Sequential` network from ``layers`` (`Dense`, `Conv`, `MaxPool`, `AvgPool`,
    `Flatten`, `Residual`) for per-example inputs of ``input_shape`` (``(din,)`` or ``(H, W,
    C)``; flat ``(batch, prod(input_shape))`` inputs are reshaped)."""
    def norm(x):
        if isinstance(x, Residual):
            return Residual(tuple(norm(y) for y in x.layers), x.activation)
        if isinstance(x, Conv):
            return dataclasses.replace(x, kernel_size=tuple(x.kernel_size))
        return x

    return Sequential(tuple(norm(x) for x in layers), tuple(int(s) for s in input_shape))
