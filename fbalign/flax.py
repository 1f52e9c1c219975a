"""Flax adapters: NNX and Linen layers whose backward is a feedback rule (imports flax).

``import fbalign`` never imports flax; ``import fbalign.flax`` does.

NNX: `Linear`, `Conv` (``rule`` in ``"bp"``, ``"fa"``, ``"kp"``, ``"sign"``/``"usf"``,
``"frsf"``, ``"brsf"``: magnitudes redrawn every call from the ``"feedback"`` rng stream), the
`Feedback` variable type, `DFATap` (with `dfa_carrier`, `dfa_hidden`, `dfa_output`),
`train_step` (one call that also updates learning feedback: Kolen-Pollack, asrbp, bdfa;
or `feedback_grads`/`update_feedback` by hand), and `convert` to switch an existing model's
linear layers (``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and their
subclasses) to a rule in one call, the direct-feedback rules of `DFA_RULES` included (a
`DirectFeedbackModel`); `summary` lists what a conversion changed and left alone;
`compare_to_backprop` measures each kernel's update against backprop's (norm ratio, angle).
Stored feedback defaults to the kernel's own scale (`kernel_feedback`; `fan_out_feedback_init` is
the core's variance-preserving alternative).
Linen: `LinenDense`, `LinenConv`, `LinenDFATap`, with feedback in the ``"feedback"`` collection,
and `linen_train_step` (the pure Linen counterpart of `train_step`: it also steps Kolen-Pollack's
``"feedback"`` kernels).
"""

from fbalign._src.flax_adapters import (
    DFA_RULES,
    LEARNING_FEEDBACK,
    RULES,
    BackpropComparison,
    Conv,
    ConversionSummary,
    DFATap,
    DirectFeedbackModel,
    Feedback,
    Linear,
    LinenConv,
    LinenDense,
    LinenDFATap,
    compare_to_backprop,
    convert,
    dfa_carrier,
    dfa_hidden,
    dfa_output,
    fan_out_feedback_init,
    feedback_grads,
    kernel_feedback,
    learning_feedback_layers,
    linen_train_step,
    shared_feedback,
    sign_feedback,
    summary,
    train_step,
    update_feedback,
)

__all__ = [
    "DFA_RULES",
    "LEARNING_FEEDBACK",
    "RULES",
    "BackpropComparison",
    "ConversionSummary",
    "Conv",
    "DFATap",
    "DirectFeedbackModel",
    "Feedback",
    "Linear",
    "LinenConv",
    "LinenDFATap",
    "LinenDense",
    "compare_to_backprop",
    "convert",
    "kernel_feedback",
    "fan_out_feedback_init",
    "dfa_carrier",
    "dfa_hidden",
    "dfa_output",
    "feedback_grads",
    "learning_feedback_layers",
    "linen_train_step",
    "shared_feedback",
    "sign_feedback",
    "summary",
    "train_step",
    "update_feedback",
]
