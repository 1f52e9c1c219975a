r"""Local error signals: every hidden block learns from its own supervised loss, computed by
small auxiliary heads on its activity; no error crosses a block.

Nøkland & Eidnes (2019), "Training neural networks with local error signals", ICML
(arXiv:1901.06656). The similarity matrix, the conv blocks' heads (the prediction head's average
pooling, the similarity head's 3x3 convolution and per-channel standard deviations) and the bio
variant follow the paper's description and the authors' reference code (anokland/local-loss,
``train.py``: ``LocalLossBlockLinear``, ``LocalLossBlockConv``, ``similarity_matrix``), read,
not copied.
"""

from __future__ import annotations

import math
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
from fbalign._src.layers import conv_op
from fbalign._src.models import MLP

LOSSES = ("pred", "sim", "predsim")
_EPS = 1e-8  # the reference code's guard in the row normalisation
_NETWORKS = ("a dense fbalign.models.mlp, fbalign.models.lenet5, or a fbalign.models.sequential "
             "chain of Dense, Conv, MaxPool, AvgPool and Flatten layers")


class LocalLossState(NamedTuple):
    """The auxiliary heads of every hidden block and what trains them.

    Attributes:
      heads: one dict per hidden block ``l``. A dense block (activity width ``n_l``):
        ``"pred_w"`` ``(n_l, m)`` and ``"pred_b"`` ``(m,)`` (the prediction head; ``m`` is the
        number of classes, or ``target_proj_size`` in the bio variant) when the loss has a
        ``pred`` term; ``"sim_w"`` ``(n_l, n_l)`` (the similarity head's linear projection, no
        bias) when it has a ``sim`` term and the variant is not bio (the bio variant compares
        ``h`` itself). A conv block (activity ``(H, W, C)``): ``"pred_w"`` ``(d_l, m)`` with
        ``d_l`` the size of the average-pooled map the head reads (`decoder_pool_plan`), and
        ``"sim_w"`` ``(3, 3, C, C)``, a convolution kernel (no bias).
      opt_state: the heads' own optax optimizer state (the heads are trained inside the step;
        the optimizer given to `fit` only ever sees the network's params).
      label_proj: bio only: one fixed random projection ``P_l`` ``(num_classes, proj)`` of the
        one-hot labels per hidden block (never trained); ``()`` otherwise.
      feedback: bio only, with a ``pred`` term: the fixed random matrices ``B_l`` (``pred_w``'s
        shape) through which the prediction head's error reaches ``h_l`` (feedback alignment,
        in place of ``pred_w``); ``()`` otherwise.
    """

    heads: tuple[dict[str, Array], ...]
    opt_state: Any
    label_proj: tuple[Array, ...] = ()
    feedback: tuple[Array, ...] = ()


def _spatial_std(z: Array) -> Array:
    """Each channel's standard deviation over the positions of an NHWC map (``ddof=1``, as
    ``torch.std``), ``(batch, C)``; a channel constant over the map has 0 with gradient 0 (the
    square root's derivative at 0 would make the step NaN)."""
    n = z.shape[1] * z.shape[2]
    zc = z - jnp.mean(z, axis=(1, 2), keepdims=True)
    var = jnp.sum(zc ** 2, axis=(1, 2)) / (n - 1)
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def similarity_matrix(h: Array, eps: float = _EPS) -> Array:
    r"""The adjusted cosine similarity of the examples of a batch (Nøkland & Eidnes 2019, eq. 3).

    Each row ``h_i`` (one example's features) is centred on its own mean over features and
    divided by its length: ``\hat h_i = (h_i - \bar h_i) / (\epsilon + \|h_i - \bar h_i\|)``; then
    ``S_{ij} = \mathrm{clip}(\hat h_i \cdot \hat h_j, -1, 1)``, a ``(batch, batch)`` matrix.

    An NHWC feature map ``(batch, H, W, C)`` is first reduced as in the authors' code: with more
    than 3 channels and ``H > 1``, each example's features are its channels' standard
    deviations over the ``H W`` positions (unbiased, ``(batch, C)``); otherwise the flattened
    map.

    A row that is exactly constant (all zero after centring, e.g. a ReLU layer silent for that
    example) has similarity 0 with every example and passes no gradient: the square root's
    derivative at 0 would make the whole step NaN (as ``torch.sqrt`` does in the authors' code).
    """
    if h.ndim == 4:
        h = _spatial_std(h) if h.shape[3] > 3 and h.shape[1] > 1 else h.reshape(h.shape[0], -1)
    hc = h - jnp.mean(h, axis=1, keepdims=True)
    ss = jnp.sum(hc ** 2, axis=1, keepdims=True)
    nonzero = ss > 0  # a constant row (a ReLU layer silent for that example) stays 0
    hn = jnp.where(nonzero, hc / (eps + jnp.sqrt(jnp.where(nonzero, ss, 1.0))), 0.0)
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


def decoder_pool_plan(shape: tuple[int, int, int], dim_in_decoder: int
                      ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    r"""How a conv block's prediction head pools its ``(H, W, C)`` activity (the authors'
    ``LocalLossBlockConv``): window ``(k_h, k_w)``, padding ``(p_h, p_w)`` and output size
    ``(H', W')``.

    Starting from ``k_h = k_w = 1``, while ``C H' W' > `` ``dim_in_decoder`` (and ``k_h < H``):
    ``k_h`` doubles (``H' = \lceil H / k_h \rceil``), then, if still too large, ``k_w``
    (``W' = \lceil W / k_w \rceil``). The padding is ``p = k (H' - \lfloor H / k \rfloor) // 2``
    on both sides, the stride the window, and ``H' = \lfloor (H + 2 p_h - k_h) / k_h \rfloor +
    1`` (PyTorch's ``AvgPool2d``). The authors' maps are square; on others ``k_w`` also stops
    at ``W``.
    """
    height, width, channels = shape
    kh = kw = 1
    oh, ow = height, width
    while channels * oh * ow > dim_in_decoder and kh < height:
        kh *= 2
        oh = math.ceil(height / kh)
        if channels * oh * ow > dim_in_decoder and kw < width:
            kw *= 2
            ow = math.ceil(width / kw)
    ph, pw = kh * (oh - height // kh) // 2, kw * (ow - width // kw) // 2
    out = ((height + 2 * ph - kh) // kh + 1, (width + 2 * pw - kw) // kw + 1)
    return (kh, kw), (ph, pw), out


def decoder_pool(h: Array, dim_in_decoder: int) -> Array:
    r"""The average pooling before a conv block's prediction head (`decoder_pool_plan`): zero
    padding counted in the average (PyTorch's ``count_include_pad=True``), windows of stride
    their size, rows and columns past the last whole window dropped; ``h`` unchanged when the
    map is already at most ``dim_in_decoder`` values."""
    (kh, kw), (ph, pw), (oh, ow) = decoder_pool_plan(h.shape[1:], dim_in_decoder)
    if kh == kw == 1:
        return h
    hp = jnp.pad(h, ((0, 0), (ph, ph), (pw, pw), (0, 0)))[:, :oh * kh, :ow * kw]
    return hp.reshape(h.shape[0], oh, kh, ow, kw, h.shape[3]).mean(axis=(2, 4))


def _fa_linear(h: Array, w: Array, b: Array, feedback: Array) -> Array:
    """``h @ w + b`` whose gradient reaches ``h`` through ``feedback`` instead of ``w``
    (feedback alignment); ``w`` and ``b`` get their ordinary gradients."""
    sg = jax.lax.stop_gradient
    return sg(h) @ w + b + (h @ sg(feedback) - sg(h @ feedback))


def _pred_term(head: dict[str, Array], h: Array, onehot: Array, bio: bool,
               label_proj: Array | None, feedback: Array | None) -> Array:
    if bio:
        bits = (onehot @ label_proj > 0).astype(h.dtype)
        return bio_pred_loss(_fa_linear(h, head["pred_w"], head["pred_b"], feedback), bits)
    return pred_loss(h @ head["pred_w"] + head["pred_b"], onehot)


def layer_local_loss(head: dict[str, Array], h: Array, onehot: Array, *, loss: str, beta: float,
                     bio: bool, label_proj: Array | None = None,
                     feedback: Array | None = None,
                     dim_in_decoder: int = 2048) -> tuple[Array, dict[str, Array]]:
    r"""One hidden block's local loss on its activity ``h`` (Nøkland & Eidnes 2019, section 3).

    Dense activity ``h`` ``(batch, n)``:

    * ``pred``: ``CE(softmax(h W_p + b_p), y)``; bio: ``BCE(h W_p + b_p, [y P > 0])`` with the
      error reaching ``h`` through the fixed ``B`` (`feedback`) instead of ``W_p``.
    * ``sim``: ``mean (S(h W_s) - S(y))^2``; bio: ``mean (S(h) - S(y P))^2``.
    * ``predsim``: ``(1 - beta) pred + beta sim``.

    Conv activity ``h`` ``(batch, H, W, C)`` (the authors' ``LocalLossBlockConv``): the
    prediction head reads the flattened `decoder_pool` ``(h)`` (at most about
    ``dim_in_decoder`` values); the similarity head is a 3x3 convolution ``K_s`` (stride 1,
    zero padding 1, no bias): ``mean (S(conv(h, K_s)) - S(y))^2``; bio compares
    ``S(decoder_pool(h))`` with ``S(y P)``. `similarity_matrix` reduces maps to per-channel
    standard deviations.

    Returns the loss and its ``{"pred", "sim"}`` terms (unweighted, for the metrics).
    """
    if h.ndim not in (2, 4):
        raise ValueError(f"layer_local_loss takes dense (batch, n) or NHWC (batch, H, W, C) "
                         f"activity, got shape {tuple(h.shape)}")
    conv = h.ndim == 4
    terms: dict[str, Array] = {}
    if loss in ("pred", "predsim"):
        z = decoder_pool(h, dim_in_decoder).reshape(h.shape[0], -1) if conv else h
        terms["pred"] = _pred_term(head, z, onehot, bio, label_proj, feedback)
    if loss in ("sim", "predsim"):
        if bio:
            z = decoder_pool(h, dim_in_decoder) if conv else h
            terms["sim"] = sim_loss(z, onehot @ label_proj)
        else:
            z = conv_op(2, padding=1, impl="auto")(h, head["sim_w"]) if conv else h @ head["sim_w"]
            terms["sim"] = sim_loss(z, onehot)
    if loss == "pred":
        return terms["pred"], terms
    if loss == "sim":
        return terms["sim"], terms
    return (1 - beta) * terms["pred"] + beta * terms["sim"], terms


def _check_options(loss: str, beta: float, bio: bool, head_lr: float | None,
                   ints: dict[str, int | None]) -> None:
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
    for name, v in ints.items():
        if v is None and name == "num_classes":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"local_error_signals: {name} must be a positive integer, got {v!r}")


def _check_network(network: Any, name: str) -> None:
    """A TypeError naming ``name`` unless ``network`` is a chain this rule trains (with at least
    one hidden block); a residual block is named by its place in the layer list.

    Besides the MLP, a chain is a layered network whose ``forward`` records a `Tape` and that
    states its ``feature_shapes`` (LeNet-5, a `sequential` chain); the classes are not imported
    here (their modules import the rule registry)."""
    if not isinstance(network, MLP):
        for j, layer in enumerate(getattr(network, "layers", None) or ()):
            if isinstance(getattr(layer, "layers", None), tuple):  # a residual block
                raise TypeError(
                    f"rule {name!r} trains each block of a chain from its own local loss, with "
                    f"its input a constant; layers[{j}] ({type(layer).__name__}) adds its input "
                    f"x to F(x), a skip path around the block's layers, which local blocks do "
                    f"not define here. Use {_NETWORKS}")
        chain = (getattr(network, "layer_structure", False) is True
                 and callable(getattr(network, "forward", None))
                 and hasattr(network, "feature_shapes") and hasattr(network, "num_classes"))
        if not chain:
            raise TypeError(f"rule {name!r} reads the activity of each hidden block of "
                            f"{_NETWORKS}, got {type(network).__name__}")
    if network.num_layers < 2:
        sizes = getattr(network, "sizes", None)
        hint = (f" (e.g. fb.mlp(({sizes[0]}, 100, {sizes[-1]})))" if sizes is not None
                else " (e.g. a Conv or Dense layer before the output layer)")
        raise TypeError(f"rule {name!r} trains hidden blocks from local losses, but the "
                        f"{type(network).__name__} has no hidden layer; add one{hint}")


def _hidden_shapes(network: Any) -> list[tuple[int, ...]]:
    """The per-example activity shape of each hidden block (what its heads read)."""
    if isinstance(network, MLP):
        return [(n,) for n in network.sizes[1:-1]]
    return [tuple(s) for s in network.feature_shapes[:-1]]


def _init_block(key: PRNGKey, shape: tuple[int, ...], m: int, n_cls: int, dtype: Any, *,
                has_pred: bool, has_sim: bool, bio: bool, dim_in_decoder: int
                ) -> tuple[dict[str, Array], Array | None, Array | None]:
    """One hidden block's heads, label projection and feedback (`LocalLossState`)."""
    k_sim, k_proj, k_fb = jax.random.split(key, 3)
    if len(shape) == 3:  # a conv block: the pooled map feeds the prediction head
        d = shape[2] * math.prod(decoder_pool_plan(shape, dim_in_decoder)[2])
        sim_shape, sim_fan = (3, 3, shape[2], shape[2]), 9 * shape[2]
    else:
        d = shape[0]
        sim_shape, sim_fan = (d, d), d
    head = {}
    if has_pred:
        head["pred_w"] = jnp.zeros((d, m), dtype)
        head["pred_b"] = jnp.zeros((m,), dtype)
    if has_sim and not bio:
        lim = 1.0 / jnp.sqrt(jnp.asarray(sim_fan, dtype))
        head["sim_w"] = jax.random.uniform(k_sim, sim_shape, dtype, -lim, lim)
    proj = fb = None
    if bio:
        lim = 1.0 / jnp.sqrt(jnp.asarray(n_cls, dtype))
        proj = jax.random.uniform(k_proj, (n_cls, m), dtype, -lim, lim)
        if has_pred:
            lim = 1.0 / jnp.sqrt(jnp.asarray(d, dtype))
            fb = jax.random.uniform(k_fb, (d, m), dtype, -lim, lim)
    return head, proj, fb


def _onehot(y: Array, n_cls: int, dtype: Any, name: str) -> Array:
    if jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1:
        return jax.nn.one_hot(y, n_cls, dtype=dtype)
    if y.ndim == 2 and y.shape[-1] == n_cls:
        return y.astype(dtype)
    raise ValueError(f"{name} needs class labels: integer (batch,) or one-hot (batch, "
                     f"{n_cls}), got {y.dtype} {tuple(y.shape)}")


def local_error_signals(loss: str = "predsim", beta: float = 0.99, bio: bool = False,
                        head_lr: float | None = None, *,
                        head_optimizer: optax.GradientTransformation | None = None,
                        target_proj_size: int = 128,
                        num_classes: int | None = None,
                        dim_in_decoder: int = 2048) -> LearningRule:
    r"""Local error signals (Nøkland & Eidnes 2019, "Training neural networks with local error
    signals") on a dense `fbalign.models.mlp`, `fbalign.models.lenet5` or a
    `fbalign.models.sequential` chain of dense, conv, pooling and flatten layers.

    **Blocks.** Block ``l`` is weight layer ``l`` (dense or conv) with its activation, and the
    parameter-free layers that follow it up to the next weight layer (pooling, flattening).
    It computes ``h_l = f_l(\mathrm{op}_l(\mathrm{sg}(x_l), W_l) + b_l)`` and passes ``x_{l+1}
    = g_{l+1}(h_l)`` (``g``: the pooling and flattening) on; its input is a constant (``sg``:
    stop-gradient), so no error crosses a block. Its heads read ``h_l``, the activity after the
    nonlinearity and *before* the network's pooling: in the authors' VGG networks the pooling
    layers follow each ``LocalLossBlockConv`` (conv -> bn -> nonlinearity -> dropout), whose
    loss reads the nonlinearity's output. Block ``l``'s update is the gradient of its own local
    loss (`layer_local_loss`) with respect to its own ``W_l, b_l``:

    * ``pred``: a linear classifier head, ``L_pred = CE(softmax(z_l W_p + b_p), y)`` with
      ``z_l = h_l`` for a dense block and, for a conv block, the flattened `decoder_pool`
      ``(h_l)``: an average pooling (windows of powers of 2) that shrinks the map to at most
      ``dim_in_decoder`` values (`decoder_pool_plan`);
    * ``sim``: a projection head and the similarity matching loss ``L_sim =
      \mathrm{mean}_{ij}(S(p_l)_{ij} - S(Y)_{ij})^2``: ``p_l = h_l W_s`` (dense, no bias) or
      ``p_l = conv_{3x3}(h_l, K_s)`` (conv, stride 1, padding 1, no bias), ``Y`` the one-hot
      labels and `similarity_matrix` ``S`` the cosine similarities of the examples' mean-centred
      rows (of a map with more than 3 channels: of its channels' spatial standard deviations);
    * ``predsim``: ``(1 - \beta) L_pred + \beta L_sim`` (the paper's ``\beta = 0.99``).

    The output layer learns the global loss (the harness's ``loss``) on its own input, itself a
    constant. ``bio=True`` is the paper's backprop-free variant (pred-bio, sim-bio,
    predsim-bio): the one-hot labels are replaced by a fixed random projection ``Y P_l``
    (``P_l``: ``(num_classes, target_proj_size)``, uniform ``\pm 1/\sqrt{C}``); the prediction
    head learns binary cross-entropy against ``[Y P_l > 0]`` and sends its error to ``h_l``
    through a fixed random matrix ``B_l`` (feedback alignment), not through its own weights;
    ``L_sim`` compares ``S(h_l)`` (a conv block: ``S(decoder_pool(h_l))``) with ``S(Y P_l)``,
    with no projection head.

    The step records the network's forward `Tape` once and forms each block's update from it:
    ``\delta_l = \partial L_l / \partial h_l \odot f_l'(a_l)``, then ``W_l``'s gradient for
    ``\delta_l`` at the recorded input ``x_l`` (``Tape.weight_grads``: ``x_l^T \delta_l`` for a
    dense layer, the convolution's VJP for a conv layer).

    Heads: prediction heads start at zero weights (as in the authors' code), the projections
    uniform ``\pm 1/\sqrt{fan_in}`` (``n_l``; ``9 C`` for the 3x3 kernel). They live in the
    rule state and are trained inside the step from the same local losses, by their own optax
    optimizer (``head_optimizer``, else ``optax.adam(head_lr)`` with ``head_lr`` defaulting to
    5e-4, the paper's learning rate), whose state is part of the rule state too: the optimizer
    given to `fit` only ever sees the network's params. Under data parallelism
    (``context.axis_name``) the heads' gradients are averaged over devices before their step;
    each similarity matrix is that of the local shard.

    Differences from the paper's networks: no batch normalisation or dropout (fbalign's
    networks have none); the global loss is not scaled by ``1 - \beta`` as the authors' code
    does for predsim (with Adam the scale does not matter; with SGD, scale the learning rate);
    a channel whose spatial standard deviation is 0 gets gradient 0 there (``torch.std``'s
    backward would give NaN); ``dim_in_decoder`` defaults to 2048 (the authors' CIFAR-10 runs; their
    code's default is 4096, their MNIST runs use 1024).

    Args:
      loss: ``"pred"``, ``"sim"`` or ``"predsim"``.
      beta: weight of the sim term in predsim, in ``[0, 1]``.
      bio: the backprop-free variant described above.
      head_lr: the heads' Adam learning rate (None: 5e-4); ignored with ``head_optimizer``.
      head_optimizer: any optax transformation for the heads.
      target_proj_size: width of the bio label projection (the authors' code: 128).
      num_classes: the number of classes (None: the network's output width).
      dim_in_decoder: the most values a conv block's prediction head reads (the authors'
        ``--dim-in-decoder``).

    Returns:
      A `LearningRule` with a `LocalLossState`. ``StepOutput.loss`` is the global loss of the
      output layer, ``output`` the network output; metrics ``local_pred_loss`` and/or
      ``local_sim_loss``, each averaged over the hidden blocks.

    Raises:
      ValueError: a bad option (named with the valid values).
      TypeError: a network other than those above (a residual block is named by its place in
        the layer list), or one without a hidden layer.
    """
    _check_options(loss, beta, bio, head_lr, {"target_proj_size": target_proj_size,
                                              "num_classes": num_classes,
                                              "dim_in_decoder": dim_in_decoder})
    name = "local_error_signals"
    tx = head_optimizer if head_optimizer is not None else optax.adam(
        5e-4 if head_lr is None else head_lr)
    has_pred, has_sim = loss in ("pred", "predsim"), loss in ("sim", "predsim")

    def classes(network: Any) -> int:
        if num_classes is not None:
            return num_classes
        return network.sizes[-1] if isinstance(network, MLP) else network.num_classes

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> LocalLossState:
        _check_network(network, name)
        n_cls = classes(network)
        shapes = _hidden_shapes(network)
        m = target_proj_size if bio else n_cls
        heads, projs, fbs = [], [], []
        for k, shape in zip(jax.random.split(key, len(shapes)), shapes, strict=True):
            head, proj, fb = _init_block(k, shape, m, n_cls, params[0]["w"].dtype,
                                         has_pred=has_pred, has_sim=has_sim, bio=bio,
                                         dim_in_decoder=dim_in_decoder)
            heads.append(head)
            projs += [] if proj is None else [proj]
            fbs += [] if fb is None else [fb]
        heads = tuple(heads)
        return LocalLossState(heads, tx.init(heads), tuple(projs), tuple(fbs))

    def step_fn(params: Params, state: LocalLossState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, LocalLossState, StepOutput]:
        del key
        network = context.network
        _check_network(network, name)
        onehot = _onehot(batch.y, classes(network), batch.x.dtype, name)
        out, tape = network.forward(params, batch.x)
        last = tape.num_layers - 1

        def block_grads(i: int, delta: Array) -> dict[str, Array]:
            return tape.weight_grads(i, delta * tape.derivs[i], params[i]["w"], "b" in params[i])

        updates, g_heads, terms = [], [], []
        for i in range(last):
            def local(h, head, i=i):
                return layer_local_loss(
                    head, h, onehot, loss=loss, beta=beta, bio=bio,
                    label_proj=state.label_proj[i] if bio else None,
                    feedback=state.feedback[i] if bio and has_pred else None,
                    dim_in_decoder=dim_in_decoder)

            (_, t), (g_h, g_head) = jax.value_and_grad(local, argnums=(0, 1), has_aux=True)(
                tape.activity(i), state.heads[i])
            updates.append(block_grads(i, g_h))
            g_heads.append(g_head)
            terms.append(t)
        global_loss, g_out = jax.value_and_grad(lambda o: context.loss(o, batch.y))(out)
        updates.append(block_grads(last, g_out))
        g_heads = tuple(g_heads)
        if context.axis_name is not None:
            g_heads = jax.lax.pmean(g_heads, context.axis_name)
        head_updates, opt_state = tx.update(g_heads, state.opt_state, state.heads)
        heads = optax.apply_updates(state.heads, head_updates)
        metrics = {f"local_{k}_loss": jnp.mean(jnp.stack([t[k] for t in terms]))
                   for k in terms[0]}
        new_state = LocalLossState(heads, opt_state, state.label_proj, state.feedback)
        updates = tuple(updates) if isinstance(params, tuple) else updates
        return updates, new_state, StepOutput(global_loss, out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
