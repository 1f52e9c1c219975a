"""Losses (mean over the batch)."""

from fbalign._src.losses import LOSSES, binary_hinge, cross_entropy, get_loss, squared_error

__all__ = ["LOSSES", "binary_hinge", "cross_entropy", "get_loss", "squared_error"]
