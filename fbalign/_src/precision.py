"""Mixed precision for any rule: compute in bfloat16, keep float32 master weights and state.

`mixed_precision(rule)` wraps a `LearningRule` so that its step runs on bfloat16 copies of the
params, the rule state and the inputs, while the harness keeps everything it stores (params,
optimizer state, rule state) in float32: the updates come back cast to float32 for the
optimizer (which steps the float32 master weights, so small updates accumulate), and each
floating leaf of the rule state moves by its bfloat16 *change*, added in float32 (``s <- s +
(s'_{bf16} - s_{bf16})``), so the state itself is never rounded to bfloat16. A rule that
updates its own state inside the step (Kolen-Pollack's ``B``, learned feedback) computes that
change in bfloat16, though: a change below bfloat16's resolution of the state (about 2**-8 of
its size) is lost, so `precision_rule` warns for the registry's stateful rules. Loss, output
and metrics come back in float32.

bfloat16 has float32's exponent range, so unlike float16 it needs no loss scaling (gradients do
not underflow where float32's would not); its 8-bit mantissa is what limits it. On GPUs, JAX's
default float32 matmuls already run as TF32 (10-bit mantissa); `jax.default_matmul_precision`
("highest") or ``JAX_DEFAULT_MATMUL_PRECISION=highest`` asks for full float32.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.base import (
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    RuleState,
    StepContext,
    StepOutput,
    Updates,
)
from fbalign._src.registry import RULES

PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def _is_float(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (integers, keys and None kept)."""
    return jax.tree.map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def mixed_precision(rule: LearningRule, compute_dtype: Any = jnp.bfloat16) -> LearningRule:
    """``rule`` computing in ``compute_dtype`` with float32 (the params' dtype) master copies.

    ``step`` casts the params, the floating rule state and the batch's floating inputs and
    targets to ``compute_dtype``, runs ``rule.step``, and returns the updates in the params'
    dtypes, the rule state as ``s + (s' - cast(s))`` in its own dtypes, and the loss, output
    and metrics in float32. ``init`` and ``predict`` are the rule's own (evaluation runs in the
    params' dtype).
    """
    if not isinstance(rule, LearningRule):
        raise TypeError(f"mixed_precision wraps a LearningRule, got {type(rule).__name__}; "
                        "lift a tape rule first (fbalign.rules.as_learning_rule)")

    def step(params: Params, state: RuleState, batch: Batch, key: PRNGKey,
             context: StepContext) -> tuple[Updates, RuleState, StepOutput]:
        low_state = cast_floats(state, compute_dtype)
        x = batch.x.astype(compute_dtype) if _is_float(batch.x) else batch.x
        y = batch.y.astype(compute_dtype) if _is_float(batch.y) else batch.y
        updates, new_state, out = rule.step(cast_floats(params, compute_dtype), low_state,
                                            Batch(x, y, batch.index), key, context)
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype) if _is_float(u) else u,
                               updates, params)
        new_state = jax.tree.map(
            lambda s, new, low: s + (new.astype(s.dtype) - low.astype(s.dtype))
            if _is_float(s) else new, state, new_state, low_state)
        metrics = None if out.metrics is None else cast_floats(out.metrics, jnp.float32)
        return updates, new_state, StepOutput(jnp.asarray(out.loss, jnp.float32),
                                              cast_floats(out.output, jnp.float32), metrics)

    return rule._replace(step=step, name=f"{rule.name} ({jnp.dtype(compute_dtype).name})")


def precision_rule(rule: LearningRule, precision: str) -> LearningRule:
    """``rule`` as it runs at ``precision`` (``"float32"``: unchanged; ``"bfloat16"``:
    `mixed_precision`); a ValueError names the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return rule
    spec = RULES.get(rule.name)
    if spec is not None and spec.stateful:
        warnings.warn(
            f"rule {rule.name!r} updates its feedback state inside the step, which runs in "
            f"{precision}: state changes below about 2**-8 of the state's size are lost (the "
            "float32 master copy only keeps what the step computed); use precision='float32' "
            "for it, or a larger feedback learning rate", RuntimeWarning, stacklevel=3)
    return mixed_precision(rule, dtype)
