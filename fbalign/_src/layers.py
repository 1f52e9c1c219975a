"""Feedback versions of convolution and einsum layers, and DFA helpers for feature maps.

Every function here reuses the one generic mechanism `fbalign._src.primitives.feedback_op`: the
forward is the ordinary op and the input cotangent is the input-VJP of the *same op evaluated at
the feedback tensor* ``b``. No layer type gets its own ``custom_vjp``.

``feedback_op`` is cached on the op object, so the ops below are built by cached factories keyed
by their static arguments (strides, padding, einsum spec, ...): calling ``fa_conv`` twice with
the same configuration reuses the same primitive.

Sign symmetry needs nothing new: pass ``b = sign(w) * magnitude``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Float

from fbalign._src.base import Array
from fbalign._src.primitives import LinearOp, feedback_op

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
FeedbackCotangent = Literal["zero", "weight"]
ConvImpl = Literal["xla", "im2col", "auto"]
CONV_IMPLS = ("xla", "im2col", "auto")

# Channels-last convolution shapes (NHWC inputs, HWIO kernels; ``cin_g = cin // groups``).
ConvInput = Float[Array, "batch *spatial cin"]
ConvKernel = Float[Array, "*window cin_g cout"]
ConvOutput = Float[Array, "batch *out_spatial cout"]
ConvOp = Callable[[ConvInput, ConvKernel], ConvOutput]

_DIMENSION_NUMBERS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _tuple(v: int | Sequence[int] | None, n: int, name: str) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} needs {n} entries (one per spatial dim), got {v}")
    return v


def _padding(padding: Padding, n: int) -> str | tuple[tuple[int, int], ...]:
    """Normalises padding to something hashable that ``lax.conv_general_dilated`` accepts."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"padding {padding!r} is not supported; use 'SAME', 'VALID', 'SAME_LOWER', an "
                "int, or a sequence of (low, high) pairs (pad the input yourself for circular)"
            )
        return p
    if isinstance(padding, int):
        return ((padding, padding),) * n
    padding = tuple(padding)
    if all(isinstance(p, int) for p in padding):
        if len(padding) != n:
            raise ValueError(f"padding needs {n} entries, got {padding}")
        return tuple((int(p), int(p)) for p in padding)
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != n:
        raise ValueError(f"padding needs {n} (low, high) pairs, got {padding}")
    return pairs


@functools.cache
def _conv_op(
    window_strides: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
    feature_group_count: int,
    precision: Any,
):
    """One ``op(x, w)`` per static configuration, so `feedback_op`'s cache hits."""
    dn = _DIMENSION_NUMBERS[len(window_strides)]

    def conv(x: Array, w: Array) -> Array:
        return lax.conv_general_dilated(
            x,
            w,
            window_strides=window_strides,
            padding=padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dn,
            feature_group_count=feature_group_count,
            precision=precision,
        )

    return conv


@functools.cache
def _im2col_conv_op(
    window_strides: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    rhs_dilation: tuple[int, ...],
    precision: Any,
):
    """The same convolution as `_conv_op` (no groups, no input dilation) written as shifted
    slices of the input gathered into patches (im2col) and one matmul with the kernel seen as a
    ``(prod(window) * cin, cout)`` matrix. Its VJPs are a matmul and pads/adds of the
    slices, which XLA's CPU backend runs (and batches under ``vmap``) far faster than small
    convolutions: see ``benchmarks/results/biotorch.md``."""

    def conv(x: Array, w: Array) -> Array:
        window, nsp = w.shape[:-2], w.ndim - 2
        spatial = x.shape[1:-1]
        span = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation, strict=True)]
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(spatial, span, window_strides, padding)
        else:
            pads = padding
        if any(lo or hi for lo, hi in pads):
            zero = jnp.zeros((), x.dtype)
            x = lax.pad(x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
        out = [
            (x.shape[1 + d] - span[d]) // window_strides[d] + 1 for d in range(nsp)
        ]
        def window_slice(a, d, o):  # offset o of the window along spatial axis d
            start = o * rhs_dilation[d]
            return lax.slice_in_dim(a, start, start + (out[d] - 1) * window_strides[d] + 1,
                                    window_strides[d], axis=1 + d)

        if x.shape[-1] == 1:
            # One input channel (LeNet's conv1): prod(window) one-channel slices concatenated
            # would be written element by element. Stack whole rows instead, one spatial axis
            # at a time (last first), each window axis inserted after the spatial ones: (n,
            # *out, *window, 1), the kernel's order. 1.8x faster alone; wider inputs keep the
            # concatenation, whose input-gradient (pads and one sum) is cheaper.
            patches = x
            for d in reversed(range(nsp)):
                patches = jnp.stack([window_slice(patches, d, o) for o in range(window[d])],
                                    axis=1 + nsp)
            patches = patches.reshape(*patches.shape[:1 + nsp], -1)
        else:
            cols = []
            for offsets in itertools.product(*(range(k) for k in window)):
                start = [o * r for o, r in zip(offsets, rhs_dilation, strict=True)]
                limit = [s0 + (n - 1) * st + 1
                         for s0, n, st in zip(start, out, window_strides, strict=True)]
                cols.append(lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                                      (1, *window_strides, 1)))
            patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
        return jnp.matmul(patches, w.reshape(-1, w.shape[-1]), precision=precision)

    return conv


def resolve_conv_impl(
    impl: ConvImpl, *, lhs_dilation: tuple[int, ...] | None = None, feature_group_count: int = 1
) -> str:
    """``"xla"`` or ``"im2col"``: ``"auto"`` picks im2col on the CPU backend when the
    convolution has no groups and no input dilation (the case im2col covers), else XLA's."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    plain = feature_group_count == 1 and all(d == 1 for d in (lhs_dilation or ()))
    if impl == "im2col" and not plain:
        raise ValueError(
            "impl='im2col' covers convolutions without groups or lhs_dilation; use impl='xla' "
            f"(got feature_group_count={feature_group_count}, lhs_dilation={lhs_dilation})"
        )
    if impl == "auto":
        return "im2col" if plain and jax.default_backend() == "cpu" else "xla"
    return impl


def conv_op(
    ndim: int = 2,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    lhs_dilation: int | Sequence[int] | None = None,
    rhs_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    precision: Any = None,
    impl: ConvImpl = "xla",
) -> ConvOp:
    """The plain convolution ``op(x, w)`` (channels-last: NHWC inputs, HWIO kernels) that
    `feedback_conv` wraps; cached per configuration. Useful as a reference and for `feedback_op`.

    ``impl``: ``"xla"`` (``lax.conv_general_dilated``), ``"im2col"`` (slices and one matmul:
    the same values to float rounding, much faster for small kernels and channel counts on
    XLA's CPU backend, and under ``vmap``; no groups or ``lhs_dilation``) or ``"auto"`` (im2col
    on CPU where it applies, else XLA's; decided when the op is built).
    """
    if ndim not in _DIMENSION_NUMBERS:
        raise ValueError(f"convolutions with {ndim} spatial dims are not supported (1, 2 or 3)")
    args = (
        _tuple(strides, ndim, "strides"),
        _padding(padding, ndim),
        _tuple(lhs_dilation, ndim, "lhs_dilation"),
        _tuple(rhs_dilation, ndim, "rhs_dilation"),
        int(feature_group_count),
        precision,
    )
    kind = resolve_conv_impl(impl, lhs_dilation=args[2], feature_group_count=args[4])
    if kind == "im2col":
        return _im2col_conv_op(args[0], args[1], args[3], precision)
    return _conv_op(*args)


def _check_feedback(w: Array, b: Array, name: str) -> None:
    if w.shape != b.shape:
        raise ValueError(
            f"{name}: feedback b must have the shape of the kernel w {tuple(w.shape)}, got "
            f"{tuple(b.shape)}"
        )


def feedback_conv(
    x: ConvInput,
    w: ConvKernel,
    b: ConvKernel,
    bias: Float[Array, " cout"] | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    lhs_dilation: int | Sequence[int] | None = None,
    rhs_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    precision: Any = None,
    feedback_cotangent: FeedbackCotangent = "zero",
    impl: ConvImpl = "xla",
) -> ConvOutput:
    """A convolution whose backward sends the error through the kernel ``b`` instead of ``w``.

    Channels-last layout: ``x`` is ``(batch, *spatial, cin)``, ``w`` and ``b`` are
    ``(*window, cin // groups, cout)`` (NHWC/HWIO for 2-D). ``bias`` (``(cout,)``) is added
    outside the feedback op, so its gradient is the ordinary sum of the error.

    Args:
      x, w, b: input, kernel and feedback kernel (``b.shape == w.shape``).
      bias: optional ``(cout,)`` bias.
      strides, padding, lhs_dilation, rhs_dilation, feature_group_count, precision: as in
        ``lax.conv_general_dilated`` (``padding`` also takes an int or per-dim ints).
      feedback_cotangent: ``"zero"`` (FA: ``b`` is fixed) or ``"weight"`` (KP: ``b``'s gradient is
        ``w``'s).
      impl: how the convolution is computed (`conv_op`): ``"xla"``, ``"im2col"`` or ``"auto"``.
    """
    _check_feedback(w, b, "feedback_conv")
    if x.ndim != w.ndim:
        raise ValueError(
            f"feedback_conv: x {tuple(x.shape)} must be (batch, *spatial, cin) with as many "
            f"spatial dims as the kernel {tuple(w.shape)} has window dims"
        )
    op = conv_op(
        w.ndim - 2,
        strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        feature_group_count=feature_group_count,
        precision=precision,
        impl=impl,
    )
    y = feedback_op(op, feedback_cotangent)(x, w, b)
    if bias is not None:
        y = y + bias
    return y


def fa_conv(
    x: ConvInput, w: ConvKernel, b: ConvKernel, bias: Float[Array, " cout"] | None = None,
    **conv_kwargs: Any,
) -> ConvOutput:
    """Feedback-alignment convolution: `feedback_conv` with a fixed feedback kernel ``b``.

    The error reaching ``x`` is the transposed convolution of the output error with ``b``
    (``b = w`` is backprop); ``w`` gets its ordinary gradient and ``b`` gets zero.
    """
    return feedback_conv(x, w, b, bias, feedback_cotangent="zero", **conv_kwargs)


def kp_conv(
    x: ConvInput, w: ConvKernel, b: ConvKernel, bias: Float[Array, " cout"] | None = None,
    **conv_kwargs: Any,
) -> ConvOutput:
    """Kolen-Pollack convolution: like `fa_conv`, but ``jax.grad`` gives ``b`` the weight's
    gradient (Akrout et al. 2019)."""
    return feedback_conv(x, w, b, bias, feedback_cotangent="weight", **conv_kwargs)


@functools.cache
def einsum_op(spec: str, precision: Any) -> LinearOp:
    def op(x: Array, w: Array) -> Array:
        return jnp.einsum(spec, x, w, precision=precision)

    return op


def feedback_einsum(
    spec: str,
    x: Float[Array, " ..."],
    w: Float[Array, " ..."],
    b: Float[Array, " ..."],
    bias: Float[Array, " ..."] | None = None,
    *,
    precision: Any = None,
    feedback_cotangent: FeedbackCotangent = "zero",
) -> Float[Array, " ..."]:
    """``jnp.einsum(spec, x, w)`` whose backward sends the error to ``x`` through ``b``.

    For attention and other projections, e.g. ``spec="btd,dhk->bthk"`` for the query projection
    of multi-head attention. ``bias`` is added to the result (broadcast on trailing axes).
    """
    _check_feedback(w, b, "feedback_einsum")
    y = feedback_op(einsum_op(spec, precision), feedback_cotangent)(x, w, b)
    if bias is not None:
        y = y + bias
    return y


def fa_einsum(
    spec: str,
    x: Float[Array, " ..."],
    w: Float[Array, " ..."],
    b: Float[Array, " ..."],
    bias: Float[Array, " ..."] | None = None,
    *,
    precision: Any = None,
) -> Float[Array, " ..."]:
    """Feedback-alignment einsum: the error reaching ``x`` is ``VJP_x einsum(spec, ., b)``."""
    return feedback_einsum(spec, x, w, b, bias, precision=precision, feedback_cotangent="zero")


def kp_einsum(
    spec: str,
    x: Float[Array, " ..."],
    w: Float[Array, " ..."],
    b: Float[Array, " ..."],
    bias: Float[Array, " ..."] | None = None,
    *,
    precision: Any = None,
) -> Float[Array, " ..."]:
    """Kolen-Pollack einsum: like `fa_einsum`, ``b``'s gradient is ``w``'s."""
    return feedback_einsum(spec, x, w, b, bias, precision=precision, feedback_cotangent="weight")


# ---------------------------------------------------------------------------------------------
# Direct feedback alignment on feature maps.


def dfa_feedback_shape(n_out: int, feature_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of ``B_l`` for a hidden layer whose per-example output is ``feature_shape``:
    ``(n_out, *feature_shape)``, e.g. ``(10, 28, 28, 6)`` for LeNet-5's first conv."""
    return (int(n_out), *(int(s) for s in feature_shape))


def shared_dfa_feedback(
    matrix: Float[Array, "n_out max_units"],
    feature_shape: Sequence[int],
    scale: float | Float[Array, ""] | None = None,
) -> Float[Array, "n_out n_l"]:
    """Layer ``l``'s DFA feedback as a slice of one shared matrix: the first ``n_l`` columns.

    The memory-lean option: keep a single ``(n_out, max_units)`` matrix instead of one per
    layer; a layer with per-example output ``feature_shape`` (``n_l = prod(feature_shape)``
    units, flattened row-major) uses ``scale * matrix[:, :n_l]``. Pass the result to
    `dfa_hidden`. ``scale`` (None: 1) lets layers of very different widths share a unit-variance
    matrix yet receive errors of their own size (`LeNet5` uses ``sqrt(2 / (n_out + n_l))``).
    """
    n = math.prod(int(s) for s in feature_shape)
    if matrix.ndim != 2:
        raise ValueError(f"the shared DFA matrix must be (n_out, max_units), got {matrix.shape}")
    if matrix.shape[1] < n:
        raise ValueError(
            f"the shared DFA matrix has {matrix.shape[1]} columns but a layer needs {n} "
            f"(feature shape {tuple(feature_shape)}); draw it with max_units >= {n}"
        )
    out = matrix[:, :n]
    return out if scale is None else out * jnp.asarray(scale, matrix.dtype)


def glorot_dfa_std(n_out: int, feature_shape: Sequence[int]) -> float:
    """``sqrt(2 / (n_out + n_l))``: the Glorot std of a ``(n_out, n_l)`` DFA feedback matrix."""
    return math.sqrt(2.0 / (int(n_out) + math.prod(int(s) for s in feature_shape)))
