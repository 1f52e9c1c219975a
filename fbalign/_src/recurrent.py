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

from fbalign._src.backward import Backward, DirectFeedback, LinearFeedback
from fbalign._src.base import Array, EmptyState, Params, PRNGKey
from fbalign._src.feedback_init import Initializer, resolve_initializer
from fbalign._src.models import get_activation, matmul
from fbalign._src.rules.feedback_alignment import (
    DirectFeedbackAlignmentState,
    FeedbackAlignmentState,
)

RNN_MODES = ("bp", "fa", "kp", "dfa")
RNN_RULES = ("bp", "fa", "dfa")  # the registered rules `fit` trains the RNN with


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

    ``init_rule_state`` draws them as the ``feedback`` of a rule state, so ``fit`` trains the
    RNN with ``bp``, ``fa`` and ``dfa`` (through their ``jax.grad`` forms).

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
            "w_rec": jax.nn.initializers.orthogonal()(k2, (self.hidden_size,) * 2, dtype),
            "b": jnp.zeros((self.hidden_size,), dtype),
            "w_out": lecun(k3, (self.hidden_size, self.output_size), dtype),
            "b_out": jnp.zeros((self.output_size,), dtype),
        }

    def init_rule_state(
        self,
        rule: str,
        key: PRNGKey,
        params: Params,
        init: str | Initializer = "gaussian",
        scale: float | None = None,
    ) -> Any:
        """The state whose ``feedback`` ``apply(..., mode=rule)`` needs: `EmptyState` for
        ``"bp"``, `FeedbackAlignmentState` of ``{"w_rec", "w_out"}`` for ``"fa"``,
        `DirectFeedbackAlignmentState` of ``{"h": B}``, one ``(dout, H)`` matrix, for ``"dfa"``.

        ``rule`` is a registered name: the RNN has no per-layer chain, so a rule object's own
        ``init`` cannot size its feedback. Kolen-Pollack's mode ``"kp"`` exists in ``apply``
        (its primitives), but its feedback update is stated for dense chains: not here.
        """
        if not isinstance(rule, str) or rule not in RNN_RULES:
            what = rule if isinstance(rule, str) else type(rule).__name__
            raise ValueError(f"rule {what!r} does not run on the RNN; it trains with "
                             f"{', '.join(RNN_RULES)} (pass the name). Other rules need a "
                             "layered feedforward network (fbalign.models.mlp, lenet5).")
        dtype = params["w_out"].dtype
        if rule == "bp":
            return EmptyState()
        if rule == "fa":
            k1, k2 = jax.random.split(key)
            h, o = self.hidden_size, self.output_size
            return FeedbackAlignmentState({
                "w_rec": resolve_initializer(init, scale, fan=h)(k1, (h, h), dtype),
                "w_out": resolve_initializer(init, scale, fan=o)(k2, (h, o), dtype),
            })
        shape = (self.output_size, self.hidden_size)
        return DirectFeedbackAlignmentState(
            {"h": resolve_initializer(init, scale, fan=self.output_size)(key, shape, dtype)})

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
        self, params: Params, xs: Array, feedback: Any = None, mode: str = "bp", *,
        backward: Backward | None = None,
    ) -> Array:
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
