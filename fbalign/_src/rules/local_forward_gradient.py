r"""Activity-perturbed forward gradient with local losses: each layer estimates the gradient of its
own loss by perturbing its activity in forward mode, then maps it onto its weights locally.

Ren, Kornblith, Liao & Hinton (2023), "Scaling forward gradient with local losses", ICLR.
Baydin, Pearlmutter, Syme, Wood & Torr (2022), "Gradients without backpropagation" (the
weight-perturbed forward gradient, `fbalign.rules.forward_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbalign._src.base import (
    Array,
    Batch,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
)
from fbalign._src.checks import check_choice
from fbalign._src.models import require_mlp
from fbalign._src.rules.forward_gradient import TANGENTS

PERTURB = ("activity", "preactivation")
_WHY = "it perturbs each dense layer's activity and maps the estimate through x @ W + b"


class LocalForwardGradientState(NamedTuple):
    """``heads[l]``: the linear classifier ``{"w": (n_l, n_out), "b": (n_out,)}`` on hidden layer
    ``l``'s activity that defines its local loss (one per hidden layer; empty without local
    losses); ``head_opt``: their optimizer states."""

    heads: tuple[dict[str, Array], ...]
    head_opt: tuple[Any, ...]


def per_example_losses(loss: Callable[[Array, Array], Array], out: Array, y: Array) -> Array:
    """``[loss(out_i, y_i)]_i``: a batch-mean loss evaluated on each example alone (so that
    ``loss(out, y) = mean_i`` of these)."""
    return jax.vmap(lambda o, t: loss(o[None], t[None]))(out, y)


def _dense(layer: dict[str, Array], h: Array) -> Array:
    a = h @ layer["w"]
    return a + layer["b"] if "b" in layer else a


def _draw(key: PRNGKey, shape: tuple[int, ...], dtype: Any, distribution: str) -> Array:
    if distribution == "normal":
        return jax.random.normal(key, shape, dtype)
    return jax.random.rademacher(key, shape, dtype)


def activity_forward_gradient(per_example_loss: Callable[[Array], Array], z: Array,
                              key: PRNGKey | None = None, num_tangents: int = 1,
                              distribution: str = "normal", *,
                              tangents: Array | None = None) -> Array:
    r"""The activity-perturbed forward-gradient estimate of ``\partial L / \partial z`` for
    ``L(z) = mean_i \ell_i(z_i)``, ``z`` of shape ``(N, n)``.

    Each example ``i`` gets its own tangent ``u_i`` with ``E[u u^T] = I``; one ``jax.jvp`` of
    the per-example losses gives every ``d_i = \nabla_{z_i} \ell_i \cdot u_i`` (forward mode,
    no backward pass), and the estimate is ``(1/K) \sum_k d_{ik} u_{ik} / N`` (unbiased: ``E[d
    u] = E[u u^T] \nabla \ell = \nabla \ell``). For normal tangents one sample has
    ``Var[(d u)_{ij}] = ||\nabla_{z_i}\ell_i||^2 + (\nabla_{z_i}\ell_i)_j^2``.

    Args:
      per_example_loss: ``z -> (N,)``, example ``i``'s loss depending on row ``i`` only.
      z: the activity to perturb.
      key: PRNG key for the tangents.
      num_tangents: ``K``.
      distribution: ``"normal"`` or ``"rademacher"``.
      tangents: ``(K, *z.shape)`` tangents to use instead of drawing them (``key``,
        ``num_tangents`` and ``distribution`` are then ignored).
    """
    if tangents is None:
        tangents = _draw(key, (num_tangents, *z.shape), z.dtype, distribution)
    _, lin = jax.linearize(per_example_loss, z)
    d = jax.vmap(lin)(tangents)  # (K, N)
    return jnp.mean(d[..., None] * tangents, axis=0) / z.shape[0]


def _check_options(num_tangents: int, distribution: str, perturb: str, local_losses: bool,
                   head_learning_rate: float) -> None:
    if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
        raise ValueError(f"local_forward_gradient: num_tangents must be a positive integer, got "
                         f"{num_tangents!r}")
    check_choice("local_forward_gradient", "distribution", distribution, TANGENTS)
    check_choice("local_forward_gradient", "perturb", perturb, PERTURB)
    if not isinstance(local_losses, bool):
        raise ValueError(f"local_forward_gradient: local_losses must be True or False, got "
                         f"{local_losses!r}")
    if (isinstance(head_learning_rate, bool) or not isinstance(head_learning_rate, (int, float))
            or not head_learning_rate > 0):
        raise ValueError(f"local_forward_gradient: head_learning_rate must be a positive number, "
                         f"got {head_learning_rate!r}")


def local_forward_gradient(num_tangents: int = 1, *,
                           distribution: Literal["normal", "rademacher"] = "normal",
                           perturb: Literal["activity", "preactivation"] = "activity",
                           local_losses: bool = True, head_learning_rate: float = 1e-3,
                           head_optimizer: optax.GradientTransformation | None = None,
                           ) -> LearningRule:
    r"""Activity-perturbed forward gradient with local losses (Ren et al. 2023) on a dense
    `fbalign.models.mlp`.

    Every layer is a block: ``a_l = \mathrm{sg}(h_{l-1}) W_l + b_l``, ``z_l = f_l(a_l)``, with a
    stop-gradient between blocks. Block ``l`` has a loss ``L_l(z_l)``: for hidden layers the
    harness's loss of a linear classifier head on the activity, ``L_l = \mathcal{L}(z_l V_l +
    c_l, y)`` (heads in the rule state, trained on their true gradient with ``head_optimizer``,
    the activity stopped); for the last layer the global loss ``\mathcal{L}(z_L, y)``. The
    block's activity is perturbed, ``u \sim N(0, I)`` per example, and forward mode gives the
    directional derivatives ``d_i = \nabla_{z_i} L_l \cdot u_i`` (`activity_forward_gradient`),
    so ``\hat g_z = d u`` estimates ``\nabla_z L_l`` without a backward pass through the loss.
    The estimate then crosses this layer only:

    .. math:: \hat g_{W_l} = h_{l-1}^\top (\hat g_z \odot f_l'(a_l)), \qquad
              \hat g_{b_l} = \textstyle\sum_i (\hat g_z \odot f_l'(a_l))_i,

    unbiased for ``\nabla_{W_l} L_l`` (``jax.grad`` of the local loss with the input stopped).
    With ``perturb="preactivation"`` the tangent perturbs ``a_l`` instead (the paper's ``z =
    xW`` before the nonlinearity) and ``\hat g_{W_l} = h_{l-1}^\top \hat g_a``: same mean,
    less variance where ``f'`` vanishes (dead ReLUs draw no noise into ``d``). Averaging over
    ``K`` tangents divides the variance by ``K``. Without ``local_losses``, every block's loss
    is the global one, reached in forward mode through the layers above (Ren et al.'s global
    activity-perturbed forward gradient; still no backward pass).

    Under data parallelism each shard draws its own tangents (the key is folded with the axis
    index) and the head gradients are averaged over the axis before the head optimizer runs,
    so every shard keeps the same heads.

    Args:
      num_tangents: ``K``, tangents averaged per block and step.
      distribution: ``"normal"`` (the paper's) or ``"rademacher"``.
      perturb: ``"activity"`` (``z_l = f(a_l)``) or ``"preactivation"`` (``a_l``).
      local_losses: give each hidden layer a local classifier head (the paper's local losses);
        False uses the global loss for every block.
      head_learning_rate: the step size of the default head optimizer,
        ``optax.adam(head_learning_rate)``.
      head_optimizer: an optax transformation for the heads instead.

    Returns:
      A `LearningRule` with a `LocalForwardGradientState`. Metric (with local losses):
      ``lfg_local_loss``, the heads' losses averaged over hidden layers.

    Example:
      >>> rule = fbalign.rules.local_forward_gradient(num_tangents=4, head_learning_rate=1e-2)
      >>> fbalign.train.fit(fbalign.mlp((64, 64, 64, 10), activation="relu"), rule,
      ...                   optax.adam(1e-3), data)
    """
    _check_options(num_tangents, distribution, perturb, local_losses, head_learning_rate)
    tx = optax.adam(head_learning_rate) if head_optimizer is None else head_optimizer
    name = "local_forward_gradient"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> LocalForwardGradientState:
        require_mlp(network, name, _WHY)
        if not local_losses:
            return LocalForwardGradientState((), ())
        n_out, dtype = network.sizes[-1], params[0]["w"].dtype
        keys = jax.random.split(key, max(len(params) - 1, 1))
        heads = tuple(
            {"w": jax.nn.initializers.lecun_normal()(k, (width, n_out), dtype),
             "b": jnp.zeros((n_out,), dtype)}
            for k, width in zip(keys, network.sizes[1:-1], strict=False))
        return LocalForwardGradientState(heads, tuple(tx.init(h) for h in heads))

    def step_fn(params: Params, state: LocalForwardGradientState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, LocalForwardGradientState, StepOutput]:
        require_mlp(context.network, name, _WHY)
        acts, loss, axis = context.network.activations(), context.loss, context.axis_name
        x, y = batch.x, batch.y
        num = len(params)
        if axis is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        # every block's tangents from one draw (one sampler in the program: it compiles slowly)
        widths = [layer["w"].shape[1] for layer in params]
        dtype = jnp.result_type(x, params[0]["w"])
        flat = _draw(key, (num_tangents, x.shape[0], sum(widths)), dtype, distribution)
        cuts = [sum(widths[:i]) for i in range(num + 1)]
        tangents = [flat[..., cuts[i]:cuts[i + 1]] for i in range(num)]

        hs, pre = [x], []  # h_0 = x, ..., h_L = output; pre[l] = a_l
        for layer, f in zip(params, acts, strict=True):
            pre.append(_dense(layer, hs[-1]))
            hs.append(f(pre[-1]))
        out = hs[-1]

        def global_from(i: int) -> Callable[[Array], Array]:
            """Block ``i``'s activity ``z_i`` to the per-example global losses."""
            def g(z):
                h = z
                for layer, f in zip(params[i + 1:], acts[i + 1:], strict=True):
                    h = f(_dense(layer, h))
                return per_example_losses(loss, h, y)
            return g

        def head_loss(head, z):
            return per_example_losses(loss, _dense(head, z), y)

        updates, head_grads, local_vals = [], [], []
        for i, (layer, f) in enumerate(zip(params, acts, strict=True)):
            if local_losses and i < num - 1:
                head = state.heads[i]
                block_loss = lambda z, head=head: head_loss(head, z)
                val, hg = jax.value_and_grad(
                    lambda hd, z=hs[i + 1]: jnp.mean(head_loss(hd, jax.lax.stop_gradient(z)))
                )(head)
                local_vals.append(val)
                head_grads.append(hg)
            else:
                block_loss = global_from(i)
            if perturb == "activity":
                g_z = activity_forward_gradient(block_loss, hs[i + 1], tangents=tangents[i])
                delta = g_z * jax.jvp(f, (pre[i],), (jnp.ones_like(pre[i]),))[1]
            else:
                delta = activity_forward_gradient(lambda a, bl=block_loss, f=f: bl(f(a)), pre[i],
                                                  tangents=tangents[i])
            u = {"w": hs[i].T @ delta}
            if "b" in layer:
                u["b"] = jnp.sum(delta, axis=0)
            updates.append(u)

        metrics = {}
        if local_losses and head_grads:
            if axis is not None:
                head_grads = jax.lax.pmean(head_grads, axis)
            new_heads, new_opt = [], []
            for head, opt, g in zip(state.heads, state.head_opt, head_grads, strict=True):
                step, opt = tx.update(g, opt, head)
                new_heads.append(optax.apply_updates(head, step))
                new_opt.append(opt)
            state = LocalForwardGradientState(tuple(new_heads), tuple(new_opt))
            metrics["lfg_local_loss"] = jnp.mean(jnp.stack(local_vals))
        return updates, state, StepOutput(loss(out, y), out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
