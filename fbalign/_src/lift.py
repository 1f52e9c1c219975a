"""Lifting tape rules into the `LearningRule` step protocol, and resolving what the harness gets.

A `TapeRule` states a rule on a recorded forward pass (``update(params, state, tape, error)``);
the harness only knows `LearningRule.step`. Two lifts, in the spirit of optax's
``with_extra_args_support``:

* `explicit`: record the tape (``network.forward``), take ``e = dL/dy``, call ``rule.update``;
* `through_primitives`: ``jax.grad`` of the loss of ``network.apply`` run with the rule's
  backward (its feedback reaches the ``custom_vjp`` primitives), then ``rule.advance`` for rules
  whose state moves.

Both give the same updates for every rule that has both forms (tested rule by rule).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax

from fbalign._src.backward import Backward
from fbalign._src.base import (
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    RuleState,
    StepContext,
    StepOutput,
    TapeRule,
    check_state_dtypes,
    rule_feedback,
)
from fbalign._src.registry import RULES, get_rule

FORMS = ("explicit", "grad")


def _tape_init(rule: TapeRule, hook_rule: Any = None, hook_kwargs: dict | None = None):
    """``init(key, params, network)`` of a lifted tape rule: the network's ``init_rule_state``
    when it has one (conv nets size DFA feedback by their feature maps), else ``rule.init``."""

    def init(key: PRNGKey, params: Params, network: Any = None) -> RuleState:
        hook = getattr(network, "init_rule_state", None)
        if hook is not None:
            return hook(rule if hook_rule is None else hook_rule, key, params,
                        **(hook_kwargs or {}))
        return rule.init(key, params)

    return init


def explicit(rule: TapeRule, *, name: str = "tape rule", hook_rule: Any = None,
             hook_kwargs: dict | None = None) -> LearningRule:
    """The explicit form of a tape rule as a `LearningRule`.

    ``step`` records ``(y, tape) = network.forward(params, x)``, computes ``e = dL/dy`` and
    returns ``rule.update(params, state, tape, e, key=key, labels=y_true)``. The network must
    record a `Tape` (``forward``); `check_network` says so otherwise.

    Args:
      rule: the `TapeRule`.
      name: the rule's name in messages.
      hook_rule, hook_kwargs: what a network's ``init_rule_state`` receives instead of ``rule``
        (a registered name and its options, so conv nets pick layer-aware feedback scales).
    """
    _check_tape_rule(rule)

    def step(params: Params, state: RuleState, batch: Batch, key: PRNGKey,
             context: StepContext) -> tuple[Any, RuleState, StepOutput]:
        check_state_dtypes(params, state)
        out, tape = context.network.forward(params, batch.x)
        loss_val, err = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
        updates, state = rule.update(params, state, tape, err, key=key, labels=batch.y)
        return updates, state, StepOutput(loss_val, out)

    return LearningRule(_tape_init(rule, hook_rule, hook_kwargs), step,
                        ("forward", "layer_structure"), name)


def through_primitives(rule: TapeRule, *, name: str = "tape rule", hook_rule: Any = None,
                       hook_kwargs: dict | None = None) -> LearningRule:
    """The ``jax.grad`` form of a tape rule as a `LearningRule`.

    ``step`` differentiates ``loss(network.apply(params, x, backward=rule.backward(feedback,
    y)))`` with the feedback `rule_feedback` gives: the rule's own `Backward` decides what each
    layer sends back (MLP, LeNet-5, the RNN). Backprop also runs on networks whose ``apply``
    takes no ``backward`` (wrapped Flax/Equinox models, plain functions). Rules with an
    ``advance`` also get the feedback's cotangent and move their state with it (given
    ``network.layer_ops()``).
    """
    _check_tape_rule(rule)
    if rule.backward is None:
        raise ValueError(f"rule {name!r} has no jax.grad form (its TapeRule.backward is None); "
                         "train it with form='explicit' (--form explicit)")
    plain = _is_backprop(rule)

    def step(params: Params, state: RuleState, batch: Batch, key: PRNGKey,
             context: StepContext) -> tuple[Any, RuleState, StepOutput]:
        check_state_dtypes(params, state)
        net, x, y = context.network, batch.x, batch.y

        def f(p, fb):
            if plain and not _takes_backward(net):  # plain jax.grad: any network runs it
                o = net.apply(p, x)
            else:  # the rule's own Backward (its file decides what each layer sends back)
                o = net.apply(p, x, backward=rule.backward(fb, y))
            return context.loss(o, y), o

        feedback = rule_feedback(rule, params, state)
        if rule.advance is None:
            (loss_val, out), updates = jax.value_and_grad(f, has_aux=True)(params, feedback)
            return updates, state, StepOutput(loss_val, out)
        (loss_val, out), (updates, fb_grads) = jax.value_and_grad(
            f, argnums=(0, 1), has_aux=True)(params, feedback)
        layer_ops = getattr(net, "layer_ops", None)
        updates, state = rule.advance(params, state, updates, fb_grads, key=key,
                                      layers=layer_ops() if layer_ops is not None else None)
        return updates, state, StepOutput(loss_val, out)

    requires = () if plain else ("layer_structure",)
    return LearningRule(_tape_init(rule, hook_rule, hook_kwargs), step, requires, name)


def _is_backprop(rule: TapeRule) -> bool:
    """Whether the rule's backward is plain backprop (`Backward` with its defaults)."""
    try:
        made = rule.backward((), None)
    except (ValueError, TypeError, StopIteration):  # rules whose backward reads the targets
        return False
    return made == Backward()


def _takes_backward(network: Any) -> bool:
    try:
        return "backward" in inspect.signature(network.apply).parameters
    except (TypeError, ValueError):
        return False


def _check_tape_rule(rule: Any) -> None:
    if not isinstance(rule, TapeRule):
        raise TypeError(f"expected a TapeRule(init, update, ...), got {type(rule).__name__}")


def _check_step_signature(rule: LearningRule) -> None:
    # LearningRule(init, update) written for the tape protocol would otherwise fail deep in a
    # trace with an arity error; name the fix instead.
    try:
        names = list(inspect.signature(rule.step).parameters)
    except (TypeError, ValueError):
        return
    if names[2:4] == ["tape", "error"]:
        raise TypeError(
            "this LearningRule's step has the signature of a tape rule's update (params, state, "
            "tape, error); build it as fbalign.rules.TapeRule(init, update) instead, or write "
            "step(params, state, batch, key, context).")


def as_learning_rule(rule: LearningRule | TapeRule | str, form: str = "explicit",
                     rule_kwargs: dict | None = None, network: Any = None) -> LearningRule:
    """What the harness trains: a `LearningRule` as given, a `TapeRule` lifted in ``form``, or
    the registered rule ``rule`` built with ``rule_kwargs`` (and lifted if it is a tape rule).

    Args:
      form: ``"explicit"`` or ``"grad"`` for tape rules. Rules with a step of their own have one
        form; ``"grad"`` for them is an error. Given a ``network`` that records no tape (no
        ``forward``: the RNN, wrapped models), ``"explicit"`` becomes ``"grad"`` (both forms
        give the same updates where both exist; see `resolve_form`). A tape rule without a
        ``jax.grad`` form (``TapeRule.backward`` None) keeps ``"explicit"`` unless ``"grad"``
        was asked for, which is an error.
    """
    explicitly_grad = form == "grad"
    form = resolve_form(form, network)
    hook_rule = hook_kwargs = None
    name = "tape rule"
    if isinstance(rule, str):
        built = get_rule(rule, **(rule_kwargs or {}))
        hook_rule, hook_kwargs, name = rule, dict(rule_kwargs or {}), rule
        _check_stateful_grad(rule, built, form, network)
        rule = built
    elif rule_kwargs:
        raise ValueError("rule_kwargs apply to a registered rule name; build the rule object "
                         "with its options instead")
    if isinstance(rule, LearningRule):
        if form == "grad" and explicitly_grad:
            raise ValueError(f"rule {rule.name!r} has a step of its own and no jax.grad form; "
                             "drop form='grad' (--form grad)")
        _check_step_signature(rule)
        return rule
    if not isinstance(rule, TapeRule):
        raise TypeError("rule must be a LearningRule, a TapeRule or a registered name "
                        f"({', '.join(RULES)}), got {type(rule).__name__}")
    if form == "explicit" or (rule.backward is None and not explicitly_grad):
        # (no grad form to fall back on: check_network then names what the rule needs)
        return explicit(rule, name=name, hook_rule=hook_rule, hook_kwargs=hook_kwargs)
    return through_primitives(rule, name=name, hook_rule=hook_rule, hook_kwargs=hook_kwargs)


def is_tape_rule(rule: Any, rule_kwargs: dict | None = None) -> bool:
    """Whether ``rule`` (an object or a registered name) is a `TapeRule`."""
    if isinstance(rule, str):
        return rule in RULES and isinstance(get_rule(rule, **(rule_kwargs or {})), TapeRule)
    return isinstance(rule, TapeRule)


def resolve_form(form: str, network: Any = None) -> str:
    """``form`` checked, with ``"explicit"`` turned into ``"grad"`` for a network that records no
    tape (no ``forward``): the form a tape rule can run there."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    if network is not None and form == "explicit" and not callable(getattr(network, "forward",
                                                                            None)):
        return "grad"
    return form


def _check_stateful_grad(name: str, built: Any, form: str, network: Any = None) -> None:
    if form != "grad" or not isinstance(built, TapeRule):
        return
    if RULES[name].stateful and built.advance is None and network is not None and not callable(
            getattr(network, "forward", None)):
        raise ValueError(
            f"rule {name!r} changes its feedback state every step from the activations that an "
            f"explicit form records, and {type(network).__name__} records none (a residual "
            "network, the RNN or a wrapped model has no chain of layers to record); train this "
            "network with a rule whose jax.grad form needs no tape (bp, fa, dfa, kp, usf, ...)")
    if RULES[name].stateful and built.advance is None:
        raise ValueError(
            f"rule {name!r} changes its feedback state every step in a way its jax.grad form "
            "cannot compute (it needs the explicit form's recorded activations); train it with "
            "form='explicit' (the default, --form explicit) on a dense model")
