"""The state of a tape rule on a layered network whose layers need not be dense (LeNet-5, a
`fbalign.models.sequential` network): the rule's own ``init``, told the network's feature maps."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.base import Params, PRNGKey, TapeRule
from fbalign._src.registry import get_rule


def build_rule(rule: Any, init: Any = "gaussian", scale: float | None = None,
               rule_kwargs: dict | None = None) -> Any:
    """A registered rule's name built with ``init``/``scale`` (given only when not the
    defaults) and ``rule_kwargs``, what a network's ``init_rule_state`` receives (an unknown
    name is refused by `get_rule`, with the valid ones); a rule object is returned as it is."""
    if not isinstance(rule, str):
        return rule
    kwargs = dict(rule_kwargs or {})
    if init != "gaussian":
        kwargs["init"] = init
    if scale is not None:
        kwargs["scale"] = scale
    return get_rule(rule, **kwargs)


def layered_rule_state(rule: TapeRule, key: PRNGKey, params: Params, n_out: int,
                       feature_shapes: Sequence[tuple[int, ...]]) -> Any:
    """``rule.init`` for a layered network whose layers need not be dense (conv kernels).

    A rule whose ``init`` understands the params is used as it is (FA-like states: one ``B_l``
    of ``W_l``'s shape, conv kernels included). A DFA-like state (one ``(n_out, n_l)`` matrix
    per hidden layer, None for the output) is drawn knowing the network: its ``init`` gets
    ``feature_shapes`` (each ``B_l`` then maps onto layer ``l``'s feature map, with the rule's
    default scale for networks with maps: `fbalign.rules.feedback_alignment.direct_fan`); an
    ``init`` without that option gets a dense stand-in whose widths are the flattened maps. An
    ``init`` that only understands 2-D weights sees each conv kernel as its ``(kh * kw * cin,
    cout)`` matrix, reshaped back in the state.
    """
    dtype = params[0]["w"].dtype
    if "feature_shapes" in inspect.signature(rule.init).parameters:
        # The rule draws map-shaped feedback itself (DFA, modular DFA: whose layer 0 may hold
        # no feedback, so the DFA-like probe below would not recognise it).
        return rule.init(key, params, feature_shapes=tuple(map(tuple, feature_shapes)))
    try:
        probe = jax.eval_shape(rule.init, key, params)
    except Exception:  # an init written for 2-D weights only
        probe = None
    if probe is not None and not dfa_like(probe, n_out):
        return rule.init(key, params)
    if probe is not None:
        widths = [math.prod(s) for s in feature_shapes]
        stand_in = [{"w": jnp.zeros((1, n), dtype), "b": jnp.zeros((n,), dtype)} for n in widths]
        return rule.init(key, stand_in)
    flat = [{**p, "w": p["w"].reshape(-1, p["w"].shape[-1])} for p in params]
    state = rule.init(key, flat)
    kernels = {tuple(f["w"].shape): tuple(p["w"].shape) for f, p in zip(flat, params,
                                                                       strict=True)}

    def back(a):
        if hasattr(a, "shape") and tuple(a.shape) in kernels:
            return a.reshape(kernels[tuple(a.shape)])
        return a

    return jax.tree.map(back, state)


def dfa_like(state: Any, n_out: int) -> bool:
    """Whether a rule state holds DFA-style feedback: ``(n_out, n_l)`` for layer 0, None last."""
    fb = getattr(state, "feedback", None)
    if not isinstance(fb, tuple | list) or len(fb) < 2:
        return False
    first, last = fb[0], fb[-1]
    return (last is None and first is not None and hasattr(first, "shape")
            and len(first.shape) == 2 and first.shape[0] == n_out)


