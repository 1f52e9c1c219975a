"""Name -> rule constructor registry used by the CLI, the harness and the conformance tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from fbalign._src.base import LearningRule, TapeRule
from fbalign._src.rules.backprop import backprop
from fbalign._src.rules.bidirectional import (
    bidirectional_direct_feedback_alignment,
    bidirectional_feedback_alignment,
)
from fbalign._src.rules.drtp import direct_random_target_projection
from fbalign._src.rules.feedback_alignment import direct_feedback_alignment, feedback_alignment
from fbalign._src.rules.forward_gradient import forward_gradient
from fbalign._src.rules.kolen_pollack import kolen_pollack, weight_mirror
from fbalign._src.rules.random_backprop import (
    adaptive_random_backprop,
    adaptive_skipped_random_backprop,
    derivative_free_random_backprop,
    quantized_random_backprop,
    random_backprop,
    skipped_random_backprop,
    sparse_random_backprop,
)
from fbalign._src.rules.sign_symmetry import brsf, frsf, usf
from fbalign._src.rules.synthetic_gradients import cdni, dni


class RuleSpec(NamedTuple):
    """A registered rule: its constructor, the `MLP.apply` mode of its ``jax.grad`` form (None
    when it has no primitive form), and a one-line description with the paper."""

    make: Callable[..., TapeRule | LearningRule]
    grad_mode: str | None
    description: str
    # True when `update` changes the feedback state (learned or redrawn feedback). Its jax.grad
    # form then needs the rule's `advance` (TapeRule) to move the state; rules without one
    # (their state update needs the recorded activations) train only in the explicit form.
    stateful: bool = False
    # Options of the constructor that change the jax.grad form: kwargs -> (mode, apply kwargs).
    grad_options: Callable[[dict], tuple[str, dict]] | None = None


def _rbp_grad_form(defaults: dict) -> Callable[[dict], tuple[str, dict]]:
    """The ``apply`` mode and keywords of a random-backprop variant built with these options."""

    def form(kwargs: dict) -> tuple[str, dict]:
        kw = {**defaults, **kwargs}
        if kw.get("skip"):
            mode = "adfa" if kw.get("adaptive") else "dfa"
        else:
            mode = "kp" if kw.get("adaptive") else "fa"
        extra = {}
        if kw.get("error_bits", kw.get("bits")) is not None:
            extra["error_bits"] = kw.get("error_bits", kw.get("bits"))
        if not kw.get("derivative", True):
            extra["derivative"] = False
        return mode, extra

    return form


def grad_form(name: str, rule_kwargs: dict | None = None) -> tuple[str | None, dict]:
    """``(mode, apply_kwargs)`` of registered rule ``name``'s ``jax.grad`` form, for the
    constructor options ``rule_kwargs``: ``model.apply(params, x, feedback, mode,
    **apply_kwargs)`` under ``jax.grad`` gives the rule's updates."""
    spec = RULES[name]
    if spec.grad_options is None or spec.grad_mode is None:
        return spec.grad_mode, {}
    return spec.grad_options(dict(rule_kwargs or {}))


RULES: dict[str, RuleSpec] = {
    "bp": RuleSpec(backprop, "bp", "backpropagation (reference)"),
    "fa": RuleSpec(feedback_alignment, "fa", "feedback alignment, Lillicrap et al. 2016"),
    "dfa": RuleSpec(direct_feedback_alignment, "dfa", "direct feedback alignment, Nokland 2016"),
    "dni": RuleSpec(dni, None, "synthetic gradients (DNI), Jaderberg et al. 2017"),
    "cdni": RuleSpec(cdni, None, "label-conditioned DNI (cDNI), Jaderberg et al. 2017"),
    # Feedback-alignment family (issue 3): sign symmetry, random backprop, KP/WM, BFA, DRTP.
    "usf": RuleSpec(usf, "sign", "sign symmetry, uniform magnitude (uSF), Liao et al. 2016"),
    "frsf": RuleSpec(frsf, "sign", "sign symmetry, fixed random magnitudes (frSF), Liao 2016"),
    "brsf": RuleSpec(brsf, "sign", "sign symmetry, magnitudes redrawn per batch (brSF), Liao 2016",
                     stateful=True),
    "rbp": RuleSpec(random_backprop, "fa", "random backprop (= FA), Baldi et al. 2018",
                    grad_options=_rbp_grad_form({})),
    "srbp": RuleSpec(skipped_random_backprop, "dfa", "skipped random backprop, Baldi et al. 2018",
                     grad_options=_rbp_grad_form({"skip": True})),
    "arbp": RuleSpec(adaptive_random_backprop, "kp", "adaptive random backprop, Baldi 2018",
                     stateful=True, grad_options=_rbp_grad_form({"adaptive": True})),
    "asrbp": RuleSpec(adaptive_skipped_random_backprop, "adfa",
                      "adaptive skipped random backprop, Baldi 2018", stateful=True,
                      grad_options=_rbp_grad_form({"skip": True, "adaptive": True})),
    "sparse_rbp": RuleSpec(sparse_random_backprop, "fa", "sparse random backprop, Baldi 2018",
                           grad_options=_rbp_grad_form({})),
    "kbit_rbp": RuleSpec(quantized_random_backprop, "fa", "RBP, k-bit error channel, Baldi 2018",
                         grad_options=_rbp_grad_form({"bits": 2})),
    "nd_rbp": RuleSpec(derivative_free_random_backprop, "fa_noderiv",
                       "RBP without activation derivatives, Baldi et al. 2018",
                       grad_options=_rbp_grad_form({"derivative": False})),
    "kp": RuleSpec(kolen_pollack, "kp", "Kolen-Pollack, Akrout et al. 2019", stateful=True),
    "wm": RuleSpec(weight_mirror, "fa", "weight mirror, Akrout et al. 2019", stateful=True),
    "bfa": RuleSpec(bidirectional_feedback_alignment, "fa",
                    "bidirectional feedback alignment, Luo et al. 2017", stateful=True),
    "bdfa": RuleSpec(bidirectional_direct_feedback_alignment, "bdfa",
                     "bidirectional direct feedback alignment, Luo et al. 2017", stateful=True),
    "drtp": RuleSpec(direct_random_target_projection, "drtp",
                     "direct random target projection, Frenkel et al. 2021"),
    # Rules with a step of their own (LearningRule): no tape, no jax.grad form.
    "fg": RuleSpec(forward_gradient, None,
                   "forward gradient (weight perturbation), Baydin et al. 2022"),
}


def get_rule(name: str, **kwargs: Any) -> TapeRule | LearningRule:
    """Builds the rule registered as ``name`` (``fbalign.rules.RULES`` lists them)."""
    try:
        spec = RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; valid: {', '.join(RULES)}") from None
    return spec.make(**kwargs)
