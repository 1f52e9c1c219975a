r"""Alignment diagnostics: angles, norm ratios and the Lillicrap criterion, as pure functions.

Everything here is jittable and cheap next to a training step. Three groups:

* **Vectors.** `angle` (degrees, computed stably), `cosine` and `norm_ratio` between two arrays
  of the same size, read as flat vectors.
* **Updates against the gradient.** `update_gradient_metrics(updates, grads)`: per layer, the
  angle between a rule's update and the true backprop gradient computed on the same batch, and
  ``|update| / |gradient|``.
* **Feedback against the forward weights.** `feedback_matrices` turns a rule state into the
  effective feedback ``B_l`` and the matrix ``W_l`` it stands in for, in one orientation:

  - ``kind="fa"`` (FA, KP, RBP, BFA, weight mirror): ``B_l`` has ``W_l``'s shape
    ``(din, dout)`` and is compared with ``W_l`` itself, for layers ``l = 1..L-1``;
  - ``kind="sign"`` (sign symmetry): ``B_l = sign(W_l) * M_l`` from the stored magnitudes;
  - ``kind="dfa"`` (DFA, DRTP, SRBP): ``B_l`` has shape ``(n_out, n_l)`` and is compared with
    ``P_l^T`` where ``P_l = W_{l+1} W_{l+2} ... W_{L-1}`` (shape ``(n_l, n_out)``) is the
    product of the weights *downstream* of hidden layer ``l`` (row-major layers
    ``a_{l+1} = h_l W_{l+1}``). ``e P_l^T`` is what backprop would send to ``h_l`` if the
    network were linear (all ``f' = 1``), so ``B_l = P_l^T`` makes DFA backprop on a linear net
    (and, with one hidden layer, on any net).

  `feedback_metrics` then reports per layer ``angle(B_l, W_l)`` (or ``angle(B_l, P_l^T)``),
  ``|B_l| / |W_l|`` (Frobenius norms) and the Lillicrap criterion.

**The Lillicrap criterion.** Lillicrap et al. (2016) note that FA's hidden signal ``B e``
reduces the error when ``e^T W B e > 0``; with ``W`` the forward weights that read the hidden
layer, ``e^T W B e = <W^T e, B e>``: the inner product of what backprop would send to the hidden
layer and what the rule sends. With several layers we evaluate it *locally*, per example ``n``
of a batch and per layer, in this library's row-major orientation:

* FA family: ``c_{l,n} = <delta_{l,n} W_l^T, delta_{l,n} B_l^T>`` for ``l = 1..L-1``, where
  ``delta_l`` is the error at layer ``l``'s pre-activation *as the rule computes it*
  (``delta_{L-1} = e * f'(a_{L-1})`` at the output, then ``delta_{l-1} = (delta_l B_l^T) *
  f'(a_{l-1})``), so every layer is judged on the signal it really passes on (rules that
  alter this chain further -- no ``f'``, a quantised channel -- are evaluated with FA's);
* DFA family: ``c_{l,n} = <e_n P_l, e_n B_l>`` for hidden layers ``l = 0..L-2`` with ``e`` the
  output error ``e * f'(a_{L-1})``.

The reported number is the fraction of examples with ``c_{l,n} > 0`` (1 = every example's hidden
signal is within 90 degrees of the backprop direction one step down). For a two-layer network
and FA it is exactly the criterion of the paper.

References:
  Lillicrap, Cownden, Tweed & Akerman (2016), Nature Communications 7:13276.
  Nokland (2016), "Direct feedback alignment provides learning in deep neural networks".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Float, Int

from fbalign._src.base import Array, Batch, Params, StepContext, Tape, TapeRule, rule_feedback
from fbalign._src.lift import as_learning_rule
from fbalign._src.losses import Loss, Target, get_loss
from fbalign._src.registry import RULES, get_rule

KINDS = ("fa", "sign", "dfa")  # feedback layouts (`Backward.kind`)


# ----------------------------------------------------------------------------------------------
# Vectors


def _flat(a: Any) -> Array:
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(a)]
    return jnp.concatenate(leaves) if len(leaves) > 1 else leaves[0]


def cosine(a: Any, b: Any) -> Float[Array, ""]:
    """Cosine similarity of ``a`` and ``b`` read as flat vectors (pytrees are concatenated).

    NaN when either has zero norm.
    """
    a, b = _flat(a), _flat(b)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    return jnp.where((na > 0) & (nb > 0), jnp.vdot(a, b) / (na * nb), jnp.nan)


def angle(a: Any, b: Any) -> Float[Array, ""]:
    r"""The angle in degrees between ``a`` and ``b`` read as flat vectors.

    Computed as ``2 atan2(|u - v|, |u + v|)`` with ``u, v`` the unit vectors, which is exact at
    0 and 180 degrees (``arccos`` of the cosine loses half the digits there). NaN when either
    vector is zero (a layer that does not learn has no direction).
    """
    a, b = _flat(a), _flat(b)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    ok = (na > 0) & (nb > 0)
    u = a / jnp.where(ok, na, 1.0)
    v = b / jnp.where(ok, nb, 1.0)
    rad = 2.0 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v))
    return jnp.where(ok, jnp.degrees(rad), jnp.nan)


def norm_ratio(a: Any, b: Any) -> Float[Array, ""]:
    """``|a| / |b|`` (Euclidean/Frobenius norms of the flattened arrays); inf when ``b`` is 0."""
    return jnp.linalg.norm(_flat(a)) / jnp.linalg.norm(_flat(b))


def lillicrap_criterion(
    error: Float[Array, "batch dout"], w: Float[Array, "din dout"], b: Float[Array, "din dout"]
) -> Float[Array, ""]:
    r"""Fraction of examples with ``e^T W B e > 0`` (Lillicrap et al. 2016), row-major.

    Args:
      error: ``(batch, dout)`` error at the layer's output (one row per example).
      w: ``(din, dout)``: the forward weights reading the hidden layer (or, for DFA, the product
        ``P_l`` of the downstream weights).
      b: ``(din, dout)``: the feedback the rule uses in their place (``B_l`` for FA, ``B_l^T``
        for DFA).

    Returns:
      The fraction of rows with ``<e W^T, e B^T> > 0``: the rule's hidden signal ``e B^T`` and
      backprop's ``e W^T`` point within 90 degrees of each other.
    """
    c = jnp.sum((error @ w.T) * (error @ b.T), axis=-1)
    return jnp.mean((c > 0).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Layers


def _is_dense(params: Params) -> bool:
    return isinstance(params, (list, tuple)) and all(
        isinstance(p, dict) and "w" in p and getattr(p["w"], "ndim", 0) == 2 for p in params)


def layer_vectors(tree: Any) -> list[Any]:
    """Splits a parameter-shaped pytree into one entry per layer for the per-layer metrics.

    A list of ``{"w": ..., "b": ...}`` dicts gives the weights ``w`` of each layer (biases are
    left out, as in the papers' ``Delta W``); another list or tuple gives each element (all its
    leaves); anything else is one layer.
    """
    if isinstance(tree, (list, tuple)):
        return [p["w"] if isinstance(p, dict) and "w" in p else p for p in tree]
    return [tree]


def update_gradient_metrics(updates: Params, grads: Params) -> dict[str, Float[Array, ""]]:
    """Per layer ``i``: ``update_angle_l{i}`` (degrees) and ``update_norm_ratio_l{i}``.

    ``updates`` is a rule's update and ``grads`` the true gradient ``jax.grad(loss)(params)``
    on the same batch, both with the gradient's sign. Layers with a zero update (e.g. the
    frozen hidden layers of a "shallow" learner) get a NaN angle and a ratio of 0.
    """
    out = {}
    for i, (u, g) in enumerate(zip(layer_vectors(updates), layer_vectors(grads), strict=True)):
        if u is None or g is None or not jax.tree.leaves(g):
            continue
        out[f"update_angle_l{i}"] = angle(u, g)
        out[f"update_norm_ratio_l{i}"] = norm_ratio(u, g)
    return out


def downstream_products(params: Params) -> list[Float[Array, "n_l n_out"] | None]:
    """``P_l = W_{l+1} @ ... @ W_{L-1}`` (shape ``(n_l, n_out)``) for hidden layers, None last."""
    ws = [p["w"] for p in params]
    out: list[Array | None] = [None] * len(ws)
    prod = None
    for i in range(len(ws) - 1, 0, -1):
        prod = ws[i] if prod is None else ws[i] @ prod
        out[i - 1] = prod
    return out


def feedback_matrices(
    params: Params, feedback: Sequence[Float[Array, " ..."] | None], kind: str
) -> list[tuple[int, Float[Array, "rows cols"], Float[Array, "rows cols"]]]:
    """``[(l, B_l, W_l or P_l^T), ...]``: each layer's effective feedback and its target.

    See the module docstring for the orientation of each ``kind`` (``"fa"``, ``"sign"``,
    ``"dfa"``). The two matrices of a pair always have the same shape.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown feedback kind {kind!r}; valid: {', '.join(KINDS)}")
    if not _is_dense(params):
        raise TypeError("feedback metrics need an MLP's params: a list of {'w': (din, dout)} "
                        "dicts")
    ws = [p["w"] for p in params]
    if len(feedback) != len(ws):
        raise ValueError(f"{len(feedback)} feedback entries for {len(ws)} layers")
    pairs = []
    if kind in ("fa", "sign"):
        for i in range(1, len(ws)):
            b = feedback[i]
            if b is None:
                continue
            if kind == "sign":
                b = jnp.sign(ws[i]) * b
            pairs.append((i, b, ws[i]))
    else:
        for i, p in enumerate(downstream_products(params)):
            if p is None or feedback[i] is None:
                continue
            pairs.append((i, feedback[i], p.T))
    for i, b, t in pairs:
        if b.shape != t.shape:
            raise ValueError(f"{kind}: feedback of layer {i} has shape {tuple(b.shape)}, "
                             f"expected {tuple(t.shape)}; is kind={kind!r} right for this rule?")
    return pairs


def rule_deltas(
    params: Params,
    feedback: Sequence[Float[Array, " ..."] | None],
    kind: str,
    tape: Tape,
    error: Float[Array, "batch n_out"],
) -> list[Float[Array, "batch n_l"]]:
    """The per-example errors ``delta_l`` the rule computes at each layer's pre-activation.

    FA/sign: ``delta_{l-1} = (delta_l B_l^T) * f'(a_{l-1})``; DFA: ``delta_l = (e B_l) *
    f'(a_l)`` for a layer with feedback and backprop's ``(delta_{l+1} W_{l+1}^T) * f'(a_l)``
    for one without (inside a module of modular DFA); both start from ``delta_{L-1} = error *
    f'(a_{L-1})``.
    """
    pairs = {i: b for i, b, _ in feedback_matrices(params, feedback, kind)}
    n = len(params)
    deltas: list[Array] = [None] * n  # type: ignore[list-item]
    deltas[-1] = error * tape.derivs[-1]
    for i in range(n - 1, 0, -1):
        if kind == "dfa" and i - 1 in pairs:
            deltas[i - 1] = (deltas[-1] @ pairs[i - 1]) * tape.derivs[i - 1]
        elif kind == "dfa":  # no tap (inside a modular-DFA module): backprop from above
            deltas[i - 1] = (deltas[i] @ params[i]["w"].T) * tape.derivs[i - 1]
        else:
            deltas[i - 1] = (deltas[i] @ pairs[i].T) * tape.derivs[i - 1]
    return deltas


def feedback_metrics(
    params: Params,
    feedback: Sequence[Float[Array, " ..."] | None],
    kind: str,
    tape: Tape | None = None,
    error: Float[Array, "batch n_out"] | None = None,
) -> dict[str, Float[Array, ""]]:
    """Per layer ``l`` with feedback: ``feedback_angle_l{l}``, ``feedback_norm_ratio_l{l}`` and,
    given the ``tape`` and output ``error`` of a batch, ``criterion_l{l}``.

    ``feedback_angle`` is the angle between ``B_l`` and ``W_l`` (FA/sign) or between ``B_l``
    and ``P_l^T`` (DFA); ``feedback_norm_ratio`` is ``|B_l| / |W_l|`` (or ``/ |P_l|``);
    ``criterion`` is the fraction of the batch satisfying the Lillicrap criterion (module
    docstring).
    """
    pairs = feedback_matrices(params, feedback, kind)
    out = {}
    for i, b, t in pairs:
        out[f"feedback_angle_l{i}"] = angle(b, t)
        out[f"feedback_norm_ratio_l{i}"] = norm_ratio(b, t)
    if tape is not None and error is not None:
        deltas = rule_deltas(params, feedback, kind, tape, error)
        for i, b, t in pairs:
            if kind == "dfa":  # hidden layer i hears e B_i; backprop (linearised) e P_i
                out[f"criterion_l{i}"] = lillicrap_criterion(deltas[-1], t.T, b.T)
            else:  # layer i sends delta_i B_i^T down; backprop would send delta_i W_i^T
                out[f"criterion_l{i}"] = lillicrap_criterion(deltas[i], t, b)
    return out


# ----------------------------------------------------------------------------------------------
# The probe for `fit`


def _backward(rule_obj: TapeRule | None, feedback: Any) -> Any:
    """The rule's `Backward` for ``feedback`` (None for a rule without one). One stand-in label:
    rules whose backward reads the targets (DRTP, BDFA) build it too."""
    if rule_obj is None or rule_obj.backward is None or feedback is None:
        return None
    return rule_obj.backward(feedback, jnp.zeros((1,), jnp.int32))


def layer_feedback(rule: TapeRule | None, feedback: Any) -> Any:
    """The per-layer feedback matrices of ``feedback`` (`fbalign.rules.rule_feedback`) as the
    rule's `Backward` holds them: modular DFA's rule feedback also carries grouped kernels,
    its Backward's ``feedback`` is the per-layer ``B_l`` (None inside modules) that
    `feedback_metrics` compares; any other rule's is ``feedback`` itself."""
    return getattr(_backward(rule, feedback), "feedback", feedback)


def feedback_kind(
    rule: TapeRule | str, params: Params, rule_state: Any, feedback: Any = None
) -> str | None:
    """The feedback layout of a rule: the ``kind`` (``"fa"``, ``"sign"``, ``"dfa"``) of the
    `Backward` its ``jax.grad`` form builds, else (a rule without one) guessed from the shapes
    of its feedback (``feedback``, else `fbalign.rules.rule_feedback` of the rule and state):
    ``"fa"`` or ``"dfa"``; None when there is none to read.

    Sign symmetry stores magnitudes of ``W``'s shape, which look like FA feedback; its
    `Backward` says ``"sign"``.
    """
    rule_obj = get_rule(rule) if isinstance(rule, str) and rule in RULES else rule
    if not isinstance(rule_obj, TapeRule):
        rule_obj = None
    if feedback is None:
        feedback = (rule_feedback(rule_obj, params, rule_state) if rule_obj is not None
                    else getattr(rule_state, "feedback", None))
    backward = _backward(rule_obj, feedback)
    feedback = getattr(backward, "feedback", feedback)
    if feedback is None or not _is_dense(params) or len(feedback) != len(params):
        return None
    if backward is not None:
        return backward.kind
    ws = [p["w"] for p in params]
    fb = list(feedback)
    if len(ws) < 2:
        return None
    if fb[0] is None and all(getattr(b, "shape", None) == w.shape
                             for b, w in zip(fb[1:], ws[1:], strict=True)):
        return "fa"
    n_out = ws[-1].shape[1]
    if fb[-1] is None and all(getattr(b, "shape", None) == (n_out, w.shape[1])
                              for b, w in zip(fb[:-1], ws[:-1], strict=True)):
        return "dfa"
    return None


def make_alignment_probe(
    model: Any,
    rule: TapeRule | str,
    loss: Loss | str,
    x: Float[Array, "batch ..."],
    y: Target,
    *,
    kind: str | None = "auto",
    rule_kwargs: dict | None = None,
    jit: bool = True,
    index: Int[Array, " batch"] | None = None,
) -> Callable[[Any], dict[str, Float[Array, "*seeds"]]]:
    """Builds ``probe_fn(state) -> dict`` of alignment metrics on the fixed batch ``(x, y)``.

    Use it with `fbalign.train.fit` (``probe_fn=..., probe_every=N``): every ``N`` steps it
    computes, from the current state,

    * ``probe_loss``: the loss on the probe batch;
    * per layer ``i``: ``update_angle_l{i}`` and ``update_norm_ratio_l{i}`` between the rule's
      update and the true gradient on the batch (`update_gradient_metrics`);
    * per layer with feedback: ``feedback_angle_l{i}``, ``feedback_norm_ratio_l{i}`` and
      ``criterion_l{i}`` (`feedback_metrics`).

    A state with a leading seed axis (``fit(..., seeds=K)``) is handled with ``vmap``: every
    value then has shape ``(K,)``. The rule state is read, never advanced.

    Args:
      model: the model trained (``forward`` for the explicit form; ``apply`` for the gradient).
        Models without ``forward`` use the rule's ``jax.grad`` form (its `Backward`).
      rule: the rule (or registered name, built with ``rule_kwargs``) that ``fit`` trains with;
        its feedback is read from the state, so only its hyperparameters must match.
      loss: a loss ``(output, target) -> scalar`` or its name.
      x, y: the fixed probe batch.
      kind: ``"fa"``, ``"sign"``, ``"dfa"``, None (no feedback metrics) or ``"auto"``
        (`feedback_kind`).
      jit: compile the probe.
      index: the probe examples' positions in the training set (`Batch.index`), for rules that
        keep per-example state (ADMM); their rows are read, never written.
    """
    tape_rule = get_rule(rule, **(rule_kwargs or {})) if isinstance(rule, str) else rule
    if not isinstance(tape_rule, TapeRule):
        tape_rule = None  # a rule with a step of its own: no feedback to read
    explicit = hasattr(model, "forward") and tape_rule is not None
    form = "grad" if tape_rule is not None and not explicit else "explicit"
    stepper = as_learning_rule(rule, form, rule_kwargs if isinstance(rule, str)
                               else None)
    loss_fn = get_loss(loss) if isinstance(loss, str) else loss
    if kind not in (None, "auto") and kind not in KINDS:
        raise ValueError(f"unknown feedback kind {kind!r}; valid: {', '.join(KINDS)}, auto, None")
    x, y = jnp.asarray(x), jnp.asarray(y)
    index = None if index is None else jnp.asarray(index)
    context = StepContext(model, loss_fn)

    def one(state) -> dict[str, Array]:
        params, rule_state = state.params, state.rule_state
        feedback = (rule_feedback(tape_rule, params, rule_state) if tape_rule is not None
                    else None)
        k = feedback_kind(rule, params, rule_state, feedback) if kind == "auto" else kind
        feedback = layer_feedback(tape_rule, feedback)
        tape = err = None
        if explicit:  # keep the tape and error: the Lillicrap criterion reads them
            out, tape = model.forward(params, x)
            loss_val, err = jax.value_and_grad(lambda o: loss_fn(o, y))(out)
            updates, _ = tape_rule.update(params, rule_state, tape, err, key=state.key,
                                          labels=y)
        else:
            updates, _, output = stepper.step(params, rule_state, Batch(x, y, index), state.key,
                                              context)
            loss_val = output.loss
        grads = jax.grad(lambda p: loss_fn(model.apply(p, x), y))(params)
        m = {"probe_loss": loss_val}
        m.update(update_gradient_metrics(updates, grads))
        if k is not None and feedback is not None:
            m.update(feedback_metrics(params, feedback, k, tape, err))
        return m

    def probe(state) -> dict[str, Array]:
        if jnp.ndim(state.step) == 1:  # a seed ensemble: leading axis on every leaf
            return jax.vmap(one)(state)
        return one(state)

    return jax.jit(probe) if jit else probe
