"""Primitives: ``jax.custom_vjp`` ops whose backward pass is a learning rule."""

from fbalign._src.primitives import (
    dfa_carrier,
    dfa_hidden,
    dfa_output,
    fa_matmul,
    feedback_op,
    kp_matmul,
    project_error,
    stop_error,
)

__all__ = [
    "dfa_carrier",
    "dfa_hidden",
    "dfa_output",
    "fa_matmul",
    "feedback_op",
    "kp_matmul",
    "project_error",
    "stop_error",
]

# Convolution, einsum and DFA-on-feature-map layers built on `feedback_op` (_src/layers.py).
from fbalign._src.layers import (  # noqa: E402
    conv_op,
    dfa_feedback_shape,
    fa_conv,
    fa_einsum,
    feedback_conv,
    feedback_einsum,
    glorot_dfa_std,
    kp_conv,
    kp_einsum,
    shared_dfa_feedback,
)

__all__ += [
    "conv_op",
    "dfa_feedback_shape",
    "fa_conv",
    "fa_einsum",
    "feedback_conv",
    "feedback_einsum",
    "glorot_dfa_std",
    "kp_conv",
    "kp_einsum",
    "shared_dfa_feedback",
]
