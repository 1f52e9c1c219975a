"""Modular and hybrid direct feedback alignment with dilated (sparse) feedback and grouped error
propagation (Han, Park, Ryu & Yoo 2020)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Float

from fbalign._src import primitives as P
from fbalign._src.backward import DirectFeedback, LinearOp, custom_linear_op
from fbalign._src.base import (
    Array,
    Links,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
    forwards_options,
)
from fbalign._src.feedback_init import Initializer, resolve_initializer
from fbalign._src.rules.feedback_alignment import DFA_ORIENTATION, direct_feedback, project
from fbalign._src.rules.random_backprop import random_backprop

# A partition of the network's layers into consecutive modules: module sizes from the input.
Partition = Callable[[Params], tuple[int, ...]]

PAPER = ("Han, Park, Ryu & Yoo (2020), \"Extension of direct feedback alignment to "
         "convolutional and recurrent neural network for bio-plausible deep learning\", "
         "arXiv:2006.12830")


class ModularDFAState(NamedTuple):
    """Fixed random feedback of modular DFA.

    Attributes:
      feedback: per layer, ``B_l`` of shape ``(n_out, *map_l)`` for a hidden layer that is the
        top (last layer) of a module (``(n_out, ceil(H/d), ceil(W/d), C)`` on an ``(H, W, C)``
        map with ``dilation=d``); None for the layers inside a module and for the output.
      kernels: per layer, with ``groups=g``: the grouped feedback kernel ``G_l`` of shape
        ``(*window, cin / g, cout)`` of a conv layer that sends the error down inside its
        module; None elsewhere (and everywhere without ``groups``).
    """

    feedback: tuple[Float[Array, " n_out *map"] | None, ...]
    kernels: tuple[Float[Array, " *window cin_g cout"] | None, ...]


# ---------------------------------------------------------------------------------------------
# Partitions


def module_sizes(modules: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The sizes (layers per module, from the input) that ``modules`` names for a network of
    ``num_layers`` layers.

    An int ``n`` splits the layers into ``n`` consecutive modules of equal size; when ``n`` does
    not divide ``num_layers``, the first ``num_layers % n`` modules (nearest the input) take one
    layer more. A sequence is taken as the sizes and must sum to ``num_layers``. Anything else
    raises a ValueError naming the network's layer count.
    """
    if isinstance(modules, int) and not isinstance(modules, bool):
        if not 1 <= modules <= num_layers:
            raise ValueError(f"modules={modules}: a network of {num_layers} layers splits into "
                             f"1 to {num_layers} modules")
        base, extra = divmod(num_layers, modules)
        return tuple(base + 1 if k < extra else base for k in range(modules))
    sizes = tuple(modules)
    if sum(sizes) != num_layers:
        raise ValueError(f"modules={sizes} sums to {sum(sizes)} layers but the network has "
                         f"{num_layers} layers; give module sizes (layers per module, from the "
                         f"input) that sum to {num_layers}, or an int number of equal modules")
    return sizes


def _check_modules(modules: Any) -> None:
    """Construction-time check of ``modules`` (its sum is checked once the network is known)."""
    if callable(modules):
        return
    if isinstance(modules, int) and not isinstance(modules, bool):
        if modules < 1:
            raise ValueError(f"modules={modules}: give a positive number of modules")
        return
    if isinstance(modules, str) or not isinstance(modules, Sequence) or not modules:
        raise TypeError(f"modules must be an int (number of equal modules) or a non-empty "
                        f"sequence of module sizes, got {modules!r}")
    bad = [s for s in modules if not isinstance(s, int) or isinstance(s, bool) or s < 1]
    if bad:
        raise ValueError(f"modules={tuple(modules)}: every module size must be a positive int "
                         f"(layers per module, from the input), got {bad[0]!r}")


def module_tops(sizes: Sequence[int]) -> frozenset[int]:
    """The layer index of each module's top (its last layer): the cumulative sizes minus one."""
    return frozenset(sum(sizes[:k + 1]) - 1 for k in range(len(sizes)))


def _partition(modules: int | Sequence[int] | Partition) -> Partition:
    if callable(modules):
        return modules
    return lambda params: module_sizes(modules, len(dense_layers(params)))


def bp_partition(bp_layers: int | Sequence[int] | str) -> Partition:
    """The partition of `hybrid_dfa`: every hidden layer named in ``bp_layers`` joins the module
    of the layer above it (its error comes by backprop from that layer); every other layer is a
    module top (its error comes by DFA). ``bp_layers``: layer indices (negative ones count from
    the output), ``"conv"`` (every hidden conv layer: kernels of rank > 2) or ``"dense"`` (every
    hidden dense layer)."""
    if isinstance(bp_layers, str):
        if bp_layers not in ("conv", "dense"):
            raise ValueError(f"bp_layers={bp_layers!r}: give layer indices, 'conv' or 'dense'")
    elif isinstance(bp_layers, int) and not isinstance(bp_layers, bool):
        bp_layers = (bp_layers,)
    elif not isinstance(bp_layers, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in bp_layers):
        raise TypeError(f"bp_layers must be layer indices, 'conv' or 'dense', got {bp_layers!r}")

    def partition(params: Params) -> tuple[int, ...]:
        layers = dense_layers(params)
        n = len(layers)
        if isinstance(bp_layers, str):
            conv = bp_layers == "conv"
            chosen = {i for i, (w, _) in enumerate(layers[:-1]) if (w.ndim > 2) == conv}
            if not chosen:
                raise ValueError(f"bp_layers={bp_layers!r}: this network of {n} layers has no "
                                 f"hidden {bp_layers} layer; name the layers by index")
        else:
            if any(not -n <= i < n for i in bp_layers):
                raise ValueError(f"bp_layers={tuple(bp_layers)}: a network of {n} layers has "
                                 f"layers 0 to {n - 1}")
            chosen = {i % n for i in bp_layers}
            if n - 1 in chosen:
                raise ValueError(f"bp_layers={tuple(bp_layers)} names the output layer {n - 1}, "
                                 "which has no layer above to backpropagate from; name hidden "
                                 f"layers (0 to {n - 2})")
        tops = [i for i in range(n) if i not in chosen]
        return tuple(t - s for s, t in zip([-1, *tops[:-1]], tops, strict=True))

    return partition


# ---------------------------------------------------------------------------------------------
# Dilated direct feedback and grouped error propagation


def coarse_shape(shape: Sequence[int], dilation: int) -> tuple[int, ...]:
    """``(ceil(H/d), ceil(W/d), C)`` for an ``(H, W, C)`` map; other shapes unchanged."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or dilation == 1:
        return shape
    return (-(-shape[0] // dilation), -(-shape[1] // dilation), shape[2])


def dilated_error(
    e: Float[Array, "batch n_out"], b: Float[Array, "n_out hc wc c"], map_shape: Sequence[int],
    dilation: int,
) -> Float[Array, "batch h w c"]:
    r"""The dilated direct feedback to an ``(H, W, C)`` map: ``e @ B`` on the coarse
    ``(ceil(H/d), ceil(W/d), C)`` grid, placed at every ``d``-th row and column, zeros between

    .. math:: \epsilon[n, d y, d x, c] = \sum_k e[n, k] B[k, y, x, c], \quad
              \epsilon[n, i, j, c] = 0 \text{ unless } d | i \text{ and } d | j,

    a transposed 1x1 convolution with stride ``d`` (interior padding, ``lax.pad``).
    """
    height, width, _ = map_shape
    coarse = P.project_error(e, b)
    zero = jnp.zeros((), coarse.dtype)
    hc, wc = coarse.shape[-3:-1]
    pads = [(0, height - (hc - 1) * dilation - 1, dilation - 1),
            (0, width - (wc - 1) * dilation - 1, dilation - 1), (0, 0, 0)]
    return lax.pad(coarse, zero, [(0, 0, 0)] * (coarse.ndim - 3) + pads)


@functools.cache
def grouped_op(op: LinearOp, groups: int) -> LinearOp:
    """``op`` with ``groups`` channel groups: ``grouped_op(op, g)(x, G)`` (``G`` of shape
    ``(*window, cin / g, cout)``, lax's ``feature_group_count`` layout) applies ``op`` to each
    group of ``cin / g`` input channels with its ``cout / g`` output channels and concatenates:
    the convolution with the block-diagonal kernel, in ``g`` times fewer multiply-adds. Written
    with the layer's own op (any strides, padding, XLA or im2col); cached per ``(op, g)``."""

    def op_g(x: Array, k: Array) -> Array:
        cin, cout = k.shape[-2], k.shape[-1] // groups
        outs = [op(x[..., j * cin:(j + 1) * cin], k[..., j * cout:(j + 1) * cout])
                for j in range(groups)]
        return jnp.concatenate(outs, axis=-1)

    return op_g


@functools.cache
def grouped_feedback_op(op: LinearOp, groups: int) -> Callable[[Array, Array, Array], Array]:
    """``f(x, w, G) = op(x, w)`` whose backward gives ``w`` its gradient and sends the error to
    ``x`` through ``grouped_op(op, groups)(., G)`` (grouped feedback alignment); ``G`` gets
    zero. Cached per ``(op, groups)``."""
    op_g = grouped_op(op, groups)

    def send_down(g: Array, x: Array, w: Array, k: Array) -> Array:
        del w
        return jax.vjp(lambda x_: op_g(x_, k), x)[1](g)[0]

    def zero(g: Array, x: Array, w: Array, k: Array) -> Array:
        del g, x, w
        return jnp.zeros_like(k)

    return custom_linear_op(op, send_down, zero)


@dataclasses.dataclass(frozen=True)
class ModularFeedback(DirectFeedback):
    """The ``jax.grad`` form of `modular_dfa`: hidden layer ``i`` with ``feedback[i]`` (a module
    top) receives ``e @ B_i`` through a `dfa_hidden` tap (dilated on a map whose ``B_i`` is
    coarse); a layer whose ``feedback[i]`` is None passes the error from above unchanged
    (backprop inside the module). Layer ``i`` with ``kernels[i]`` sends its error down through
    the grouped feedback kernel (`grouped_feedback_op`) instead of ``W_i``."""

    kernels: Sequence[Array | None] = ()
    groups: int | None = None
    dilation: int = 1
    # kind "dfa" (DirectFeedback's): the probes compare each module top's B_l with P_l^T as for
    # DFA; a layer inside a module has no B_l and gets backprop's delta (`rule_deltas`)

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        k = self.kernels[i] if self.kernels else None
        if k is None:
            return op(x, w)
        return grouped_feedback_op(op, self.groups)(x, w, k)

    def tap(self, i: Any, h: Array, carrier: Array | None) -> tuple[Array, Array | None]:
        b = self.feedback[i]
        if b is None:  # inside a module: the error from the layer above, as backprop
            return h, carrier
        if b.ndim == 2 or tuple(b.shape[1:]) == tuple(h.shape[-b.ndim + 1:]):
            return P.dfa_hidden(h, carrier, b)
        d = self.dilation
        want = coarse_shape(h.shape[-3:], d)
        if h.ndim < 3 or tuple(b.shape[1:]) != want:
            raise ValueError(f"modular_dfa: feedback for layer {i} has shape {tuple(b.shape)}; "
                             f"its map {tuple(h.shape[1:])} with dilation={d} needs "
                             f"{(b.shape[0], *want)}")
        # The tap on the coarse grid h[::d, ::d]; the rest of the map gets no error at all.
        grid, carrier = P.dfa_hidden(h[..., ::d, ::d, :], carrier, b)
        return P.stop_error(h).at[..., ::d, ::d, :].set(grid), carrier


# ---------------------------------------------------------------------------------------------
# The rule


def _check_options(dilation: Any, groups: Any, nonzeros: Any) -> None:
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1 (1: dense feedback), got {dilation!r}")
    if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool)
                               or groups < 1):
        raise ValueError(f"groups must be a positive int or None (backprop inside modules), "
                         f"got {groups!r}")
    if nonzeros is not None and (not isinstance(nonzeros, int) or isinstance(nonzeros, bool)
                                 or nonzeros < 1):
        raise ValueError(f"nonzeros must be a positive int or None (dense feedback), got "
                         f"{nonzeros!r}")


def _maps(params: Params, feature_shapes: Any) -> list[tuple[int, ...]]:
    """Each layer's per-example output shape: ``feature_shapes``, else a dense chain's widths."""
    layers = dense_layers(params)
    if feature_shapes is not None:
        return [tuple(int(d) for d in f) for f in feature_shapes]
    if any(w.ndim != 2 for w, _ in layers):
        raise ValueError("modular_dfa: a network with conv kernels needs its feature maps: call "
                         "rule.init(key, params, feature_shapes=network.feature_shapes)")
    return [(w.shape[1],) for w, _ in layers]


def _draw_direct(key: PRNGKey, params: Params, tops: frozenset[int], maps, init, scale,
                 dilation: int, nonzeros: int | None, has_maps: bool) -> tuple:
    """``B_l`` for the module tops (None elsewhere) with DFA's draw (`direct_feedback`: the same
    key gives DFA's matrices), on the coarse maps; sparse SRBP's masked draw with ``nonzeros``."""
    n = len(maps)
    hidden_tops = [i for i in sorted(tops) if i < n - 1]
    if dilation > 1 and not any(len(maps[i]) == 3 for i in hidden_tops):
        raise ValueError(f"dilation={dilation} sparsifies the feedback to conv feature maps, but "
                         "no module top of this network is an (H, W, C) map; use dilation=1")
    coarse = [coarse_shape(m, dilation) for m in maps] if has_maps else None
    if nonzeros is None:
        full = direct_feedback(key, params, init, scale, coarse)
    else:
        full = random_backprop(init, scale, skip=True, nonzeros=nonzeros).init(
            key, params, coarse).feedback
    return tuple(b if i in tops else None for i, b in enumerate(full))


def _draw_kernels(key: PRNGKey, params: Params, tops: frozenset[int], groups: int | None,
                  init, scale) -> tuple:
    """``G_l`` of shape ``(*window, cin / g, cout)`` for every conv layer ``l`` that sends its
    error down inside a module (layer ``l - 1`` is not a module top), std ``1/sqrt(fan)`` with
    ``fan = window * cout / g`` (the outputs one input unit hears); None elsewhere."""
    layers = dense_layers(params)
    out = [None] * len(layers)
    if groups is None:
        return tuple(out)
    keys = jax.random.split(jax.random.fold_in(key, 0x6D646661), len(layers))
    for i, (w, _) in enumerate(layers):
        if i == 0 or i - 1 in tops or w.ndim < 3:
            continue
        cin, cout = w.shape[-2], w.shape[-1]
        if cin % groups or cout % groups:
            raise ValueError(f"groups={groups} must divide the channels of conv layer {i} "
                             f"(cin={cin}, cout={cout}); pick a common divisor")
        shape = (*w.shape[:-2], cin // groups, cout)
        fan = math.prod(w.shape[:-2]) * cout // groups
        out[i] = resolve_initializer(init, scale, fan=fan)(keys[i], shape, w.dtype)
    if all(k is None for k in out):
        raise ValueError(f"groups={groups} replaces W^T by a grouped kernel in conv layers that "
                         "send errors inside a module, and this partition has none (every conv "
                         "layer's input is a module top or the input); use groups=None")
    return tuple(out)


def _expected_shapes(tape: Tape, fb: Sequence, tops: frozenset[int], dilation: int) -> list:
    n_out = tape.output.shape[-1]
    out = []
    for i, a in enumerate(tape.preacts):
        if i not in tops or i == len(tape.preacts) - 1:
            out.append(None)
        elif fb[i] is not None and fb[i].ndim == 2 and (dilation == 1 or a.ndim != 4):
            out.append((n_out, math.prod(a.shape[1:])))
        else:
            out.append((n_out, *coarse_shape(a.shape[1:], dilation)))
    return out


def _check_state(state: ModularDFAState, params: Params, tape: Tape, sizes: tuple[int, ...],
                 dilation: int, groups: int | None) -> None:
    """Raises naming what does not fit: feedback shapes (`check_feedback_shapes`), feedback
    inside a module, grouped kernels where the rule has none or none where it needs one."""
    tops, layers = module_tops(sizes), dense_layers(params)
    fb, kernels = state.feedback, state.kernels
    check_feedback_shapes(fb, _expected_shapes(tape, fb, tops, dilation), "modular_dfa",
                          DFA_ORIENTATION, dtype=layers[0][0].dtype)
    inner = [i for i, b in enumerate(fb) if b is not None and i not in tops]
    want = [groups is not None and i > 0 and i - 1 not in tops and w.ndim > 2
            for i, (w, _) in enumerate(layers)]
    have = [k is not None for k in kernels]
    if inner or have != want:
        raise ValueError(f"modular_dfa: the state does not fit the partition {sizes} with "
                         f"groups={groups} (feedback inside modules at layers {inner}, grouped "
                         f"kernels at {[i for i, h in enumerate(have) if h]}, expected at "
                         f"{[i for i, w in enumerate(want) if w]}); draw it with this rule's "
                         "init")


def _make_update(partition: Partition, dilation: int, groups: int | None):
    def update_fn(params: Params, state: ModularDFAState, tape: Tape, error: Array,
                  **extra: Any) -> tuple[list[dict[str, Array]], ModularDFAState]:
        del extra
        sizes = partition(params)
        _check_state(state, params, tape, sizes, dilation, groups)
        tops, layers = module_tops(sizes), dense_layers(params)
        fb, kernels = state.feedback, state.kernels
        out_delta = error * tape.derivs[-1]

        def send_back(i: int, delta: Array) -> Array:
            j = i - 1
            if j in tops:  # module top: the output error, directly
                b = fb[j]
                if tape.is_dense or b.ndim == 2 or b.shape[1:] == tape.preacts[j].shape[1:]:
                    return project(tape, j, out_delta, b)
                return dilated_error(out_delta, b, tape.preacts[j].shape[1:], dilation)
            if kernels[i] is None:  # inside a module: backprop through W_i
                return tape.send_back(i, delta, layers[i][0])
            ops = list(tape.links.ops)
            ops[i] = grouped_op(ops[i], groups)
            grouped = tape._replace(links=Links(ops, tape.links.between))
            return grouped.send_back(i, delta, kernels[i])

        return chain_updates(params, tape, error, send_back), state

    return update_fn


def modular_dfa(
    modules: int | Sequence[int] | Partition = 2,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    dilation: int = 1,
    nonzeros: int | None = None,
    groups: int | None = None,
) -> TapeRule:
    r"""Modular direct feedback alignment: DFA between modules, backprop inside them.

    The ``L`` layers are split into consecutive modules; layer ``t`` is a module top when it is
    the last layer of its module. With ``e = \partial L / \partial a_{L-1}`` (the output
    layer's error, as in DFA) and ``\epsilon_l`` the error reaching ``h_l = f(a_l)``:

    .. math::
        \epsilon_l = e B_l \ \text{(module top)}, \qquad
        \epsilon_l = \mathrm{op}_{l+1}^\top(\delta_{l+1}; W_{l+1}) \ \text{(inside a module)},
        \qquad \delta_l = \epsilon_l \odot f'(a_l), \quad \Delta W_l = x_l^\top \delta_l

    (``op^T`` is ``\delta W^T`` for a dense layer, the transposed convolution then pooling's
    VJP for a conv layer). One module per layer is DFA (`direct_feedback_alignment`, the same
    ``B`` for the same key); one module for the whole network is backprop.

    Options (all fixed, random, drawn by ``init``):

    * ``dilation=d`` (sparse feedback in dilated-convolution form): a module top with an
      ``(H, W, C)`` map gets ``B_l`` of shape ``(n_out, ceil(H/d), ceil(W/d), C)``; ``e B_l``
      lands on every ``d``-th row and column of the map, zeros between (`dilated_error`, a
      transposed 1x1 convolution of stride ``d``): ``d^2`` times fewer feedback weights and
      multiply-adds. Dense module tops keep a dense ``B_l``; ``d > 1`` with no map among the
      module tops is refused.
    * ``nonzeros=k`` (sparse feedback): each receiving unit keeps ``k`` random nonzeros of its
      ``n_out`` feedback weights, sparse SRBP's mask (`random_backprop` with ``skip=True``;
      Baldi et al. 2018). Stored and applied as a masked dense ``B_l``, not as (index, value)
      pairs: the contraction is only ``n_out`` long, and `dfa_hidden` takes a dense ``B``.
    * ``groups=g`` (grouped error propagation): inside a module, a conv layer ``l`` sends its
      error down through a fixed random kernel ``G_l`` of shape ``(*window, cin/g, cout)``
      convolved with ``feature_group_count = g`` (block-diagonal channel connectivity,
      `grouped_op`: ``g`` times fewer multiply-adds) instead of ``W_l``: feedback alignment
      with a grouped kernel. Dense layers inside a module keep ``W^T``. None: backprop inside.

    The paper's full text could not be read here; from its abstract and the issue we take
    modules as above, "sparse backward weight ... in a form of dilated convolution" as the
    coarse grid projection, and "error propagation ... simpler through the group convolution"
    as grouped feedback kernels inside modules. Which layers the paper groups, its dilation
    offsets and its feedback scales are not known.

    Args:
      modules: module sizes (layers per module, from the input; they must sum to the number of
        layers), an int number of equal modules (the first ones one layer larger when it does
        not divide), or a callable ``params -> sizes`` (`bp_partition`).
      init, scale: the feedback initialiser and its std/limit/gain (as in
        `direct_feedback_alignment`; DFA's default scales, on the coarse maps with dilation).
      dilation: the grid step of the feedback to conv maps; 1 is dense.
      nonzeros: nonzero feedback weights per receiving unit; None is dense.
      groups: channel groups of the feedback kernels inside modules; None is backprop there.

    Returns:
      A `TapeRule` with `ModularDFAState`. ``init(key, params, feature_shapes=None)`` needs the
      network's ``feature_shapes`` on conv nets. Its ``jax.grad`` form runs `ModularFeedback`
      in the network's ``apply(..., backward=...)``.

    References:
      Han, Park, Ryu & Yoo (2020), "Extension of direct feedback alignment to convolutional and
      recurrent neural network for bio-plausible deep learning", arXiv:2006.12830.
      Nokland (2016), "Direct feedback alignment provides learning in deep neural networks".
    """
    _check_modules(modules)
    _check_options(dilation, groups, nonzeros)
    partition = _partition(modules)

    def init_fn(key: PRNGKey, params: Params, feature_shapes: Any = None) -> ModularDFAState:
        tops = module_tops(partition(params))
        maps = _maps(params, feature_shapes)
        fb = _draw_direct(key, params, tops, maps, init, scale, dilation, nonzeros,
                          feature_shapes is not None)
        return ModularDFAState(fb, _draw_kernels(key, params, tops, groups, init, scale))

    def backward(feedback: Any, labels: Any) -> ModularFeedback:
        del labels
        direct, kernels = feedback
        return ModularFeedback(feedback=direct, kernels=kernels, groups=groups,
                               dilation=dilation)

    return TapeRule(init_fn, _make_update(partition, dilation, groups),
                    feedback=lambda params, state: (state.feedback, state.kernels),
                    backward=backward)


@forwards_options(modular_dfa, ("modules", "init", "scale"))
def hybrid_dfa(
    bp_layers: int | Sequence[int] | str = (0,),
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    **options: Any,
) -> TapeRule:
    r"""Hybrid DFA: the hidden layers named in ``bp_layers`` get their error by backprop from the
    layer above; every other hidden layer gets ``e B_l`` by DFA.

    Exactly `modular_dfa` with the partition `bp_partition` (``bp_layers``): each named layer
    joins the module of the layer above, every other layer ends a module. On LeNet-5 (layers
    conv1, conv2, fc1, fc2, out):

    * ``bp_layers="conv"`` (the conv stack trained by BP below a DFA-trained classifier):
      modules ``(3, 1, 1)``: fc1 and fc2 hear ``e B``, conv2 and conv1 the backprop of fc1's
      error;
    * ``bp_layers="dense"`` (the reverse): modules ``(1, 1, 3)``: conv1 and conv2 hear ``e B``,
      fc2 and fc1 the backprop of the output error (fc1 and fc2 are trained by backprop);
    * the default ``(0,)``: the first layer learns by backprop from the second, which hears
      DFA; modules ``(2, 1, ..., 1)``; meaningful on any network with two hidden layers.

    Uncertain: the abstract of Han et al. (2020) says only that "hybrid DFA increases the
    accuracy of the CNN and RNN training to the BP-level"; their earlier CNN work (Han & Yoo
    2019) combines BP in the conv layers with DFA in the fully connected ones, which
    ``bp_layers="conv"`` reproduces, but which layers the 2020 paper's hybrid assigns to BP
    could not be read. Options (``dilation``, ``nonzeros``, ``groups``) as in `modular_dfa`.

    References:
      Han, Park, Ryu & Yoo (2020), arXiv:2006.12830; Han & Yoo (2019), "Direct feedback
      alignment based convolutional neural network training for low-power online learning
      processor", ICCV Workshops.
    """
    return modular_dfa(bp_partition(bp_layers), init, scale, **options)
