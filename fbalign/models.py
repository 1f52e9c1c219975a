"""Models: fbalign's layered networks (MLP, LeNet-5, RNN, and any list of dense, conv, pooling,
flatten and residual layers: `sequential`), which record a `Tape` and run every
rule's backward, the layered Hopfield network of equilibrium propagation, and wrappers that
make any Flax NNX/Linen or Equinox model, or a pure
``apply(params, x)`` function, a network the harness trains."""

from fbalign._src.activations import ACTIVATIONS, get_activation
from fbalign._src.convnet import LeNet5, lenet5
from fbalign._src.hopfield import EnergyNetwork, HopfieldNetwork, hopfield
from fbalign._src.hopfield_conv import ConvHopfieldNetwork, conv_hopfield
from fbalign._src.models import BACKWARD_MODES, MLP, mlp
from fbalign._src.recurrent import RNN, rnn
from fbalign._src.sequential import (
    AvgPool,
    Conv,
    Dense,
    Flatten,
    MaxPool,
    Residual,
    Sequential,
    sequential,
)
from fbalign._src.wrap import (
    EquinoxNetwork,
    FunctionNetwork,
    LinenNetwork,
    NNXNetwork,
    as_network,
    from_equinox,
    from_function,
    from_linen,
    from_nnx,
    is_seeded,
)

__all__ = [
    "ACTIVATIONS",
    "AvgPool",
    "Conv",
    "Dense",
    "Flatten",
    "MaxPool",
    "Residual",
    "Sequential",
    "sequential",
    "BACKWARD_MODES",
    "MLP",
    "RNN",
    "EquinoxNetwork",
    "ConvHopfieldNetwork",
    "EnergyNetwork",
    "FunctionNetwork",
    "HopfieldNetwork",
    "LeNet5",
    "LinenNetwork",
    "NNXNetwork",
    "as_network",
    "conv_hopfield",
    "from_equinox",
    "from_function",
    "from_linen",
    "from_nnx",
    "get_activation",
    "hopfield",
    "is_seeded",
    "lenet5",
    "mlp",
    "rnn",
]
