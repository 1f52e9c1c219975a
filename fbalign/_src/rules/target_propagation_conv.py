r"""Target propagation on chains of convolutional and dense blocks (`fbalign.models.sequential`
chains and `fbalign.models.lenet5`): the pieces that `dtp`, `drl`, `ldrl` and `tp` use there.

As in Ernoult, Normandin, Moudgil, Spinney, Belilovsky, Rish, Richards & Bengio (2022), "Towards
scaling difference target propagation by learning backprop targets" (ICML; their code,
BorealisAI/scalingDTP), a *block* ``f_l`` is one weight layer with its activation and the
pooling after it,

.. math:: h_l = f_l(h_{l-1}) = P_l\big(\rho_l(\mathrm{op}_l(\mathrm{pre}(h_{l-1}), W_l) + b_l)
          \big),

(``op`` a convolution or ``x @ W``; ``P_l`` the block's max/average pooling, or none; ``pre``
the `Flatten` before a dense block, a reshape), and its learned inverse reverses the block,
``g_l = \mathrm{pre}^{-1} \circ (T_{V_l}(\cdot) + c_l) \circ \phi_l \circ U_l``:

.. math:: g_l(y) = \mathrm{reshape}\big(T_{V_l}(\phi_l(U_l(y))) + c_l\big),

* ``U_l`` un-pools: the transpose of the pooling at the forward pass that ``y`` stands for.
  Max pooling routes each value to its window's (first) maximum, scalingDTP's max-unpooling
  with the forward pass's pool indices; average pooling spreads it evenly over its window
  (scalingDTP upsamples instead, a factor ``k^2`` that the learned kernel absorbs);
* ``\phi_l`` is the block's own activation ``\rho_l`` (scalingDTP inverts ``conv -> relu ->
  pool`` as ``unpool -> relu -> conv-transpose``), or ``inverse_activation`` in every map;
* ``T_V`` is the transpose of the block's linear op with ``V`` in ``W``'s place: for a
  convolution the transposed convolution with the forward strides and padding (``V`` has the
  kernel's HWIO shape), for a dense layer ``u V^\top``; ``c_l`` is one bias per input channel
  (unit).

With ``V_l = W_l``, ``c_l = 0`` and ``\phi_l`` the identity, ``g_l`` is exactly the transposed
Jacobian of a linear block at the forward pass (``J_{f_l}^\top``). For a ReLU block with
``V_l = W_l``, ``g_l``'s Jacobian at ``h_l`` is ``J_{f_l}^\top`` (``U_l`` selects the forward
maxima, where ``h_l > 0`` exactly when the pre-activation is), the minimum L-DRL's loss looks
for; at a finite ``\sigma`` its output perturbation also passes ``\mathrm{relu}(\delta y)``
where ``h_l = 0``, which pulls the learned ``V_l`` somewhat off ``W_l``.

Which forward pass a map's un-pooling follows (scalingDTP's "magic bridge" holds the pool
indices of the last forward call): the feedforward pass for the targets ``g_l(t_l)``,
``g_l(h_l)``, for L-DRL's output perturbation ``g_l(h_l + \delta y)`` and for DRL's
difference path; the corrupted pass for the reconstructions of a corrupted input,
``g_l(f_l(h_{l-1} + \delta x))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbalign._src.activations import get_activation
from fbalign._src.base import Array, Params, PRNGKey

Activation = Callable[[Array], Array]
Routes = tuple[Array | None, ...]

_SUPPORTED = ("a dense fbalign.models.mlp network, a fbalign.models.sequential chain of Conv and "
              "Dense layers with MaxPool, AvgPool and Flatten between them, or "
              "fbalign.models.lenet5")
_WHY = "its targets travel down the layers one block at a time through learned inverses"


class ChainBlock(NamedTuple):
    """Block ``l`` of a chain: ``h_l = pools(activation(op(reshape(h_{l-1}), W_l) + b_l))``.

    Attributes:
      op: the weight layer's linear map ``op(x, w)`` (the network's own conv or matmul).
      op_in_shape: ``op``'s per-example input shape (``h_{l-1}`` flattened for a dense block).
      activation: ``\\rho_l``.
      pools: the poolings after the activation, ``("max" | "avg", window)`` each.
      in_shape: ``h_{l-1}``'s per-example shape; out_shape: ``h_l``'s.
      w_shape: ``W_l``'s shape (a map's ``V_l`` has it too).
    """

    op: Callable[[Array, Array], Array]
    op_in_shape: tuple[int, ...]
    activation: Activation
    pools: tuple[tuple[str, int], ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    w_shape: tuple[int, ...]


class Chain(NamedTuple):
    """A network as blocks (`ChainBlock`), read once from the network by `conv_chain`."""

    input_shape: tuple[int, ...]
    blocks: tuple[ChainBlock, ...]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


# --------------------------------------------------------------------------------------------
# Reading a network
# --------------------------------------------------------------------------------------------


def _refuse(rule: str, what: str) -> TypeError:
    return TypeError(f"rule {rule!r} needs {_SUPPORTED} ({_WHY}); {what}")


def _sequential_layout(network: Any, rule: str) -> list[tuple[str, list[tuple[str, int]]]]:
    """``[(activation, pools), ...]`` per weight layer of a `Sequential` chain."""
    layout: list[tuple[str, list[tuple[str, int]]]] = []
    for j, layer in enumerate(network.layers):
        kind = type(layer).__name__
        if kind == "Residual":
            raise _refuse(rule, f"layers[{j}] is a Residual block: its skip path h = f(x + F(x)) "
                                "carries activity around the block's layers, so there is no "
                                "single block to invert. Use a chain without Residual blocks")
        if kind in ("Dense", "Conv"):
            layout.append((layer.activation, []))
        elif kind in ("MaxPool", "AvgPool"):
            if not layout:
                raise _refuse(rule, f"layers[{j}] ({kind}) pools the input before the first "
                                    "weight layer; pool the data beforehand")
            layout[-1][1].append(("max" if kind == "MaxPool" else "avg", int(layer.window)))
        elif kind != "Flatten":
            raise _refuse(rule, f"layers[{j}] is a {kind}")
    return layout


def conv_chain(network: Any, rule: str) -> Chain:
    """The blocks of ``network``: a `fbalign.models.sequential` chain (no `Residual`) or
    `fbalign.models.lenet5`; any other network raises a `TypeError` naming ``rule``."""
    if type(network).__name__ == "LeNet5" and callable(getattr(network, "layer_ops", None)):
        pool = ("max" if network.pool == "max" else "avg", 2)
        layout = [(network.activation, [pool]), (network.activation, [pool]),
                  (network.activation, []), (network.activation, []), ("linear", [])]
    elif (getattr(network, "layer_structure", False) is True
          and isinstance(getattr(network, "layers", None), tuple)
          and callable(getattr(network, "layer_ops", None))):
        layout = _sequential_layout(network, rule)
    else:
        raise _refuse(rule, f"got {type(network).__name__}")
    ops = network.layer_ops()
    shape = tuple(int(s) for s in network.input_shape)
    blocks = []
    for (act, pools), op, w_shape in zip(layout, ops, network.param_shapes, strict=True):
        out = jax.eval_shape(op.op, jax.ShapeDtypeStruct((1, *op.input_shape), jnp.float32),
                             jax.ShapeDtypeStruct(tuple(w_shape), jnp.float32)).shape[1:]
        for _, k in pools:
            out = (out[0] // k, out[1] // k, out[2])
        blocks.append(ChainBlock(op.op, tuple(op.input_shape), get_activation(act), tuple(pools),
                                 shape, tuple(out), tuple(w_shape)))
        shape = tuple(out)
    return Chain(tuple(int(s) for s in network.input_shape), tuple(blocks))


# --------------------------------------------------------------------------------------------
# Pooling and un-pooling
# --------------------------------------------------------------------------------------------


def _windows(z: Array, k: int) -> Array:
    n, height, width, c = z.shape
    return z.reshape(n, height // k, k, width // k, k, c)


def max_pool_routes(z: Array, k: int) -> Array:
    """The one-hot mask, of ``z``'s shape, of each ``k x k`` window's first maximum in
    row-major order: max pooling's indices. For ``k = 2`` this is where LeNet-5's and
    `sequential`'s max pooling send their error; for other windows their ``jnp.max`` splits it
    between tied maxima, while the rule's blocks route it to the first."""
    b = _windows(z, k)
    slot = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 2) * k
            + jax.lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 4))
    hit = b == jnp.max(b, axis=(2, 4), keepdims=True)
    first = jnp.min(jnp.where(hit, slot, k * k), axis=(2, 4), keepdims=True)
    return jax.lax.stop_gradient((slot == first).astype(z.dtype).reshape(z.shape))


def pool(z: Array, kind: str, k: int, routes: Array | None) -> Array:
    """``k x k`` pooling with stride ``k``: the max (``z`` at ``routes``, whose VJP is
    `unpool`'s routing) or the mean."""
    if kind == "max":
        return jnp.sum(_windows(z * routes, k), axis=(2, 4))
    return jnp.mean(_windows(z, k), axis=(2, 4))


def unpool(block: ChainBlock, y: Array, routes: Routes) -> Array:
    """``U_l(y)``: the transpose of the block's poolings (last first) at the forward pass
    whose max-pool ``routes`` are given: max pooling puts each value at its window's maximum
    (zeros elsewhere), average pooling spreads it as ``value / k^2`` over the window."""
    for (kind, k), r in zip(reversed(block.pools), reversed(routes), strict=True):
        up = jnp.repeat(jnp.repeat(y, k, axis=1), k, axis=2)
        y = up * r if kind == "max" else up / (k * k)
    return y


# --------------------------------------------------------------------------------------------
# Forward blocks and their inverses
# --------------------------------------------------------------------------------------------


def block_forward(block: ChainBlock, p: dict[str, Array], h: Array) -> tuple[Array, Routes]:
    """``(h_l, routes)``: block ``l`` on ``h = h_{l-1}``, with each max pooling's routes (None
    for average pooling) for `unpool`."""
    a = block.op(h.reshape((h.shape[0], *block.op_in_shape)), p["w"])
    z = block.activation(a + p["b"] if "b" in p else a)
    routes = []
    for kind, k in block.pools:
        r = max_pool_routes(z, k) if kind == "max" else None
        z = pool(z, kind, k, r)
        routes.append(r)
    return z, tuple(routes)


def chain_forward(chain: Chain, params: Params, x: Array) -> tuple[list[Array], list[Routes]]:
    """``([h_0, ..., h_L], [routes_1, ..., routes_L])``; flat inputs are reshaped to the
    network's input shape."""
    want = math.prod(chain.input_shape)
    if math.prod(x.shape[1:]) != want:
        raise ValueError(f"the network expects inputs (batch, *{chain.input_shape}) or (batch, "
                         f"{want}), got {tuple(x.shape)}")
    hs, routes = [x.reshape((x.shape[0], *chain.input_shape))], []
    for block, p in zip(chain.blocks, params, strict=True):
        h, r = block_forward(block, p, hs[-1])
        hs.append(h)
        routes.append(r)
    return hs, routes


def chain_forward_from(chain: Chain, params: Params, h: Array, m: int) -> Array:
    """Blocks ``m+1..L`` from an activity ``h`` standing for ``h_m`` (their own pooling)."""
    for block, p in zip(chain.blocks[m:], params[m:], strict=True):
        h, _ = block_forward(block, p, h)
    return h


def transpose_op(block: ChainBlock, v: Array, u: Array) -> Array:
    """``T_V(u)``: the transpose of ``x -> op(x, v)`` applied to ``u`` (the transposed
    convolution with the layer's strides and padding; ``u v^\\top`` for a dense layer)."""
    struct = jax.ShapeDtypeStruct((u.shape[0], *block.op_in_shape), u.dtype)
    return jax.linear_transpose(lambda x: block.op(x, v), struct)(u)[0]


def chain_inverse(block: ChainBlock, g: dict[str, Array], y: Array, routes: Routes,
                  phi: Activation) -> Array:
    """``g_l(y) = \\mathrm{reshape}(T_{V}(\\phi(U_l(y))) + c)`` (``g = {"w": V, "b": c}``),
    in ``h_{l-1}``'s shape; ``routes``: the max-pool routes of the forward pass ``y`` stands
    for."""
    v = transpose_op(block, g["w"], phi(unpool(block, y, routes)))
    if "b" in g:
        v = v + g["b"]
    return v.reshape((y.shape[0], *block.in_shape))


def init_chain_inverse(key: PRNGKey, block: ChainBlock, dtype: Any) -> dict[str, Array]:
    """``V ~ N(0, 1/fan_in)`` of the map's own fan-in (``kh kw c_out`` for a transposed
    convolution, ``n_l`` for a dense layer), ``c = 0``."""
    fan_in = math.prod(block.w_shape) // block.w_shape[-2]
    w = jax.random.normal(key, block.w_shape, dtype) / jnp.sqrt(jnp.asarray(fan_in, dtype))
    return {"w": w, "b": jnp.zeros((block.op_in_shape[-1],), dtype)}


# --------------------------------------------------------------------------------------------
# Feedback losses, forward updates, diagnostics
# --------------------------------------------------------------------------------------------


def sqnorm_mean(d: Array) -> Array:
    """Batch mean of the per-example squared norm (summed over every other axis)."""
    return jnp.mean(jnp.sum(d * d, axis=tuple(range(1, d.ndim))))


def _dot_mean(a: Array, b: Array) -> Array:
    return jnp.mean(jnp.sum(a * b, axis=tuple(range(1, a.ndim))))


InverseOf = Callable[[Array, Routes], Array]
BlockOf = Callable[[Array], tuple[Array, Routes]]


def chain_reconstruction_loss(inverse: InverseOf, f_block: BlockOf, h_prev: Array, eps: Array,
                              sigma: float) -> Array:
    r"""TP/DTP's inverse loss on a block (Lee et al. 2015): ``\frac1N\sum_n\|g_l(f_l(\tilde h))
    - \tilde h\|^2``, ``\tilde h = h_{l-1} + \sigma\epsilon``; ``g_l`` un-pools at the
    corrupted pass (``inverse(y, routes)``, ``f_block(h) -> (y, routes)``; no gradient into
    ``f_l``)."""
    ht = h_prev + sigma * eps
    y, routes = jax.lax.stop_gradient(f_block(ht))
    return sqnorm_mean(inverse(y, routes) - ht)


def chain_ldrl_loss(inverse: InverseOf, f_block: BlockOf, h_prev: Array, h: Array,
                    routes: Routes, eps: Array, eta: Array, sigma: float) -> Array:
    r"""L-DRL (Ernoult et al. 2022) on a block, as scalingDTP computes it:

    .. math:: \frac1N\sum_n\big[-2\,\delta x^\top\big(g(f(x + \delta x)) - g(y)\big)
              + \|g(y + \delta y) - g(y)\|^2\big],

    ``x = h_{l-1}``, ``y = h_l``, ``\delta x = \sigma\epsilon``, ``\delta y = \sigma\eta``;
    ``g(f(x + \delta x))`` un-pools at the corrupted pass, the others at the forward
    ``routes``."""
    dx = sigma * eps
    yn, rn = jax.lax.stop_gradient(f_block(h_prev + dx))
    r = inverse(h, routes)
    dr = inverse(yn, rn) - r
    dry = inverse(h + sigma * eta, routes) - r
    return -2.0 * _dot_mean(dx, dr) + sqnorm_mean(dry)


def chain_updates(chain: Chain, params: Params, hs: Sequence[Array], ts: Sequence[Array],
                  eta: float) -> Params:
    r"""``\partial/\partial(W_l, b_l)`` of ``\frac{1}{\eta N}\sum_n\tfrac12\|f_l(h_{l-1}) -
    \mathrm{sg}(t_l)\|^2`` for every block (the max pooling passes it to the forward maxima)."""
    sg = jax.lax.stop_gradient
    n = hs[0].shape[0]

    def local(ps):
        total = jnp.zeros((), hs[0].dtype)
        for ll, (block, p) in enumerate(zip(chain.blocks, ps, strict=True), start=1):
            y, _ = block_forward(block, p, sg(hs[ll - 1]))
            total = total + 0.5 * jnp.sum((y - sg(ts[ll - 1])) ** 2)
        return total / (eta * n)

    return jax.grad(local)(params)


def block_vjp(block: ChainBlock, p: dict[str, Array], h: Array, cot: Array) -> Array:
    """``J_{f_l}(h)^\\top`` applied to ``cot`` (parameters held fixed)."""
    _, pull = jax.vjp(lambda u: block_forward(block, jax.lax.stop_gradient(p), u)[0], h)
    return pull(cot)[0]


def chain_activity_grads(chain: Chain, params: Params, hs: Sequence[Array],
                         e_mean: Array) -> list[Array]:
    """Backprop's ``[\\partial\\mathcal L/\\partial h_1, ..., \\partial\\mathcal L/\\partial
    h_{L-1}]`` from ``e_mean = \\partial\\mathcal L/\\partial h_L`` (a diagnostic)."""
    n_layers = chain.num_layers
    grads: list[Array] = [None] * (n_layers - 1)  # type: ignore[list-item]
    g = e_mean
    for ll in range(n_layers, 1, -1):
        g = block_vjp(chain.blocks[ll - 1], params[ll - 1], hs[ll - 1], g)
        grads[ll - 2] = g
    return grads
