"""`jax.custom_vjp` primitives whose forward is the ordinary op and whose backward is the rule.

One generic mechanism, `feedback_op`, turns any op that is linear in its first argument (dense,
convolution, einsum, ...) into a feedback op: the weight cotangent is the ordinary one and the
input cotangent is the input-VJP of the *same op evaluated at the feedback tensor* ``b``.
`fa_matmul` is that mechanism applied to ``jnp.matmul``; later layer types reuse it unchanged.

Direct feedback alignment needs the output error inside hidden layers. `dfa_output` and
`dfa_hidden` carry it there through the cotangent of an error *carrier*: an all-zeros array of
the output's shape threaded through the forward pass. Plain ``jax.grad`` then returns DFA updates
in any model without global state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.base import Array
from fbalign._src.sharding import varying_axes

# op(x, w) linear in x: shapes depend on the op (dense, convolution, einsum...)
LinearOp = Callable[[Float[Array, " ..."], Float[Array, " ..."]], Float[Array, " ..."]]
# grad(e, h, b, targets) -> g_b: a DFA-style rule's feedback gradient (flattened arrays)
FeedbackGrad = Callable[
    [Float[Array, "batch n_out"], Float[Array, "batch n_h"], Float[Array, "n_out n_h"],
     Float[Array, "batch n_out"]],
    Float[Array, "n_out n_h"],
]
# f(x, w, b) = op(x, w): the feedback op `feedback_op` returns
FeedbackOp = Callable[
    [Float[Array, " ..."], Float[Array, " ..."], Float[Array, " ..."]], Float[Array, " ..."]
]


@functools.cache
def feedback_op(
    op: LinearOp, feedback_cotangent: Literal["zero", "weight"] = "zero"
) -> FeedbackOp:
    """Makes ``f(x, w, b) = op(x, w)`` whose backward sends the error through ``op(., b)``.

    Args:
      op: a function ``op(x, w)`` linear in ``x`` (e.g. ``jnp.matmul``, a convolution). Pass the
        same function object each time (``feedback_op`` is cached on it) to reuse the primitive.
      feedback_cotangent: what ``jax.grad`` returns for ``b``: ``"zero"`` (feedback is fixed, as
        in feedback alignment, Lillicrap et al. 2016) or ``"weight"`` (the weight's own cotangent,
        the Kolen-Pollack update of Akrout et al. 2019; needs ``b.shape == w.shape``).

    Returns:
      ``f(x, w, b)``: forward ``op(x, w)``; cotangents ``(VJP_x op(., b), VJP_w op(x, .), 0 or
      VJP_w)``.
    """
    if feedback_cotangent not in ("zero", "weight"):
        raise ValueError(
            f"feedback_cotangent must be 'zero' or 'weight', got {feedback_cotangent!r}"
        )

    @jax.custom_vjp
    def f(x: Float[Array, " ..."], w: Float[Array, " ..."],
          b: Float[Array, " ..."]) -> Float[Array, " ..."]:
        return op(x, w)

    def fwd(x, w, b):
        return op(x, w), (x, w, b)

    def bwd(res, g):
        x, w, b = res
        _, vjp_w = jax.vjp(lambda w_: op(x, w_), w)
        _, vjp_x = jax.vjp(lambda x_: op(x_, b), x)
        (gw,) = vjp_w(g)
        (gx,) = vjp_x(g)
        gb = gw if feedback_cotangent == "weight" else jnp.zeros_like(b)
        return gx, gw, gb

    f.defvjp(fwd, bwd)
    return f


def _matmul(x: Array, w: Array) -> Array:
    return jnp.matmul(x, w)


def fa_matmul(
    x: Float[Array, "*batch din"], w: Float[Array, "din dout"], b: Float[Array, "din dout"]
) -> Float[Array, "*batch dout"]:
    """``x @ w`` whose backward sends the error as ``g @ b.T`` (feedback alignment).

    Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback weights support error
    backpropagation for deep learning". ``b`` has the shape of ``w`` (``din x dout``); the
    weight gets its ordinary gradient ``x.T @ g`` and ``b`` gets zero.
    """
    _check_same_shape(w, b, "fa_matmul")
    return feedback_op(_matmul)(x, w, b)


def kp_matmul(
    x: Float[Array, "*batch din"], w: Float[Array, "din dout"], b: Float[Array, "din dout"]
) -> Float[Array, "*batch dout"]:
    """Like `fa_matmul`, but ``jax.grad`` also returns the weight's gradient for ``b``.

    Kolen & Pollack (1994); Akrout et al. (2019), "Deep learning without weight transport":
    W and B receive the same update, so with weight decay they converge.
    """
    _check_same_shape(w, b, "kp_matmul")
    return feedback_op(_matmul, "weight")(x, w, b)


def _check_same_shape(w: Array, b: Array, name: str) -> None:
    if w.shape != b.shape:
        raise ValueError(
            f"{name}: feedback b must have the shape of w (din x dout) = {tuple(w.shape)}, got "
            f"{tuple(b.shape)}" + (" (transposed?)" if b.shape == w.shape[::-1] else "")
        )
    if w.dtype != b.dtype:
        raise TypeError(
            f"{name}: feedback b has dtype {b.dtype} but w has dtype {w.dtype}; they must match "
            f"(cast b with b.astype(w.dtype))"
        )


def batched_like(carrier: Float[Array, "*b n_out"], like: Array) -> Float[Array, "*b n_out"]:
    """``carrier`` plus an exact zero computed from ``like``: the same values, but under
    ``jax.vmap`` the carrier is batched whenever ``like`` is. An all-zeros carrier made inside a
    vmapped function is an unbatched constant, and the cotangent of an unbatched input is summed
    over the mapped axis: under ``jax.grad(... jax.vmap(per_example) ...)`` every example would
    receive the batch's summed output error. `dfa_hidden` and `dfa_output` batch their carrier
    like the activations it travels with, so each example gets its own error."""
    zero = jnp.sum(jax.lax.stop_gradient(like).ravel()[:0]).astype(carrier.dtype)
    return carrier + zero


def _match_varying(carrier: Array, like: Array) -> Array:
    # Inside ``jax.shard_map`` the carrier's cotangent is the per-shard error, so the carrier must
    # be typed varying like the activations it travels with (an all-zeros constant is invariant).
    # Outside shard_map both sets are empty and this is the identity. Under ``jax.vmap`` the
    # same holds for batching (`batched_like`).
    carrier = batched_like(carrier, like)
    missing = varying_axes(like) - varying_axes(carrier)
    if not missing:
        return carrier
    return jax.lax.pcast(carrier, tuple(sorted(missing)), to="varying")


def dfa_output(
    y: Float[Array, "batch n_out"], carrier: Float[Array, "batch n_out"]
) -> Float[Array, "batch n_out"]:
    """Identity on ``y``; in the backward pass copies the error ``dL/dy`` into ``carrier``.

    Place it on the output pre-activation ``a_L`` with ``carrier = jnp.zeros_like(a_L)`` threaded
    through `dfa_hidden` taps (Nokland 2016, "Direct feedback alignment provides learning in deep
    neural networks").
    """
    return _dfa_output(y, _match_varying(carrier, y))


@jax.custom_vjp
def _dfa_output(y: Array, carrier: Array) -> Array:
    del carrier
    return y


def _dfa_output_fwd(y, carrier):
    del carrier
    return y, None


def _dfa_output_bwd(_, g):
    return g, g


_dfa_output.defvjp(_dfa_output_fwd, _dfa_output_bwd)


def dfa_hidden(
    h: Float[Array, " batch *map"],
    carrier: Float[Array, "batch n_out"],
    b: Float[Array, " n_out *map"] | Float[Array, "n_out n_h"],
    *,
    feedback_cotangent: Literal["zero", "activity"] | FeedbackGrad = "zero",
    targets: Float[Array, "batch n_out"] | None = None,
) -> tuple[Float[Array, " batch *map"], Float[Array, "batch n_out"]]:
    """Identity on ``(h, carrier)``; backward replaces the error reaching ``h`` by ``e @ b``.

    ``e`` is the output error that `dfa_output` put in the carrier's cotangent; ``b`` has shape
    ``(n_out, n_h)`` (Nokland 2016). The error arriving from the layer above is discarded.

    ``h`` may be a feature map, e.g. ``(batch, H, W, C)`` of a convolution: ``b`` is then either
    ``(n_out, H, W, C)`` or flat ``(n_out, H * W * C)`` (row-major over ``H, W, C``), and
    ``e @ b`` is reshaped to ``h``'s shape. A slice ``B[:, :n_h]`` of one wider shared matrix is
    a valid ``b`` (see `fbalign.ops.shared_dfa_feedback`).

    ``feedback_cotangent`` is what ``jax.grad`` returns for ``b``: ``"zero"`` (fixed feedback),
    ``"activity"`` (``e^T h``, the local product of the signals at the two ends of the skip
    connection: adaptive skipped RBP's channel update, Baldi et al. 2018), or a rule's own
    function ``grad(e, h, b, targets) -> g_b`` on the flattened ``(batch, n_out)`` error,
    ``(batch, n_h)`` activity, ``(n_out, n_h)`` feedback and ``targets`` (bidirectional DFA's
    `bdfa_feedback_grad` lives with its rule; needs ``targets``). A rule's ``advance`` turns
    that cotangent into its state update.
    """
    carrier = _match_varying(carrier, h)
    if feedback_cotangent == "zero":
        return _dfa_hidden(h, carrier, b)
    if feedback_cotangent == "activity":
        return _dfa_hidden_learning("activity", h, carrier, b, jnp.zeros((), h.dtype))
    if callable(feedback_cotangent):
        if targets is None:
            raise ValueError("dfa_hidden with a feedback-gradient function needs targets=")
        return _dfa_hidden_learning(feedback_cotangent, h, carrier, b, targets)
    raise ValueError(f"feedback_cotangent must be 'zero', 'activity' or a function "
                     f"grad(e, h, b, targets), got {feedback_cotangent!r}")


SMALL_CONTRACTION = 16


def project_error(
    e: Float[Array, "batch n_out"],
    b: Float[Array, " n_out *hidden"],
    *,
    impl: Literal["auto", "dot", "sum"] = "auto",
) -> Float[Array, " batch *hidden"]:
    """``e @ b`` contracting ``e``'s last axis with ``b``'s first (``jnp.tensordot(e, b, 1)``).

    This is the direct feedback projection of DFA-style rules (Nokland 2016): ``e`` is the
    output error ``(batch, n_out)`` and ``b`` is ``(n_out, *hidden)``. The contraction is only
    ``n_out`` long, which GEMM libraries handle poorly: on XLA's CPU backend a
    ``(128, 10) @ (10, 1000)`` product ran at under 10 GFLOP/s. ``impl="sum"`` writes it as
    ``sum_k e[:, k] * b[k]``, which XLA fuses into one elementwise loop (with whatever consumes
    the result); ``"dot"`` is the plain contraction; ``"auto"`` (default) picks ``"sum"`` on the
    CPU backend when the contracted axis has at most ``SMALL_CONTRACTION`` entries, else
    ``"dot"``. Both give the same values up to float rounding.
    """
    if impl not in ("auto", "dot", "sum"):
        raise ValueError(f"project_error: impl must be 'auto', 'dot' or 'sum', got {impl!r}")
    if e.shape[-1] != b.shape[0]:
        raise ValueError(
            f"project_error: e has {e.shape[-1]} entries on its last axis but b has {b.shape[0]} "
            f"on its first (e {tuple(e.shape)}, b {tuple(b.shape)}); b must be (n_out, ...)"
        )
    if impl == "auto":
        small = b.shape[0] <= SMALL_CONTRACTION
        impl = "sum" if small and jax.default_backend() == "cpu" else "dot"
    if impl == "dot":
        return jnp.tensordot(e, b, axes=1)
    flat = b.reshape(b.shape[0], -1)  # (n_out, units): one 2-D loop whatever b's rank
    out = e[..., 0, None] * flat[0]
    for k in range(1, b.shape[0]):
        out = out + e[..., k, None] * flat[k]
    return out.reshape(e.shape[:-1] + b.shape[1:])


def _tap_error(ge: Array, b: Array, gh: Array) -> Array:
    # ``e @ b`` contracting e's last axis with b's first: the plain matmul for a 2-D ``b``; for a
    # feature map, ``b`` is (n_out, *map) or flat (n_out, prod(map)) and we reshape to h's shape.
    gx = project_error(ge, b)
    if gx.shape != gh.shape:
        if gx.size != gh.size:
            raise ValueError(
                f"dfa_hidden: e @ b has shape {tuple(gx.shape)} but h has shape "
                f"{tuple(gh.shape)}; b must be (n_out, *h.shape[1:]) or (n_out, prod(h.shape[1:]))"
            )
        gx = gx.reshape(gh.shape)
    return gx.astype(gh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dfa_hidden_learning(kind: str | FeedbackGrad, h: Array, carrier: Array, b: Array,
                         targets: Array):
    del kind, b, targets
    return h, carrier


def _dfa_hidden_learning_fwd(kind, h, carrier, b, targets):
    del kind
    return (h, carrier), (h, b, targets)


def _dfa_hidden_learning_bwd(kind, res, g):
    h, b, t = res
    gh, ge = g
    flat_e = ge.reshape(-1, ge.shape[-1])  # (batch, n_out); one example under vmap: (1, n_out)
    flat_h = h.reshape(flat_e.shape[0], -1)
    if kind == "activity":
        gb = flat_e.T @ flat_h
    else:  # the rule's own feedback gradient
        gb = kind(flat_e, flat_h, b.reshape(b.shape[0], -1), t)
    return (_tap_error(ge, b, gh), ge, gb.reshape(b.shape).astype(b.dtype),
            jnp.zeros_like(t))


_dfa_hidden_learning.defvjp(_dfa_hidden_learning_fwd, _dfa_hidden_learning_bwd)


@jax.custom_vjp
def _dfa_hidden(h: Array, carrier: Array, b: Array) -> tuple[Array, Array]:
    del b
    return h, carrier


def _dfa_hidden_fwd(h, carrier, b):
    return (h, carrier), b


def _dfa_hidden_bwd(b, g):
    gh, ge = g
    return _tap_error(ge, b, gh), ge, jnp.zeros_like(b)


_dfa_hidden.defvjp(_dfa_hidden_fwd, _dfa_hidden_bwd)


def dfa_carrier(y_shape: tuple[int, ...], dtype=jnp.float32) -> Float[Array, "batch n_out"]:
    """The all-zeros error carrier for `dfa_hidden`/`dfa_output` (shape of the output)."""
    return jnp.zeros(y_shape, dtype)


def stop_error(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Blocks the error: nothing below this point learns from the loss (``lax.stop_gradient``)."""
    return jax.lax.stop_gradient(x)
