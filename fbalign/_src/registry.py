"""Name -> rule constructor registry used by the CLI, the harness and the conformance tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from fbalign._src.base import LearningRule, TapeRule
from fbalign._src.rules.activation_relaxation import activation_relaxation
from fbalign._src.rules.admm import admm
from fbalign._src.rules.altmin import alternating_minimization
from fbalign._src.rules.backprop import backprop
from fbalign._src.rules.bidirectional import (
    bidirectional_direct_feedback_alignment,
    bidirectional_feedback_alignment,
)
from fbalign._src.rules.drtp import direct_random_target_projection
from fbalign._src.rules.dynamic_inversion import dynamic_inversion
from fbalign._src.rules.equilibrium import equilibrium_propagation
from fbalign._src.rules.evolution import evolution_strategy
from fbalign._src.rules.feedback_alignment import direct_feedback_alignment, feedback_alignment
from fbalign._src.rules.forward_forward import forward_forward
from fbalign._src.rules.forward_gradient import forward_gradient
from fbalign._src.rules.hsic import hsic_bottleneck
from fbalign._src.rules.kickback import kickback
from fbalign._src.rules.kolen_pollack import kolen_pollack, weight_mirror
from fbalign._src.rules.learned_feedback import (
    activation_alignment,
    information_alignment,
    symmetric_alignment,
)
from fbalign._src.rules.local_forward_gradient import local_forward_gradient
from fbalign._src.rules.local_losses import local_error_signals
from fbalign._src.rules.modular_dfa import hybrid_dfa, modular_dfa
from fbalign._src.rules.msa import extended_msa
from fbalign._src.rules.pal import phaseless_alignment
from fbalign._src.rules.pepita import pepita
from fbalign._src.rules.predictive_coding import predictive_coding
from fbalign._src.rules.random_backprop import (
    adaptive_random_backprop,
    adaptive_skipped_random_backprop,
    derivative_free_random_backprop,
    quantized_random_backprop,
    random_backprop,
    skipped_random_backprop,
    sparse_random_backprop,
)
from fbalign._src.rules.shallow import shallow
from fbalign._src.rules.sign_symmetry import brsf, frsf, usf
from fbalign._src.rules.synthetic_gradients import cdni, dni
from fbalign._src.rules.target_propagation import ddtp, drl, dtp, ldrl, tp


class RuleSpec(NamedTuple):
    """A registered rule: its constructor and a one-line description with the paper.

    Whether a rule has a ``jax.grad`` form, and what it sends back there, is the rule's own
    business (`TapeRule.backward`, built in its file); `has_grad_form` reads it.
    """

    make: Callable[..., TapeRule | LearningRule]
    description: str
    # True when `update` changes the feedback state (learned or redrawn feedback). Its jax.grad
    # form then needs the rule's `advance` (TapeRule) to move the state; rules without one
    # (their state update needs the recorded activations) train only in the explicit form.
    stateful: bool = False


def has_grad_form(name: str, rule_kwargs: dict | None = None) -> bool:
    """Whether registered rule ``name`` (built with ``rule_kwargs``) trains through ``jax.grad``
    of the network's ``apply`` (a `TapeRule` with a ``backward`` whose state, if it changes,
    has an ``advance``)."""
    rule = get_rule(name, **(rule_kwargs or {}))
    if not isinstance(rule, TapeRule) or rule.backward is None:
        return False
    return not (RULES[name].stateful and rule.advance is None)


RULES: dict[str, RuleSpec] = {
    "bp": RuleSpec(backprop, "backpropagation (reference)"),
    "fa": RuleSpec(feedback_alignment, "feedback alignment, Lillicrap et al. 2016"),
    "dfa": RuleSpec(direct_feedback_alignment, "direct feedback alignment, Nokland 2016"),
    "dni": RuleSpec(dni, "synthetic gradients (DNI), Jaderberg et al. 2017"),
    "cdni": RuleSpec(cdni, "label-conditioned DNI (cDNI), Jaderberg et al. 2017"),
    # Feedback-alignment family (issue 3): sign symmetry, random backprop, KP/WM, BFA, DRTP.
    "usf": RuleSpec(usf, "sign symmetry, uniform magnitude (uSF), Liao et al. 2016"),
    "frsf": RuleSpec(frsf, "sign symmetry, fixed random magnitudes (frSF), Liao 2016"),
    "brsf": RuleSpec(brsf, "sign symmetry, magnitudes redrawn per batch (brSF), Liao 2016",
                     stateful=True),
    "rbp": RuleSpec(random_backprop, "random backprop (= FA), Baldi et al. 2018"),
    "srbp": RuleSpec(skipped_random_backprop, "skipped random backprop, Baldi et al. 2018"),
    "arbp": RuleSpec(adaptive_random_backprop, "adaptive random backprop, Baldi 2018",
                     stateful=True),
    "asrbp": RuleSpec(adaptive_skipped_random_backprop,
                      "adaptive skipped random backprop, Baldi 2018", stateful=True),
    "sparse_rbp": RuleSpec(sparse_random_backprop, "sparse random backprop, Baldi 2018"),
    "kbit_rbp": RuleSpec(quantized_random_backprop, "RBP, k-bit error channel, Baldi 2018"),
    "nd_rbp": RuleSpec(derivative_free_random_backprop,
                       "RBP without activation derivatives, Baldi et al. 2018"),
    "kp": RuleSpec(kolen_pollack, "Kolen-Pollack, Akrout et al. 2019", stateful=True),
    "wm": RuleSpec(weight_mirror, "weight mirror, Akrout et al. 2019", stateful=True),
    "bfa": RuleSpec(bidirectional_feedback_alignment,
                    "bidirectional feedback alignment, Luo et al. 2017", stateful=True),
    "bdfa": RuleSpec(bidirectional_direct_feedback_alignment,
                     "bidirectional direct feedback alignment, Luo et al. 2017", stateful=True),
    "drtp": RuleSpec(direct_random_target_projection,
                     "direct random target projection, Frenkel et al. 2021"),
    "shallow": RuleSpec(shallow, "shallow learning: only the output layer learns (baseline, "
                                 "Lillicrap et al. 2016)"),
    # Learned and structured feedback (issue 21).
    "ia": RuleSpec(information_alignment,
                   "information alignment (amp + null + decay), Kunin et al. 2020", stateful=True),
    "sa": RuleSpec(symmetric_alignment,
                   "symmetric alignment (self + decay), Kunin et al. 2020", stateful=True),
    "aa": RuleSpec(activation_alignment,
                   "activation alignment (amp + sparse), Kunin et al. 2020", stateful=True),
    "dyninv": RuleSpec(dynamic_inversion, "dynamic inversion, Podlaski & Machens 2020"),
    "mdfa": RuleSpec(modular_dfa, "modular DFA: DFA between modules, backprop inside (dilated, "
                                  "sparse, grouped feedback options), Han et al. 2020"),
    "hdfa": RuleSpec(hybrid_dfa, "hybrid DFA: named layers learn by backprop from the layer "
                                 "above, the rest by DFA, Han et al. 2020"),
    "pal": RuleSpec(phaseless_alignment,
                    "phaseless alignment learning (PAL), Max et al. 2024", stateful=True),
    # Rules with a step of their own (LearningRule): no tape, no jax.grad form.
    "fg": RuleSpec(forward_gradient, "forward gradient (weight perturbation), Baydin et al. 2022"),
    # Energy-based and relaxation rules (issue 13).
    "ep": RuleSpec(equilibrium_propagation,
                   "equilibrium propagation (on fbalign.models.hopfield), Scellier & Bengio 2017"),
    "pc": RuleSpec(predictive_coding, "predictive coding, Whittington & Bogacz 2017"),
    "ar": RuleSpec(activation_relaxation, "activation relaxation, Millidge et al. 2020"),
    # Target propagation (issue 14): targets through learned inverses, kept in the rule state.
    "tp": RuleSpec(tp, "target propagation, Bengio 2014; Lee et al. 2015"),
    "dtp": RuleSpec(dtp, "difference target propagation, Lee et al. 2015"),
    "drl": RuleSpec(drl, "DTP with the difference reconstruction loss, Meulemans et al. 2020"),
    "ddtp": RuleSpec(ddtp, "direct DTP (DDTP-linear by default), Meulemans et al. 2020"),
    "ldrl": RuleSpec(ldrl, "DTP with the local difference reconstruction loss, Ernoult 2022"),
    # Local objectives (issue 15).
    "lsig": RuleSpec(local_error_signals,
                     "local error signals (pred/sim/predsim, bio), Nokland & Eidnes 2019"),
    "ff": RuleSpec(forward_forward, "forward-forward (label in the input, goodness), Hinton 2022"),
    "hsic": RuleSpec(hsic_bottleneck,
                     "HSIC bottleneck (per-layer HSIC objectives), Ma, Lewis & Kleijn 2020"),
    "pepita": RuleSpec(pepita, "PEPITA (error-modulated second forward pass), Dellaferrera & "
                               "Kreiman 2022"),
    "lfg": RuleSpec(local_forward_gradient,
                    "activity-perturbed forward gradient with local losses, Ren et al. 2023"),
    # Auxiliary-variable and gradient-free training (issue 16).
    "altmin": RuleSpec(alternating_minimization,
                       "online alternating minimization, Choromanska et al. 2019"),
    "admm": RuleSpec(admm, "ADMM without gradients, Taylor et al. 2016"),
    "emsa": RuleSpec(extended_msa, "extended method of successive approximations (E-MSA), "
                                   "Li, Chen, Tai & E 2018"),
    "kickback": RuleSpec(kickback, "Kickback (ReLU nets, one output), Balduzzi, Vanchinathan "
                                   "& Buhmann 2015"),
    "es": RuleSpec(evolution_strategy,
                   "evolution strategies via evosax (OpenAI-ES, Salimans et al. 2017; SNES)"),
}


def get_rule(name: str, **kwargs: Any) -> TapeRule | LearningRule:
    """Builds the rule registered as ``name`` (``fbalign.rules.RULES`` lists them)."""
    try:
        spec = RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; valid: {', '.join(RULES)}") from None
    return spec.make(**kwargs)
