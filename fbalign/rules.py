"""Learning rules: the `LearningRule` step protocol, tape rules (``TapeRule(init, update[, advance,
feedback])``) and their lifts, and the registry."""

from fbalign._src.base import (
    Batch,
    EmptyState,
    FeedbackDtypeError,
    FeedbackShapeError,
    LayerOp,
    LearningRule,
    Links,
    StepContext,
    StepOutput,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    check_network,
    check_state_dtypes,
    rule_feedback,
)
from fbalign._src.feedback_init import (
    FEEDBACK_INITS,
    gaussian,
    gaussian_feedback,
    orthogonal,
    orthogonal_feedback,
    uniform,
    uniform_feedback,
)
from fbalign._src.lift import as_learning_rule, explicit, through_primitives
from fbalign._src.registry import RULES, RuleSpec, get_rule, has_grad_form
from fbalign._src.relax import RelaxationError, RelaxResult, check_relaxation, relax
from fbalign._src.rules.activation_relaxation import (
    ActivationRelaxationState,
    activation_relaxation,
)
from fbalign._src.rules.backprop import backprop
from fbalign._src.rules.equilibrium import PersistentParticles, equilibrium_propagation
from fbalign._src.rules.feedback_alignment import (
    DirectFeedbackAlignmentState,
    FeedbackAlignmentState,
    dfa_feedback_shapes,
    direct_feedback_alignment,
    fa_feedback_shapes,
    feedback_alignment,
)
from fbalign._src.rules.forward_gradient import forward_gradient, sample_tangents
from fbalign._src.rules.predictive_coding import PredictiveCodingState, predictive_coding
from fbalign._src.rules.shallow import shallow

__all__ = [
    "FEEDBACK_INITS",
    "RULES",
    "Batch",
    "StepContext",
    "StepOutput",
    "TapeRule",
    "as_learning_rule",
    "check_network",
    "explicit",
    "forward_gradient",
    "sample_tangents",
    "through_primitives",
    "ActivationRelaxationState",
    "PredictiveCodingState",
    "activation_relaxation",
    "equilibrium_propagation",
    "PersistentParticles",
    "predictive_coding",
    "RelaxResult",
    "RelaxationError",
    "check_relaxation",
    "relax",
    "Links",
    "DirectFeedbackAlignmentState",
    "EmptyState",
    "FeedbackAlignmentState",
    "FeedbackDtypeError",
    "FeedbackShapeError",
    "LayerOp",
    "LearningRule",
    "RuleSpec",
    "Tape",
    "backprop",
    "shallow",
    "chain_updates",
    "check_feedback_shapes",
    "check_state_dtypes",
    "rule_feedback",
    "dfa_feedback_shapes",
    "has_grad_form",
    "direct_feedback_alignment",
    "fa_feedback_shapes",
    "feedback_alignment",
    "gaussian",
    "gaussian_feedback",
    "orthogonal_feedback",
    "uniform_feedback",
    "get_rule",
    "orthogonal",
    "uniform",
]

# Synthetic gradients / decoupled neural interfaces (issue 7), feedforward and recurrent.
from fbalign._src.recurrent_dni import (  # noqa: E402
    Cell,
    RecurrentDNI,
    RecurrentDNIState,
    WindowMetrics,
    carry_to_vector,
    lstm_cell,
    recurrent_dni,
    rnn_cell,
    sigmoid_bce,
    softmax_ce,
    unroll,
    vector_to_carry,
)
from fbalign._src.recurrent_dni import make_train_step as make_recurrent_dni_step  # noqa: E402
from fbalign._src.rules.synthetic_gradients import (  # noqa: E402
    Synthesizer,
    SyntheticGradientState,
    cdni,
    dni,
    linear_synthesizer,
    mlp_synthesizer,
    synthesizer_loss,
    synthetic_gradients,
)

__all__ += [
    "Cell",
    "RecurrentDNI",
    "RecurrentDNIState",
    "SyntheticGradientState",
    "Synthesizer",
    "WindowMetrics",
    "carry_to_vector",
    "cdni",
    "dni",
    "linear_synthesizer",
    "lstm_cell",
    "make_recurrent_dni_step",
    "mlp_synthesizer",
    "recurrent_dni",
    "rnn_cell",
    "sigmoid_bce",
    "softmax_ce",
    "synthesizer_loss",
    "synthetic_gradients",
    "unroll",
    "vector_to_carry",
]

# Feedback-alignment family (issue 3, rules part): sign symmetry, random backprop variants,
# Kolen-Pollack and weight mirrors, bidirectional FA, direct random target projection.
from fbalign._src.channel import as_targets, quantize  # noqa: E402
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
    mirror_op_step,
    mirror_step,
    weight_mirror,
)
from fbalign._src.rules.modular_dfa import (  # noqa: E402
    ModularDFAState,
    ModularFeedback,
    bp_partition,
    dilated_error,
    grouped_op,
    hybrid_dfa,
    modular_dfa,
    module_sizes,
)
from fbalign._src.rules.pal import (  # noqa: E402
    PALConstants,
    PALState,
    pal_dynamics,
    pal_gain,
    pal_increments,
    pal_low_pass,
    pal_row_slopes,
    phaseless_alignment,
)
from fbalign._src.rules.random_backprop import (  # noqa: E402
    RandomBackpropState,
    adaptive_random_backprop,
    adaptive_skipped_random_backprop,
    derivative_free_random_backprop,
    nonzeros_per_unit,
    quantized_random_backprop,
    random_backprop,
    skipped_random_backprop,
    sparse_random_backprop,
)
from fbalign._src.rules.sign_symmetry import (  # noqa: E402
    BatchRandomSignState,
    SignSymmetryState,
    brsf,
    draw_magnitude,
    frsf,
    sign_feedback,
    sign_symmetry,
    usf,
)

__all__ += [
    "BatchRandomSignState",
    "BidirectionalDirectFeedbackAlignmentState",
    "BidirectionalFeedbackAlignmentState",
    "DirectRandomTargetProjectionState",
    "KolenPollackState",
    "ModularDFAState",
    "ModularFeedback",
    "PALConstants",
    "PALState",
    "RandomBackpropState",
    "SignSymmetryState",
    "WeightMirrorState",
    "adaptive_random_backprop",
    "adaptive_skipped_random_backprop",
    "as_targets",
    "bidirectional_direct_feedback_alignment",
    "bidirectional_feedback_alignment",
    "brsf",
    "derivative_free_random_backprop",
    "direct_random_target_projection",
    "draw_magnitude",
    "frsf",
    "kolen_pollack",
    "mirror_op_step",
    "mirror_step",
    "bp_partition",
    "dilated_error",
    "grouped_op",
    "hybrid_dfa",
    "modular_dfa",
    "module_sizes",
    "nonzeros_per_unit",
    "pal_dynamics",
    "pal_gain",
    "pal_increments",
    "pal_low_pass",
    "pal_row_slopes",
    "phaseless_alignment",
    "quantize",
    "quantized_random_backprop",
    "random_backprop",
    "sign_feedback",
    "sign_symmetry",
    "skipped_random_backprop",
    "sparse_random_backprop",
    "usf",
    "weight_mirror",
]

# Target propagation (issue 14), local objectives (issue 15), auxiliary-variable and
# gradient-free training (issue 16).
from fbalign._src.rules.admm import ADMMState, admm, binary_hinge  # noqa: E402
from fbalign._src.rules.altmin import AltMinState, alternating_minimization  # noqa: E402
from fbalign._src.rules.dynamic_inversion import (  # noqa: E402
    DynamicInversionState,
    InversionFeedback,
    auto_dt,
    check_stability,
    dynamic_inversion,
    invert,
)
from fbalign._src.rules.evolution import (  # noqa: E402
    EvolutionState,
    evolution_strategy,
    population_fitness,
)
from fbalign._src.rules.forward_forward import (  # noqa: E402
    forward_forward,
    forward_forward_goodness,
    forward_forward_predict,
)
from fbalign._src.rules.hsic import (  # noqa: E402
    gaussian_kernel,
    hsic,
    hsic_bottleneck,
    linear_kernel,
    normalized_hsic,
)
from fbalign._src.rules.kickback import kickback  # noqa: E402
from fbalign._src.rules.learned_feedback import (  # noqa: E402
    LearnedFeedbackState,
    RegularizedFeedback,
    activation_alignment,
    information_alignment,
    learned_feedback,
    primitive,
    regularizer,
    regularizer_grad,
    symmetric_alignment,
)
from fbalign._src.rules.local_forward_gradient import (  # noqa: E402
    LocalForwardGradientState,
    activity_forward_gradient,
    local_forward_gradient,
)
from fbalign._src.rules.local_losses import (  # noqa: E402
    LocalLossState,
    local_error_signals,
    similarity_matrix,
)
from fbalign._src.rules.msa import extended_msa  # noqa: E402
from fbalign._src.rules.pepita import PepitaState, pepita  # noqa: E402
from fbalign._src.rules.target_propagation import (  # noqa: E402
    TargetPropState,
    ddtp,
    drl,
    dtp,
    ldrl,
    tp,
)

__all__ += [
    "ADMMState",
    "AltMinState",
    "DynamicInversionState",
    "InversionFeedback",
    "LearnedFeedbackState",
    "RegularizedFeedback",
    "activation_alignment",
    "auto_dt",
    "check_stability",
    "extended_msa",
    "kickback",
    "dynamic_inversion",
    "information_alignment",
    "invert",
    "learned_feedback",
    "primitive",
    "regularizer",
    "regularizer_grad",
    "symmetric_alignment",
    "EvolutionState",
    "LocalForwardGradientState",
    "LocalLossState",
    "PepitaState",
    "TargetPropState",
    "activity_forward_gradient",
    "gaussian_kernel",
    "hsic",
    "hsic_bottleneck",
    "linear_kernel",
    "local_forward_gradient",
    "normalized_hsic",
    "pepita",
    "admm",
    "alternating_minimization",
    "binary_hinge",
    "ddtp",
    "drl",
    "dtp",
    "evolution_strategy",
    "forward_forward",
    "forward_forward_goodness",
    "forward_forward_predict",
    "ldrl",
    "local_error_signals",
    "population_fitness",
    "similarity_matrix",
    "tp",
]
