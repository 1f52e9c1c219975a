"""fbalign: learning rules beyond exact backpropagation, in pure JAX."""

from fbalign import data, losses, models, ops, rules, sweep, train
from fbalign._src.base import EmptyState, FeedbackShapeError, LearningRule, Tape, TapeRule
from fbalign._src.feedback_init import gaussian_feedback, orthogonal_feedback, uniform_feedback
from fbalign._src.losses import cross_entropy, squared_error
from fbalign._src.models import MLP, mlp
from fbalign._src.primitives import (
    dfa_carrier,
    dfa_hidden,
    dfa_output,
    fa_matmul,
    feedback_op,
    kp_matmul,
    stop_error,
)
from fbalign._src.registry import RULES, get_rule
from fbalign._src.rules.backprop import backprop
from fbalign._src.rules.feedback_alignment import (
    DirectFeedbackAlignmentState,
    FeedbackAlignmentState,
    direct_feedback_alignment,
    feedback_alignment,
)

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "MLP",
    "DirectFeedbackAlignmentState",
    "EmptyState",
    "FeedbackAlignmentState",
    "FeedbackShapeError",
    "LearningRule",
    "Tape",
    "TapeRule",
    "backprop",
    "cross_entropy",
    "data",
    "dfa_carrier",
    "dfa_hidden",
    "dfa_output",
    "direct_feedback_alignment",
    "fa_matmul",
    "feedback_alignment",
    "feedback_op",
    "gaussian_feedback",
    "get_rule",
    "kp_matmul",
    "losses",
    "mlp",
    "models",
    "ops",
    "orthogonal_feedback",
    "rules",
    "sweep",
    "squared_error",
    "stop_error",
    "train",
    "uniform_feedback",
]

# Layers (conv/einsum feedback ops), LeNet-5 and a vanilla RNN (issue 3, layers part).
from fbalign._src.convnet import LeNet5, SharedDirectFeedbackState, lenet5  # noqa: E402
from fbalign._src.layers import (  # noqa: E402
    fa_conv,
    fa_einsum,
    feedback_conv,
    feedback_einsum,
    kp_conv,
    kp_einsum,
    shared_dfa_feedback,
)
from fbalign._src.recurrent import RNN, rnn  # noqa: E402

__all__ += [
    "LeNet5",
    "RNN",
    "SharedDirectFeedbackState",
    "fa_conv",
    "fa_einsum",
    "feedback_conv",
    "feedback_einsum",
    "kp_conv",
    "kp_einsum",
    "lenet5",
    "rnn",
    "shared_dfa_feedback",
]

# Synthetic gradients / decoupled neural interfaces (issue 7).
from fbalign._src.recurrent_dni import (  # noqa: E402
    RecurrentDNIState,
    lstm_cell,
    recurrent_dni,
    rnn_cell,
)
from fbalign._src.rules.synthetic_gradients import (  # noqa: E402
    Synthesizer,
    SyntheticGradientState,
    cdni,
    dni,
    linear_synthesizer,
    mlp_synthesizer,
    synthetic_gradients,
)

__all__ += [
    "RecurrentDNIState",
    "SyntheticGradientState",
    "Synthesizer",
    "cdni",
    "dni",
    "linear_synthesizer",
    "lstm_cell",
    "mlp_synthesizer",
    "recurrent_dni",
    "rnn_cell",
    "synthetic_gradients",
]

# Feedback-alignment family (issue 3, rules part).
from fbalign._src.channel import quantize_error, straight_through, target_output  # noqa: E402
from fbalign._src.rules.bidirectional import (  # noqa: E402
    BidirectionalDirectFeedbackAlignmentState,
    BidirectionalFeedbackAlignmentState,
    bidirectional_direct_feedback_alignment,
    bidirectional_feedback_alignment,
)
from fbalign._src.rules.drtp import (  # noqa: E402
    DirectRandomTargetProjectionState,
    direct_random_target_projection,
)
from fbalign._src.rules.kolen_pollack import (  # noqa: E402
    KolenPollackState,
    WeightMirrorState,
    kolen_pollack,
    weight_mirror,
)
from fbalign._src.rules.modular_dfa import ModularDFAState, hybrid_dfa, modular_dfa  # noqa: E402
from fbalign._src.rules.pal import PALState, phaseless_alignment  # noqa: E402
from fbalign._src.rules.random_backprop import (  # noqa: E402
    RandomBackpropState,
    adaptive_random_backprop,
    adaptive_skipped_random_backprop,
    derivative_free_random_backprop,
    quantized_random_backprop,
    random_backprop,
    skipped_random_backprop,
    sparse_random_backprop,
)
from fbalign._src.rules.sign_symmetry import (  # noqa: E402
    SignSymmetryState,
    brsf,
    frsf,
    sign_symmetry,
    usf,
)

__all__ += [
    "BidirectionalDirectFeedbackAlignmentState",
    "BidirectionalFeedbackAlignmentState",
    "DirectRandomTargetProjectionState",
    "KolenPollackState",
    "RandomBackpropState",
    "SignSymmetryState",
    "WeightMirrorState",
    "adaptive_random_backprop",
    "adaptive_skipped_random_backprop",
    "bidirectional_direct_feedback_alignment",
    "bidirectional_feedback_alignment",
    "brsf",
    "derivative_free_random_backprop",
    "direct_random_target_projection",
    "frsf",
    "kolen_pollack",
    "quantize_error",
    "quantized_random_backprop",
    "random_backprop",
    "sign_symmetry",
    "skipped_random_backprop",
    "sparse_random_backprop",
    "straight_through",
    "target_output",
    "usf",
    "weight_mirror",
    "PALState",
    "phaseless_alignment",
    "ModularDFAState",
    "hybrid_dfa",
    "modular_dfa",
]

# Multi-device, seed-sharded and multi-host training (issue 5).
from fbalign import distributed  # noqa: E402

__all__ += ["distributed"]

# Alignment diagnostics (issue 4); plots live in fbalign.plot (matplotlib, imported lazily).
from fbalign import metrics  # noqa: E402

__all__ += ["metrics"]

# Energy-based and relaxation rules (issue 13) and the Hopfield network EP trains.
from fbalign._src.hopfield import HopfieldNetwork, hopfield  # noqa: E402
from fbalign._src.hopfield_conv import ConvHopfieldNetwork, conv_hopfield  # noqa: E402
from fbalign._src.relax import relax  # noqa: E402
from fbalign._src.rules.activation_relaxation import activation_relaxation  # noqa: E402
from fbalign._src.rules.equilibrium import equilibrium_propagation  # noqa: E402
from fbalign._src.rules.predictive_coding import predictive_coding  # noqa: E402

__all__ += ["ConvHopfieldNetwork", "HopfieldNetwork", "activation_relaxation", "conv_hopfield",
            "equilibrium_propagation", "hopfield", "predictive_coding", "relax"]

# Target propagation (issue 14), local objectives (issue 15), auxiliary-variable and
# gradient-free training and sign-based optimizers (issue 16).
from fbalign import optimizers  # noqa: E402
from fbalign._src.rules.admm import admm  # noqa: E402
from fbalign._src.rules.altmin import alternating_minimization  # noqa: E402
from fbalign._src.rules.dynamic_inversion import dynamic_inversion  # noqa: E402
from fbalign._src.rules.evolution import evolution_strategy  # noqa: E402
from fbalign._src.rules.forward_forward import forward_forward  # noqa: E402
from fbalign._src.rules.hsic import hsic_bottleneck  # noqa: E402
from fbalign._src.rules.kickback import kickback  # noqa: E402
from fbalign._src.rules.learned_feedback import (  # noqa: E402
    activation_alignment,
    information_alignment,
    learned_feedback,
    symmetric_alignment,
)
from fbalign._src.rules.local_forward_gradient import local_forward_gradient  # noqa: E402
from fbalign._src.rules.local_losses import local_error_signals  # noqa: E402
from fbalign._src.rules.msa import extended_msa  # noqa: E402
from fbalign._src.rules.pepita import pepita  # noqa: E402
from fbalign._src.rules.target_propagation import ddtp, drl, dtp, ldrl, tp  # noqa: E402

__all__ += ["extended_msa", "kickback"]
__all__ += ["activation_alignment", "dynamic_inversion", "information_alignment",
            "learned_feedback", "symmetric_alignment"]
__all__ += ["admm", "alternating_minimization", "ddtp", "drl", "dtp", "evolution_strategy",
            "forward_forward", "hsic_bottleneck", "ldrl", "local_error_signals",
            "local_forward_gradient", "optimizers", "pepita", "tp"]
