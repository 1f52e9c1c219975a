"""Synthetic gradients: decoupled neural interfaces (DNI, cDNI) for dense chains.

A *synthesizer* ``M_l`` predicts the gradient of the loss with respect to a hidden activation
``h_l`` from ``h_l`` alone (and, for cDNI, the label). Layer ``l`` updates from that prediction
as soon as its forward pass is done, without waiting for the layers above: it is *update
unlocked*. The synthesizer learns by regression onto the gradient that does arrive from the
layer above (a bootstrapped target), never differentiating into that target.

Scale convention: losses are means over the batch, so ``error = dL/dy`` carries a factor
``1/batch``. Synthesizers work in *per-example* units (their targets are ``batch * dL/dh``), and
their output is divided by the batch size before use, so that their learning rate does not
depend on the batch size.

Forward unlocking (synthetic *inputs*, Jaderberg et al. 2017, Sec. 3.3) is not implemented yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbalign._src.base import (
    Array,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    dense_grads,
    dense_layers,
    forwards_options,
)
from fbalign._src.checks import check_number

# --------------------------------------------------------------------------------------------
# Synthesizers
# --------------------------------------------------------------------------------------------


class Synthesizer(NamedTuple):
    """A model of the gradient ``dL/dh`` at an interface, as a pair of pure functions.

    Attributes:
      init: ``init(key, in_features, cond_features, out_features, dtype) -> params``.
        ``cond_features`` is 0 for an unconditioned synthesizer.
      apply: ``apply(params, h, cond) -> g``: ``h`` is ``(batch, in_features)``, ``cond`` is
        ``(batch, cond_features)`` or None; ``g`` is ``(batch, out_features)`` in per-example
        units (see the module docstring).
    """

    init: Callable[..., Params]
    apply: Callable[[Params, Array, Array | None], Array]


_DENSE_SYNTHESIZERS = (
    "its synthesizers are dense maps of each hidden layer's activity (Jaderberg et al. 2017 used "
    "convolutional synthesizers for conv nets, which fbalign does not implement); train a conv "
    "net with fa, dfa, kp or the sign-symmetry rules")


def linear_synthesizer(init_scale: float = 0.0) -> Synthesizer:
    r"""A linear synthesizer ``g = h A + c C + b``, zero-initialised as in the paper.

    Starting at zero means training starts as "no gradient" below each interface rather than as
    a random one (Jaderberg et al. 2017, Sec. 3).

    Args:
      init_scale: standard deviation of ``A`` and ``C`` at initialisation (times
        ``1/sqrt(fan_in)``); ``0.0`` gives the paper's zero initialisation.
    """

    def init(key, in_features, cond_features, out_features, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        fan = in_features + cond_features

        def draw(k, shape):
            if init_scale == 0.0:
                return jnp.zeros(shape, dtype)
            return init_scale / jnp.sqrt(fan).astype(dtype) * jax.random.normal(k, shape, dtype)

        p = {"w": draw(k1, (in_features, out_features)), "b": jnp.zeros((out_features,), dtype)}
        if cond_features:
            p["wc"] = draw(k2, (cond_features, out_features))
        return p

    def apply(params, h, cond=None):
        g = h @ params["w"] + params["b"]
        if "wc" in params:
            if cond is None:
                raise ValueError("this synthesizer is conditioned; pass cond (e.g. labels)")
            g = g + cond @ params["wc"]
        return g

    return Synthesizer(init, apply)


def mlp_synthesizer(
    hidden: Sequence[int] = (256,), activation: Callable[[Array], Array] = jax.nn.relu
) -> Synthesizer:
    """A small MLP synthesizer on ``[h, c]`` whose last layer is zero-initialised.

    The hidden layers get LeCun-normal weights; the output layer starts at zero so that, like
    `linear_synthesizer`, the first synthetic gradients are zero.

    Args:
      hidden: hidden widths.
      activation: hidden activation.
    """
    hidden = tuple(int(s) for s in hidden)

    def init(key, in_features, cond_features, out_features, dtype=jnp.float32):
        sizes = (in_features + cond_features, *hidden)
        keys = jax.random.split(key, len(hidden) + 1)
        layers = []
        kinit = jax.nn.initializers.lecun_normal()
        for k, din, dout in zip(keys[:-1], sizes[:-1], sizes[1:], strict=True):
            layers.append({"w": kinit(k, (din, dout), dtype), "b": jnp.zeros((dout,), dtype)})
        layers.append(
            {"w": jnp.zeros((sizes[-1], out_features), dtype),
             "b": jnp.zeros((out_features,), dtype)}
        )
        return layers

    def apply(params, h, cond=None):
        z = h if cond is None else jnp.concatenate([h, cond], axis=-1)
        if z.shape[-1] != params[0]["w"].shape[0]:
            raise ValueError(
                f"synthesizer expects {params[0]['w'].shape[0]} input features (h and cond), got "
                f"{z.shape[-1]}; conditioned synthesizers need cond"
            )
        for layer in params[:-1]:
            z = activation(z @ layer["w"] + layer["b"])
        return z @ params[-1]["w"] + params[-1]["b"]

    return Synthesizer(init, apply)


def synthesizer_loss(
    synthesizer: Synthesizer,
    params: Params,
    h: Array,
    target: Array,
    cond: Array | None = None,
    weight: Array | None = None,
) -> Array:
    r"""``0.5 * mean_b ||M(h, c) - sg(target)||^2``: the regression every synthesizer trains on.

    The target is wrapped in ``stop_gradient``: gradients reach only the synthesizer's params.

    Args:
      synthesizer: the model.
      params: its parameters.
      h: ``(batch, in_features)`` inputs.
      target: ``(batch, out_features)`` gradient targets in per-example units.
      cond: optional conditioning.
      weight: optional ``(batch,)`` example weights (0 excludes an example); the mean is over
        the weighted examples.
    """
    g = synthesizer.apply(params, h, cond)
    sq = 0.5 * jnp.sum((g - jax.lax.stop_gradient(target)) ** 2, axis=-1)
    if weight is None:
        return jnp.mean(sq)
    return jnp.sum(weight * sq) / jnp.maximum(jnp.sum(weight), 1.0)


# --------------------------------------------------------------------------------------------
# Feedforward DNI
# --------------------------------------------------------------------------------------------


class SyntheticGradientState(NamedTuple):
    """State of `synthetic_gradients`.

    Attributes:
      synth_params: one entry per hidden layer ``l = 0..L-2`` (the interface after layer ``l``):
        the synthesizer's params, or None where the layer is not decoupled.
      opt_state: the synthesizer optimizer's state, one entry per hidden layer (None likewise).
      step: number of ``update`` calls so far (drives the warm-up).
      synth_loss: ``(L-1,)`` prediction error ``0.5 mean_b ||M_l(h_l) - target_l||^2`` of each
        synthesizer measured at the last update, before its step (0 where not decoupled).
    """

    synth_params: tuple[Params | None, ...]
    opt_state: tuple[Any, ...]
    step: Array
    synth_loss: Array


WARMUP_MODES = ("freeze", "backprop")


def _resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    n_hidden = num_layers - 1
    if layers is None:
        return tuple(range(n_hidden))
    out = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n_hidden <= i < n_hidden:
            raise ValueError(
                f"decoupled layers must be hidden-layer indices in [{-n_hidden}, {n_hidden}) "
                f"(the interface after layer l; the output layer has none); got {tuple(layers)} "
                f"for a network of {num_layers} layers"
            )
        out.append(i % n_hidden)
    return tuple(sorted(set(out)))


def _conditioning(labels: Any, n_out: int, batch: int, dtype) -> Array:
    if labels is None:
        raise ValueError(
            "cDNI conditions its synthesizers on the labels: call "
            "rule.update(..., labels=targets) with integer class labels (batch,) or targets of "
            "the output's shape (batch, n_out)"
        )
    labels = jnp.asarray(labels)
    if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        cond = jax.nn.one_hot(labels, n_out, dtype=dtype)
    elif labels.ndim == 2 and labels.shape[1] == n_out:
        cond = labels.astype(dtype)
    else:
        raise ValueError(
            f"labels must be integer classes (batch,) or targets (batch, {n_out}); got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if cond.shape[0] != batch:
        raise ValueError(f"labels have batch {cond.shape[0]} but the error has batch {batch}")
    return cond


def synthetic_gradients(
    layers: Sequence[int] | None = None,
    conditioned: bool = False,
    synthesizer: Synthesizer | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    p_update: float = 1.0,
    warmup_steps: int = 0,
    warmup_mode: str = "freeze",
    mix: float | Array = 0.0,
) -> TapeRule:
    r"""Decoupled neural interfaces with synthetic gradients on a dense chain.

    With ``h_l = f(a_l)`` the output of layer ``l`` and ``t_l`` the gradient arriving at ``h_l``
    from the layer above,

    .. math::
        s_{L-1} = e, \qquad \delta_l = s_l \odot f'(a_l), \qquad
        t_l = \delta_{l+1} W_{l+1}^\top, \qquad
        s_l = (1 - \lambda)\, \tfrac{1}{B} M_l(h_l, c) + \lambda\, t_l \ \text{(decoupled } l),
        \quad s_l = t_l \ \text{(otherwise)},

    each layer updates with ``dW_l = x_l^T delta_l`` and each synthesizer descends
    ``0.5 mean_b ||M_l(h_l, c) - sg(B t_l)||^2``. This is bootstrapping: the target of ``M_l``
    is the signal of layer ``l+1`` (itself synthetic when ``l+1`` is decoupled) sent back
    through ``W_{l+1}``; the topmost synthesizer's target is the true gradient. With
    ``lambda = 0`` (the paper) a decoupled layer never sees a backpropagated gradient; with
    ``lambda = 1`` the rule is backprop. Computing all layers in one call is the same
    arithmetic as the asynchronous schedule in which each layer updates right after its forward
    pass.

    Args:
      layers: indices of the hidden layers whose output interface is decoupled (negative
        indices count from the top hidden layer); None decouples every hidden layer.
      conditioned: cDNI: synthesizers also see the one-hot label (pass ``labels=`` to
        ``update``).
      synthesizer: the gradient model; default `linear_synthesizer` (zero-initialised).
      optimizer: optax transform for the synthesizers; default ``optax.adam(learning_rate)``.
      learning_rate: the default optimizer's step size.
      p_update: each layer (and its synthesizer) updates with this probability per step, the
        paper's asynchrony experiment; below 1 the ``update`` call needs ``key=``.
      warmup_steps: for this many ``update`` calls the synthesizers train but their output is
        not applied (see ``warmup_mode``).
      warmup_mode: ``"freeze"``: during warm-up every layer at or below a decoupled interface
        gets a zero update (the layers above keep learning from the true gradient);
        ``"backprop"``: during warm-up ``lambda = 1``, the network trains by backprop and the
        synthesizers regress onto true gradients.
      mix: ``lambda``, the weight of the backpropagated gradient ``t_l`` in a decoupled layer's
        signal (0: pure synthetic, 1: backprop).

    Returns:
      A `TapeRule` whose state is `SyntheticGradientState`.

    References:
      Jaderberg, Czarnecki, Osindero, Vinyals, Graves, Silver & Kavukcuoglu (2017), "Decoupled
      neural interfaces using synthetic gradients", ICML.
      Czarnecki, Swirszcz, Jaderberg, Osindero, Vinyals & Kavukcuoglu (2017), "Understanding
      synthetic gradients and decoupled neural interfaces", ICML.
    """
    check_number("synthetic_gradients", "learning_rate", learning_rate, low=0)
    if warmup_mode not in WARMUP_MODES:
        raise ValueError(f"warmup_mode must be one of {WARMUP_MODES}, got {warmup_mode!r}")
    if not 0.0 <= float(p_update) <= 1.0:
        raise ValueError(f"p_update must lie in [0, 1], got {p_update}")
    if int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    synth = linear_synthesizer() if synthesizer is None else synthesizer
    tx = optax.adam(learning_rate) if optimizer is None else optimizer
    name = "cdni" if conditioned else "dni"

    def init_fn(key: PRNGKey, params: Params) -> SyntheticGradientState:
        dense = dense_layers(params)
        num = len(dense)
        dec = _resolve_layers(layers, num)
        n_out = dense[-1][0].shape[1]
        dtype = dense[0][0].dtype
        keys = jax.random.split(key, max(num - 1, 1))
        sps = []
        for i in range(num - 1):
            if i in dec:
                width = dense[i][0].shape[1]
                sps.append(synth.init(keys[i], width, n_out if conditioned else 0, width, dtype))
            else:
                sps.append(None)
        opt = tuple(None if sp is None else tx.init(sp) for sp in sps)
        return SyntheticGradientState(
            tuple(sps), opt, jnp.zeros((), jnp.int32), jnp.zeros((num - 1,), dtype)
        )

    def update_fn(
        params: Params, state: SyntheticGradientState, tape: Tape, error: Array, **extra: Any
    ):
        tape.require_dense(name, _DENSE_SYNTHESIZERS)
        dense = dense_layers(params)
        num = len(dense)
        if num != tape.num_layers:
            raise ValueError(
                f"params have {num} layers but the tape recorded {tape.num_layers}; "
                "was the tape made by the same model?"
            )
        if error.shape != tape.output.shape:
            raise ValueError(
                f"error has shape {tuple(error.shape)} but the network output has shape "
                f"{tuple(tape.output.shape)}; pass error = dL/dy for the output y."
            )
        dec = _resolve_layers(layers, num)
        if len(state.synth_params) != num - 1 or any(
            (sp is not None) != (i in dec) for i, sp in enumerate(state.synth_params)
        ):
            raise ValueError(
                f"{name}: the state does not match this network and decoupling; make it with "
                "rule.init(key, params) for the same params"
            )
        if p_update < 1.0 and extra.get("key") is None:
            raise ValueError(f"{name} with p_update < 1 draws which layers update: pass key=")
        batch = error.shape[0]
        dtype = error.dtype
        cond = None
        if conditioned:
            cond = _conditioning(extra.get("labels"), dense[-1][0].shape[1], batch, dtype)

        warm = warmup_steps > 0
        in_warmup = state.step < warmup_steps
        lam = jnp.asarray(mix, dtype)
        if warm and warmup_mode == "backprop":
            lam = jnp.where(in_warmup, jnp.ones_like(lam), lam)

        def objective(sps):
            delta = error * tape.derivs[-1]
            deltas = [None] * num
            deltas[-1] = delta
            losses = [jnp.zeros((), dtype)] * (num - 1)
            for i in reversed(range(num - 1)):
                t = delta @ dense[i + 1][0].T
                if i in dec:
                    h = tape.inputs[i + 1]
                    g = synth.apply(sps[i], h, cond)
                    # The target is a constant for the synthesizer: never differentiate into it.
                    target = jax.lax.stop_gradient(batch * t)
                    losses[i] = 0.5 * jnp.sum((g - target) ** 2) / batch
                    s = (1 - lam) * (g / batch) + lam * t
                else:
                    s = t
                delta = s * tape.derivs[i]
                deltas[i] = delta
            total = sum(losses) if losses else jnp.zeros((), dtype)
            return total, (tuple(deltas), jnp.stack(losses) if losses else jnp.zeros((0,), dtype))

        synth_grads, (deltas, losses) = jax.grad(objective, has_aux=True)(state.synth_params)
        deltas = jax.lax.stop_gradient(deltas)
        updates = [dense_grads(tape.inputs[i], deltas[i], dense[i][1] is not None)
                   for i in range(num)]

        if warm and warmup_mode == "freeze" and dec:
            keep = jnp.where(in_warmup, 0.0, 1.0).astype(dtype)
            updates = [
                jax.tree.map(lambda u: u * keep, u) if i <= max(dec) else u
                for i, u in enumerate(updates)
            ]

        masks = None
        if p_update < 1.0:
            masks = jax.random.bernoulli(extra["key"], p_update, (num,))
            updates = [
                jax.tree.map(lambda u, m=masks[i]: jnp.where(m, u, jnp.zeros_like(u)), u)
                for i, u in enumerate(updates)
            ]

        new_sps, new_opt = [], []
        for i, (sp, os_, gr) in enumerate(
            zip(state.synth_params, state.opt_state, synth_grads, strict=True)
        ):
            if sp is None:
                new_sps.append(None)
                new_opt.append(os_)
                continue
            upd, os_new = tx.update(gr, os_, sp)
            sp_new = optax.apply_updates(sp, upd)
            if masks is not None:
                m = masks[i]
                sp_new = jax.tree.map(lambda a, b, m=m: jnp.where(m, a, b), sp_new, sp)
                os_new = jax.tree.map(lambda a, b, m=m: jnp.where(m, a, b), os_new, os_)
            new_sps.append(sp_new)
            new_opt.append(os_new)

        new_state = SyntheticGradientState(
            tuple(new_sps), tuple(new_opt), state.step + 1, losses.astype(state.synth_loss.dtype)
        )
        return updates, new_state

    return TapeRule(init_fn, update_fn)


@forwards_options(synthetic_gradients, ("conditioned",))
def dni(**kwargs: Any) -> TapeRule:
    """Feedforward DNI: `synthetic_gradients` with unconditioned synthesizers.

    Keyword arguments are those of `synthetic_gradients` (except ``conditioned``).
    """
    if "conditioned" in kwargs:
        raise TypeError("dni() is unconditioned; use cdni() or synthetic_gradients(conditioned=)")
    return synthetic_gradients(conditioned=False, **kwargs)


@forwards_options(synthetic_gradients, ("conditioned",))
def cdni(**kwargs: Any) -> TapeRule:
    """Conditional DNI: synthesizers also see the one-hot label (``update(..., labels=y)``).

    Keyword arguments are those of `synthetic_gradients` (except ``conditioned``).
    """
    if "conditioned" in kwargs:
        raise TypeError("cdni() is conditioned; use dni() or synthetic_gradients(conditioned=)")
    return synthetic_gradients(conditioned=True, **kwargs)
