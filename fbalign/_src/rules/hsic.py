r"""The HSIC bottleneck: every hidden layer learns alone, keeping what its activity says about the
labels and dropping what it says about the input, measured by a kernel independence criterion.

Ma, Lewis & Kleijn (2020), "The HSIC bottleneck: deep learning without back-propagation", AAAI.
Gretton, Bousquet, Smola & Schoelkopf (2005), "Measuring statistical dependence with
Hilbert-Schmidt norms" (the HSIC estimator).
"""

from __future__ import annotations

from typing import Any, Literal

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
from fbalign._src.linalg import solve_spd
from fbalign._src.models import require_mlp

LABEL_KERNELS = ("gaussian", "linear")
_WHY = "each hidden layer's objective is stated on its own activity h_l = f(h_{l-1} W_l + b_l)"


def squared_distances(a: Array) -> Array:
    """``D_ij = ||a_i - a_j||^2`` for the rows of ``a`` (``(m, d)``), clipped at 0 against
    round-off."""
    a = a.reshape(a.shape[0], -1)
    r = jnp.sum(a * a, axis=1)
    return jnp.maximum(r[:, None] - 2.0 * (a @ a.T) + r[None, :], 0.0)


def gaussian_kernel(a: Array, sigma: float, *, scale_by_dim: bool = True) -> Array:
    r"""The Gaussian kernel matrix ``K_ij = exp(-||a_i - a_j||^2 / (2 s^2))`` of the rows of ``a``.

    With ``scale_by_dim`` (the HSIC bottleneck's convention, Ma et al. 2020 and their code)
    the width is ``s = sigma * sqrt(d)`` for ``d`` features, so one ``sigma`` suits layers of
    every width; else ``s = sigma``.
    """
    a = a.reshape(a.shape[0], -1)
    var = 2.0 * sigma**2 * (a.shape[1] if scale_by_dim else 1)
    return jnp.exp(-squared_distances(a) / jnp.asarray(var, a.dtype))


def linear_kernel(a: Array) -> Array:
    """``K = a a^T`` of the rows of ``a`` (a one-hot label's kernel is ``[y_i = y_j]``)."""
    a = a.reshape(a.shape[0], -1)
    return a @ a.T


def center(k: Array) -> Array:
    """``H K H`` with the centring matrix ``H = I - 1 1^T / m``."""
    return (k - jnp.mean(k, axis=0, keepdims=True) - jnp.mean(k, axis=1, keepdims=True)
            + jnp.mean(k))


def hsic(kx: Array, ky: Array) -> Array:
    r"""The biased HSIC estimator of Gretton et al. (2005), used by Ma et al. (2020):

    .. math:: \mathrm{HSIC}(X, Y) = (m-1)^{-2}\, \mathrm{tr}(K_X H K_Y H),

    for ``m x m`` kernel matrices ``kx``, ``ky`` of the same ``m`` samples, ``H = I - 1 1^T/m``.
    Non-negative for positive semi-definite kernels; zero in expectation (up to ``O(1/m)``)
    for independent samples. Computed as ``sum((H K_X H) * K_Y^T)``, ``O(m^2)`` after the
    kernels.
    """
    m = kx.shape[0]
    if m < 2:
        raise ValueError(f"hsic needs at least 2 samples, got kernel matrices of size {m}")
    return jnp.sum(center(kx) * ky.T) / (m - 1) ** 2


def normalized_hsic(kx: Array, ky: Array, epsilon: float = 1e-5) -> Array:
    r"""The normalised HSIC of the HSIC bottleneck's code (``hsic_normalized_cca``):

    .. math:: \mathrm{nHSIC}(X, Y) = \mathrm{tr}(\tilde K_X \tilde K_Y), \qquad
              \tilde K = \bar K (\bar K + \epsilon m I)^{-1}, \qquad \bar K = H K H.

    ``\tilde K`` is ``\bar K`` with its eigenvalues ``\lambda`` mapped to ``\lambda / (\lambda +
    \epsilon m)`` (nearly a projection), so nHSIC does not depend on the kernels' scale. The
    authors' code right-centres only (``K H``); here both sides are centred, which keeps
    ``\tilde K`` symmetric.
    """
    return jnp.sum(_regularized(kx, epsilon) * _regularized(ky, epsilon).T)


def _regularized(k: Array, epsilon: float) -> Array:
    r"""``\tilde K = \bar K (\bar K + \epsilon m I)^{-1}`` (= ``(\bar K + \epsilon m I)^{-1} \bar
    K``: both are functions of ``\bar K``), by a Cholesky solve."""
    m = k.shape[0]
    kc = center(k)
    return solve_spd(kc + epsilon * m * jnp.eye(m, dtype=k.dtype), kc)


def _is_positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


def _check_options(beta: float, sigma: float, normalized: bool, label_kernel: str,
                   epsilon: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"hsic_bottleneck: beta must be a non-negative number (the weight of "
                         f"HSIC(Z, Y)), got {beta!r}")
    if not _is_positive(sigma):
        raise ValueError(f"hsic_bottleneck: sigma must be a positive number (the kernel width), "
                         f"got {sigma!r}")
    if not isinstance(normalized, bool):
        raise ValueError(f"hsic_bottleneck: normalized must be True or False, got "
                         f"{normalized!r}")
    check_choice("hsic_bottleneck", "label_kernel", label_kernel, LABEL_KERNELS)
    if not _is_positive(epsilon):
        raise ValueError(f"hsic_bottleneck: epsilon must be a positive number, got {epsilon!r}")


def _live_global(z: Array, axis_name: str | None) -> Array:
    """The global batch of ``z`` over ``axis_name`` with only this shard's rows differentiable
    (the other shards' rows are constants here: each shard differentiates its own rows)."""
    if axis_name is None:
        return z
    full = jax.lax.all_gather(jax.lax.stop_gradient(z), axis_name, tiled=True)
    start = jax.lax.axis_index(axis_name) * z.shape[0]
    return jax.lax.dynamic_update_slice_in_dim(full, z, start, axis=0)


def hsic_bottleneck(beta: float = 50.0, sigma: float = 5.0, *, normalized: bool = False,
                    label_kernel: Literal["gaussian", "linear"] = "gaussian",
                    epsilon: float = 1e-5) -> LearningRule:
    r"""The HSIC bottleneck (Ma, Lewis & Kleijn 2020) on a dense `fbalign.models.mlp`.

    Each hidden layer ``l`` (activity ``Z_l = f(\mathrm{sg}(h_{l-1}) W_l + b_l)``, with the
    stop-gradient ``sg`` at its input) descends its own objective

    .. math:: \mathcal{L}_l = \mathrm{HSIC}(Z_l, X) - \beta\, \mathrm{HSIC}(Z_l, Y)

    with respect to its own ``W_l, b_l`` only: the update is ``jax.grad`` of ``\mathcal{L}_l``
    (the information-bottleneck trade-off with HSIC in place of mutual information). ``X`` is
    the network input, ``Y`` the labels (one-hot for class indices). Kernels are Gaussian of
    width ``sigma * sqrt(d)`` on ``X`` and ``Z_l`` (`gaussian_kernel`); the labels get the
    same Gaussian kernel (the authors' code) or, with ``label_kernel="linear"``, ``Y Y^T``. On
    one-hot labels the two differ by an affine map ``a + c Y Y^T``, which centring turns into
    a factor ``c = 1 - exp(-1/(sigma^2 C))`` on plain HSIC (``C`` classes).

    The paper appends a "format" layer trained with SGD on the cross-entropy of the last hidden
    representation. Here the network's last layer plays that part: it descends the harness's
    loss ``\mathcal{L}(f_L(\mathrm{sg}(h_{L-1}) W_L + b_L), y)`` with its input stopped, so no
    error crosses a layer anywhere. All layers update from one forward pass (the authors' code
    updates them one after another, re-running the forward between layers).

    Data parallelism: the kernels need the whole batch. With ``context.axis_name`` set, ``X``,
    ``Y`` and every ``Z_l`` are gathered over the axis (``all_gather(..., tiled=True)``) and
    HSIC is evaluated on the global batch. Each shard differentiates the global objective
    through its own rows of ``Z_l`` (the other rows are constants) and multiplies by the axis
    size ``n``: the global gradient is the sum of the shards' row contributions, so the
    harness's ``pmean`` of the updates returns exactly the global-batch gradient.

    Args:
      beta: ``\beta``, the weight of ``HSIC(Z, Y)`` (the code's ``lambda_y``; default 50 as in
        its default configuration).
      sigma: the kernel width before scaling by ``sqrt(d)`` (default 5, as in the code). With
        ``beta = 50`` the label term outweighs the input term at initialisation with either
        estimator (measured: 6x with `hsic` on a random toy batch, 12x with `normalized_hsic`
        on digits).
      normalized: use the normalised estimator `normalized_hsic` (the default of the authors'
        code, ``hsic_normalized_cca``) instead of `hsic` (the estimator the paper states).
        Not the default here: its regularised inverse amplifies float32 round-off (measured on
        a batch of 8: the eager and the jitted, seed-vmapped step gave parameters 2e-4 apart,
        relative, after one SGD step; `hsic` agrees to better than 1e-4), and it costs two
        ``m x m`` Cholesky solves per hidden layer and step. `hsic` is ``O(m^2)`` after the
        kernels; its values are small (a Gaussian kernel of width ``sigma sqrt(d)`` is nearly
        constant), so pair it with a scale-free optimizer (``optax.adam``) or a large SGD step.
      label_kernel: ``"gaussian"`` (the code's) or ``"linear"``.
      epsilon: the regulariser ``\epsilon`` of `normalized_hsic`.

    Returns:
      A `LearningRule` with an `EmptyState`. Metrics: ``hsic_zx`` and ``hsic_zy``, the two
      HSIC terms averaged over the hidden layers (global batch).

    Example:
      >>> rule = fbalign.rules.hsic_bottleneck(beta=50.0, sigma=5.0)
      >>> fbalign.train.fit(fbalign.mlp((64, 64, 64, 10), activation="relu"), rule,
      ...                   optax.adam(1e-3), data)
    """
    _check_options(beta, sigma, normalized, label_kernel, epsilon)
    name = "hsic_bottleneck"

    def prepare(k: Array) -> Array:
        # the estimators as sum(P(K_a) * P(K_b)) of symmetric factors: H K H / (m - 1) for HSIC
        # (H is idempotent), K~ for nHSIC; the constant X and Y factors are made once a step
        if normalized:
            return _regularized(k, epsilon)
        return center(k) / (k.shape[0] - 1)

    def init_fn(key: PRNGKey, params: Params, network: Any = None) -> EmptyState:
        del key
        require_mlp(network, name, _WHY)
        if len(params) < 2:
            raise ValueError(f"{name} trains hidden layers, but the network has a single layer "
                             f"(sizes {network.sizes}); add a hidden layer, e.g. fbalign.mlp(("
                             f"{network.sizes[0]}, 64, {network.sizes[-1]}))")
        return EmptyState()

    def step_fn(params: Params, state: EmptyState, batch: Batch, key: PRNGKey,
                context: StepContext) -> tuple[Updates, EmptyState, StepOutput]:
        del key
        network, axis = context.network, context.axis_name
        require_mlp(network, name, _WHY)
        if len(params) < 2:
            raise ValueError(f"{name} needs at least one hidden layer, got {len(params)} layer")
        acts = network.activations()
        x, y = batch.x, batch.y
        if y.ndim == 1 and jnp.issubdtype(y.dtype, jnp.integer):
            y_feat = jax.nn.one_hot(y, network.sizes[-1], dtype=x.dtype)
        else:
            y_feat = y.reshape(y.shape[0], -1).astype(x.dtype)
        if axis is not None:
            gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)
            x_all, y_all = gather(x), gather(y_feat)
            n_shards = jax.lax.axis_size(axis)
        else:
            x_all, y_all, n_shards = x, y_feat, 1
        if x_all.shape[0] < 2:
            raise ValueError(f"{name}: the kernels need a batch of at least 2 examples, got "
                             f"{x_all.shape[0]}")
        px = prepare(gaussian_kernel(x_all, sigma))
        py = prepare(gaussian_kernel(y_all, sigma) if label_kernel == "gaussian"
                     else linear_kernel(y_all))

        def layer_objective(layer, h_in, f):
            a = jax.lax.stop_gradient(h_in) @ layer["w"]
            if "b" in layer:
                a = a + layer["b"]
            pz = prepare(gaussian_kernel(_live_global(f(a), axis), sigma))
            hx, hy = jnp.sum(pz * px), jnp.sum(pz * py)
            return n_shards * (hx - beta * hy), (hx, hy)

        updates, hxs, hys = [], [], []
        h = x
        for i, (layer, f) in enumerate(zip(params[:-1], acts[:-1], strict=True)):
            g, (hx, hy) = jax.grad(layer_objective, has_aux=True)(layer, h, f)
            updates.append(g)
            hxs.append(hx)
            hys.append(hy)
            a = h @ layer["w"] + (layer["b"] if "b" in layer else 0)
            h = acts[i](a)

        def output_loss(layer):
            a = jax.lax.stop_gradient(h) @ layer["w"]
            if "b" in layer:
                a = a + layer["b"]
            out = acts[-1](a)
            return context.loss(out, y), out

        (loss_val, out), g_out = jax.value_and_grad(output_loss, has_aux=True)(params[-1])
        updates.append(g_out)
        metrics = {"hsic_zx": jnp.mean(jnp.stack(hxs)), "hsic_zy": jnp.mean(jnp.stack(hys))}
        return updates, state, StepOutput(loss_val, out, metrics)

    return LearningRule(init_fn, step_fn, (), name)
