"""Flax NNX and Linen layers whose backward pass is a feedback rule (FA, sign symmetry, KP).

The layers hold no rule logic of their own: at every call a layer builds its rule's `Backward`
object (`fbalign._src.backward`; `_rule_backward` maps the ``rule`` name to it) and runs its
linear map, the dense matmul or its convolution, through ``Backward.linear``. The forward is the
ordinary op; the backward sends the error through a feedback kernel ``B`` of the weight's shape
(`LinearFeedback` for FA/KP, `SignFeedback` for the sign-symmetry rules; backprop is plain
`Backward`). The DFA taps run `DirectFeedback.tap`. Feedback never lives with the trainable
parameters:

* NNX: a `Feedback` variable type (not an ``nnx.Param``), so an optimizer built with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (weight decay included) never touches it;
* Linen: a separate ``"feedback"`` collection.

Kolen-Pollack's feedback learns through its own path: `feedback_grads` differentiates w.r.t.
`Feedback` only, `update_feedback` applies plain SGD with weight decay to it.

brSF (``rule="brsf"``) stores no feedback at all: every call draws fresh magnitudes from an RNG
stream named ``"feedback"``: an ``nnx.RngStream`` that the NNX layer forks from its ``rngs`` (as
``nnx.Dropout`` does), or ``make_rng("feedback")`` in Linen, so Linen's ``apply`` needs
``rngs={"feedback": key}``.

This module imports flax; ``import fbalign`` never does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx, traverse_util
from flax.core import unfreeze
from flax.errors import InvalidRngError
from flax.nnx.nn.dtypes import promote_dtype

from fbalign._src import primitives as P
from fbalign._src.backward import (
    Backward,
    DirectFeedback,
    LinearFeedback,
    SignFeedback,
    TargetProjection,
)
from fbalign._src.feedback_init import glorot_std, matched_feedback, matched_std
from fbalign._src.layers import conv_op, einsum_op, glorot_dfa_std, shared_dfa_feedback
from fbalign._src.models import matmul
from fbalign._src.rules.bidirectional import bdfa_feedback_grad
from fbalign._src.rules.sign_symmetry import DISTRIBUTIONS, draw_magnitude, sign_feedback

Array = jax.Array
Initializer = Callable[..., Array]

RULES = ("bp", "fa", "kp", "sign", "usf", "frsf", "brsf")  # the names ``rule`` accepts
_STORES_FEEDBACK = ("fa", "kp", "frsf")
# The key of a layer's weight in its `Backward` object's feedback mapping, and of a DFA tap.
_KERNEL = "kernel"
_TAP = "dfa"
# The RNG stream brSF draws its per-call magnitudes from (NNX ``Rngs`` stream, Linen rng name).
FEEDBACK_STREAM = "feedback"

default_kernel_init = jax.nn.initializers.lecun_normal()
# Variance-preserving for the backward map (std 1/sqrt(dout), or 1/sqrt(kh*kw*cout) for conv),
# the default of `fbalign.rules.feedback_alignment`; the adapters' default (feedback_init=None)
# is `matched_feedback` instead (issue 18 item 5: this one made a converted Flax CNN's hidden
# errors 5-18x backprop's, and SGD 0.1 with momentum diverged).
fan_out_feedback_init = jax.nn.initializers.variance_scaling(1.0, "fan_out", "normal")


def kernel_feedback(init: Initializer | None, key: Array, kernel: Array) -> Array:
    """``B`` for ``kernel``: ``init(key, kernel.shape, kernel.dtype)``, or, with ``init=None``
    (the adapters' default), `matched_feedback`: entries of the kernel's own scale, so that the
    errors a converted layer sends down start at backprop's magnitude."""
    if init is None:
        return matched_feedback(key, kernel)
    return init(key, kernel.shape, kernel.dtype)


class Feedback(nnx.Variable):
    """Feedback weights of a layer: an ``nnx.Variable`` that is *not* an ``nnx.Param``.

    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad`` (which differentiates
    ``nnx.Param`` by default) leave it alone; select it with ``Feedback`` as a filter.
    """


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    return "sign" if rule == "usf" else rule


def _check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown magnitude_distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    return distribution


def _brsf_magnitudes(
    key: Array, shape: Sequence[int], scale: float | None, dtype, distribution: str
) -> Array:
    """brSF's magnitudes ``|R|`` of ``shape``, drawn by the core rule's own `draw_magnitude`.

    ``R`` has std ``s = scale``, or the Glorot std ``sqrt(2 / (fan_in + fan_out))`` of ``shape``
    (receptive field included for a conv kernel; for a dense ``(din, dout)`` kernel it is the
    core rule's ``sqrt(2 / (din + dout))``), and the law ``distribution``, so a dense layer and
    `fbalign.rules.brsf` given the same key draw the very same magnitudes.
    """
    if scale is None:
        scale = glorot_std(tuple(shape))
    return draw_magnitude(key, tuple(shape), dtype, scale, distribution)


def _rule_backward(rule: str, shape: Sequence[int], feedback: Array | None,
                   sign_scale: float | None) -> Backward:
    """The `Backward` object of a layer under the adapter rule ``rule``, its weight keyed
    ``_KERNEL``: the adapters' one rule switch.

    ``feedback`` is the layer's stored ``B`` (fa, kp), its fixed magnitudes (frsf) or the
    magnitudes drawn for this call (brsf); ``shape`` is the kernel's.
    """
    if rule == "bp":
        return Backward()
    if rule in ("fa", "kp"):  # kp: B also gets the weight's cotangent
        return LinearFeedback(feedback={_KERNEL: feedback}, learn=rule == "kp")
    if rule in ("sign", "usf"):
        # The Glorot std that `sign_feedback(w, None)` uses, given explicitly: a None entry would
        # tell SignFeedback "no feedback here, the plain op".
        return SignFeedback(
            feedback={_KERNEL: glorot_std(tuple(shape)) if sign_scale is None else sign_scale})
    if rule in ("frsf", "brsf"):  # random magnitudes, the sign of the current weight
        return SignFeedback(feedback={_KERNEL: jnp.abs(feedback)})
    raise AssertionError(rule)


def _error_kernel(backward: Backward, kernel: Array) -> Array | None:
    """The tensor ``B`` that ``backward.linear(_KERNEL, op, x, kernel)`` sends the error back
    through (None for backprop, whose ``B`` is the kernel itself)."""
    if isinstance(backward, LinearFeedback):
        return backward.feedback[_KERNEL]
    if isinstance(backward, SignFeedback):
        return sign_feedback(kernel, backward.feedback[_KERNEL])
    return None


def _key_from(rngs: Any, stream: str) -> Array:
    """A key from a per-call ``rngs``: an ``nnx.Rngs`` (its ``stream``), an ``nnx.RngStream``
    or a key."""
    if isinstance(rngs, nnx.Rngs):
        return rngs[stream]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"rngs must be an nnx.Rngs, nnx.RngStream or a key, got {type(rngs)}")


@functools.cache
def _matmul_op(precision: Any) -> Callable[[Array, Array], Array]:
    """``x @ w`` at ``precision``: one function object per precision, so `feedback_op` caches
    (None is the core dense op `fbalign._src.models.matmul` itself)."""
    if precision is None:
        return matmul
    return lambda x, w: jnp.matmul(x, w, precision=precision)


def _dense(backward: Backward, x: Array, kernel: Array, bias: Array | None,
           precision: Any = None) -> Array:
    """``x @ kernel + bias``, the matmul run by ``backward``."""
    y = backward.linear(_KERNEL, _matmul_op(precision), x, kernel)
    if bias is not None:
        y = y + bias
    return y


def _static(v):
    if isinstance(v, (list, tuple)):
        return tuple(_static(i) for i in v)
    return v


def _tuple(v, n):
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(v)


def _conv(
    backward: Backward,
    x: Array,
    kernel: Array,
    bias: Array | None,
    strides,
    padding,
    input_dilation,
    kernel_dilation,
    feature_group_count: int,
    precision: Any = None,
) -> Array:
    """Channels-last conv with flax's input conventions (extra or missing batch dims, circular /
    reflect / causal padding done on the input): the `conv_op` closure run by ``backward``."""
    nsp = kernel.ndim - 2
    nbatch = x.ndim - (nsp + 1)
    batch_shape = x.shape[:nbatch]
    if nbatch != 1:
        x = x.reshape((-1, *x.shape[nbatch:]))
    kernel_dilation = _tuple(kernel_dilation, nsp)
    if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
        mode = padding.upper()
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:nsp], kernel_dilation,
                                                     strict=True)]
        if mode == "CAUSAL":
            if nsp != 1:
                raise ValueError("CAUSAL padding is only defined for 1-D convolutions")
            pads = [(0, 0), (dilated[0] - 1, 0), (0, 0)]
            x = jnp.pad(x, pads)
        else:
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[mode])
        padding = "VALID"
    op = conv_op(
        nsp,
        strides=_tuple(strides, nsp),
        padding=padding,
        lhs_dilation=_tuple(input_dilation, nsp),
        rhs_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
        precision=precision,
    )
    y = backward.linear(_KERNEL, op, x, kernel)
    if bias is not None:
        y = y + bias
    if nbatch != 1:
        y = y.reshape((*batch_shape, *y.shape[1:]))
    return y


# ---------------------------------------------------------------------------------------------
# NNX.


class _FeedbackLayer(nnx.Module):
    """What `Linear` and `Conv` share: kernel, bias and feedback variables, and the rule's
    `Backward` object."""

    rule: str
    sign_scale: float | None
    magnitude_distribution: str
    rng_collection: str

    def _make_weights(self, shape, out_features, use_bias, kernel_init, bias_init,
                      feedback_init, param_dtype, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.feedback = (
            Feedback(kernel_feedback(feedback_init, rngs.params(), self.kernel[...]))
            if self.rule in _STORES_FEEDBACK
            else None
        )
        # brSF: the layer's own stream (forked after the weights are drawn, so that they are the
        # same as under any other rule), as nnx.Dropout keeps one. Its key and count are
        # RngState variables: neither nnx.Param nor Feedback, so no optimizer sees them.
        if self.rule == "brsf":
            try:
                self.rngs = rngs[self.rng_collection].fork()
            except KeyError:
                raise ValueError(
                    f"rule='brsf' draws feedback magnitudes from the {self.rng_collection!r} "
                    f"stream: give rngs that stream or a default one, e.g. "
                    f"nnx.Rngs(params=0, {self.rng_collection}=1) or nnx.Rngs(0)"
                ) from None
        else:
            self.rngs = nnx.data(None)

    def _magnitudes(self, rngs: Any) -> Array:
        if rngs is None:
            rngs = self.rngs
        key = _key_from(rngs, self.rng_collection)
        kernel = self.kernel[...]
        return _brsf_magnitudes(key, kernel.shape, self.sign_scale, kernel.dtype,
                                self.magnitude_distribution)

    def _backward(self, rngs: Any, dtype: Any = None) -> Backward:
        """The rule's `Backward` object for one call (brSF draws its magnitudes here), its
        feedback cast to the compute ``dtype`` (None: the kernel's)."""
        if self.rule == "brsf":
            fb = self._magnitudes(rngs)
        else:
            fb = None if self.feedback is None else self.feedback[...]
        if fb is not None and dtype is not None:
            fb = fb.astype(dtype)
        return _rule_backward(self.rule, self.kernel[...].shape, fb, self.sign_scale)

    def _operands(self, x: Array) -> tuple[Array, Array, Array | None]:
        """``(x, kernel, bias)`` promoted to the compute ``dtype`` as flax's layers do."""
        bias = None if self.bias is None else self.bias[...]
        return promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)

    def backward_kernel(self, rngs: Any = None) -> Array | None:
        """The tensor ``B`` the error is sent back through (None for backprop).

        For ``"brsf"`` every call draws new magnitudes (from ``rngs`` if given: an ``nnx.Rngs``,
        an ``nnx.RngStream`` or a key; else from the layer's own stream, advancing it).
        """
        return _error_kernel(self._backward(rngs), self.kernel[...])


class Linear(_FeedbackLayer):
    """A dense layer ``y = x @ W + b`` whose backward follows ``rule``.

    Args:
      in_features, out_features: as ``nnx.Linear``.
      rule: ``"bp"`` (ordinary), ``"fa"`` (fixed random ``B``), ``"kp"`` (Kolen-Pollack: ``B``
        learns through `feedback_grads`/`update_feedback`), ``"sign"``/``"usf"`` (``sign(W)`` times
        ``sign_scale``), ``"frsf"`` (``sign(W)`` times fixed random magnitudes) or ``"brsf"``
        (``sign(W) * M`` with random magnitudes ``M = |R|`` redrawn at every call, as
        `fbalign.rules.brsf` draws them; Liao, Leibo & Poggio 2016, "How important is weight
        symmetry in backpropagation?"; the name is BioTorch's, Sanfiz & Akrout 2021).
      use_bias, kernel_init, bias_init, param_dtype: as ``nnx.Linear``.
      dtype, precision: the compute dtype (None: promote the input and the parameters, as
        ``nnx.Linear``) and the matmul precision; the feedback is cast to the compute dtype,
        so a bfloat16 layer sends its error back in bfloat16.
      feedback_init: initialiser of ``B``; None (default): `matched_feedback`, Gaussian entries
        with the kernel's own RMS, so the errors sent down start at backprop's magnitude
        (`compare_to_backprop` measures it); `fan_out_feedback_init` is the core rules'
        variance-preserving std ``1/sqrt(fan_out)``.
      sign_scale: magnitude for ``"sign"``, std ``s`` of brSF's ``R``; None is the Glorot std
        ``sqrt(2 / (fan_in + fan_out))`` of the kernel.
      magnitude_distribution: law of brSF's ``R`` (i.i.d., std ``s``), as ``distribution`` of
        `fbalign.rules.brsf`: ``"uniform"`` (BioTorch's Xavier-uniform; the core's default) or
        ``"normal"``.
      rng_collection: the ``rngs`` stream brSF draws from (default ``"feedback"``; an
        ``nnx.Rngs`` without it falls back to its ``default`` stream, as for ``nnx.Dropout``).
      rngs: draws the weights (``params`` stream) and, for brSF, forks the layer's own
        magnitude stream from ``rng_collection``.

    Attributes:
      kernel: ``nnx.Param`` ``(in_features, out_features)``; ``bias``: ``nnx.Param`` or None;
      feedback: `Feedback` of the kernel's shape for ``fa``/``kp``/``frsf``, else None;
      rngs: for brSF the layer's ``nnx.RngStream`` (RNG state, not a parameter), else None.

    Call it as ``layer(x)``, or ``layer(x, rngs=...)`` (brSF only: an ``nnx.Rngs``, an
    ``nnx.RngStream`` or a key that draws this call's magnitudes instead of the layer's stream).
    A brSF layer draws at every call, with or without a gradient, and advances its stream (under
    ``nnx.jit`` too).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rule: str = "fa",
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = jax.nn.initializers.zeros,
        feedback_init: Initializer | None = None,
        sign_scale: float | None = None,
        magnitude_distribution: str = "uniform",
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        precision: Any = None,
        rng_collection: str = FEEDBACK_STREAM,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = _static(precision)
        self.rule = _check_rule(rule)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.sign_scale = sign_scale
        self.magnitude_distribution = _check_distribution(magnitude_distribution)
        self.rng_collection = rng_collection
        self._make_weights((in_features, out_features), out_features, use_bias, kernel_init,
                           bias_init, feedback_init, param_dtype, rngs)

    def __call__(self, x: Array, *, rngs: Any = None) -> Array:
        x, kernel, bias = self._operands(x)
        return _dense(self._backward(rngs, kernel.dtype), x, kernel, bias, self.precision)


class Conv(_FeedbackLayer):
    """A channels-last convolution (``nnx.Conv``'s arguments) whose backward follows ``rule``.

    ``kernel`` is ``(*kernel_size, in_features // feature_group_count, out_features)``; the error
    reaching the input is the transposed convolution with ``B`` (see `Linear` for ``rule``,
    ``sign_scale``, ``magnitude_distribution``, ``rng_collection`` and brSF's per-call ``rngs``;
    brSF's default std uses the fans ``kh*kw*cin``, ``kh*kw*cout``; ``dtype``/``precision`` as
    there).
    Padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``, an int, ints
    or ``(low, high)`` pairs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: Any = "SAME",
        input_dilation: int | Sequence[int] = 1,
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        rule: str = "fa",
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = jax.nn.initializers.zeros,
        feedback_init: Initializer | None = None,
        sign_scale: float | None = None,
        magnitude_distribution: str = "uniform",
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        precision: Any = None,
        rng_collection: str = FEEDBACK_STREAM,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = _static(precision)
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,)
        if in_features % feature_group_count:
            raise ValueError(
                f"in_features {in_features} is not divisible by feature_group_count "
                f"{feature_group_count}"
            )
        self.rule = _check_rule(rule)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = tuple(kernel_size)
        # Tuples, not lists: static, hashable module attributes.
        self.strides = _static(strides)
        self.padding = _static(padding)
        self.input_dilation = _static(input_dilation)
        self.kernel_dilation = _static(kernel_dilation)
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.sign_scale = sign_scale
        self.magnitude_distribution = _check_distribution(magnitude_distribution)
        self.rng_collection = rng_collection
        shape = (*self.kernel_size, in_features // feature_group_count, out_features)
        self._make_weights(shape, out_features, use_bias, kernel_init, bias_init, feedback_init,
                           param_dtype, rngs)

    def __call__(self, x: Array, *, rngs: Any = None) -> Array:
        x, kernel, bias = self._operands(x)
        return _conv(
            self._backward(rngs, kernel.dtype),
            x,
            kernel,
            bias,
            self.strides,
            self.padding,
            self.input_dilation,
            self.kernel_dilation,
            self.feature_group_count,
            self.precision,
        )


class DFATap(nnx.Module):
    """Direct feedback alignment tap: ``h, carrier = tap(h, carrier)``.

    Identity forward; backward replaces the error reaching ``h`` by ``e @ B`` where ``e`` is the
    output error carried by ``carrier`` (make it with `dfa_carrier`, close it with `dfa_output`
    on the output pre-activation). ``B`` is ``(num_outputs, *feature_shape)``.

    Args:
      num_outputs: width ``n_out`` of the network output.
      feature_shape: per-example shape of ``h`` (e.g. ``(H, W, C)`` for a conv map).
      feedback_init: initialiser of ``B`` (default Glorot std ``sqrt(2 / (n_out + n_l))``).
      shared: a `Feedback` ``(num_outputs, max_units)`` shared by several taps (the memory-lean
        option): this tap uses ``scale * shared[:, :n_l]``; ``scale`` None is the Glorot std.
      rngs: needed unless ``shared`` is given.
    """

    def __init__(
        self,
        num_outputs: int,
        feature_shape: Sequence[int],
        *,
        feedback_init: Initializer | None = None,
        shared: Feedback | None = None,
        scale: float | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.num_outputs = int(num_outputs)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.is_shared = shared is not None
        if shared is not None:
            if not isinstance(shared, Feedback):
                raise TypeError("shared must be a Feedback variable (n_out, max_units)")
            self.feedback = shared
            self.scale = (
                glorot_dfa_std(self.num_outputs, self.feature_shape) if scale is None else scale
            )
        else:
            if rngs is None:
                raise ValueError("DFATap needs rngs to draw its feedback (or a shared Feedback)")
            std = glorot_dfa_std(self.num_outputs, self.feature_shape)
            init = feedback_init or jax.nn.initializers.normal(std if scale is None else scale)
            shape = (self.num_outputs, *self.feature_shape)
            self.feedback = Feedback(init(rngs.params(), shape, param_dtype))
            self.scale = None

    def backward_matrix(self) -> Array:
        b = self.feedback[...]
        if self.is_shared:
            b = shared_dfa_feedback(b, self.feature_shape, self.scale)
        return b

    def __call__(self, h: Array, carrier: Array) -> tuple[Array, Array]:
        return DirectFeedback(feedback={_TAP: self.backward_matrix()}).tap(_TAP, h, carrier)


def shared_feedback(
    num_outputs: int, max_units: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
) -> Feedback:
    """A unit-variance ``(num_outputs, max_units)`` `Feedback` to share among `DFATap` s."""
    return Feedback(jax.random.normal(rngs.params(), (num_outputs, max_units), param_dtype))


def feedback_grads(loss_fn: Callable[..., Array], model: nnx.Module, *args: Any, **kwargs: Any):
    """``d loss_fn(model, *args) / d Feedback``: Kolen-Pollack's feedback update (``nnx.State``).

    With ``rule="kp"`` layers this equals each layer's weight gradient (Akrout et al. 2019);
    for fixed-feedback rules it is zero.
    """
    return nnx.grad(loss_fn, argnums=nnx.DiffState(0, Feedback))(model, *args, **kwargs)


def update_feedback(
    model: nnx.Module, grads: nnx.State, learning_rate: float, weight_decay: float = 0.0
) -> None:
    """In place: ``B <- (1 - lr * weight_decay) B - lr * grad`` for every `Feedback` in ``grads``.

    Kolen & Pollack (1994), Akrout et al. (2019): ``W`` and ``B`` get the same update and decay,
    so they converge. Equivalent to an ``nnx.Optimizer(model, optax.sgd(lr) with decay,
    wrt=Feedback)``.
    """
    state = nnx.state(model, Feedback)
    new = jax.tree.map(
        lambda b, g: (1.0 - learning_rate * weight_decay) * b - learning_rate * g, state, grads
    )
    nnx.update(model, new)


# Rules whose feedback learns from its own cotangent: Kolen-Pollack (B gets W's update), and the
# direct-feedback rules adaptive skipped RBP and bidirectional DFA (their taps' cotangents).
LEARNING_FEEDBACK = ("kp", "asrbp", "bdfa")


def learning_feedback_layers(model: nnx.Module) -> list[str]:
    """The paths of ``model``'s layers (or the model itself, for a `DirectFeedbackModel`) whose
    `Feedback` learns (`LEARNING_FEEDBACK`): what `train_step` must update."""
    return [_path(path) or "<model>" for path, m in nnx.iter_modules(model)
            if getattr(m, "rule", None) in LEARNING_FEEDBACK]


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: Callable[..., Array],
               *args: Any, feedback_lr: float | None = None,
               feedback_weight_decay: float = 0.0, **kwargs: Any) -> Array:
    """One training step of an NNX model with feedback layers, in place; returns the loss.

    ``optimizer`` (an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``) steps the parameters with
    ``d loss_fn(model, *args) / d Param``; every `Feedback` whose rule learns it
    (`LEARNING_FEEDBACK`: Kolen-Pollack's ``B`` takes ``W``'s update, Akrout et al. 2019;
    adaptive skipped RBP's and bidirectional DFA's ``B`` their taps' cotangents) steps by
    `update_feedback`, ``B <- (1 - feedback_lr * feedback_weight_decay) B - feedback_lr *
    g_B``, from the same backward pass. An ``nnx.Optimizer`` alone never moves a `Feedback`
    (it is not an ``nnx.Param``), so such a model would silently train as fixed-feedback FA;
    this step is the one call that keeps the rule's promise. For Kolen-Pollack's guarantee
    (``W - B`` shrinking by ``1 - lr * wd`` a step) ``tx`` must be plain SGD at
    ``feedback_lr`` with the same decay.

    Raises:
      ValueError: the model has learning feedback and ``feedback_lr`` is None (named layers).
    """
    learners = learning_feedback_layers(model)
    if learners and feedback_lr is None:
        raise ValueError(
            f"layers {', '.join(learners)} learn their feedback (rules "
            f"{', '.join(LEARNING_FEEDBACK)}); pass feedback_lr= (Kolen-Pollack: the "
            "optimizer's SGD rate) so that train_step updates it")
    if not learners:
        loss, grads = nnx.value_and_grad(loss_fn)(model, *args, **kwargs)
        optimizer.update(model, grads)
        return loss
    which = nnx.DiffState(0, nnx.Any(nnx.Param, Feedback))
    loss, grads = nnx.value_and_grad(loss_fn, argnums=which)(model, *args, **kwargs)
    param_grads, feedback_g = nnx.split_state(grads, nnx.Param, Feedback)
    optimizer.update(model, param_grads)
    update_feedback(model, feedback_g, feedback_lr, feedback_weight_decay)
    return loss


# ---------------------------------------------------------------------------------------------
# Converting an existing NNX model.

# The direct-feedback rules `convert` builds: every converted layer but the first gets a tap on
# its input (the error reaching it is replaced by ``e @ B_l``), and the model's output passes
# through the rule's output primitive, both inside the `DirectFeedbackModel` that `convert`
# returns.
DFA_RULES = ("dfa", "srbp", "asrbp", "drtp", "bdfa")
_READS_TARGETS = ("drtp", "bdfa")


def _check_convert_rule(rule: str) -> str:
    if rule not in RULES + DFA_RULES:
        raise ValueError(
            f"unknown rule {rule!r}; valid: {', '.join(RULES + DFA_RULES)} (convert's "
            f"direct-feedback rules {', '.join(DFA_RULES)} need sample_input=)"
        )
    return rule


def _get_child(parent: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(parent, key):
        return getattr(parent, key)
    return parent[key]


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(parent, key) and not isinstance(parent, dict):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _hashable(v: Any) -> Any:
    """Lists (flax passes some) as tuples, so that an op's configuration can key a cache."""
    if isinstance(v, list):
        return tuple(_hashable(i) for i in v)
    return v


def _kwargs_key(kwargs: dict) -> tuple:
    return tuple(sorted((k, _hashable(v)) for k, v in kwargs.items() if v is not None))


# Flax's layers call their linear map through an attribute (``self.dot_general``,
# ``self.conv_general_dilated``, ``self.einsum_op``); a converted layer's class turns that
# attribute into the rule's feedback op, and everything else of the layer (``dtype``,
# ``param_dtype``, ``precision``, ``promote_dtype``, a conv's ``mask``, LoRA branches) stays.


@functools.cache
def _dot_general_op(fn: Callable, dimension_numbers: Any, precision: Any, kwargs: tuple):
    def op(x: Array, w: Array) -> Array:
        return fn(x, w, dimension_numbers, precision=precision, **dict(kwargs))

    return op


@functools.cache
def _conv_general_op(fn: Callable, window_strides: Any, padding: Any, kwargs: tuple):
    def op(x: Array, w: Array) -> Array:
        return fn(x, w, window_strides, padding, **dict(kwargs))

    return op


@functools.cache
def _einsum_general_op(fn: Callable, spec: str, precision: Any, kwargs: tuple):
    if fn is jnp.einsum and not kwargs:  # the core op of `fbalign.ops.fa_einsum`
        return einsum_op(spec, precision)

    def op(x: Array, w: Array) -> Array:
        return fn(spec, x, w, precision=precision, **dict(kwargs))

    return op


def _feedback_dot_general(layer, fn, lhs, rhs, dimension_numbers, precision=None, **kwargs):
    op = _dot_general_op(fn or jax.lax.dot_general, _hashable(dimension_numbers),
                         _hashable(precision), _kwargs_key(kwargs))
    return layer._feedback_backward(rhs).linear(_KERNEL, op, lhs, rhs)


def _feedback_conv_general(layer, fn, lhs, rhs, window_strides, padding, **kwargs):
    op = _conv_general_op(fn, _hashable(window_strides), _hashable(padding),
                          _kwargs_key(kwargs))
    return layer._feedback_backward(rhs).linear(_KERNEL, op, lhs, rhs)


def _feedback_einsum(layer, fn, spec, x, w, precision=None, **kwargs):
    op = _einsum_general_op(fn, spec, _hashable(precision), _kwargs_key(kwargs))
    return layer._feedback_backward(w).linear(_KERNEL, op, x, w)


@functools.cache
def _conv_transpose_op(strides: tuple, padding: Any, kernel_dilation: tuple,
                       transpose_kernel: bool, precision: Any, preferred: Any):
    def op(x: Array, w: Array) -> Array:
        return jax.lax.conv_transpose(x, w, strides, padding, rhs_dilation=kernel_dilation,
                                      transpose_kernel=transpose_kernel, precision=precision,
                                      preferred_element_type=preferred)

    return op


def _spatial(value: Any, n: int) -> tuple[int, ...]:
    """A per-spatial-axis option of a conv layer as a tuple (flax broadcasts an int or None)."""
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def _transpose_padding(padding: Any, n: int) -> Any:
    """``nnx.ConvTranspose``'s ``padding`` as ``lax.conv_transpose`` takes it."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _feedback_conv_transpose_call(self, inputs: Array) -> Array:
    """``nnx.ConvTranspose.__call__`` whose ``lax.conv_transpose`` is the rule's feedback op:
    the same forward (mask, dtype promotion, precision, bias, any leading batch axes), the
    kernel's ordinary gradient, and the input's error through ``B`` (`Backward.linear`)."""
    n = len(self.kernel_size)
    lead = inputs.shape[:inputs.ndim - (n + 1)]
    x = inputs.reshape((-1, *inputs.shape[len(lead):]))
    kernel = self.kernel[...]
    if self.mask is not None:
        kernel = kernel * self.mask
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    op = _conv_transpose_op(_spatial(self.strides, n), _transpose_padding(self.padding, n),
                            _spatial(self.kernel_dilation, n), self.transpose_kernel,
                            _hashable(self.precision), self.preferred_element_type)
    y = self._feedback_backward(kernel).linear(_KERNEL, op, x, kernel)
    if self.use_bias:
        y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y.reshape((*lead, *y.shape[1:]))


_OP_ATTRS = ((nnx.Einsum, "einsum_op", _feedback_einsum),
             (nnx.Conv, "conv_general_dilated", _feedback_conv_general),
             (nnx.LinearGeneral, "dot_general", _feedback_dot_general),
             (nnx.Linear, "dot_general", _feedback_dot_general))


def _op_property(attr: str, impl: Callable) -> property:
    def get(self):
        return functools.partial(impl, self, vars(self).get(attr))

    def set_(self, value):
        vars(self)[attr] = value

    return property(get, set_)


def _feedback_backward(self, w: Array) -> Backward:
    """The rule's `Backward` for one call of a converted flax layer; ``w`` is the kernel as the
    op receives it (promoted to the compute dtype, masked), so the feedback is cast and masked
    alike."""
    if self.rule == "brsf":
        fb = _brsf_magnitudes(self.feedback_rngs(), w.shape, self.sign_scale, w.dtype,
                              self.magnitude_distribution)
    else:
        fb = None if self.feedback is None else self.feedback[...].astype(w.dtype)
        mask = getattr(self, "mask", None)
        if fb is not None and mask is not None:  # the masked connections send nothing
            fb = fb * mask
    return _rule_backward(self.rule, w.shape, fb, self.sign_scale)


def _is_feedback_op_layer(m: Any) -> bool:
    """A flax layer (or subclass) whose op `convert` turned into a rule's feedback op."""
    return getattr(type(m), "_fbalign_feedback_op", False)


def _base_class(cls: type) -> type:
    return getattr(cls, "_fbalign_base", cls)


@functools.cache
def _feedback_class(base: type) -> type:
    # No mixin base and no __slots__: the class must keep flax's layout, as `convert` assigns
    # it to existing instances (``__class__``).
    ns = {"_fbalign_base": base, "__module__": __name__,
          "_feedback_backward": _feedback_backward, "_fbalign_feedback_op": True}
    if issubclass(base, nnx.ConvTranspose):  # it calls lax.conv_transpose, not an attribute
        ns["__call__"] = _feedback_conv_transpose_call
        ns["__doc__"] = (f"``{base.__qualname__}`` whose transposed convolution is a feedback "
                         "rule's op (made by `fbalign.flax.convert`).")
    else:
        attr, impl = next((a, f) for c, a, f in _OP_ATTRS if issubclass(base, c))
        ns[attr] = _op_property(attr, impl)
        ns["__doc__"] = (f"``{base.__qualname__}`` whose ``{attr}`` is a feedback rule's op "
                         "(made by `fbalign.flax.convert`).")
    return types.new_class(f"Feedback{base.__name__}", (base,), {},
                           lambda d: d.update(ns))


class _Slot:
    """What one call of a `DirectFeedbackModel` threads through its layers: the error carrier
    (made by the first tap), the rule, the targets; or, while `convert` traces, the shapes."""

    def __init__(self, mode: str, rule: str | None = None, num_outputs: int = 0,
                 batch_ndim: int = 1, labels: Any = None):
        self.mode = mode  # "record", "train" or "off"
        self.rule = rule
        self.num_outputs = num_outputs
        self.batch_ndim = batch_ndim
        self.labels = labels
        self.carrier: Array | None = None
        self.records: dict[int, tuple] = {}
        self.input_ids: set[int] = set()

    def record(self, index: int, x: Array) -> None:
        shape = tuple(x.shape)
        if index in self.records and self.records[index][0] != shape:
            raise ValueError(
                f"convert: a converted layer is called on inputs of shapes "
                f"{self.records[index][0]} and {shape}; a direct-feedback tap needs one shape "
                "per layer (its B is (num_outputs, *feature shape))")
        self.records.setdefault(index, (shape, id(x) in self.input_ids))

    def targets(self, dtype: Any) -> Array | None:
        if self.rule not in _READS_TARGETS:
            return None
        labels = jnp.asarray(self.labels)
        shape = self.carrier.shape
        if jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == shape[:-1]:
            t = jax.nn.one_hot(labels, self.num_outputs, dtype=dtype)
        elif labels.shape == shape:
            t = labels.astype(dtype)
        else:
            raise ValueError(
                f"labels must be integer classes of shape {shape[:-1]} or targets of the "
                f"output's shape {shape}, got shape {labels.shape} and dtype {labels.dtype}")
        if self.rule == "drtp":  # the batch mean's 1/n, as the core rule
            t = t / math.prod(shape[:-1])
        return t

    def backward(self, feedback: dict) -> DirectFeedback:
        """The core rule's `Backward` object (`fbalign._src.backward`) for this call."""
        t = self.targets(self.carrier.dtype)
        if self.rule == "drtp":
            return TargetProjection(feedback=feedback, targets=t)
        cotangent = {"asrbp": "activity", "bdfa": bdfa_feedback_grad}.get(self.rule, "zero")
        return DirectFeedback(feedback=feedback, tap_cotangent=cotangent, targets=t)


_LOCAL = threading.local()


def _slots() -> list[_Slot]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def _dfa_tap(layer: Any, x: Array) -> Array:
    """The direct-feedback tap on a converted layer's input (identity forward)."""
    stack = _slots()
    if not stack:
        raise RuntimeError(
            f"{type(layer).__name__} was converted to a direct-feedback rule and must be called "
            "through the DirectFeedbackModel that fbalign.flax.convert returned: that model "
            "closes the output with the rule's output primitive, without which the hidden "
            "layers would get no error (zero gradients)")
    slot = stack[-1]
    if slot.mode == "record":
        slot.record(layer.dfa_index, x)
        return x
    fb = getattr(layer, "dfa_feedback", None)
    if slot.mode == "off" or fb is None:
        return x
    b = fb[...]
    nb = slot.batch_ndim
    if slot.carrier is None:
        slot.carrier = P.dfa_carrier((*x.shape[:nb], slot.num_outputs), b.dtype)
    if x.shape[:nb] != slot.carrier.shape[:-1] or x.shape[nb:] != b.shape[1:]:
        raise ValueError(
            f"direct-feedback tap of shape {b.shape[1:]} (traced by convert) got an input of "
            f"shape {x.shape} with batch shape {slot.carrier.shape[:-1]}: call the model on "
            "inputs shaped like sample_input (the batch size may change)")
    h, slot.carrier = slot.backward({_TAP: b}).tap(_TAP, x, slot.carrier)
    return h


@functools.cache
def _tap_class(base: type) -> type:
    def __call__(self, x, *args, **kwargs):
        return base.__call__(self, _dfa_tap(self, x), *args, **kwargs)

    ns = {"__call__": __call__, "_fbalign_base": base, "__module__": __name__,
          "__doc__": f"``{base.__qualname__}`` with a direct-feedback tap on its input (made by "
                     "`fbalign.flax.convert`; call it through its `DirectFeedbackModel`)."}
    return types.new_class(f"DirectFeedback{base.__name__}", (base,), {},
                           lambda d: d.update(ns))


@jax.custom_vjp
def _no_backward(y: Array) -> Array:
    return y


def _no_backward_fwd(y):
    return y, None


def _no_backward_bwd(_, g):
    raise ValueError(
        "DirectFeedbackModel.predict is for evaluation and has no backward: train with "
        "model(x) (model(x, labels=...) for drtp and bdfa), which runs the rule's taps")


_no_backward.defvjp(_no_backward_fwd, _no_backward_bwd)


class DirectFeedbackModel(nnx.Module):
    """A model converted to a direct-feedback rule by `convert`: call it as the original.

    ``model(*args, **kwargs)`` runs the original forward; each converted layer but the first
    taps its input and the output goes through the rule's output primitive, so ``nnx.grad``
    gives the rule's updates:

    * ``"dfa"`` (Nokland 2016, "Direct feedback alignment provides learning in deep neural
      networks") and ``"srbp"`` (skipped random backprop, Baldi, Sadowski & Lu 2018, "Learning
      in the machine: random backpropagation and the deep learning channel"): the error reaching
      hidden activity ``h_l`` (a converted layer's input) is ``e @ B_l``, ``e = dL/dy``, so
      ``delta_l = (e B_l) * f'(a_l)`` and ``dW_l = x_l^T delta_l``;
    * ``"asrbp"`` (adaptive SRBP, Baldi et al. 2018): as srbp, and ``nnx.grad`` w.r.t.
      `Feedback` (`feedback_grads`) returns ``e^T h_l`` for ``B_l``, which `update_feedback`
      applies as ``B_l <- B_l - lr e^T h_l``;
    * ``"drtp"`` (Frenkel, Lefebvre & Bol 2021, "Learning without feedback"): hidden layers get
      ``(t / n) @ B_l`` from the one-hot target ``t``; call ``model(x, labels=y)``;
    * ``"bdfa"`` (Luo, Fu & Glass 2017, "Bidirectional backpropagation"): DFA, and `Feedback`'s
      gradient is the backward loss's (the core rule's ``bdfa_feedback_grad``); ``labels=``
      needed.

    The taps and the output primitive are the core ops (`fbalign.ops.dfa_hidden`,
    `fbalign.ops.dfa_output`); the layers refuse to run outside this model, so the output
    primitive cannot be forgotten. ``predict`` runs the forward alone (no labels; taking its
    gradient raises).

    Attributes:
      model: the converted model; rule, num_outputs: as given to `convert`; batch_ndim: the
      number of leading batch axes of the output (and of every tapped input).
    """

    def __init__(self, model: nnx.Module, rule: str, num_outputs: int, batch_ndim: int):
        self.model = model
        self.rule = rule
        self.num_outputs = int(num_outputs)
        self.batch_ndim = int(batch_ndim)

    def _run(self, slot: _Slot, args, kwargs):
        stack = _slots()
        stack.append(slot)
        try:
            return self.model(*args, **kwargs)
        finally:
            stack.pop()

    def __call__(self, *args: Any, labels: Array | None = None, **kwargs: Any) -> Array:
        if self.rule == "bp":  # `compare_to_backprop`'s reference: taps off, plain backprop
            return self._run(_Slot("off"), args, kwargs)
        if self.rule in _READS_TARGETS and labels is None:
            raise ValueError(
                f"rule {self.rule!r} sends the target to the hidden layers: call "
                f"model(x, labels=y) (integer classes or targets of the output's shape); "
                "model.predict(x) evaluates without labels")
        slot = _Slot("train", self.rule, self.num_outputs, self.batch_ndim, labels)
        y = self._run(slot, args, kwargs)
        if slot.carrier is None:  # nothing tapped: a single converted layer
            return y
        if not hasattr(y, "shape") or y.shape != slot.carrier.shape:
            raise ValueError(
                f"the model's output must be one array of shape {slot.carrier.shape} (batch "
                f"shape of the taps, num_outputs={self.num_outputs}), got "
                f"{getattr(y, 'shape', type(y))}")
        out = slot.backward({}).output(y.astype(slot.carrier.dtype), slot.carrier)
        return out.astype(y.dtype)

    def predict(self, *args: Any, **kwargs: Any) -> Array:
        """The forward pass alone, for evaluation: no taps, no labels; no gradient."""
        return _no_backward(self._run(_Slot("off"), args, kwargs))


def _converted_kind(m: Any) -> str | None:
    """``"ff"`` (this module's `Linear`/`Conv`), ``"flax"`` (a flax layer whose op `convert`
    swaps) or None."""
    if isinstance(m, (Linear, Conv)):
        return "ff"
    base = _base_class(type(m))
    if issubclass(base, nnx.ConvTranspose):
        return None if m.padding == "CIRCULAR" else "flax"
    if any(issubclass(base, c) for c, _, _ in _OP_ATTRS):
        if isinstance(m, nnx.LinearGeneral) and m.dot_general_cls is not None:
            return None
        return "flax"
    return None


def _left_alone_reason(m: Any) -> tuple[str, bool] | None:
    """Why a module with parameters stays backprop, and whether to warn (it holds a weight
    matrix or kernel, so its input error is backprop's and not the rule's)."""
    params = [v for v in vars(m).values() if isinstance(v, nnx.Param)]
    if not params:
        return None
    heavy = any(jnp.ndim(v[...]) >= 2 for v in params)
    if isinstance(m, nnx.Embed):
        return "embedding (its integer input receives no error)", False
    if isinstance(m, nnx.LinearGeneral):
        return "LinearGeneral with dot_general_cls (no op convert can swap)", True
    if isinstance(m, nnx.ConvTranspose):
        return "ConvTranspose with CIRCULAR padding (no feedback form)", True
    if isinstance(m, nnx.LoRA):
        return "LoRA branch x @ A @ B (no feedback form)", True
    if not heavy:
        return "scale/offset parameters only (normalisation): passes the error as backprop", False
    return f"{type(m).__name__} is not a layer convert knows", True


def _path(path: tuple) -> str:
    return "/".join(str(k) for k in path) or "<model>"


def _set(module: Any, name: str, value: Any) -> None:
    """Sets an attribute that may hold a Variable, an RNG stream or None."""
    if name in vars(module):
        delattr(module, name)
    setattr(module, name, value if value is not None else nnx.data(None))


def _feedback_stream(rngs: nnx.Rngs, stream: str):
    try:
        return rngs[stream].fork()
    except KeyError:
        raise ValueError(
            f"rule='brsf' draws feedback magnitudes from the {stream!r} stream: give rngs "
            f"that stream or a default one, e.g. nnx.Rngs(params=0, {stream}=1) or "
            "nnx.Rngs(0)") from None


def _swap_op(layer: Any, rule: str, rngs: nnx.Rngs, feedback_init, sign_scale,
             magnitude_distribution, rng_collection) -> None:
    """In place: ``layer``'s class becomes `_feedback_class` of its flax class; feedback is
    drawn in the kernel's ``param_dtype``."""
    layer.__class__ = _feedback_class(_base_class(type(layer)))
    kernel = layer.kernel[...]
    layer.rule = _check_rule(rule)
    layer.sign_scale = sign_scale
    layer.magnitude_distribution = magnitude_distribution
    layer.rng_collection = rng_collection
    fb = (Feedback(kernel_feedback(feedback_init, rngs.params(), kernel))
          if layer.rule in _STORES_FEEDBACK else None)
    _set(layer, "feedback", fb)
    _set(layer, "feedback_rngs",
         _feedback_stream(rngs, rng_collection) if layer.rule == "brsf" else None)


def _plain(layer: Any) -> bool:
    """An exact ``nnx.Linear``/``nnx.Conv`` with flax's default op, promotion and no mask:
    `Linear`/`Conv` of this module represent it exactly."""
    if type(layer) is nnx.Linear:
        op_ok = vars(layer).get("dot_general") is jax.lax.dot_general
    elif type(layer) is nnx.Conv:
        op_ok = (vars(layer).get("conv_general_dilated") is jax.lax.conv_general_dilated
                 and layer.mask is None)
    else:
        return isinstance(layer, (Linear, Conv))
    return (op_ok and layer.promote_dtype is promote_dtype
            and layer.preferred_element_type is None)


def _convert_layer(
    layer: nnx.Module, rule: str, rngs: nnx.Rngs, feedback_init, sign_scale,
    magnitude_distribution, rng_collection
) -> nnx.Module:
    """A new `Linear`/`Conv` under ``rule`` with ``layer``'s weights, dtype and precision."""
    dtype = layer.kernel[...].dtype
    common = dict(rule=rule, use_bias=layer.use_bias, feedback_init=feedback_init,
                  sign_scale=sign_scale, magnitude_distribution=magnitude_distribution,
                  param_dtype=dtype, dtype=layer.dtype, precision=layer.precision,
                  rng_collection=rng_collection, rngs=rngs)
    if isinstance(layer, (nnx.Linear, Linear)):
        new = Linear(layer.in_features, layer.out_features, **common)
    else:
        new = Conv(
            layer.in_features,
            layer.out_features,
            layer.kernel_size,
            layer.strides,
            padding=layer.padding,
            input_dilation=layer.input_dilation,
            kernel_dilation=layer.kernel_dilation,
            feature_group_count=layer.feature_group_count,
            **common,
        )
    if new.feedback is not None and feedback_init is None:
        # B was matched to the new layer's fresh kernel; match it to the kernel it takes over
        new.feedback[...] = (new.feedback[...] * (matched_std(layer.kernel[...])
                                                  / matched_std(new.kernel[...]))
                             ).astype(new.feedback[...].dtype)
    new.kernel[...] = layer.kernel[...]
    if layer.use_bias:
        new.bias[...] = layer.bias[...]
    return new


def _targets_of(model: nnx.Module):
    found, left = [], []
    for path, m in nnx.iter_modules(model):
        kind = _converted_kind(m)
        if kind is not None:
            found.append((path, m))
        else:
            reason = _left_alone_reason(m)
            if reason is not None:
                left.append((path, m, *reason))
    return found, left


def _warn_left_alone(left, rule: str) -> None:
    heavy = [f"{_path(p)} ({r})" for p, _, r, warn in left if warn]
    if heavy:
        warnings.warn(
            f"convert(..., {rule!r}) left these layers as backprop (their input error is "
            f"backprop's, not the rule's): {'; '.join(heavy)}. fbalign.flax.summary(model) "
            "lists what was converted.", UserWarning, stacklevel=3)


def _convert_dfa(model, rule, rngs, num_outputs, sample_input, feedback_init):
    found, left = _targets_of(model)
    layers = []
    for path, m in found:
        m.__class__ = _tap_class(_base_class(type(m)))
        m.dfa_index = len(layers)
        layers.append((path, m))
    args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
    graphdef, state = nnx.split(model)
    slot = _Slot("record")

    def trace(state, *args):
        slot.input_ids = {id(a) for a in args}
        stack = _slots()
        stack.append(slot)
        try:
            return nnx.merge(graphdef, state)(*args)
        finally:
            stack.pop()

    out = jax.eval_shape(trace, state, *args)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 1:
        raise ValueError(
            f"convert(..., {rule!r}) needs a model that returns one array (..., num_outputs) "
            f"on sample_input, got {jax.tree.map(lambda a: a.shape, out)}")
    if num_outputs is None:
        num_outputs = out.shape[-1]
    elif out.shape[-1] != num_outputs:
        raise ValueError(f"num_outputs={num_outputs} but the model's output on sample_input "
                         f"has shape {out.shape} (last axis {out.shape[-1]})")
    nb = out.ndim - 1
    if rule in ("asrbp", "bdfa") and nb != 1:
        raise ValueError(f"rule {rule!r} updates B from (batch, units) activity: it needs a "
                         f"model whose output is (batch, num_outputs), got {out.shape}")
    first = next(iter(slot.records), None)  # the first layer called (dicts keep order)
    for index, (path, m) in enumerate(layers):
        record = slot.records.get(index)
        fb = None
        if record is not None and index != first and not record[1]:
            shape = record[0]
            if shape[:nb] != out.shape[:nb]:
                raise ValueError(
                    f"convert(..., {rule!r}): layer {_path(path)} gets inputs of shape {shape} "
                    f"but the output is {out.shape}: a tap needs the output's {nb} leading "
                    "batch axes")
            fshape = shape[nb:]
            init = feedback_init or jax.nn.initializers.normal(
                glorot_dfa_std(num_outputs, fshape))
            fb = Feedback(init(rngs.params(), (num_outputs, *fshape), m.kernel[...].dtype))
        _set(m, "dfa_feedback", fb)
    return DirectFeedbackModel(model, rule, num_outputs, nb), left


def convert(
    model: nnx.Module,
    rule: str,
    rngs: nnx.Rngs,
    *,
    num_outputs: int | None = None,
    sample_input: Any = None,
    feedback_init: Initializer | None = None,
    sign_scale: float | None = None,
    magnitude_distribution: str = "uniform",
    rng_collection: str = FEEDBACK_STREAM,
    copy: bool = True,
    warn: bool = True,
) -> nnx.Module:
    """Converts every linear layer of ``model`` to ``rule`` in one call; the forward is unchanged.

    Layers converted: ``nnx.Linear``, ``nnx.Conv``, ``nnx.ConvTranspose`` (its transposed
    convolution through the feedback; not with ``padding="CIRCULAR"``), ``nnx.LinearGeneral``
    (so every ``nnx.MultiHeadAttention`` projection), ``nnx.Einsum``, their subclasses
    (``nnx.LoRALinear``:
    its base kernel; the low-rank branch stays backprop) and this module's `Linear`/`Conv`
    (switched to the new rule). A plain ``nnx.Linear``/``nnx.Conv`` becomes a `Linear`/`Conv`;
    any other layer keeps its class's forward, with its op (``dot_general``,
    ``conv_general_dilated``, ``einsum_op``) replaced by the rule's feedback op (the einsum one
    is `fbalign.ops.fa_einsum`'s). ``dtype``, ``param_dtype`` and ``precision`` are kept, and
    the feedback is cast to the compute dtype. Anything else holding a weight matrix or kernel
    (a circular-padded ``nnx.ConvTranspose``, LoRA branches, unknown layers) is left as
    backprop with a warning
    naming each path; `summary` lists what was converted and what was left alone.

    Rules of `RULES` (``"fa"``, ``"kp"``, ``"sign"``/``"usf"``, ``"frsf"``, ``"brsf"``, ``"bp"``)
    send each layer's error back through ``B`` instead of ``W`` (see `Linear`). The
    direct-feedback rules of ``DFA_RULES`` (``"dfa"``, ``"srbp"``, ``"asrbp"``, ``"drtp"``,
    ``"bdfa"``) trace the model once on ``sample_input`` (``jax.eval_shape``: nothing is
    computed) to find each layer's input shape, give every converted layer but the first a tap
    with a `Feedback` ``B_l`` of shape ``(num_outputs, *input feature shape)`` (Glorot normal
    std ``sqrt(2 / (num_outputs + n_l))`` unless ``feedback_init``), and return a
    `DirectFeedbackModel` whose output passes through the rule's output primitive (see there for
    the equations). Its gradient equals ``fbalign.mlp``'s ``apply(..., mode)`` on the same
    weights and feedback.

    Args:
      model: an NNX module (or a single layer).
      rule: one of `RULES` or ``DFA_RULES``.
      rngs: draws the feedback; for ``"brsf"`` each layer forks its own magnitude stream from
        ``rngs``' ``rng_collection`` stream (``"feedback"``, or ``default``).
      num_outputs: direct-feedback rules: the output width (checked against the traced output;
        None takes it from there).
      sample_input: direct-feedback rules: an input (array or ``jax.ShapeDtypeStruct``), or a
        tuple of positional inputs, shaped like a training batch (the batch size may differ).
      feedback_init: initialiser of ``B`` (None: `matched_feedback`, entries of the converted
        kernel's own RMS, for `RULES` (see `Linear`), the Glorot
        std above for direct feedback).
      sign_scale, magnitude_distribution, rng_collection: as `Linear`.
      copy: convert a clone (default) and leave ``model`` untouched; ``False`` converts in place.
      warn: warn about layers with weights left as backprop (default True).

    Returns:
      The converted model (a `DirectFeedbackModel` for the direct-feedback rules).
    """
    _check_convert_rule(rule)
    _check_distribution(magnitude_distribution)
    if copy:
        model = nnx.clone(model)
    if rule in DFA_RULES:
        if sample_input is None:
            raise ValueError(
                f"convert(model, {rule!r}) traces the model to find each tap's shape: pass "
                "sample_input= (an input batch or a jax.ShapeDtypeStruct)")
        out, left = _convert_dfa(model, rule, rngs, num_outputs, sample_input, feedback_init)
        if warn:
            _warn_left_alone(left, rule)
            _warn_learning_feedback(rule)
        return out
    args = (rule, rngs, feedback_init, sign_scale, magnitude_distribution, rng_collection)
    found, left = _targets_of(model)
    for path, layer in found:
        if _plain(layer):
            new = _convert_layer(layer, *args)
            if not path:
                return new
            parent = model
            for key in path[:-1]:
                parent = _get_child(parent, key)
            _set_child(parent, path[-1], new)
        else:
            _swap_op(layer, *args)
    if warn:
        _warn_left_alone(left, rule)
        _warn_learning_feedback(rule)
    return model


def _warn_learning_feedback(rule: str) -> None:
    if rule in LEARNING_FEEDBACK:
        warnings.warn(
            f"convert(..., {rule!r}): this rule's feedback learns, but an nnx.Optimizer(..., "
            "wrt=nnx.Param) alone never updates a Feedback variable, so the model would train "
            "with fixed feedback; train it with fbalign.flax.train_step(model, optimizer, "
            "loss_fn, ..., feedback_lr=...) (or feedback_grads + update_feedback)",
            UserWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class BackpropComparison:
    """What `compare_to_backprop` measured: ``rows`` are ``(parameter path, norm ratio, angle in
    degrees)``; ``str()`` prints them as a table."""

    rows: tuple[tuple[str, float, float], ...]

    def ratios(self) -> dict[str, float]:
        """``{path: |rule update| / |backprop gradient|}``."""
        return {path: r for path, r, _ in self.rows}

    def __str__(self) -> str:
        width = max((len(p) for p, _, _ in self.rows), default=4)
        lines = [f"{'layer'.ljust(width)}  |update|/|bp grad|  angle (deg)"]
        lines += [f"{p.ljust(width)}  {r:17.3g}  {a:11.1f}" for p, r, a in self.rows]
        return "\n".join(lines)


def _as_backprop(model: nnx.Module) -> None:
    """In place: every converted layer (and a `DirectFeedbackModel`) runs backprop."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, DirectFeedbackModel) or _converted_kind(m) is not None:
            m.rule = "bp"


def compare_to_backprop(model: nnx.Module, loss_fn: Callable[..., Array], *args: Any,
                        **kwargs: Any) -> BackpropComparison:
    r"""How far a converted model's updates are from backprop's, kernel by kernel, on one batch.

    For every kernel (``nnx.Param`` named ``kernel``) of ``model``: ``|Delta W| / |dL/dW|``
    (Frobenius norms) and the angle between them, where ``Delta W`` is what ``nnx.grad(loss_fn)
    (model, *args, **kwargs)`` returns under the model's rules and ``dL/dW`` is backprop's on the
    same weights (a clone with every converted layer set to ``"bp"``). Since ``Delta W = x^T
    delta`` with backprop's own input ``x``, the ratio measures the hidden error ``delta`` a
    rule sends down against backprop's: ratios far above 1 (errors growing layer by layer) are
    what makes a learning rate that suits backprop diverge under the rule; the last layer's
    ratio is 1 for the FA family (it sees the true output error). Compiles and runs
    ``loss_fn``'s gradient twice: a diagnostic for the start of a run, not a training step.

    Example::

        report = fbalign.flax.compare_to_backprop(model, loss_fn, x, y)
        print(report)            # one row per kernel
        report.ratios()          # {"linear1/kernel": 0.97, ...}
    """
    def kernels(m: nnx.Module) -> dict[str, Array]:
        grads = nnx.jit(nnx.grad(loss_fn))(m, *args, **kwargs)
        return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(grads)
                if path[-1] == "kernel"}

    rule = kernels(model)
    reference = nnx.clone(model)
    _as_backprop(reference)
    bp = kernels(reference)
    if set(rule) != set(bp) or not rule:
        raise ValueError("compare_to_backprop: model has no kernel parameters to compare "
                         "(nnx.Param variables named 'kernel')")
    rows = []
    for path, g in bp.items():
        u, g = jnp.ravel(rule[path]), jnp.ravel(g)
        norm_u, norm_g = jnp.linalg.norm(u), jnp.linalg.norm(g)
        cos = jnp.dot(u, g) / (norm_u * norm_g)
        rows.append((path, float(norm_u / norm_g),
                     float(jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0))))))
    return BackpropComparison(tuple(rows))


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What `convert` did: ``converted`` and ``left_alone`` are ``(path, layer type, what)``
    rows; ``str()`` prints them as a table."""

    converted: tuple[tuple[str, str, str], ...]
    left_alone: tuple[tuple[str, str, str], ...]

    def __str__(self) -> str:
        rows = [("converted", *r) for r in self.converted]
        rows += [("left as backprop", *r) for r in self.left_alone]
        widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True))
                         + "  " + r[3] for r in rows)


def summary(model: nnx.Module) -> ConversionSummary:
    """The layers of ``model`` that follow a feedback rule and those left as backprop (every
    module holding parameters that `convert` did not convert, and why)."""
    rule = model.rule if isinstance(model, DirectFeedbackModel) else None
    inner = model.model if rule is not None else model
    found, left = _targets_of(inner)
    converted = []
    for path, m in found:
        name = _base_class(type(m)).__name__
        if rule is not None:
            fb = getattr(m, "dfa_feedback", None)
            what = (f"{rule} tap, B {tuple(fb.shape)}" if isinstance(fb, Feedback)
                    else f"{rule}: no tap (first layer: its input is the data)")
        else:
            what = getattr(m, "rule", "bp")
            if isinstance(m, (Linear, Conv)) or _is_feedback_op_layer(m):
                what = f"rule {what}"
            else:
                what = "not converted (bp)"
        converted.append((_path(path), name, what))
    return ConversionSummary(tuple(converted),
                             tuple((_path(p), type(m).__name__, r) for p, m, r, _ in left))


# ---------------------------------------------------------------------------------------------
# Linen.


def _linen_feedback(module: nn.Module, rule: str, kernel: Array, init) -> Array | None:
    if rule not in _STORES_FEEDBACK:
        return None
    var = module.variable(
        "feedback", "kernel", lambda: kernel_feedback(init, module.make_rng("params"), kernel)
    )
    return var.value


def _linen_backward(module: nn.Module, rule: str, kernel: Array, fb: Array | None,
                    sign_scale: float | None, distribution: str, stream: str) -> Backward:
    """The rule's `Backward` object for a Linen layer; brSF draws this call's magnitudes from
    ``make_rng(stream)``.

    Call it after every parameter is made: at ``init`` without ``stream`` Linen's ``make_rng``
    falls back to ``"params"``, which must not shift the parameters' keys.
    """
    if rule == "brsf":
        if not (module.has_rng(stream) or module.has_rng("params")):
            where = type(module).__name__ + ("" if module.name is None else f" {module.name}")
            raise InvalidRngError(
                f"{where} with rule='brsf' draws new feedback magnitudes at every call from the "
                f"{stream!r} rng stream: pass apply(..., rngs={{{stream!r}: key}})"
            )
        fb = _brsf_magnitudes(module.make_rng(stream), kernel.shape, sign_scale, kernel.dtype,
                              _check_distribution(distribution))
        # A no-op unless "intermediates" is mutable: apply(..., mutable=["intermediates"]) shows
        # the magnitudes this call drew.
        module.sow("intermediates", "feedback_magnitudes", fb)
    return _rule_backward(rule, kernel.shape, fb, sign_scale)


def _linen_variables(module: nn.Module, rule: str, shape: tuple[int, ...]):
    """``(kernel, backward, bias)`` of a Linen layer: the ``"params"`` kernel and bias, and the
    rule's `Backward` object (its feedback from the ``"feedback"`` collection, or drawn for
    brSF)."""
    kernel = module.param("kernel", module.kernel_init, shape, module.param_dtype)
    fb = _linen_feedback(module, rule, kernel, module.feedback_init)
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if module.use_bias
        else None
    )
    backward = _linen_backward(module, rule, kernel, fb, module.sign_scale,
                               module.magnitude_distribution, module.rng_collection)
    return kernel, backward, bias


class LinenDense(nn.Module):
    """Linen dense layer whose backward follows ``rule`` (see `Linear`); ``B`` lives in the
    ``"feedback"`` collection (``variables["feedback"]``), never in ``"params"``.

    With ``rule="brsf"`` (sign symmetry with magnitudes redrawn every call, Liao, Leibo & Poggio
    2016) nothing is stored: each call draws magnitudes ``M = |R|`` from
    ``make_rng(rng_collection)`` (default ``"feedback"``), so ``apply`` needs
    ``rngs={"feedback": key}`` (``init`` falls back to the ``"params"`` key); ``R`` has std
    ``sign_scale`` (None: the Glorot std of the kernel) and law ``magnitude_distribution``, as
    `fbalign.rules.brsf` draws them (see `Linear`). The magnitudes a call drew are sown as
    ``("intermediates", "feedback_magnitudes")``: see them with
    ``apply(..., mutable=["intermediates"])``.
    """

    features: int
    rule: str = "fa"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = jax.nn.initializers.zeros
    feedback_init: Initializer | None = None
    sign_scale: float | None = None
    magnitude_distribution: str = "uniform"
    param_dtype: Any = jnp.float32
    rng_collection: str = FEEDBACK_STREAM

    @nn.compact
    def __call__(self, x: Array) -> Array:
        rule = _check_rule(self.rule)
        kernel, backward, bias = _linen_variables(self, rule, (x.shape[-1], self.features))
        return _dense(backward, x, kernel, bias)


class LinenConv(nn.Module):
    """Linen channels-last convolution whose backward follows ``rule`` (see `Conv`); ``B`` lives
    in the ``"feedback"`` collection. ``rule="brsf"`` draws from ``make_rng(rng_collection)`` at
    every call, as in `LinenDense`: ``apply`` needs ``rngs={"feedback": key}``."""

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    rule: str = "fa"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = jax.nn.initializers.zeros
    feedback_init: Initializer | None = None
    sign_scale: float | None = None
    magnitude_distribution: str = "uniform"
    param_dtype: Any = jnp.float32
    rng_collection: str = FEEDBACK_STREAM

    @nn.compact
    def __call__(self, x: Array) -> Array:
        rule = _check_rule(self.rule)
        ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        shape = (*ks, x.shape[-1] // self.feature_group_count, self.features)
        kernel, backward, bias = _linen_variables(self, rule, shape)
        return _conv(backward, x, kernel, bias, self.strides, self.padding, self.input_dilation,
                     self.kernel_dilation, self.feature_group_count)


class LinenDFATap(nn.Module):
    """Linen `DFATap`: ``h, carrier = LinenDFATap(num_outputs)(h, carrier)``; ``B`` of shape
    ``(num_outputs, *h.shape[1:])`` lives in the ``"feedback"`` collection."""

    num_outputs: int
    feedback_init: Initializer | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, carrier: Array) -> tuple[Array, Array]:
        feature_shape = h.shape[1:]
        init = self.feedback_init or jax.nn.initializers.normal(
            glorot_dfa_std(self.num_outputs, feature_shape)
        )
        shape = (self.num_outputs, *feature_shape)
        b = self.variable(
            "feedback", "dfa", lambda: init(self.make_rng("params"), shape, self.param_dtype)
        ).value
        return DirectFeedback(feedback={_TAP: b}).tap(_TAP, h, carrier)


dfa_carrier = P.dfa_carrier
dfa_hidden = P.dfa_hidden
dfa_output = P.dfa_output


def _linen_learners(found: list[tuple[tuple[str, ...], str]]):
    """A ``linen.intercept_methods`` interceptor that records ``(path, rule)`` of every
    `LinenDense`/`LinenConv` called whose feedback learns (`LEARNING_FEEDBACK`)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, (LinenDense, LinenConv)) and context.method_name == "__call__"
                and module.rule in LEARNING_FEEDBACK):
            found.append((tuple(module.path), module.rule))
        return next_fun(*args, **kwargs)

    return interceptor


def linen_train_step(
    loss_fn: Callable[..., Array],
    variables: dict[str, Any],
    opt_state: optax.OptState,
    tx: optax.GradientTransformation,
    *args: Any,
    feedback_lr: float | None = None,
    feedback_weight_decay: float = 0.0,
    **kwargs: Any,
) -> tuple[dict[str, Any], optax.OptState, Array]:
    r"""One training step of a Linen model with feedback layers (pure; jit it).

    ``loss_fn(variables, *args, **kwargs)`` returns the scalar loss (it calls
    ``model.apply(variables, ...)``). The ``"params"`` collection steps by ``tx`` with
    ``d loss / d params``; the ``"feedback"`` kernel of every `LinenDense`/`LinenConv` whose
    rule learns it (`LEARNING_FEEDBACK`: Kolen-Pollack's ``B`` receives ``W``'s cotangent,
    Akrout et al. 2019) steps from the same backward pass,

    .. math:: B \leftarrow (1 - \eta\lambda) B - \eta\, g_B,

    with ``\eta`` = ``feedback_lr`` and ``\lambda`` = ``feedback_weight_decay``; fixed feedback
    (fa, frsf, DFA taps) and every other collection are returned unchanged. The Linen
    counterpart of `train_step`: ``jax.grad`` over ``variables["params"]`` alone never moves a
    ``"feedback"`` variable, so a Kolen-Pollack model would silently train as FA. For KP's
    guarantee (``W - B`` shrinking by ``1 - \eta\lambda`` a step) ``tx`` must be plain SGD at
    ``feedback_lr`` with the same decay. The learning layers are found while ``loss_fn`` is
    traced (``linen.intercept_methods``), so nothing runs twice.

    Returns:
      ``(new_variables, new_opt_state, loss)``.

    Raises:
      ValueError: the model has learning feedback and ``feedback_lr`` is None (named layers),
        or ``variables`` has no ``"params"``.
    """
    if "params" not in variables:
        raise ValueError(f"linen_train_step: variables has no 'params' collection (got "
                         f"{', '.join(variables) or 'nothing'}); pass model.init(...)'s output")
    feedback = variables.get("feedback", {})

    def loss_of(params, fb):
        return loss_fn({**variables, "params": params, "feedback": fb}, *args, **kwargs)

    found: list[tuple[tuple[str, ...], str]] = []
    with nn.intercept_methods(_linen_learners(found)):
        loss, (g_params, g_feedback) = jax.value_and_grad(loss_of, argnums=(0, 1))(
            variables["params"], feedback)
    learners = dict(found)
    if learners and feedback_lr is None:
        names = ", ".join("/".join(p) or "<model>" for p in learners)
        raise ValueError(
            f"linen_train_step: layers {names} learn their feedback (rules "
            f"{', '.join(sorted(set(learners.values())))}); pass feedback_lr= (Kolen-Pollack: "
            "the optimizer's SGD rate) so that their 'feedback' kernels are updated")
    updates, opt_state = tx.update(g_params, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    flat = traverse_util.flatten_dict(unfreeze(feedback))
    grads = traverse_util.flatten_dict(unfreeze(g_feedback))
    keep = 1.0 - feedback_lr * feedback_weight_decay if learners else 1.0
    for path in learners:
        key = (*path, "kernel")
        flat[key] = keep * flat[key] - feedback_lr * grads[key]
    new_feedback = traverse_util.unflatten_dict(flat)
    out = {**variables, "params": params}
    if "feedback" in variables:
        out["feedback"] = new_feedback
    return out, opt_state, loss
