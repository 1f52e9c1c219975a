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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.errors import InvalidRngError

from fbalign._src import primitives as P
from fbalign._src.backward import Backward, DirectFeedback, LinearFeedback, SignFeedback
from fbalign._src.feedback_init import glorot_std
from fbalign._src.layers import conv_op, glorot_dfa_std, shared_dfa_feedback
from fbalign._src.models import matmul
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
# the default of `fbalign.rules.feedback_alignment`.
default_feedback_init = jax.nn.initializers.variance_scaling(1.0, "fan_out", "normal")


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


def _dense(backward: Backward, x: Array, kernel: Array, bias: Array | None) -> Array:
    """``x @ kernel + bias``, the matmul run by ``backward``."""
    y = backward.linear(_KERNEL, matmul, x, kernel)
    if bias is not None:
        y = y + bias
    return y


def _static(v):
    if isinstance(v, (str, int)) or v is None:
        return v
    return tuple(_static(i) for i in v)


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
            Feedback(feedback_init(rngs.params(), shape, param_dtype))
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

    def _backward(self, rngs: Any) -> Backward:
        """The rule's `Backward` object for one call (brSF draws its magnitudes here)."""
        if self.rule == "brsf":
            fb = self._magnitudes(rngs)
        else:
            fb = None if self.feedback is None else self.feedback[...]
        return _rule_backward(self.rule, self.kernel[...].shape, fb, self.sign_scale)

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
      feedback_init: initialiser of ``B`` (default std ``1/sqrt(out_features)``).
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
        feedback_init: Initializer = default_feedback_init,
        sign_scale: float | None = None,
        magnitude_distribution: str = "uniform",
        param_dtype: Any = jnp.float32,
        rng_collection: str = FEEDBACK_STREAM,
        rngs: nnx.Rngs,
    ):
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
        bias = None if self.bias is None else self.bias[...]
        return _dense(self._backward(rngs), x, self.kernel[...], bias)


class Conv(_FeedbackLayer):
    """A channels-last convolution (``nnx.Conv``'s arguments) whose backward follows ``rule``.

    ``kernel`` is ``(*kernel_size, in_features // feature_group_count, out_features)``; the error
    reaching the input is the transposed convolution with ``B`` (see `Linear` for ``rule``,
    ``sign_scale``, ``magnitude_distribution``, ``rng_collection`` and brSF's per-call ``rngs``;
    brSF's default std uses the fans ``kh*kw*cin``, ``kh*kw*cout``).
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
        feedback_init: Initializer = default_feedback_init,
        sign_scale: float | None = None,
        magnitude_distribution: str = "uniform",
        param_dtype: Any = jnp.float32,
        rng_collection: str = FEEDBACK_STREAM,
        rngs: nnx.Rngs,
    ):
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
        return _conv(
            self._backward(rngs),
            x,
            self.kernel[...],
            None if self.bias is None else self.bias[...],
            self.strides,
            self.padding,
            self.input_dilation,
            self.kernel_dilation,
            self.feature_group_count,
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


# ---------------------------------------------------------------------------------------------
# Converting an existing NNX model.


def _get_child(parent: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(parent, key):
        return getattr(parent, key)
    return parent[key]


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(parent, key) and not isinstance(parent, dict):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _convert_layer(
    layer: nnx.Module, rule: str, rngs: nnx.Rngs, feedback_init, sign_scale,
    magnitude_distribution, rng_collection
) -> nnx.Module:
    dtype = layer.kernel[...].dtype
    if isinstance(layer, nnx.Linear):
        new = Linear(
            layer.in_features,
            layer.out_features,
            rule=rule,
            use_bias=layer.use_bias,
            feedback_init=feedback_init,
            sign_scale=sign_scale,
            magnitude_distribution=magnitude_distribution,
            param_dtype=dtype,
            rng_collection=rng_collection,
            rngs=rngs,
        )
    else:
        if getattr(layer, "mask", None) is not None:
            raise NotImplementedError("convert: masked nnx.Conv layers are not supported")
        new = Conv(
            layer.in_features,
            layer.out_features,
            layer.kernel_size,
            layer.strides,
            padding=layer.padding,
            input_dilation=layer.input_dilation,
            kernel_dilation=layer.kernel_dilation,
            feature_group_count=layer.feature_group_count,
            rule=rule,
            use_bias=layer.use_bias,
            feedback_init=feedback_init,
            sign_scale=sign_scale,
            magnitude_distribution=magnitude_distribution,
            param_dtype=dtype,
            rng_collection=rng_collection,
            rngs=rngs,
        )
    new.kernel[...] = layer.kernel[...]
    if layer.use_bias:
        new.bias[...] = layer.bias[...]
    return new


def convert(
    model: nnx.Module,
    rule: str,
    rngs: nnx.Rngs,
    *,
    feedback_init: Initializer = default_feedback_init,
    sign_scale: float | None = None,
    magnitude_distribution: str = "uniform",
    rng_collection: str = FEEDBACK_STREAM,
    copy: bool = True,
) -> nnx.Module:
    """Converts every ``nnx.Linear``/``nnx.Conv`` of ``model`` to the ``rule`` version.

    Weights and biases are copied; feedback is drawn from ``rngs``. Other modules (norms,
    pooling, dropout, attention's internals that are not ``nnx.Linear``) are left as they are
    and pass the error as usual. The forward pass is unchanged.

    Args:
      model: an NNX module (or a single ``nnx.Linear``/``nnx.Conv``).
      rule: one of ``"bp"``, ``"fa"``, ``"kp"``, ``"sign"``/``"usf"``, ``"frsf"``, ``"brsf"``.
      rngs: draws the feedback; for ``"brsf"`` each layer forks its own magnitude stream from
        ``rngs``' ``rng_collection`` stream (``"feedback"``, or ``default``).
      feedback_init, sign_scale, magnitude_distribution, rng_collection: passed to the new
        layers.
      copy: convert a clone (default) and leave ``model`` untouched; ``False`` converts in place.

    Returns:
      The converted model.
    """
    _check_rule(rule)
    _check_distribution(magnitude_distribution)
    targets = (nnx.Linear, nnx.Conv)
    if type(model) in targets:
        return _convert_layer(model, rule, rngs, feedback_init, sign_scale,
                              magnitude_distribution, rng_collection)
    if copy:
        model = nnx.clone(model)
    found = [
        (path, m) for path, m in nnx.iter_modules(model) if type(m) in targets and len(path) > 0
    ]
    for path, layer in found:
        parent = model
        for key in path[:-1]:
            parent = _get_child(parent, key)
        new = _convert_layer(layer, rule, rngs, feedback_init, sign_scale,
                             magnitude_distribution, rng_collection)
        _set_child(parent, path[-1], new)
    return model


# ---------------------------------------------------------------------------------------------
# Linen.


def _linen_feedback(module: nn.Module, rule: str, shape, init, dtype) -> Array | None:
    if rule not in _STORES_FEEDBACK:
        return None
    var = module.variable(
        "feedback", "kernel", lambda: init(module.make_rng("params"), shape, dtype)
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
    fb = _linen_feedback(module, rule, shape, module.feedback_init, module.param_dtype)
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
    feedback_init: Initializer = default_feedback_init
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
    feedback_init: Initializer = default_feedback_init
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
dfa_output = P.dfa_output
