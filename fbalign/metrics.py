"""Alignment diagnostics: update/gradient and feedback/weight angles, norm ratios, criterion."""

from fbalign._src.metrics import (
    KINDS,
    angle,
    cosine,
    downstream_products,
    feedback_kind,
    feedback_matrices,
    feedback_metrics,
    layer_feedback,
    layer_vectors,
    lillicrap_criterion,
    make_alignment_probe,
    norm_ratio,
    rule_deltas,
    update_gradient_metrics,
)

__all__ = [
    "KINDS",
    "angle",
    "cosine",
    "downstream_products",
    "feedback_kind",
    "feedback_matrices",
    "feedback_metrics",
    "layer_feedback",
    "layer_vectors",
    "lillicrap_criterion",
    "make_alignment_probe",
    "norm_ratio",
    "rule_deltas",
    "update_gradient_metrics",
]
