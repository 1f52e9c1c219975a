"""LeNet-5, a functional model whose ``jax.grad`` runs backprop or a feedback rule (FA, DFA...).

The MNIST variant used in the BioTorch benchmark (Sanfiz & Akrout 2021), channels-last:

    28x28x1 --conv 5x5, 6, pad 2--> 28x28x6 --pool 2--> 14x14x6
            --conv 5x5, 16, valid--> 10x10x16 --pool 2--> 5x5x16 = 400
            --fc 120--> --fc 84--> --fc num_classes (logits)

Params are a list of five ``{"w", "b"}`` dicts: two conv kernels ``(5, 5, cin, cout)`` (HWIO) and
three dense ``(din, dout)`` matrices, so FA's feedback (one ``B_l`` of ``W_l``'s shape per layer)
has the same structure as for `fbalign.models.MLP`. Pooling and flattening have no weights and
pass the error as usual.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.backward import Backward
from fbalign._src.base import Array, LayerOp, Params, PRNGKey, Tape, TapeRule
from fbalign._src.feedback_init import Initializer, resolve_initializer
from fbalign._src.layered_init import build_rule, layered_rule_state
from fbalign._src.layers import (
    conv_op,
    glorot_dfa_std,
    resolve_conv_impl,
    shared_dfa_feedback,
)
from fbalign._src.models import get_activation, matmul, record_layers, run_layers
from fbalign._src.modes import MODES, backward_for_mode

LENET_MODES = MODES  # the legacy mode strings `apply` reads (`backward_for_mode`)


class SharedDirectFeedbackState(NamedTuple):
    """DFA state with one shared ``(n_out, max_units)`` matrix; layer ``l`` uses its first
    ``n_l`` columns (`fbalign.ops.shared_dfa_feedback`). Named ``feedback`` like the other states
    so that ``apply(..., feedback=state.feedback)`` works unchanged."""

    feedback: Array


def _blocks_2x2(h: Array) -> Array:
    n, height, width, c = h.shape
    return h.reshape(n, height // 2, 2, width // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(h: Array) -> Array:
    """2x2 max pooling with stride 2 of an NHWC map with even height and width.

    The same values and the same VJP as ``lax.reduce_window`` max pooling (each window's error
    goes to its first maximum, in row-major order), computed on a reshape: the VJP is one
    elementwise select over the four slots of each window, which XLA fuses with the activation
    derivative. On XLA's CPU backend reduce_window's select-and-scatter VJP made LeNet-5's step
    1.5x slower, the tie-splitting VJP of ``jnp.max`` over the reshape 1.15x, and a VJP that
    first reduced to the index of the first maximum 1.06x (``benchmarks/results``).
    """
    return _blocks_2x2(h).max(axis=(2, 4))


def _max_pool_fwd(h):
    out = max_pool_2x2(h)
    return out, (h, out)


def _max_pool_bwd(res, g):
    h, out = res
    b = _blocks_2x2(h)
    m = out[:, :, None, :, None, :]
    # The four slots of each window in row-major order; the error goes to the first slot that
    # holds the maximum (the last one when none compares equal, e.g. NaN). Written slot by slot
    # with no reduction, so that XLA fuses it into one elementwise loop with its consumer.
    a00, a01 = b[:, :, 0:1, :, 0:1, :] == m, b[:, :, 0:1, :, 1:2, :] == m
    a10 = b[:, :, 1:2, :, 0:1, :] == m
    first01 = a01 & ~a00
    first10 = a10 & ~(a00 | a01)
    first11 = ~(a00 | a01 | a10)
    row = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2) == 0
    col = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 4) == 0
    chosen = jnp.where(row, jnp.where(col, a00, first01), jnp.where(col, first10, first11))
    gb = jnp.where(chosen, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (gb.reshape(h.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@dataclasses.dataclass(frozen=True)
class LeNet5:
    """LeNet-5 for 28x28x1 inputs; build it with `lenet5`.

    Two forms share one interface with `fbalign.models.MLP`: ``init(key)`` and
    ``apply(params, x, feedback, mode)``, an ordinary forward whose ``jax.grad`` is the rule.
    ``init_rule_state`` draws the feedback a rule needs for this network (DFA needs the feature
    map shapes, which the params alone do not give).
    """

    layer_structure = True  # rules that send errors through layers can use it

    activation: str = "tanh"
    num_classes: int = 10
    pool: str = "max"

    conv_features: tuple[int, int] = (6, 16)
    dense_features: tuple[int, int] = (120, 84)
    conv_impl: str = "auto"

    def __post_init__(self):
        get_activation(self.activation)
        resolve_conv_impl(self.conv_impl)
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    # ----- shapes -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return 5

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (28, 28, 1)

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        c1, c2 = self.conv_features
        d1, d2 = self.dense_features
        return [(5, 5, 1, c1), (5, 5, c1, c2), (5 * 5 * c2, d1), (d1, d2), (d2, self.num_classes)]

    @property
    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Per-example output shape of each layer (before pooling): where DFA injects error."""
        c1, c2 = self.conv_features
        d1, d2 = self.dense_features
        return [(28, 28, c1), (10, 10, c2), (d1,), (d2,), (self.num_classes,)]

    # ----- parameters and rule state -----------------------------------------------------

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """LeCun-normal kernels (He-normal for relu), zero biases."""
        if self.activation in ("relu", "leaky_relu"):
            kinit = jax.nn.initializers.he_normal()
        else:
            kinit = jax.nn.initializers.lecun_normal()
        keys = jax.random.split(key, self.num_layers)
        return [
            {"w": kinit(k, shape, dtype), "b": jnp.zeros((shape[-1],), dtype)}
            for k, shape in zip(keys, self.param_shapes, strict=True)
        ]

    def init_rule_state(
        self,
        rule: str | TapeRule,
        key: PRNGKey,
        params: Params,
        init: str | Initializer = "gaussian",
        scale: float | None = None,
        shared: bool = False,
        **rule_kwargs: Any,
    ) -> Any:
        """Draws the rule state whose ``feedback`` ``apply(..., feedback, mode)`` takes.

        Args:
          rule: a registered rule name (built with ``get_rule(rule, init=..., scale=...,
            **rule_kwargs)``) or a `TapeRule`. Its own ``init`` draws the state, knowing the
            network (`fbalign.models.sequential.layered_rule_state`): FA-like rules one
            ``B_l`` of ``W_l``'s shape per layer (None for the first) with the backward fan-in
            (``dout`` for dense, ``kh * kw * cout`` for conv kernels); DFA-like rules (dfa,
            drtp, srbp, asrbp, bdfa) one ``(n_out, *feature_shape_l)`` per hidden layer (None
            for the output) with Glorot's fan ``(n_out + n_l) / 2`` (std ``sqrt(2 / (n_out +
            n_l))``, BioTorch's Xavier default) rather than the MLP's ``n_out``: a conv map has
            thousands of units, and an error of the output's size at each of them swamps the
            kernel update (LeNet-5 with ``1/sqrt(n_out)`` feedback barely trains).
          key: PRNG key.
          params: this network's params (for dtype and to check shapes).
          init, scale: the feedback initialiser (as in `fbalign.rules.feedback_alignment`).
          shared: DFA only: draw one ``(n_out, max_units)`` matrix of unit variance (times
            ``scale`` if given), sliced per layer (`SharedDirectFeedbackState`); ``apply`` takes
            its ``feedback`` (an array) and gives layer ``l`` the slice ``M[:, :n_l]`` times
            ``sqrt(2 / (n_out + n_l))``.

        Returns:
          A state whose ``feedback`` attribute is what ``apply`` takes (`EmptyState` for
          backprop).
        """
        shapes = [tuple(p["w"].shape) for p in params]
        if shapes != self.param_shapes:
            raise ValueError(f"params have kernel shapes {shapes}, expected {self.param_shapes}")
        if shared:
            return self._shared_dfa_state(rule, key, params, init, scale)
        rule = build_rule(rule, init, scale, rule_kwargs)
        return layered_rule_state(rule, key, params, self.num_classes, self.feature_shapes)

    def _shared_dfa_state(self, rule: Any, key: PRNGKey, params: Params, init: Any,
                          scale: float | None) -> SharedDirectFeedbackState:
        """One ``(n_out, max_units)`` matrix of unit variance (or ``scale``), for ``apply``
        to slice per layer and scale by its Glorot std (``shared=True``, DFA only)."""
        if rule != "dfa":
            raise ValueError("shared=True is implemented for 'dfa' only")
        max_units = max(math.prod(s) for s in self.feature_shapes[:-1])
        draw = resolve_initializer(init, 1.0 if scale is None else scale, fan=1)
        return SharedDirectFeedbackState(draw(key, (self.num_classes, max_units),
                                              params[0]["w"].dtype))

    def layer_ops(self) -> tuple[LayerOp, ...]:
        """Each layer's linear map ``op(x, w)`` (the two convolutions, then ``x @ w``) and the
        per-example shape of its input, for rules whose ``jax.grad`` form updates their state
        layer by layer (`fbalign.rules.TapeRule.advance`: weight mirrors, brSF, KP, ARBP).
        """
        c1, _ = self.conv_features
        d1, d2 = self.dense_features
        return (
            LayerOp(conv_op(2, padding=2, impl=self.conv_impl), (28, 28, 1)),
            LayerOp(conv_op(2, padding="VALID", impl=self.conv_impl), (14, 14, c1)),
            LayerOp(matmul, (self.param_shapes[2][0],)),
            LayerOp(matmul, (d1,)),
            LayerOp(matmul, (d2,)),
        )

    # ----- forward -------------------------------------------------------------------------

    def _prepare(self, x: Array) -> Array:
        if x.ndim == 2 and x.shape[1] == 784:
            return x.reshape(x.shape[0], 28, 28, 1)
        if x.ndim == 3 and x.shape[1:] == (28, 28):
            return x[..., None]
        if x.ndim == 4 and x.shape[1:] == (28, 28, 1):
            return x
        raise ValueError(
            "LeNet5 expects inputs of shape (batch, 784), (batch, 28, 28) or (batch, 28, 28, 1), "
            f"got {tuple(x.shape)}"
        )

    def _pool(self, h: Array) -> Array:
        # 2x2 windows, stride 2, on even maps (28 -> 14, 10 -> 5), as a reshape: see
        # `max_pool_2x2` for why not ``lax.reduce_window``.
        if self.pool == "max":
            return max_pool_2x2(h)
        n, height, width, c = h.shape
        return jnp.mean(h.reshape(n, height // 2, 2, width // 2, 2, c), axis=(2, 4))

    def apply(
        self,
        params: Params,
        x: Float[Array, "batch 784"] | Float[Array, "batch 28 28 1"],
        feedback: Sequence[Array | None] | Array | None = None,
        mode: str = "bp",
        *,
        labels: Array | None = None,
        derivative: bool = True,
        error_bits: int | None = None,
        backward: Backward | None = None,
    ) -> Float[Array, "batch n_out"]:
        """Forward pass returning logits; its ``jax.grad`` runs the rule's backward
        (``backward=``, a `fbalign._src.backward.Backward`, else built from ``mode``).

        Args:
          params: from ``init``.
          x: ``(batch, 784)``, ``(batch, 28, 28)`` or ``(batch, 28, 28, 1)`` images.
          feedback: the state's ``feedback`` from ``init_rule_state`` for every mode but
            ``"bp"`` and ``"shallow"`` (for DFA either one entry per layer, each
            ``(n_out, *map)`` or flat ``(n_out, n_l)``, or one shared 2-D matrix ``M``: layer
            ``l`` then uses ``sqrt(2 / (n_out + n_l)) * M[:, :n_l]``).
          mode: as `fbalign.models.MLP.apply`: ``"bp"``, ``"fa"`` (`fa_conv`/`famatmul`),
            ``"kp"``, ``"sign"`` (``feedback`` holds magnitudes ``M_l``; the error goes back
            through ``sign(W_l) * M_l``), ``"fa_noderiv"``, ``"dfa"`` (a `dfa_hidden` tap after
            every hidden activation, before pooling), ``"drtp"`` (the taps receive the one-hot
            ``labels`` / batch), ``"adfa"``/``"bdfa"`` (DFA taps whose feedback learns: see
            `fbalign.models.MLP.apply`) or ``"shallow"`` (only the last layer learns).
          labels: targets for ``"drtp"`` and ``"bdfa"``.
          derivative: if False, hidden activations pass the error with ``f'`` replaced by 1.
          error_bits: quantise the error reaching each hidden layer's output to this many bits.
          backward: a `Backward` to run instead of ``feedback``/``mode``.
        """
        x = self._prepare(x)
        if backward is None:
            if mode in ("drtp", "dfa", "adfa", "bdfa") and hasattr(feedback, "ndim"):
                feedback = [
                    shared_dfa_feedback(feedback, s, glorot_dfa_std(self.num_classes, s))
                    for s in self.feature_shapes[:-1]
                ] + [None]
            backward = backward_for_mode(
                mode, feedback, num_layers=self.num_layers, n_out=self.num_classes,
                batch=x.shape[0], dtype=x.dtype, labels=labels, derivative=derivative,
                error_bits=error_bits)
        f = get_activation(self.activation)
        ops = [op.op for op in self.layer_ops()]
        return run_layers(backward, [f] * (self.num_layers - 1) + [_identity], ops, params, x,
                          self.num_classes, between=self._between)

    def forward(self, params: Params, x: Float[Array, "batch ..."]
                ) -> tuple[Float[Array, "batch n_out"], Tape]:
        """Forward pass returning the logits and the `Tape` (with its `Links`: the two
        convolutions, pooling and flattening) for the explicit form of a rule
        (``rule.update``)."""
        x = self._prepare(x)
        f = get_activation(self.activation)
        ops = [op.op for op in self.layer_ops()]
        return record_layers([f] * (self.num_layers - 1) + [_identity], ops, params, x,
                             between=self._between, gaps=(1, 2))

    def _between(self, i: int, h: Array) -> Array:
        # after each conv layer's activation: 2x2 pooling; before the first dense layer: flatten
        if i in (1, 2):
            h = self._pool(h)
        return h.reshape(h.shape[0], -1) if i == 2 else h


def _identity(a: Array) -> Array:
    return a


def lenet5(
    activation: str = "tanh", num_classes: int = 10, pool: str = "max", conv_impl: str = "auto"
) -> LeNet5:
    """Builds `LeNet5` (BioTorch's MNIST LeNet: conv6-pool-conv16-pool-fc120-fc84-fc10).

    Args:
      activation: hidden activation (``tanh``, ``relu``, ...).
      num_classes: output logits.
      pool: ``"max"`` (BioTorch) or ``"avg"`` (LeCun et al. 1998's subsampling).
      conv_impl: ``"auto"`` (im2col on CPU, XLA's convolution elsewhere), ``"im2col"`` or
        ``"xla"`` (`fbalign.ops.conv_op`); the values agree to float rounding.
    """
    return LeNet5(activation, int(num_classes), pool, conv_impl=conv_impl)
