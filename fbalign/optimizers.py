"""Sign-based optimizers as optax transformations, usable with every rule: RProp (a correct one;
optax 0.2.8's emits the previous step's update), signSGD and Signum (optax's)."""

from fbalign._src.optimizers import RpropState, rprop, signsgd, signum

__all__ = ["RpropState", "rprop", "signsgd", "signum"]
