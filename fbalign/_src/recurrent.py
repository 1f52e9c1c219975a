"""A vanilla recurrent network under ``lax.scan`` with backprop-through-time, FA and DFA.

``h_t = f(x_t W_in + h_{t-1} W_rec + b)``, ``y_t = h_t W_out + c`` for ``t = 1..T`` (``h_0 = 0``),
time-major: inputs ``(T, batch, din)``, outputs ``(T, batch, dout)``.

DFA (Nokland 2016, applied per time step): each step's output error ``e_t = dL/dy_t`` is carried
to ``h_t`` by an error carrier scanned alongside the inputs; ``h_t`` receives ``e_t @ B`` and the
error arriving from the output layer *and* from step ``t+1`` is discarded, so nothing travels
back through time. With ``delta_t = (e_t B) * f'(a_t)``:
``dW_in = sum_t x_t^T delta_t``, ``dW_rec = sum_t h_{t-1}^T delta_t``, ``db = sum_t delta_t``,
and the readout learns from ``e_t`` as in backprop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fbalign._src import primitives as P
from fbalign._src.base import Array, Params, PRNGKey
from fbalign._src.feedback_init import Initializer, resolve_initializer
from fbalign._src.models import get_activation

RNN_MODES = ("bp", "fa", "kp", "dfa")


@dataclasses.dataclass(frozen=True)
class RNN:
    """A vanilla (Elman) RNN with a linear readout at every step; build it with `rnn`.

    Params: ``{"w_in": (din, H), "w_rec": (H, H), "b": (H,), "w_out": (H, dout), "b_out":
    (dout,)}``. Feedback for ``apply``:

    * ``"fa"``/``"kp"``: ``{"w_rec": B_rec (H, H), "w_out": B_out (H, dout)}``, each of its
      weight's shape (the input projection sends no error anywhere);
    * ``"dfa"``: ``B`` of shape ``(dout, H)``, one matrix shared by all time steps.
    """

    layer_structure = True  # rules that send errors through layers can use it

    input_size: int
    hidden_size: int
    output_size: int
    activation: str = "tanh"

    def __post_init__(self):
        get_activation(self.activation)

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
        rule_name: str,
        key: PRNGKey,
        params: Params,
        init: str | Initializer = "gaussian",
        scale: float | None = None,
    ) -> Any:
        """Draws the feedback that ``apply(..., mode=rule_name)`` needs (None for ``"bp"``)."""
        dtype = params["w_out"].dtype
        if rule_name == "bp":
            return None
        if rule_name in ("fa", "kp"):
            k1, k2 = jax.random.split(key)
            h, o = self.hidden_size, self.output_size
            return {
                "w_rec": resolve_initializer(init, scale, fan=h)(k1, (h, h), dtype),
                "w_out": resolve_initializer(init, scale, fan=o)(k2, (h, o), dtype),
            }
        if rule_name == "dfa":
            shape = (self.output_size, self.hidden_size)
            return resolve_initializer(init, scale, fan=self.output_size)(key, shape, dtype)
        raise ValueError(f"unknown RNN mode {rule_name!r}; valid: {', '.join(RNN_MODES)}")

    def apply(
        self, params: Params, xs: Array, feedback: Any = None, mode: str = "bp"
    ) -> Array:
        """Runs the RNN over ``xs`` ``(T, batch, din)``; ``jax.grad`` is the rule named by ``mode``.

        Returns:
          ``ys`` of shape ``(T, batch, dout)``, the readout at every step.
        """
        if mode not in RNN_MODES:
            raise ValueError(f"unknown RNN mode {mode!r}; valid: {', '.join(RNN_MODES)}")
        if xs.ndim != 3 or xs.shape[-1] != self.input_size:
            raise ValueError(
                f"RNN expects time-major inputs (T, batch, {self.input_size}), got "
                f"{tuple(xs.shape)}"
            )
        if mode != "bp" and feedback is None:
            raise ValueError(f"mode {mode!r} needs feedback (see RNN.init_rule_state)")
        f = get_activation(self.activation)
        w_in, w_rec, b = params["w_in"], params["w_rec"], params["b"]
        w_out, b_out = params["w_out"], params["b_out"]
        batch = xs.shape[1]
        h0 = jnp.zeros((batch, self.hidden_size), xs.dtype)

        def rec(h, wr):
            if mode == "fa":
                return P.fa_matmul(h, wr, feedback["w_rec"])
            if mode == "kp":
                return P.kp_matmul(h, wr, feedback["w_rec"])
            return h @ wr

        def readout(h, wo):
            if mode == "fa":
                return P.fa_matmul(h, wo, feedback["w_out"])
            if mode == "kp":
                return P.kp_matmul(h, wo, feedback["w_out"])
            return h @ wo

        if mode == "dfa":
            if feedback.shape != (self.output_size, self.hidden_size):
                raise ValueError(
                    f"RNN DFA feedback must be (dout, H) = "
                    f"{(self.output_size, self.hidden_size)}, got {tuple(feedback.shape)}"
                )
            carriers = P.dfa_carrier((xs.shape[0], batch, self.output_size), xs.dtype)

            def step(h, inp):
                x_t, c_t = inp
                h = f(x_t @ w_in + h @ w_rec + b)
                h, c_t = P.dfa_hidden(h, c_t, feedback)
                y = P.dfa_output(h @ w_out + b_out, c_t)
                return h, y

            _, ys = lax.scan(step, h0, (xs, carriers))
            return ys

        def step(h, x_t):
            h = f(x_t @ w_in + rec(h, w_rec) + b)
            return h, readout(h, w_out) + b_out

        _, ys = lax.scan(step, h0, xs)
        return ys


def rnn(input_size: int, hidden_size: int, output_size: int, activation: str = "tanh") -> RNN:
    """Builds a vanilla `RNN` (``tanh`` by default) with a readout at every time step."""
    return RNN(int(input_size), int(hidden_size), int(output_size), activation)
