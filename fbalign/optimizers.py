"""Sign-based optimizers as optax transformations, usable with every rule: RProp (a correct one;
optax 0.2.8's emits the previous step's update), signSGD and Signum (optax's); and
`lr_schedule`, learning-rate schedules with their times in epochs; `scale_by_layer`, per-layer
learning rates."""

from fbalign._src.optimizers import (
    LR_SCHEDULES,
    RpropState,
    lr_schedule,
    rprop,
    scale_by_layer,
    signsgd,
    signum,
)

__all__ = ["LR_SCHEDULES", "RpropState", "lr_schedule", "rprop", "scale_by_layer", "signsgd",
           "signum"]
