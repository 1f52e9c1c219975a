"""Core types shared by every rule: `LearningRule` (the step protocol), `TapeRule`, `Tape`,
`Batch`, `StepContext`, `StepOutput`, and the orientation of B.

Conventions (stated once here, tested in ``tests/test_base.py``):

* **Layout.** Activations are row-major: a batch of inputs to layer ``l`` is ``x_l`` with shape
  ``(batch, din)``; a dense layer computes ``a_l = x_l @ W_l + b_l`` with ``W_l`` of shape
  ``(din, dout)`` and ``h_l = f(a_l)``.
* **Updates use the gradient's sign.** ``rule.update`` returns a pytree shaped like ``params``
  that plays the role of ``jax.grad(loss)(params)``; ``optax`` descends along it.
* **Feedback alignment (FA).** ``B_l`` has the shape of ``W_l`` (``din x dout``). The error
  ``delta_l = dL/da_l`` travels to the layer below as ``delta_l @ B_l.T`` (backprop would use
  ``delta_l @ W_l.T``). So ``B_l = W_l`` is exactly backprop.
* **Direct feedback alignment (DFA).** ``B_l`` has shape ``(n_out, n_l)``: hidden layer ``l``
  receives ``e @ B_l`` where ``e = dL/da_L`` is the output error. With one hidden layer,
  ``B_1 = W_out.T`` is exactly backprop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Float, Int

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays
Updates = Any  # a pytree shaped like Params
RuleState = Any  # a pytree (usually a NamedTuple) of arrays


@jax.tree_util.register_static
class Links:
    """How the layers of a recorded forward pass connect when they are not a dense chain.

    Static (no arrays; part of the tree structure, so a `Tape` holding one passes through
    ``jit``). ``ops[l](x, w)`` is layer ``l``'s linear map without bias (a convolution, ``x @
    w``...) and ``between[l]`` maps the previous layer's activity ``h_{l-1}`` to this layer's
    input ``x_l`` (pooling, flattening; None for the identity; ``between[0]`` is None).
    """

    __slots__ = ("ops", "between")

    def __init__(self, ops: Sequence[Callable[[Array, Array], Array]],
                 between: Sequence[Callable[[Array], Array] | None]):
        if len(ops) != len(between):
            raise ValueError(f"Links needs one op and one between per layer, got {len(ops)} ops "
                             f"and {len(between)} betweens")
        self.ops, self.between = tuple(ops), tuple(between)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Links) and (self.ops, self.between) == (other.ops,
                                                                        other.between)

    def __hash__(self) -> int:
        return hash((self.ops, self.between))


class Tape(NamedTuple):
    """What a layered forward pass records for the explicit form of a rule.

    For a chain of ``L`` layers ``a_l = op_l(x_l, W_l) + b_l``, ``h_l = f_l(a_l)``, ``x_{l+1} =
    g_{l+1}(h_l)`` (``op`` is ``x @ W`` and ``g`` the identity for a dense chain; a conv net
    has convolutions, and pooling or flattening as ``g``):

    Attributes:
      inputs: ``(x_0, ..., x_{L-1})``, the input to each layer, each ``(batch, *in_shape_l)``.
      preacts: ``(a_0, ..., a_{L-1})``, each ``(batch, *out_shape_l)``.
      derivs: ``(f_0'(a_0), ..., f_{L-1}'(a_{L-1}))``, the elementwise activation derivatives.
      output: ``h_{L-1}``, the network output ``y`` (what the loss sees).
      links: None for a dense chain; else the layers' ops and ``g``s (`Links`).
      hidden: None for a dense chain (``h_l = x_{l+1}``); else ``(h_0, ..., h_{L-2})``, the
        hidden activities before ``g`` (what `send_back` differentiates ``g`` at).

    Rules written with `chain_updates`, `send_back`, `weight_grads` and `activity` run on any
    such chain; on a dense one they are the plain matrix products.
    """

    inputs: tuple[Float[Array, " batch *in_l"], ...]
    preacts: tuple[Float[Array, " batch *out_l"], ...]
    derivs: tuple[Float[Array, " batch *out_l"], ...]
    output: Float[Array, "batch n_out"]
    links: Links | None = None
    hidden: tuple[Float[Array, " batch *out_l"], ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.inputs)

    @property
    def is_dense(self) -> bool:
        """Whether the tape is of a dense chain (``x_l @ W_l``, no ops between layers)."""
        return self.links is None

    def activity(self, i: int) -> Array:
        """``h_i = f_i(a_i)``, hidden layer ``i``'s activity (before pooling or flattening)."""
        return self.inputs[i + 1] if self.hidden is None else self.hidden[i]

    def send_back(self, i: int, delta: Array, m: Array) -> Array:
        """The error layer ``i`` sends to ``h_{i-1}`` through ``m`` in place of ``W_i``:
        ``delta @ m.T`` on a dense chain, else the transpose of ``op_i(., m)`` at ``delta``
        followed by the VJP of the ``g_i`` between the layers (pooling, flattening)."""
        if self.links is None:
            return delta @ m.T
        op, between = self.links.ops[i], self.links.between[i]
        g = jax.vjp(lambda x: op(x, m), self.inputs[i])[1](delta)[0]
        if between is not None:
            g = jax.vjp(between, self.activity(i - 1))[1](g)[0]
        return g

    def weight_grads(self, i: int, delta: Array, w: Array, has_bias: bool) -> dict[str, Array]:
        """Layer ``i``'s local update for ``delta = dL/da_i``: ``{"w": x_i^T delta, "b": sum
        delta}`` on a dense chain, else the VJP of ``op_i(x_i, .)`` and ``delta`` summed over
        every axis but the channels."""
        if self.links is None:
            return dense_grads(self.inputs[i], delta, has_bias)
        op, x = self.links.ops[i], self.inputs[i]
        out = {"w": jax.vjp(lambda v: op(x, v), w)[1](delta)[0]}
        if has_bias:
            out["b"] = jnp.sum(delta, axis=tuple(range(delta.ndim - 1)))
        return out

    def layer_ops(self) -> tuple[LayerOp, ...] | None:
        """The layers as `LayerOp` s (op and per-example input shape); None for a dense chain."""
        if self.links is None:
            return None
        return tuple(LayerOp(op, tuple(x.shape[1:]))
                     for op, x in zip(self.links.ops, self.inputs, strict=True))

    def require_dense(self, rule: str, why: str) -> None:
        """Raises naming ``rule`` when the tape is not of a dense chain (``why``: what of the
        rule is stated for dense layers only, and what to use instead)."""
        if self.links is not None:
            raise NotImplementedError(f"{rule}'s explicit form is stated for dense layers: {why}")


class InitFn(Protocol):
    def __call__(self, key: PRNGKey, params: Params) -> RuleState: ...


class UpdateFn(Protocol):
    def __call__(
        self, params: Params, state: RuleState, tape: Tape, error: Array, **extra: Any
    ) -> tuple[Updates, RuleState]: ...


class LayerOp(NamedTuple):
    """One weight layer as a rule's grad-form state update sees it (``model.layer_ops()``).

    Attributes:
      op: ``op(x, w)``, the layer's linear map without bias, linear in ``x`` and in ``w``
        (``x @ w`` for a dense layer, the convolution for a conv layer).
      input_shape: the per-example shape of ``x`` (``(din,)``, or ``(H, W, C)`` for a conv).
    """

    op: Callable[[Array, Array], Array]
    input_shape: tuple[int, ...]


class AdvanceFn(Protocol):
    def __call__(
        self,
        params: Params,
        state: RuleState,
        updates: Updates,
        feedback_grads: Any,
        *,
        key: PRNGKey,
        layers: Sequence[LayerOp] | None,
    ) -> tuple[Updates, RuleState]: ...


FeedbackFn = Callable[[Params, RuleState], Any]
# backward(feedback, labels) -> a `fbalign._src.backward.Backward` for the network's apply
BackwardFn = Callable[[Any, Any], Any]


class TapeRule(NamedTuple):
    """A rule stated on a recorded forward pass: ``update(params, state, tape, error)``.

    The feedback-alignment family and synthetic gradients are tape rules, pure functions shaped
    like ``optax.GradientTransformation``. `explicit` and `through_primitives` (in
    ``fbalign.rules``) lift one into a `LearningRule`; the harness does that itself (``form=``).

    Attributes:
      init: ``init(key, params) -> state`` draws feedback matrices and any other rule state.
      update: ``update(params, state, tape, error, **extra) -> (updates, state)`` computes the
        rule's parameter updates (gradient sign) from the activations recorded on ``tape`` and
        the output error ``error = dL/dy``. Optional keyword ``key`` feeds rules that draw
        randomness per step; rules ignore keywords they do not use.
      advance: None for rules whose state does not change, or whose change needs the explicit
        form. Otherwise the state update of the rule's ``jax.grad`` form, for any model (dense,
        conv): ``advance(params, state, updates, feedback_grads, *, key, layers) -> (updates,
        state)`` gets the updates ``jax.grad`` returned through the primitives (computed with
        ``state.feedback``), ``jax.grad``'s cotangent for ``state.feedback`` (Kolen-Pollack's
        and ARBP's primitives put the feedback's own update there), a PRNG key and the model's
        `LayerOp` list, and returns the final updates and the next state. The explicit
        ``update`` and ``advance`` agree on dense networks (tested).
      feedback: None when the state stores its feedback arrays as ``state.feedback``.
        Otherwise ``feedback(params, state)`` computes them, for rules whose state keeps a
        recipe instead (brSF keeps the key its magnitudes are hashed from, so that no
        weight-sized array is written every step). The ``jax.grad`` form and the diagnostics
        read the feedback through `rule_feedback`.
      backward: None for rules without a ``jax.grad`` form. Otherwise ``backward(feedback,
        labels)`` builds the `fbalign._src.backward.Backward` that the network's ``apply``
        (``backward=``) runs so that ``jax.grad`` returns the rule's updates: the rule decides
        what each layer sends back, in its own file.
    """

    init: InitFn
    update: UpdateFn
    advance: AdvanceFn | None = None
    feedback: FeedbackFn | None = None
    backward: BackwardFn | None = None


class Batch(NamedTuple):
    """What one training step sees of the data.

    Attributes:
      x: the inputs, ``(batch, ...)`` (time-major ``(T, batch, din)`` for recurrent nets).
      y: the targets (class indices or arrays of the output's shape).
      index: the examples' positions in the training set, ``(batch,)`` ints, for rules that keep
        per-example state (ADMM, alternating minimisation); None where the caller has none.
    """

    x: Float[Array, " batch *in"]
    y: Int[Array, " batch"] | Float[Array, "batch n_out"]
    index: Int[Array, " batch"] | None = None


class StepContext(NamedTuple):
    """What a rule's step is told about the problem; static (closed over, never traced).

    Attributes:
      network: the model: an fbalign network (``init``, ``apply`` and, for tape rules, the layer
        structure: ``forward`` recording a `Tape`), or a wrapped Flax/Equinox model or function
        (``fbalign.models.as_network``).
      loss: ``loss(output, target) -> scalar``, the batch mean.
      axis_name: the data-parallel axis inside ``shard_map``/``pmap``, else None. Rules whose
        statistics are not batch means (kernels, fitness) reduce over it themselves; the
        harness averages updates, changed state and metrics over it.
    """

    network: Any
    loss: Callable[[Array, Array], Array]
    axis_name: str | None = None


class StepOutput(NamedTuple):
    """What a step reports besides its updates: the batch loss, the network output the loss saw,
    and any rule-specific scalars (``metrics``, averaged and logged by the harness)."""

    loss: Float[Array, ""]
    output: Float[Array, "batch n_out"]
    metrics: dict[str, Float[Array, ""]] | None = None


class LearningRule(NamedTuple):
    """The one rule protocol the harness, the CLI and the registry know.

    A rule owns its training step, given the network, the loss and the batch. That covers rules
    with a different backward pass (feedback alignment: `TapeRule` lifted by `explicit` or
    `through_primitives`), rules that only evaluate the loss (forward gradient, evolution
    strategies), and rules with phases or inner loops (target, equilibrium propagation).

    Attributes:
      init: ``init(key, params, network) -> state``: feedback matrices, auxiliary parameters and
        anything else the rule keeps, drawn knowing the network.
      step: ``step(params, state, batch, key, context) -> (updates, state, output)`` with a
        `Batch`, a PRNG key and a static `StepContext`. ``updates`` has the gradient's sign and
        the params' structure, so any optax optimizer applies it; ``output`` is a `StepOutput`.
      requires: what the rule needs of the network beyond ``init``/``apply``, as attribute names
        (``("forward",)`` for rules that read a recorded `Tape`). The harness checks them once
        (`check_network`) and names the rule and what is missing.
      name: a short name for messages.
      predict: ``predict(network, params, x) -> scores``, ``(batch, n_out)``, for rules whose
        network answers otherwise than by ``network.apply(params, x)`` (forward-forward: the
        label of highest goodness). Evaluation in `fbalign.train.fit` and `evaluate` uses it;
        None means ``network.apply``.
    """

    init: Callable[[PRNGKey, Params, Any], RuleState]
    step: Callable[[Params, RuleState, Batch, PRNGKey, StepContext],
                   tuple[Updates, RuleState, StepOutput]]
    requires: tuple[str, ...] = ()
    name: str = "rule"
    predict: Callable[[Any, Params, Array], Array] | None = None


def check_network(rule: LearningRule, network: Any) -> None:
    """Raises a `TypeError` naming the rule and what it needs when ``network`` lacks
    ``init``/``apply`` or a requirement in ``rule.requires``: a method name (``"forward"``), or
    ``"layer_structure"`` (fbalign's layered networks; wrapped Flax/Equinox models and plain
    functions set ``layer_structure = False``). Call once per run."""

    def has(attr: str) -> bool:
        value = getattr(network, attr, None)
        return value is True if attr == "layer_structure" else callable(value)

    missing = [a for a in ("init", "apply", *rule.requires) if not has(a)]
    if not missing:
        return
    what = type(network).__name__
    if {"init", "apply"} & set(missing):
        hint = ("Wrap the model with fbalign.models.as_network (Flax NNX/Linen, Equinox) or "
                "fbalign.models.from_function(apply, init).")
    else:
        hint = ("Tape rules send their error through the layers of an fbalign network "
                "(fbalign.models.mlp, lenet5, rnn), whose forward records the activations; a "
                "wrapped Flax/Equinox model or a plain function trains with rules that only "
                "evaluate the network (bp, fg), or convert its layers with "
                "fbalign.flax.convert.")
    raise TypeError(f"rule {rule.name!r} needs a network with {', '.join(missing)}; {what} has "
                    f"none. {hint}")


def rule_feedback(rule: TapeRule, params: Params, state: RuleState) -> Any:
    """The feedback a rule's ``jax.grad`` form passes to the model's ``apply``:
    ``rule.feedback(params, state)`` if the rule computes it, else ``state.feedback`` (None when
    the state has none, as for backprop)."""
    if rule.feedback is not None:
        return rule.feedback(params, state)
    return getattr(state, "feedback", None)


class EmptyState(NamedTuple):
    """State of a rule that keeps none (backprop)."""


class FeedbackShapeError(ValueError):
    """A feedback matrix does not have the shape the rule requires."""


class FeedbackDtypeError(ValueError, TypeError):
    """Feedback (or other rule state) does not have the params' floating-point dtype."""


def check_state_dtypes(params: Params, state: RuleState, rule: str | None = None) -> None:
    """Raises `FeedbackDtypeError` when a floating-point leaf of the rule ``state`` has another
    dtype than the params (e.g. float16 params with float32 feedback), naming both leaves.

    Mixed dtypes would otherwise promote the error signal silently (or fail deep inside a
    ``custom_vjp``). Integer and key leaves (counters, PRNG keys) are not checked.
    """
    p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    floats = [(p, a) for p, a in p_flat if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    if not floats:
        return
    want = jnp.result_type(floats[0][1])
    for _, a in floats:
        if jnp.result_type(a) != want:
            return  # params of mixed precision: no single dtype to hold the state to
    for path, a in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating):
            continue
        if jnp.dtype(a.dtype) != want:
            raise FeedbackDtypeError(
                f"{rule + ': ' if rule else ''}rule state{jax.tree_util.keystr(path)} has dtype "
                f"{jnp.dtype(a.dtype)} "
                f"but the params (e.g. params{jax.tree_util.keystr(floats[0][0])}) have dtype "
                f"{want}; build the state with rule.init(key, params) from params of the dtype "
                f"you train in, or cast one to the other."
            )


def check_feedback_shapes(
    feedback: Sequence[Array | None],
    expected: Sequence[tuple[int, ...] | None],
    rule: str,
    orientation: str,
    *,
    dtype: Any = None,
) -> None:
    """Raises `FeedbackShapeError` naming the first layer whose feedback has the wrong shape
    (or, when ``dtype`` is given, the wrong dtype: feedback must share the params' dtype).

    Shapes and dtypes are static under ``jit``, so this check costs nothing at run time.
    """
    if len(feedback) != len(expected):
        raise FeedbackShapeError(
            f"{rule}: got {len(feedback)} feedback matrices for a network that needs "
            f"{len(expected)} (one per layer; entries for layers without feedback are None)."
        )
    for i, (b, shape) in enumerate(zip(feedback, expected, strict=True)):
        if shape is None:
            continue
        if b is None:
            raise FeedbackShapeError(f"{rule}: layer {i} needs a feedback matrix of shape "
                                     f"{shape} ({orientation}) but got None.")
        if tuple(b.shape) != tuple(shape):
            hint = ""
            if tuple(b.shape) == tuple(shape)[::-1]:
                hint = " It looks transposed."
            raise FeedbackShapeError(
                f"{rule}: feedback for layer {i} has shape {tuple(b.shape)}, expected {shape} "
                f"({orientation}).{hint}"
            )
        if dtype is not None and jnp.dtype(b.dtype) != jnp.dtype(dtype):
            raise FeedbackDtypeError(
                f"{rule}: feedback for layer {i} has dtype {jnp.dtype(b.dtype)} but the params "
                f"have dtype {jnp.dtype(dtype)}; draw the feedback from params of the right dtype "
                f"(rule.init(key, params)) or cast it (b.astype(jnp.{jnp.dtype(dtype)}))."
            )


def descend_feedback(
    feedback: Sequence[Array | None], feedback_grads: Sequence[Array | None], learning_rate: float
) -> tuple[Array | None, ...]:
    """``B_l - learning_rate * g_l`` for every feedback entry (None stays None): the grad-form
    state update of rules whose feedback learns from its own cotangent (ARBP, ASRBP, BDFA)."""
    return tuple(
        None if b is None else b - learning_rate * g
        for b, g in zip(feedback, feedback_grads, strict=True)
    )


def descending_advance(make_state: Callable[[tuple], RuleState], learning_rate: float):
    """The ``advance`` of a rule whose feedback descends its own ``jax.grad`` cotangent:
    ``make_state(descend_feedback(state.feedback, feedback_grads, learning_rate))``, updates
    unchanged. ARBP and ASRBP (their primitives hand each channel its local update, Baldi et al.
    2018) and BDFA (its taps hand each B_l the gradient of its backward loss, Luo et al. 2017)."""

    def advance(params: Params, state: RuleState, updates: Updates, feedback_grads: Any, *,
                key: PRNGKey | None = None, layers: Any = None) -> tuple[Updates, RuleState]:
        del params, key, layers
        return updates, make_state(descend_feedback(state.feedback, feedback_grads,
                                                    learning_rate))

    return advance


def dense_layers(params: Params) -> list[tuple[Array, Array | None]]:
    """Reads ``[(W_0, b_0), ...]`` from an MLP parameter list of ``{"w": ..., "b": ...}`` dicts."""
    if not isinstance(params, (list, tuple)) or not all(
        isinstance(p, dict) and "w" in p for p in params
    ):
        raise TypeError(
            "expected params as a list of {'w': (din, dout), 'b': (dout,)} dicts, one per layer "
            f"(as made by fbalign.models.mlp), got {jax.tree_util.tree_structure(params)}"
        )
    return [(p["w"], p.get("b")) for p in params]


def dense_grads(x: Array, delta: Array, has_bias: bool) -> dict[str, Array]:
    """``{"w": x^T delta, "b": sum_batch delta}``: the local weight update of a dense layer."""
    out = {"w": x.T @ delta}
    if has_bias:
        out["b"] = jnp.sum(delta, axis=0)
    return out


ErrorFn = Callable[[Array, Array], Array]


def chain_updates(
    params: Params,
    tape: Tape,
    error: Array,
    send_back: Callable[[int, Array], Array],
) -> list[dict[str, Array]]:
    """Walks a chain of layers from the top, the skeleton every layer-local rule shares.

    ``delta_{L-1} = error * f'(a_{L-1})``; layer ``l`` gets ``x_l^T delta_l`` (and
    ``sum delta_l`` for its bias; `Tape.weight_grads`, a convolution's weight VJP on conv
    nets); the layer below gets ``delta_{l-1} = send_back(l, delta_l) * f'(a_{l-1})``.
    ``send_back`` is what distinguishes backprop (``tape.send_back(l, delta, W_l)``: ``delta @
    W_l.T`` on a dense chain), feedback alignment (``B_l`` in place of ``W_l``) and direct
    feedback alignment (``e @ B_{l-1}``, shaped like ``a_{l-1}``).
    """
    layers = dense_layers(params)
    if len(layers) != tape.num_layers:
        raise ValueError(
            f"params have {len(layers)} layers but the tape recorded {tape.num_layers}; "
            "was the tape made by the same model?"
        )
    if error.shape != tape.output.shape:
        raise ValueError(
            f"error has shape {tuple(error.shape)} but the network output has shape "
            f"{tuple(tape.output.shape)}; pass error = dL/dy for the output y."
        )
    delta = error * tape.derivs[-1]
    updates: list[dict[str, Array]] = [None] * len(layers)  # type: ignore[list-item]
    for i in reversed(range(len(layers))):
        updates[i] = tape.weight_grads(i, delta, layers[i][0], layers[i][1] is not None)
        if i > 0:
            delta = send_back(i, delta) * tape.derivs[i - 1]
    return updates


def forwards_options(callee: Callable, fixed: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Declares that a rule constructor passes its ``**kwargs`` on to ``callee`` with the
    options ``fixed`` set by itself (``dni`` -> ``synthetic_gradients(conditioned=False)``), so
    that `rule_options` lists ``callee``'s other options for ``--rule-arg``."""

    def mark(fn: Callable) -> Callable:
        fn.forwards_options = (callee, tuple(fixed))
        return fn

    return mark
