r"""Local error signals: every hidden layer learns from its own supervised loss, computed by small
auxiliary heads on its activity; no error crosses a layer.

Nøkland & Eidnes (2019), "Training neural networks with local error signals", ICML
(arXiv:1901.06656). The similarity matrix and the bio variant follow the paper's description
and the authors' reference code (anokland/local-loss), read, not copied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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

LOSSES = ("pred", "sim", "predsim")
_WHY = ("its auxiliary heads read the activity of dense hidden layers; the paper's conv blocks "
        "(pooling before the heads) are not implemented yet")
_EPS = 1e-8  # the reference code's guard in the row normalisation


class LocalLossState(NamedTuple):
    """The auxiliary heads of every hidden layer and what trains them.

    Attributes:
      heads: one dict per hidden layer ``l`` (activity width ``n_l``): ``"pred_w"`` ``(n_l, m)``
        and ``"pred_b"`` ``(m,)`` (the prediction head; ``m`` is the number of classes, or
        ``target_proj_size`` in the bio variant) when the loss has a ``pred`` term;
        ``"sim_w"`` ``(n_l, n_l)`` (the similarity head's linear projection, no bias) when it has
        a ``sim`` term and the variant is not bio (the bio variant compares ``h`` itself).
      opt_state: the heads' own optax optimizer state (the heads are trained inside the step;
        the optimizer given to `fit` only ever sees the network's params).
      label_proj: bio only: one fixed random projection ``P_l`` ``(num_classes, proj)`` of the
        one-hot labels per hidden layer (never trained); ``()`` otherwise.
      feedback: bio only, with a ``pred`` term: the fixed random matrices ``B_l`` ``(n_l,
        proj)`` through which the prediction head's error reaches ``h_l`` (feedback alignment,
        in place of ``pred_w``); ``()`` otherwise.
    """

    heads: tuple[dict[str, Array], ...]
    opt_state: Any
    label_proj: tuple[Array, ...] = ()
    feedback: tuple[Array, ...] = ()


def similarity_matrix(h: Array, eps: float = _EPS) -> Array:
    r"""The adjusted cosine similarity of the examples of a batch (Nøkland & Eidnes 2019, eq. 3).

    Each row ``h_i`` (one example's features) is centred on its own mean over features and
    divided by its length: ``\hat h_i = (h_i - \bar h_i) / (\epsilon + \|h_i - \bar h_i\|)``; then
    ``S_{ij} = \mathrm{clip}(\hat h_i \cdot \hat h_j, -1, 1)``, a ``(batch, batch)`` matrix.
    """
    hc = h - jnp.mean(h, axis=1, keepdims=True)
    hn = hc / (eps + jnp.sqrt(jnp.sum(hc ** 2, axis=1, keepdims=True)))
    return jnp.clip(hn @ hn.T, -1.0, 1.0)


def sim_loss(z: Array, targets: Array) -> Array:
    r"""Similarity matching loss: ``\mathrm{mean}_{ij} (S(z)_{ij} - S(t)_{ij})^2`` with `S` the
    `similarity_matrix`, ``z`` the projected activity and ``t`` the (one-hot or projected)
    labels, whose matrix is a constant (stop-gradient)."""
    r_t = jax.lax.stop_gradient(similarity_matrix(targets))
    return jnp.mean((similarity_matrix(z) - r_t) ** 2)


def pred_loss(logits: Array, onehot: Array) -> Array:
    """Prediction loss: softmax cross-entropy of a linear head's ``logits`` with the one-hot
    labels, mean over the batch."""
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


def bio_pred_loss(logits: Array, bits: Array) -> Array:
    r"""The bio prediction loss: binary cross-entropy with logits against the binarised random
    projection of the labels ``t = [y P > 0]``, mean over the batch and the ``proj`` units."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, bits))


def _fa_linear(h: Array, w: Array, b: Array, feedback: Array) -> Array:
    """``h @ w + b`` whose gradient reaches ``h`` through ``feedback`` instead of ``w``
    (feedback alignment); ``w`` and ``b`` get their ordinary gradients."""
    sg = jax.lax.stop_gradient
    return sg(h) @ w + b + (h @ sg(feedback) - sg(h @ feedback))


def layer_local_loss(head: dict[str, Array], h: Array, onehot: Array, *, loss: str, beta: float,
                     bio: bool, label_proj: Array | None = None,
                     feedback: Array | None = None) -> tuple[Array, dict[str, Array]]:
    r"""One hidden layer's local loss on its activity ``h`` (Nøkland & Eidnes 2019, section 3).

    * ``pred``: ``CE(softmax(h W_p + b_p), y)``; bio: ``BCE(h W_p + b_p, [y P > 0])`` with the
      error reaching ``h`` through the fixed ``B`` (`feedback`) instead of ``W_p``.
    * ``sim``: ``mean (S(h W_s) - S(y))^2``; bio: ``mean (S(h) - S(y P))^2``.
    * ``predsim``: ``(1 - beta) pred + beta sim``.

    Returns the loss and its ``{"pred", "sim"}`` terms (unweighted, for the metrics).
    """
    terms: dict[str, Array] = {}
    if loss in ("pred", "predsim"):
        if bio:
            bits = (onehot @ label_proj > 0).astype(h.dtype)
            logits = _fa_linear(h, head["pred_w"], head["pred_b"], feedback)
            terms["pred"] = bio_pred_loss(logits, bits)
        else:
            terms["pred"] = pred_loss(h @ head["pred_w"] + head["pred_b"], onehot)
    if loss in ("sim", "predsim"):
        if bio:
            terms["sim"] = sim_loss(h, onehot @ label_proj)
        else:
            terms["sim"] = sim_loss(h @ head["sim_w"], onehot)
    if loss == "pred":
        return terms["pred"], terms
    if loss == "sim":
        return terms["sim"], terms
    return (1 - beta) * terms["pred"] + beta * terms["sim"], terms


def _check_options(loss: str, beta: float, bio: bool, head_lr: float | None,
                   target_proj_size: int, num_classes: int | None) -> None:
    check_choice("local_error_signals", "loss", loss, LOSSES)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"local_error_signals: beta must be a number in [0, 1] (the weight of "
                         f"the sim term in predsim), got {beta!r}")
    if not isinstance(bio, bool):
        raise ValueError(f"local_error_signals: bio must be True or False, got {bio!r}")
    if head_lr is not None and (isinstance(head_lr, bool) or not isinstance(head_lr, (int, float))
                                or not 0 < head_lr < float("inf")):
        raise ValueError(f"local_error_signals: head_lr must be a positive number or None, got "
                         f"{head_lr!r}")
    for name, v in (("target_proj_size", target_proj_size), ("num_classes", num_classes)):
        if v is None and name == "num_classes":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"local_error_signals: {name} must be a positive integer, got {v!r}")


def local_error_signals(loss: str = "predsim", beta: float = 0.99, bio: bool = False,
                        head_lr: float | None = None, *,
                        head_optimizer: optax.GradientTransformation | None = None,
                        target_proj_size: int = 128,
                        num_classes: int | None = None) -> LearningRule:
    r"""Local error signals (Nøkland & Eidnes 2019, "Training neural networks with local error
    signals") on a dense `fbalign.models.mlp`.

    Hidden layer ``l`` computes ``h_l = f(\mathrm{sg}(h_{l-1}) W_l + b_l)``: its input is a
    constant (``sg``: stop-gradient), so no error crosses a layer. Its update is the gradient of
    its own local loss (`layer_local_loss`) with respect to its own ``W_l, b_l``:

    * ``pred``: a linear classifier head, ``L_pred = CE(softmax(h_l W_p + b_p), y)``;
    * ``sim``: a linear projection head ``W_s`` (no bias) and the similarity matching loss
      ``L_sim = \mathrm{mean}_{ij}(S(h_l W_s)_{ij} - S(Y)_{ij})^2``, where `similarity_matrix`
      ``S`` holds the cosine similarities of the examples' mean-centred rows and ``Y`` is the
      one-hot labels;
    * ``predsim``: ``(1 - \beta) L_pred + \beta L_sim`` (the paper's ``\beta = 0.99``).

    The output layer learns the global loss (the harness's ``loss``) on its own input, itself a
    constant. ``bio=True`` is the paper's backprop-free variant (pred-bio, sim-bio,
    predsim-bio): the one-hot labels are replaced by a fixed random projection ``Y P_l``
    (``P_l``: ``(num_classes, target_proj_size)``, uniform ``\pm 1/\sqrt{C}``); the prediction
    head learns binary cross-entropy against ``[Y P_l > 0]`` and sends its error to ``h_l``
    through a fixed random matrix ``B_l`` (feedback alignment), not through its own weights;
    ``L_sim`` compares ``S(h_l)`` with ``S(Y P_l)``, with no projection head.

    Heads: prediction heads start at zero weights (as in the authors' code), the similarity
    projection uniform ``\pm 1/\sqrt{n_l}``. They live in the rule state and are trained inside
    the step from the same local losses, by their own optax optimizer (``head_optimizer``, else
    ``optax.adam(head_lr)`` with ``head_lr`` defaulting to 5e-4, the paper's learning rate),
    whose state is part of the rule state too: the optimizer given to `fit` only ever sees the
    network's params. Under data parallelism (``context.axis_name``) the heads' gradients are
    averaged over devices before their step; each similarity matrix is that of the local shard.

    Differences from the paper's networks: no batch normalisation or dropout (fbalign's MLP has
    none), and the global loss is not scaled by ``1 - \beta`` as the authors' code does for
    predsim (with Adam the scale does not matter; with SGD, scale the learning rate).

    Args:
      loss: ``"pred"``, ``"sim"`` or ``"predsim"``.
      beta: weight of the sim term in predsim, in ``[0, 1]``.
      bio: the backprop-free variant described above.
      head_lr: the heads' Adam learning rate (None: 5e-4); ignored with ``head_optimizer``.
      head_optimizer: any optax transformation for the heads.
      target_proj_size: width of the bio label projection (the authors' code: 128).
      num_classes: the number of classes (None: the network's output width).

    Returns:
      A `LearningRule` with a `LocalLossState`. ``StepOutput.loss`` is the global loss of the
      output layer, ``output`` the network output; metrics ``local_pred_loss`` and/or
      ``local_sim_loss``, each averaged over the hidden layers.

    Raises:
      ValueError: a bad option (named with the valid values).
      TypeError: a network other than a dense `fbalign.models.mlp` (conv blocks are not
        implemented), or one without a hidden layer.
    """
    _check_options(loss, beta, bio, head_lr, target_proj_size, num_classes)
    name = "local_error_signals"
    tx = head_optimizer if head_optimizer is not None else optax.adam(
        5e-4 if head_lr is None else head_lr)
    has_pred, has_sim = loss in ("pred", "predsim"), loss in ("sim", "predsim")

    def classes(network: Any) -> int:
        return network.sizes[-1] if num_classes is None else num_classes

    def check(network: Any) -> None:
        require_mlp(network, name, _WHY)
        if network.num_layers < 2:
            raise TypeError(f"rule {name!r} trains hidden layers from local losses, but the MLP "
                            f"{network.sizes} has no hidden layer; add one (e.g. "
                            f"fb.mlp(({network.sizes[0]}, 100, {network.sizes[-1]})))")

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> LocalLossState:
        check(network)
        n_cls = classes(network)
        dtype = params[0]["w"].dtype
        widths = network.sizes[1:-1]
        m = target_proj_size if bio else n_cls
        heads, projs, fbs = [], [], []
        for k, n in zip(jax.random.split(key, len(widths)), widths, strict=True):
            k_sim, k_proj, k_fb = jax.random.split(k, 3)
            head = {}
            if has_pred:
                head["pred_w"] = jnp.zeros((n, m), dtype)
                head["pred_b"] = jnp.zeros((m,), dtype)
            if has_sim and not bio:
                lim = 1.0 / jnp.sqrt(jnp.asarray(n, dtype))
                head["sim_w"] = jax.random.uniform(k_sim, (n, n), dtype, -lim, lim)
            heads.append(head)
            if bio:
                lim = 1.0 / jnp.sqrt(jnp.asarray(n_cls, dtype))
                projs.append(jax.random.uniform(k_proj, (n_cls, m), dtype, -lim, lim))
                if has_pred:
                    lim = 1.0 / jnp.sqrt(jnp.asarray(n, dtype))
                    fbs.append(jax.random.uniform(k_fb, (n, m), dtype, -lim, lim))
        heads = tuple(heads)
        return LocalLossState(heads, tx.init(heads), tuple(projs), tuple(fbs))

    def step_fn(params: Params, state: LocalLossState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, LocalLossState, StepOutput]:
        del key
        network = context.network
        check(network)
        n_cls = classes(network)
        y = batch.y
        if jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1:
            onehot = jax.nn.one_hot(y, n_cls, dtype=batch.x.dtype)
        elif y.ndim == 2 and y.shape[-1] == n_cls:
            onehot = y.astype(batch.x.dtype)
        else:
            raise ValueError(f"{name} needs class labels: integer (batch,) or one-hot (batch, "
                             f"{n_cls}), got {y.dtype} {tuple(y.shape)}")
        acts = network.activations()
        last = len(params) - 1

        def objective(params, heads):
            h, total = batch.x, jnp.zeros((), batch.x.dtype)
            terms = []
            for i, (layer, f) in enumerate(zip(params, acts, strict=True)):
                a = jax.lax.stop_gradient(h) @ layer["w"]
                h = f(a + layer["b"] if "b" in layer else a)
                if i < last:
                    value, t = layer_local_loss(
                        heads[i], h, onehot, loss=loss, beta=beta, bio=bio,
                        label_proj=state.label_proj[i] if bio else None,
                        feedback=state.feedback[i] if bio and has_pred else None)
                    total = total + value
                    terms.append(t)
            global_loss = context.loss(h, batch.y)
            return total + global_loss, (global_loss, h, terms)

        (g_params, g_heads), (global_loss, out, terms) = jax.grad(
            objective, argnums=(0, 1), has_aux=True)(params, state.heads)
        if context.axis_name is not None:
            g_heads = jax.lax.pmean(g_heads, context.axis_name)
        head_updates, opt_state = tx.update(g_heads, state.opt_state, state.heads)
        heads = optax.apply_updates(state.heads, head_updates)
        metrics = {f"local_{k}_loss": jnp.mean(jnp.stack([t[k] for t in terms]))
                   for k in terms[0]}
        new_state = LocalLossState(heads, opt_state, state.label_proj, state.feedback)
        return g_params, new_state, StepOutput(global_loss, out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
