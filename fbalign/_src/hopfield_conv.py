"""A convolutional Hopfield network: Laborieux et al.'s energy-based ConvNet for equilibrium
propagation.

Laborieux, Ernoult, Scellier, Bengio, Grollier & Querlioz (2021), "Scaling equilibrium
propagation to deep ConvNets by drastically reducing its gradient estimator bias", Frontiers in
Neuroscience 15 (their ``P_CNN``): convolutional state layers coupled by a convolution followed
by 2x2 pooling, then fully-connected state layers, the input clamped; optionally the last layer
is a softmax readout outside the energy (their ``softmax=True``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.base import Array, Params, PRNGKey
from fbalign._src.convnet import max_pool_2x2
from fbalign._src.hopfield import EnergyNetwork, check_relaxation_options
from fbalign._src.layers import CONV_IMPLS, conv_op

POOLS = {"m": "2x2 max pooling (stride 2)", "a": "2x2 average pooling (stride 2)",
         "i": "no pooling"}


def avg_pool_2x2(h: Array) -> Array:
    """2x2 average pooling with stride 2 of an NHWC map with even height and width."""
    n, height, width, c = h.shape
    return h.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


def _per_layer(name: str, value: Any, n: int) -> tuple[Any, ...]:
    """An int (or a pool letter) for every conv layer, or one entry per conv layer."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        if isinstance(value, str) and len(value) == n:  # "mm": one letter per layer
            return tuple(value)
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"conv_hopfield: {name} needs one entry per conv layer ({n}), got "
                         f"{value!r}")
    return value


def conv_map_shapes(input_shape: tuple[int, int, int], channels: tuple[int, ...],
                    kernels: tuple[int, ...], strides: tuple[int, ...],
                    paddings: tuple[int, ...], pools: tuple[str, ...]
                    ) -> list[tuple[int, int, int]]:
    """The ``(H, W, C)`` of each conv state layer: ``(H + 2p - k) // stride + 1`` after the
    convolution, halved by a pool (which must divide the map: else a `ValueError` naming the
    layer and what to change)."""
    h, w, _ = input_shape
    shapes = []
    for i, (c, k, s, p, pool) in enumerate(zip(channels, kernels, strides, paddings, pools,
                                               strict=True)):
        h2, w2 = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h + 2 * p < k or w + 2 * p < k:
            raise ValueError(f"conv_hopfield: conv layer {i}'s kernel {k} does not fit its "
                             f"{h}x{w} input (padding {p}); use a smaller kernel or more padding")
        if pool != "i" and (h2 % 2 or w2 % 2):
            raise ValueError(f"conv_hopfield: conv layer {i}'s 2x2 pool ({pool!r}) does not "
                             f"divide its {h2}x{w2} map (kernel {k}, padding {p}, stride {s}); "
                             f"change the padding or kernel so the map is even, or use pool 'i'")
        h, w = (h2 // 2, w2 // 2) if pool != "i" else (h2, w2)
        shapes.append((h, w, c))
    return shapes


@dataclasses.dataclass(frozen=True)
class ConvHopfieldNetwork(EnergyNetwork):
    r"""A convolutional Hopfield network with input clamped (Laborieux et al. 2021, ``P_CNN``);
    build one with `conv_hopfield`. Params ``[{"w", "b"}, ...]``, one per weight layer: HWIO
    kernels ``(k, k, C_{l-1}, C_l)`` and ``(C_l,)`` biases for the conv layers, then
    ``(d_{l-1}, d_l)`` matrices and ``(d_l,)`` biases for the dense ones (the first takes the
    last conv state flattened in ``(H, W, C)`` row-major order).

    The energy of one example is

    .. math:: E(s) = \tfrac12 \sum_l \|s_l\|^2
              - \sum_{l \le N_c} \langle \rho(s_l), P_l(\rho(s_{l-1}) \star W_l) + b_l \rangle
              - \sum_{l > N_c} \big(\rho(\bar s_{l-1})^\top W_l + b_l^\top\big) \rho(s_l),

    with ``rho(s_0) := x`` (the clamped input, unchanged), ``*`` the convolution (stride,
    zero padding), ``P_l`` 2x2 max pooling (``"m"``), average pooling (``"a"``) or none
    (``"i"``), ``b_l`` broadcast over the map, and ``bar s`` the flattened state. It is
    Laborieux et al.'s primitive function ``Phi`` (``E = 1/2 ||s||^2 - Phi`` with ``Phi``'s
    states read as ``rho(s)``): at ``step_size = 1`` the hard sigmoid's projected descent is
    their fixed-point iteration ``s <- rho(dPhi/ds)``. `energy` sums over the batch. Its
    gradient is ``dE/ds_l = s_l - rho'(s_l) (P_l(rho(s_{l-1}) * W_l) + b_l + J_{l+1}^T
    rho(s_{l+1}))`` where the top-down term ``J^T`` is the transposed convolution through the
    pool's (sub)gradient, computed by autodiff.

    ``readout=True``: the last ``fc`` layer is the readout ``o = rho(bar s_last) W_out +
    b_out`` outside the energy (`EnergyNetwork`).

    Attributes:
      input_shape: ``(H, W, C)``; inputs are ``(batch, H, W, C)`` or ``(batch, H*W*C)``.
      channels, kernels, strides, paddings, pools: per conv layer (see `conv_hopfield`).
      fc: the dense layers' sizes, the output last.
      activation, free_steps, step_size, tol: as `HopfieldNetwork`.
      readout: the last ``fc`` layer is a readout outside the energy.
      conv_impl: `fbalign.ops.conv_op`'s ``impl`` (``"auto"``: im2col on CPU).
      dynamics: ``"descent"`` or ``"prototypical"`` (states enter ``E`` unchanged and relax
        by ``s <- rho(s - eta dE/ds)``; `EnergyNetwork`).
    """

    input_shape: tuple[int, int, int]
    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    paddings: tuple[int, ...]
    pools: tuple[str, ...]
    fc: tuple[int, ...]
    activation: str = "hard_sigmoid"
    free_steps: int = 40
    step_size: float = 0.5
    tol: float | None = None
    readout: bool = False
    conv_impl: str = "auto"
    dynamics: str = "descent"

    def __post_init__(self):
        for name in ("input_shape", "channels", "kernels", "strides", "fc"):
            v = getattr(self, name)
            if not v or any(isinstance(i, bool) or not isinstance(i, int) or i <= 0 for i in v):
                raise ValueError(f"conv_hopfield: {name} must be a non-empty sequence of "
                                 f"positive ints, got {v!r}")
        if len(self.input_shape) != 3:
            raise ValueError(f"conv_hopfield: input_shape is (H, W, C), got {self.input_shape}")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in self.paddings):
            raise ValueError(f"conv_hopfield: paddings must be non-negative ints, got "
                             f"{self.paddings!r}")
        for p in self.pools:
            if p not in POOLS:
                raise ValueError(f"conv_hopfield: unknown pool {p!r} in pools={self.pools!r}; "
                                 f"valid: " + ", ".join(f"{k!r} ({v})" for k, v in POOLS.items()))
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_hopfield: unknown conv_impl {self.conv_impl!r}; valid: "
                             f"{', '.join(CONV_IMPLS)}")
        check_relaxation_options("conv_hopfield", self.activation, self.free_steps,
                                 self.step_size, self.dynamics, self.tol)
        self.map_shapes  # noqa: B018 (validates the maps: kernels fit, pools divide)

    @property
    def map_shapes(self) -> list[tuple[int, int, int]]:
        """``(H_l, W_l, C_l)`` of each conv state layer (after its pool)."""
        return conv_map_shapes(self.input_shape, self.channels, self.kernels, self.strides,
                               self.paddings, self.pools)

    @property
    def num_conv(self) -> int:
        return len(self.channels)

    @property
    def num_layers(self) -> int:
        return len(self.channels) + len(self.fc)

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per-example shape of each free state: the conv maps, then the dense layers (the
        readout's excluded)."""
        return [*self.map_shapes, *((d,) for d in self.fc)][:self.num_states]

    @property
    def param_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """``(w, b)`` shapes per weight layer: HWIO kernels, then dense matrices."""
        cins = (self.input_shape[2], *self.channels[:-1])
        shapes = [((k, k, ci, co), (co,))
                  for k, ci, co in zip(self.kernels, cins, self.channels, strict=True)]
        dins = (math.prod(self.map_shapes[-1]), *self.fc[:-1])
        return shapes + [((di, do), (do,)) for di, do in zip(dins, self.fc, strict=True)]

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """PyTorch's default init, as Laborieux et al.'s code (without ``--scale``): weights
        and biases uniform in ``+-1/sqrt(fan_in)``, ``fan_in = k*k*C_in`` or ``d_in``."""
        params = []
        for k, (ws, bs) in zip(jax.random.split(key, self.num_layers), self.param_shapes,
                               strict=True):
            bound = 1.0 / math.sqrt(math.prod(ws[:-1]))
            kw, kb = jax.random.split(k)
            params.append({"w": jax.random.uniform(kw, ws, dtype, -bound, bound),
                           "b": jax.random.uniform(kb, bs, dtype, -bound, bound)})
        return params

    def zero_states(self, x: Array, dtype: Any = None) -> list[Array]:
        """All states zero, ``(batch, *state_shape)`` each: the free phase's start."""
        dtype = x.dtype if dtype is None else dtype
        return [jnp.zeros((x.shape[0], *s), dtype) for s in self.state_shapes]

    def prepare_input(self, x: Array) -> Array:
        """``x`` as ``(batch, H, W, C)``: accepted as that or flat ``(batch, H*W*C)`` (row-major
        ``H, W, C``); else a `ValueError` naming the expected shape."""
        want = tuple(self.input_shape)
        if tuple(x.shape[1:]) == want and x.ndim == 4:
            return x
        if x.ndim == 2 and x.shape[1] == math.prod(want):
            return x.reshape(x.shape[0], *want)
        raise ValueError(f"conv_hopfield expects inputs of shape (batch, {want[0]}, {want[1]}, "
                         f"{want[2]}) or (batch, {math.prod(want)}), got {tuple(x.shape)}")

    def readout_input(self, r: Array) -> Array:
        """The last state's activity flattened to ``(batch, features)``."""
        return r.reshape(r.shape[0], -1)

    def pool(self, i: int, h: Array) -> Array:
        """Conv layer ``i``'s pool ``P_i`` of an NHWC map."""
        kind = self.pools[i]
        return max_pool_2x2(h) if kind == "m" else avg_pool_2x2(h) if kind == "a" else h

    def energy(self, params: Params, x: Array, states: list[Array]) -> Array:
        """``E(s)`` summed over the batch (see the class docstring); a readout's params are
        not used."""
        if len(params) != self.num_layers or len(states) != self.num_states:
            raise ValueError(f"conv_hopfield: {self.num_layers} layers and {self.num_states} "
                             f"states, got {len(params)} param layers and {len(states)} states")
        below = self.prepare_input(x)
        e = 0.5 * sum(jnp.sum(s**2) for s in states)
        for i, (layer, s) in enumerate(zip(params[:self.num_states], states, strict=True)):
            above = self.activity(s)
            if i < self.num_conv:
                conv = conv_op(2, strides=self.strides[i], padding=self.paddings[i],
                               impl=self.conv_impl)
                drive = self.pool(i, conv(below, layer["w"]))
            else:
                drive = below.reshape(below.shape[0], -1) @ layer["w"]
            e = e - jnp.sum((drive + layer["b"]) * above)
            below = above
        return e


def conv_hopfield(
    input_shape: tuple[int, int, int] | list[int],
    channels: tuple[int, ...] | list[int] = (32, 64),
    kernels: int | tuple[int, ...] | list[int] = 5,
    strides: int | tuple[int, ...] | list[int] = 1,
    paddings: int | tuple[int, ...] | list[int] = 0,
    pools: str | tuple[str, ...] | list[str] = "m",
    fc: tuple[int, ...] | list[int] = (10,),
    activation: str = "hard_sigmoid",
    *,
    free_steps: int = 40,
    step_size: float | None = None,
    tol: float | None = None,
    readout: bool = False,
    conv_impl: str = "auto",
    dynamics: str = "descent",
) -> ConvHopfieldNetwork:
    """A convolutional Hopfield network (`ConvHopfieldNetwork`) for equilibrium propagation,
    with Laborieux et al.'s (2021, "Scaling equilibrium propagation to deep ConvNets by
    drastically reducing its gradient estimator bias") ``P_CNN`` options.

    Args:
      input_shape: ``(H, W, C)`` of the clamped input.
      channels: output channels of each conv layer (their ``--channels``, without the input's).
      kernels, strides, paddings: square kernel size, stride and symmetric zero padding, one int
        for all conv layers or one per layer (``--kernels``, ``--strides``, ``--paddings``).
      pools: one letter per conv layer (``"mm"``; a single letter applies to all): ``"m"`` 2x2
        max pooling, ``"a"`` 2x2 average pooling, ``"i"`` none (``--pools``). A pool must
        divide its map (PyTorch's pooling would drop the last row and column).
      fc: the dense layers' sizes, the output (or readout) last (``--fc``).
      activation: ``rho``: ``"hard_sigmoid"`` (default, ``clip(s, 0, 1)``), ``"sigmoid"``...
      free_steps, step_size, tol: the free phase (`HopfieldNetwork`).
      readout: the last ``fc`` layer is a readout outside the energy (their ``--softmax``),
        for ``equilibrium_propagation(cost="cross_entropy")``.
      conv_impl: ``"auto"``, ``"xla"`` or ``"im2col"`` (`fbalign.ops.conv_op`).
      dynamics: ``"descent"`` or ``"prototypical"`` (their ``s <- rho(dPhi/ds)``; `hopfield`).
        ``step_size`` defaults to 0.5 for descent, 1.0 for prototypical dynamics.

    Example (Laborieux et al.'s MNIST ConvNet, 28x28x1 -> 32c5 m -> 64c5 m -> 10):
      >>> net = conv_hopfield((28, 28, 1), (32, 64), 5, pools="mm", fc=(10,))
    """
    n = len(tuple(channels))
    if step_size is None:
        step_size = 1.0 if dynamics == "prototypical" else 0.5
    return ConvHopfieldNetwork(
        tuple(input_shape), tuple(channels), _per_layer("kernels", kernels, n),
        _per_layer("strides", strides, n), _per_layer("paddings", paddings, n),
        _per_layer("pools", pools, n), tuple(fc), activation, free_steps, step_size, tol,
        readout, conv_impl, dynamics)
