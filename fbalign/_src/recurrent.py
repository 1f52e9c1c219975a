"""A vanilla recurrent network under ``lax.scan`` with backprop-through-time, FA and DFA.

``h_t = f(x_t W_in + h_{t-1} W_rec + b)``, ``y_t = h_t W_out + c`` for ``t = 1..T`` (``h_0 = 0``),
time-major: inputs ``(T, batch, din)``, outputs ``(T, batch, dout)``.

DFA (Nokland 2016, applied per time step): each step's output error ``e_t = dL/dy_t`` is carried
to ``h_t`` by an error carrier (the rule's `Backward` makes it) scanned alongside the inputs;
``h_t`` receives ``e_t @ B`` and the
error arriving from the output layer *and* from step ``t+1`` is discarded, so nothing travels
back through time. With ``delta_t = (e_t B) * f'(a_t)``:
``dW_in = sum_t x_t^T delta_t``, ``dW_rec = sum_t h_{t-1}^T delta_t``, ``db = sum_t delta_t``,
and the readout learns from ``e_t`` as in backprop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Float

from fbalign._src.backward import Backward, DirectFeedback, LinearFeedback
from fbalign._src.base import Array, Params, PRNGKey, TapeRule
from fbalign._src.feedback_init import Initializer
from fbalign._src.layered_init import build_rule, dfa_like
from fbalign._src.linalg import orthogonal
from fbalign._src.models import get_activation, matmul
from fbalign._src.registry import RULES

RNN_MODES = ("bp", "fa", "kp", "dfa")
# the registered rules `fit` trains the RNN with (`RNN.init_rule_state` says why not the others)
RNN_RULES = ("bp", "fa", "dfa", "usf", "frsf", "rbp", "srbp", "sparse_rbp", "kbit_rbp", "nd_rbp")
_NOT_ON_RNN = {"drtp": "its targets would replace the output error at every step of a "
                       "sequence, which direct random target projection does not define"}


def check_rnn_rule(name: str, rule: Any) -> None:
    """A ValueError naming ``rule`` when it cannot train the RNN, and why."""
    if not isinstance(rule, TapeRule):
        raise ValueError(f"rule {name!r} does not run on the RNN; it trains with "
                         f"{', '.join(RNN_RULES)} (pass the name). Other rules need a layered "
                         "feedforward network (fbalign.models.mlp, lenet5, sequential).")
    why = _NOT_ON_RNN.get(name)
    if rule.backward is None:
        why = "it has no jax.grad form and the RNN records no tape"
    elif name in RULES and RULES[name].stateful and rule.advance is None:
        why = "its feedback learns from the activations only its explicit form records"
    elif rule.advance is not None or rule.feedback is not None:
        why = ("its feedback changes (or is computed) layer by layer in ways stated for "
               "feedforward chains")
    if why:
        raise ValueError(f"rule {name!r} does not run on the RNN: {why}; it trains with "
                         f"{', '.join(RNN_RULES)}")


@dataclasses.dataclass(frozen=True)
class RNN:
    """A vanilla (Elman) RNN with a linear readout at every step; build it with `rnn`.

    Params: ``{"w_in": (din, H), "w_rec": (H, H), "b": (H,), "w_out": (H, dout), "b_out":
    (dout,)}``. Feedback for ``apply``:

    * ``"fa"``/``"kp"``: ``{"w_rec": B_rec (H, H), "w_out": B_out (H, dout)}``, each of its
      weight's shape (the input projection sends no error anywhere);
    * ``"dfa"``: ``{"h": B}`` with ``B`` of shape ``(dout, H)``, one matrix shared by all time
      steps (a bare ``B`` is accepted too).

    ``apply(..., backward=...)`` runs any `fbalign._src.backward.Backward` instead: its layers
    are ``"w_rec"`` and ``"w_out"`` and its hidden tap ``"h"``.

    ``init_rule_state`` draws them with the rule's own ``init`` as the ``feedback`` of its
    state, so ``fit`` trains the RNN with every rule in `RNN_RULES` (bp, FA, DFA, sign
    symmetry and the random-backprop variants, through their ``jax.grad`` forms).

    Inputs are time-major ``(T, batch, din)`` by default. With ``time_major=False`` they are
    batch-major, ``(batch, T, din)`` or flat ``(batch, T * din)`` (e.g. an image read row by
    row, as in sequential MNIST), which is what the training harness hands a model.
    ``readout="last"`` returns only the last step's readout ``(batch, dout)``, for sequence
    classification; ``"all"`` (default) every step's.
    """

    layer_structure = True  # rules that send errors through layers can use it

    input_size: int
    hidden_size: int
    output_size: int
    activation: str = "tanh"
    time_major: bool = True
    readout: str = "all"

    def __post_init__(self):
        get_activation(self.activation)
        if self.readout not in ("all", "last"):
            raise ValueError(f"RNN readout must be 'all' or 'last', got {self.readout!r}")

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """LeCun-normal input/readout weights, orthogonal recurrent weights, zero biases."""
        k1, k2, k3 = jax.random.split(key, 3)
        lecun = jax.nn.initializers.lecun_normal()
        return {
            "w_in": lecun(k1, (self.input_size, self.hidden_size), dtype),
            "w_rec": orthogonal()(k2, (self.hidden_size,) * 2, dtype),
            "b": jnp.zeros((self.hidden_size,), dtype),
            "w_out": lecun(k3, (self.hidden_size, self.output_size), dtype),
            "b_out": jnp.zeros((self.output_size,), dtype),
        }

    def init_rule_state(
        self,
        rule: str | TapeRule,
        key: PRNGKey,
        params: Params,
        init: str | Initializer = "gaussian",
        scale: float | None = None,
        **rule_kwargs: Any,
    ) -> Any:
        """The rule's state for this RNN, drawn by the rule's own ``init``.

        ``rule`` is a registered name (built with ``init``/``scale``/``rule_kwargs``) or a
        `TapeRule`. Its ``init`` sees the unrolled step as a chain ``x -> h -> h -> y`` (the
        weights ``w_in``, ``w_rec``, ``w_out``): an FA-like state's ``B`` for ``w_rec`` and
        ``w_out`` (``w_in`` sends no error) becomes ``{"w_rec": B_rec, "w_out": B_out}``; a
        DFA-like state's one ``(dout, H)`` matrix becomes ``{"h": B}``, shared by every step.

        Rules that cannot run here are refused by name: rules without a ``jax.grad`` form (the
        RNN records no tape), rules whose feedback changes by a layer-by-layer ``advance`` or is
        computed from a per-step recipe (kp, wm, arbp, asrbp, bdfa, brsf, ...: stated for
        feedforward chains), and drtp (its targets replace the output error at every step of a
        sequence, which the paper does not define). `RNN_RULES` lists the registered ones that
        do run.
        """
        name = rule if isinstance(rule, str) else getattr(rule, "__name__", "this rule")
        rule = build_rule(rule, init, scale, rule_kwargs)
        check_rnn_rule(name, rule)
        w_in, w_rec, w_out = params["w_in"], params["w_rec"], params["w_out"]
        chain = [{"w": w_in, "b": params["b"]}, {"w": w_rec}, {"w": w_out, "b": params["b_out"]}]
        probe = jax.eval_shape(rule.init, key, chain)
        if dfa_like(probe, self.output_size):
            state = rule.init(key, [chain[0], chain[2]])  # B of the one hidden layer, (dout, H)
            return state._replace(feedback={"h": state.feedback[0]})
        state = rule.init(key, chain)
        fb = getattr(state, "feedback", None)
        if fb is None:
            return state
        return state._replace(feedback={"w_rec": fb[1], "w_out": fb[2]})

    def _time_major(self, xs: Array) -> Array:
        if self.time_major:
            return xs
        if xs.ndim == 2 and xs.shape[1] % self.input_size == 0:
            xs = xs.reshape(xs.shape[0], -1, self.input_size)
        if xs.ndim != 3:
            raise ValueError(f"RNN(time_major=False) expects (batch, T, {self.input_size}) or "
                             f"(batch, T * {self.input_size}) inputs, got {tuple(xs.shape)}")
        return jnp.swapaxes(xs, 0, 1)

    def apply(
        self, params: Params, xs: Float[Array, "T batch din"] | Float[Array, "batch ..."],
        feedback: Any = None, mode: str = "bp", *, backward: Backward | None = None,
    ) -> Float[Array, "T batch dout"] | Float[Array, "batch dout"]:
        """Runs the RNN over ``xs`` (``(T, batch, din)``, or batch-major with
        ``time_major=False``); ``jax.grad`` runs the rule's backward.

        The rule's backward is a `fbalign._src.backward.Backward` (``backward=``; the recurrent
        and readout maps are its layers ``"w_rec"`` and ``"w_out"``, the hidden state its tap
        ``"h"``), or one built from a legacy ``mode`` (``"bp"``, ``"fa"``, ``"kp"``, ``"dfa"``)
        and ``feedback`` (see `RNN`). A DFA-style backward gets one error carrier per time step,
        so each step's output error reaches that step's hidden state.

        Returns:
          ``ys`` of shape ``(T, batch, dout)``, the readout at every step (``readout="all"``),
          or ``(batch, dout)``, the last step's (``readout="last"``).
        """
        xs = self._time_major(xs)
        if xs.ndim != 3 or xs.shape[-1] != self.input_size:
            raise ValueError(
                f"RNN expects time-major inputs (T, batch, {self.input_size}), got "
                f"{tuple(xs.shape)}"
            )
        if backward is None:
            backward = self._legacy_backward(feedback, mode)
        f = get_activation(self.activation)
        w_in, w_rec, b = params["w_in"], params["w_rec"], params["b"]
        w_out, b_out = params["w_out"], params["b_out"]
        steps, batch = xs.shape[:2]
        h0 = jnp.zeros((batch, self.hidden_size), xs.dtype)
        # One carrier per step (None for rules without one), scanned with the inputs.
        carriers = backward.begin(xs.reshape(steps * batch, -1), self.output_size)
        if carriers is not None:
            carriers = carriers.reshape(steps, batch, self.output_size)

        def step(h, inp):
            x_t, c_t = inp
            a = x_t @ w_in + backward.linear("w_rec", matmul, h, w_rec) + b
            h, c_t = backward.hidden("h", f, a, c_t)
            y = backward.linear("w_out", matmul, backward.into_last(h), w_out) + b_out
            return h, backward.output(y, c_t)

        _, ys = lax.scan(step, h0, (xs, carriers))
        return ys[-1] if self.readout == "last" else ys

    def _legacy_backward(self, feedback: Any, mode: str) -> Backward:
        """The `Backward` of a legacy RNN mode string (`RNN_MODES`)."""
        if mode not in RNN_MODES:
            raise ValueError(f"unknown RNN mode {mode!r}; valid: {', '.join(RNN_MODES)}")
        if mode != "bp" and feedback is None:
            raise ValueError(f"mode {mode!r} needs feedback (see RNN.init_rule_state)")
        if mode in ("fa", "kp"):
            return LinearFeedback(feedback=feedback, learn=mode == "kp")
        if mode == "dfa":
            b = feedback["h"] if isinstance(feedback, Mapping) else feedback
            want = (self.output_size, self.hidden_size)
            if tuple(b.shape) != want:
                raise ValueError(f"RNN DFA feedback must be (dout, H) = {want}, got "
                                 f"{tuple(b.shape)}")
            return DirectFeedback(feedback={"h": b})
        return Backward()


def rnn(input_size: int, hidden_size: int, output_size: int, activation: str = "tanh", *,
        time_major: bool = True, readout: str = "all") -> RNN:
    """Builds a vanilla `RNN` (``tanh`` by default); see `RNN` for ``time_major``/``readout``.
    ``rnn(28, 128, 10, time_major=False, readout="last")`` reads MNIST row by row."""
    return RNN(int(input_size), int(hidden_size), int(output_size), activation, time_major,
               readout)
