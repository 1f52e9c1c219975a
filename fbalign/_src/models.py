"""A functional multi-layer perceptron that records a `Tape` and runs every rule's backward."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Float

from fbalign._src.activations import ACTIVATIONS, derivative, get_activation  # noqa: F401
from fbalign._src.backward import Backward
from fbalign._src.base import Array, LayerOp, Links, Params, PRNGKey, Tape
from fbalign._src.modes import MODES, backward_for_mode

BACKWARD_MODES = MODES  # the legacy mode strings `apply` reads (`backward_for_mode`)


def matmul(x: Array, w: Array) -> Array:
    """``x @ w``, the dense layers' linear op (one function object, so `feedback_op` caches)."""
    return jnp.matmul(x, w)


@dataclasses.dataclass(frozen=True)
class MLP:
    """A dense network ``h_{l} = f_l(h_{l-1} @ W_l + b_l)``; params are ``[{"w", "b"}, ...]``.

    Use `mlp` to build one. Two forms:

    * ``forward(params, x) -> (y, tape)`` records the activations for ``rule.update``;
    * ``apply(params, x, feedback=..., mode=...)`` is an ordinary forward whose ``jax.grad``
      runs a rule's backward through the primitives in `fbalign.ops`.
    """

    layer_structure = True  # rules that send errors through layers can use it

    sizes: tuple[int, ...]
    activation: str = "tanh"
    output_activation: str = "linear"
    use_bias: bool = True
    kernel_init: Callable[..., Array] | None = None

    def __post_init__(self):
        if len(self.sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {self.sizes}")
        for s in self.sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise ValueError(f"layer sizes must be positive integers, got {self.sizes}")
        get_activation(self.activation)
        get_activation(self.output_activation)

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def activations(self) -> list[Callable[[Array], Array]]:
        """``[f_1, ..., f_L]``: the hidden activation for every layer but the last, which gets
        the output activation."""
        hid = get_activation(self.activation)
        return [hid] * (self.num_layers - 1) + [get_activation(self.output_activation)]

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """LeCun-normal weights (He-normal for relu family), zero biases."""
        if self.kernel_init is not None:
            kinit = self.kernel_init
        elif self.activation in ("relu", "leaky_relu"):
            kinit = jax.nn.initializers.he_normal()
        else:
            kinit = jax.nn.initializers.lecun_normal()
        keys = jax.random.split(key, self.num_layers)
        params = []
        for k, din, dout in zip(keys, self.sizes[:-1], self.sizes[1:], strict=True):
            layer = {"w": kinit(k, (din, dout), dtype)}
            if self.use_bias:
                layer["b"] = jnp.zeros((dout,), dtype)
            params.append(layer)
        return params

    def layer_ops(self) -> tuple[LayerOp, ...]:
        """Each layer's ``op(x, w) = x @ w`` and input shape ``(din,)``, for rules whose
        ``jax.grad`` form updates their state layer by layer (`TapeRule.advance`)."""
        return tuple(LayerOp(matmul, (din,)) for din in self.sizes[:-1])

    def _check_input(self, x: Array) -> None:
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(
                f"MLP expects inputs of shape (batch, {self.sizes[0]}), got {tuple(x.shape)}"
                + ("; flatten images first (x.reshape(len(x), -1))" if x.ndim > 2 else "")
            )

    def forward(self, params: Params, x: Float[Array, "batch din"]
                ) -> tuple[Float[Array, "batch dout"], Tape]:
        """Forward pass returning the output and the `Tape` for ``rule.update``."""
        self._check_input(x)
        return record_layers(self.activations(), [matmul] * self.num_layers, params, x)

    def apply(
        self,
        params: Params,
        x: Float[Array, "batch din"],
        feedback: Sequence[Array | None] | None = None,
        mode: str = "bp",
        *,
        labels: Array | None = None,
        derivative: bool = True,
        error_bits: int | None = None,
        backward: Backward | None = None,
    ) -> Float[Array, "batch dout"]:
        """Forward pass whose ``jax.grad`` runs the rule's backward.

        The rule's backward is a `fbalign._src.backward.Backward` object (``backward=``), or
        built from a legacy mode string by `backward_for_mode`.

        Args:
          params: the MLP's parameters.
          x: ``(batch, sizes[0])`` inputs.
          feedback: the rule state's ``feedback`` tuple, for every mode but ``"bp"`` and
            ``"shallow"``.
          mode: ``"bp"`` (ordinary), ``"fa"`` (`fa_matmul`), ``"kp"`` (`kp_matmul`: the
            feedback's gradient is the weight's), ``"dfa"`` (`dfa_hidden`/`dfa_output` taps),
            ``"shallow"`` (only the last layer learns), ``"sign"`` (sign symmetry: ``feedback``
            holds magnitudes ``M_l`` and the error goes back through ``sign(W_l) * M_l``),
            ``"fa_noderiv"`` (``"fa"`` with ``derivative=False``), ``"drtp"`` (direct random
            target projection: the DFA taps receive ``labels`` one-hot, divided by the batch
            size, instead of the error; needs ``labels``), ``"adfa"`` (DFA whose feedback's
            gradient is ``e^T h_l``: adaptive skipped RBP) or ``"bdfa"`` (DFA whose feedback's
            gradient is that of bidirectional DFA's loss; needs ``labels``).
          labels: targets for ``"drtp"`` and ``"bdfa"`` (class indices or an array of the
            output's shape).
          derivative: if False, hidden activations pass the error with ``f'`` replaced by 1.
          error_bits: quantise the error signal reaching each hidden layer's output to this
            many bits (`fbalign._src.channel.quantize`), before ``f'``.
          backward: a `Backward` to run instead of ``feedback``/``mode``.
        """
        self._check_input(x)
        if backward is None:
            backward = backward_for_mode(
                mode, feedback, num_layers=self.num_layers, n_out=self.sizes[-1],
                batch=x.shape[0], dtype=x.dtype, labels=labels, derivative=derivative,
                error_bits=error_bits)
        return run_layers(backward, self.activations(), [matmul] * self.num_layers, params, x,
                          self.sizes[-1])


def run_layers(backward: Backward, acts: Sequence[Callable[[Array], Array]],
               ops: Sequence[Callable[[Array, Array], Array]], params: Params, x: Array,
               n_out: int, between: Callable[[int, Array], Array] | None = None) -> Array:
    """The forward of a chain of layers ``h_{i+1} = f_i(op_i(h_i, W_i) + b_i)`` with every
    backward decision left to ``backward``; ``between(i, h)`` reshapes or pools between layers
    (its VJP is the ordinary one)."""
    carrier = backward.begin(x, n_out)
    last = len(params) - 1
    h = x
    for i, (layer, f, op) in enumerate(zip(params, acts, ops, strict=True)):
        if between is not None:
            h = between(i, h)
        if i == last:
            h = backward.into_last(h)
        a = backward.linear(i, op, h, layer["w"])
        if "b" in layer:
            a = a + layer["b"]
        if i == last:
            return f(backward.output(a, carrier))
        h, carrier = backward.hidden(i, f, a, carrier)
    raise ValueError("a network needs at least one layer")


@dataclasses.dataclass(frozen=True)
class _Gap:
    """``between(i, h)`` at a fixed layer ``i``, compared by value (a `Links` entry)."""

    between: Callable[[int, Array], Array]
    i: int

    def __call__(self, h: Array) -> Array:
        return self.between(self.i, h)


def record_layers(acts: Sequence[Callable[[Array], Array]],
                  ops: Sequence[Callable[[Array, Array], Array]], params: Params, x: Array,
                  between: Callable[[int, Array], Array] | None = None,
                  gaps: Sequence[int] = ()) -> tuple[Array, Tape]:
    """The forward of the chain `run_layers` runs, recording its `Tape` for the explicit form
    of a rule: inputs, pre-activations, derivatives, and, for a chain that is not dense
    (``between`` reshaping or pooling before the layers in ``gaps``, or ops other than
    `matmul`), the hidden activities and the `Links` its rules send errors back through."""
    dense = between is None and all(op is matmul for op in ops)
    inputs, preacts, derivs, hidden = [], [], [], []
    h = x
    for i, (layer, f, op) in enumerate(zip(params, acts, ops, strict=True)):
        if i > 0:
            hidden.append(h)
        if between is not None and i in gaps:
            h = between(i, h)
        inputs.append(h)
        a = op(h, layer["w"])
        if "b" in layer:
            a = a + layer["b"]
        preacts.append(a)
        derivs.append(derivative(f, a))
        h = f(a)
    if dense:
        return h, Tape(tuple(inputs), tuple(preacts), tuple(derivs), h)
    links = Links(tuple(ops), tuple(_Gap(between, i) if i in gaps else None
                                    for i in range(len(ops))))
    return h, Tape(tuple(inputs), tuple(preacts), tuple(derivs), h, links, tuple(hidden))


def require_mlp(network: Any, rule: str, why: str) -> None:
    """Raises a `TypeError` naming ``rule`` unless ``network`` is a dense `MLP` (``why``: what of
    the rule is stated for dense layers)."""
    if not isinstance(network, MLP):
        raise TypeError(f"rule {rule!r} needs a dense fbalign.models.mlp network ({why}), got "
                        f"{type(network).__name__}")


def mlp(
    sizes: Sequence[int],
    activation: str = "tanh",
    output_activation: str = "linear",
    use_bias: bool = True,
    kernel_init: Callable[..., Array] | None = None,
) -> MLP:
    """Builds an `MLP` with layer sizes ``(din, h_1, ..., dout)``.

    Args:
      sizes: input, hidden and output widths.
      activation: hidden activation: ``tanh``, ``relu``, ``sigmoid``, ``leaky_relu``, ``linear``.
      output_activation: the output layer's activation (``linear`` gives logits).
      use_bias: whether layers have biases.
      kernel_init: a ``jax.nn.initializers`` initialiser for the weights.
    """
    return MLP(tuple(_as_size(s) for s in sizes), activation, output_activation, use_bias,
               kernel_init)


def _as_size(s: Any) -> Any:
    # numpy/JAX integers become ints; anything else (2.5, "8", True) reaches MLP's check as is,
    # so a fractional width is an error rather than silently truncated.
    if isinstance(s, bool):
        return s
    try:
        return operator.index(s)
    except TypeError:
        return s
