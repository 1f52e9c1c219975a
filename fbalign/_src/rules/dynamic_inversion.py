"""Dynamic inversion (Podlaski & Machens 2020): hidden errors from feedback-control dynamics that
invert each layer's forward map, with the paper's stability condition checked and reported."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbalign._src.backward import LinearFeedback, LinearOp, custom_linear_op
from fbalign._src.base import (
    Array,
    Params,
    PRNGKey,
    Tape,
    TapeRule,
    chain_updates,
    check_feedback_shapes,
    dense_layers,
)
from fbalign._src.feedback_init import Initializer
from fbalign._src.rules.feedback_alignment import FA_ORIENTATION, draw_feedback, fa_feedback_shapes


class DynamicInversionState(NamedTuple):
    """``feedback[l]``: the fixed feedback ``B_l`` of ``W_l``'s shape ``(din, dout)``
    (``feedback[0]`` is None); ``alpha``: the controller's leak, kept for `check_stability`."""

    feedback: tuple[Array | None, ...]
    alpha: Array


# `invert` reports a diverged Euler iteration (NaN) when its last increment is this many times
# its first: a converging iteration's increments shrink, a diverging one's grow geometrically.
DIVERGED = 10.0


# ``dt="auto"``: the Euler step ``min(AUTO_DT_SAFETY / s, AUTO_DT_MAX)`` from ``s``, the spectral
# norm of ``alpha I + B^T W`` estimated by AUTO_DT_ITERS power iterations (see `auto_dt`).
AUTO_DT_SAFETY = 1.0
AUTO_DT_MAX = 1.0
AUTO_DT_ITERS = 20
AUTO_DT_SEED = 0  # the power iteration's fixed start: np.random.default_rng(AUTO_DT_SEED)


def _matmul(x: Array, w: Array) -> Array:
    return x @ w


def _check_dt(dt: Any, where: str, arrays: bool = False) -> None:
    if (isinstance(dt, str) and dt == "auto") or (arrays and isinstance(dt, jax.Array)):
        return  # an array step (possibly traced) is the caller's to check
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"{where}: dt must be a number > 0 or 'auto' (the Euler step chosen "
                         f"from W and B at each step), got {dt!r}")


def _layer_maps(w: Array, b: Array, op: LinearOp, x: Array | None):
    """``back(u) = u B^T``, ``fwd(h) = h W`` and their transposes ``back_t(h) = h B``,
    ``fwd_t(z) = z W^T``, as maps of rows (or batches of rows); through ``op`` at ``x`` when
    the layer is not dense."""
    if op is _matmul:
        return (lambda u: u @ b.T, lambda h: h @ w,  # noqa: E731
                lambda h: h @ b, lambda z: z @ w.T)  # noqa: E731
    if x is None:
        raise ValueError("invert: pass the layer input x for a non-dense op")
    back = lambda u: jax.vjp(lambda x_: op(x_, b), x)[1](u)[0]  # noqa: E731
    fwd_t = lambda z: jax.vjp(lambda x_: op(x_, w), x)[1](z)[0]  # noqa: E731
    return back, (lambda h: op(h, w)), (lambda h: op(h, b)), fwd_t


def auto_dt(w: Array, b: Array, alpha: float, op: LinearOp = _matmul,
            x: Array | None = None) -> Array:
    r"""The Euler step of ``dt="auto"``: ``dt = \min(c / \hat s,\ dt_{max})`` for the layer's
    current ``W`` and ``B``, with ``\hat s`` the spectral norm of the controller's matrix
    ``M = \alpha I + B^\top W`` (row-major, ``d_{out} x d_{out}``), estimated by `AUTO_DT_ITERS`
    power iterations on ``M M^\top`` matrix-free (``v \leftarrow v M M^\top / \|v M
    M^\top\|``, then ``\hat s = \|v M\|``) from the fixed unit start
    ``np.random.default_rng(AUTO_DT_SEED).standard_normal(d_out)``; ``c`` = `AUTO_DT_SAFETY`
    (1), ``dt_{max}`` = `AUTO_DT_MAX` (1, also the step when ``M = 0``).

    Why: the Euler map ``I - dt\,M`` has eigenvalues ``1 - dt\lambda`` and ``|1 -
    dt\lambda|^2 = 1 - 2 dt\,\mathrm{Re}\lambda + dt^2|\lambda|^2``. Every ``|\lambda| \le
    s``, so at ``dt = c/s`` it is below 1 whenever ``\mathrm{Re}\lambda > (c/2)|\lambda|``:
    with ``c = 1``, the Euler steps contract for every stable flow whose eigenvalues lie within
    60 degrees of the positive real axis (all real positive spectra included, as ``B = W``),
    however large ``W`` has grown. A stable flow with eigenvalues closer to the imaginary axis
    needs ``dt < 2\,\mathrm{Re}\lambda / |\lambda|^2``, which no norm bound sees: then, and
    when the flow itself is unstable (an eigenvalue with ``\mathrm{Re}\lambda \le 0``, the
    paper's condition fails), no step helps; `invert` returns NaN and ``init`` warns.

    The power iteration lower-bounds ``s`` (so ``dt`` may exceed ``c/s`` slightly; real
    eigenvalues tolerate up to ``2/s``); it costs ``4`` matrix-vector products per iteration on
    one row, against ``2 n`` per Euler step on a batch of ``n``, and runs under ``jit`` and
    ``vmap`` with no host sync. ``W`` and ``B`` pass through ``stop_gradient``. For a layer
    ``op(x, W)`` other than ``x @ W``, pass its input ``x`` (its first row is used).

    Returns:
      The step, a scalar of ``W``'s dtype.
    """
    w, b = jax.lax.stop_gradient(w), jax.lax.stop_gradient(b)
    if op is _matmul:
        probe_shape = (w.shape[-1],)
    else:
        if x is None:
            raise ValueError("auto_dt: pass the layer input x for a non-dense op")
        x = jax.lax.stop_gradient(x)[:1]
        probe_shape = jax.eval_shape(op, x, w).shape
    back, fwd, back_t, fwd_t = _layer_maps(w, b, op, x)
    m = lambda v: alpha * v + fwd(back(v))  # noqa: E731
    m_t = lambda z: alpha * z + back_t(fwd_t(z))  # noqa: E731

    def unit(v):
        n = jnp.sqrt(jnp.sum(v * v))
        return jnp.where(n > 0, v / jnp.where(n > 0, n, 1), v)

    v0 = np.random.default_rng(AUTO_DT_SEED).standard_normal(probe_shape)
    v = jax.lax.fori_loop(0, AUTO_DT_ITERS, lambda _, v: unit(m_t(m(v))),
                          jnp.asarray(v0 / np.linalg.norm(v0), w.dtype))
    s = jnp.sqrt(jnp.sum(jnp.square(m(v))))
    return jnp.minimum(AUTO_DT_SAFETY / s, AUTO_DT_MAX).astype(w.dtype)


def invert(delta: Array, w: Array, b: Array, alpha: float, steps: int,
           dt: float | Literal["auto"], op: LinearOp = _matmul, x: Array | None = None) -> Array:
    r"""The error a layer sends down, by dynamic inversion: Euler steps of the controller.

    Row-major (``W`` ``(din, dout)``, ``B`` of ``W``'s shape, ``\delta`` ``(n, dout)``): a
    controller ``u`` integrates, with leak ``\alpha``, the mismatch between the layer's error
    ``\delta`` and what the feedback's own proposal ``\delta h = u B^\top`` produces when sent
    forward through ``W``:

    .. math::
        u_0 = 0, \qquad u_{k+1} = u_k + dt\,\bigl(-\alpha u_k + \delta - u_k B^\top W\bigr),
        \qquad \delta h = u_T B^\top .

    Its fixed point ``u^* = \delta (\alpha I + B^\top W)^{-1}`` gives ``\delta h^* = \delta
    (\alpha I + B^\top W)^{-1} B^\top``; with ``\alpha = 0`` it solves ``\delta h\, W =
    \delta`` (a right inverse of ``W``), the pseudo-inverse ``\delta W^+`` when ``B = W``.
    For a layer ``r = op(x, W)`` other than ``x @ W``, ``u B^T`` is the transpose of ``op(.,
    B)`` at ``u`` and ``\delta h W`` is ``op(\delta h, W)`` (then pass ``x``, the layer input,
    for the shapes).

    ``dt="auto"`` takes the step from the current ``W`` and ``B`` at each call (`auto_dt`:
    ``dt = \min(1 / \|\alpha I + B^\top W\|_2, 1)``, the norm by a few power iterations,
    no gradient, no host sync), so it shrinks as training grows ``W``; ``T`` steps then
    integrate a time ``T\,dt`` that shrinks too (the slowest mode ``\lambda_{min}`` decays by
    about ``(1 - \lambda_{min}/\|M\|)^T``: raise ``steps`` when ``M`` is ill-conditioned).

    When the Euler map ``I - dt (\alpha I + B^\top W)`` has spectral radius above 1 (the flow
    may still be stable: ``W`` grew during training, a fixed ``dt`` did not shrink; with
    ``"auto"``, eigenvalues more than 60 degrees off the positive real axis; or the flow itself
    is unstable, which no ``dt`` fixes), the iteration diverges geometrically. That is detected
    from the last increment of ``u`` being more than `DIVERGED` times the first, and the result
    is then NaN, so a training run stops at its non-finite check instead of applying inverted
    errors thousands of times backprop's.

    Returns:
      ``\delta h = u_T B^\top``, shaped like the layer's input (NaN when the Euler iteration
      diverged: pass ``dt="auto"``, or lower ``dt`` with more ``steps``).
    """
    _check_dt(dt, "invert", arrays=True)
    back, fwd, _, _ = _layer_maps(w, b, op, x)
    if isinstance(dt, str):  # "auto"
        dt = auto_dt(w, b, alpha, op, x)

    def body(carry, _):
        u, _ = carry
        step = dt * (-alpha * u + delta - fwd(back(u)))
        return (u + step, step), None

    # the first increment is dt * delta (u_0 = 0); only the last one is carried out
    (u, last), _ = jax.lax.scan(body, (jnp.zeros_like(delta), jnp.zeros_like(delta)), None,
                                length=steps)
    diverged = jnp.sum(last * last) > DIVERGED**2 * dt**2 * jnp.sum(delta * delta)
    out = back(u)
    return jnp.where(diverged, jnp.asarray(jnp.nan, out.dtype), out)


def check_stability(params: Params, state: DynamicInversionState,
                      alpha: float | None = None) -> list[float | None]:
    r"""Per layer, the largest real part of the eigenvalues of the controller's dynamics matrix
    ``-(\alpha I + B_l^\top W_l)`` (``d_l x d_l``, row-major; Podlaski & Machens write it
    ``-(W_l B_l + \alpha I)`` column-major). Negative for every layer: the feedback dynamics
    converge to their fixed point (the paper's stability condition); ``>= 0``: they do not.
    None for layer 0 (no feedback). Host-side (NumPy), for diagnostics outside ``jit``."""
    a = float(np.asarray(state.alpha).reshape(-1)[0]) if alpha is None else float(alpha)
    out: list[float | None] = []
    for (w, _), b in zip(dense_layers(params), state.feedback, strict=True):
        if b is None:
            out.append(None)
            continue
        m = np.asarray(b, np.float64).T @ np.asarray(w, np.float64)
        out.append(float(-a - np.min(np.linalg.eigvals(m).real)))
    return out



def _euler_radius(w: np.ndarray, b: np.ndarray, alpha: float, dt: float) -> float:
    m = b.T @ w
    return float(np.max(np.abs(np.linalg.eigvals(np.eye(m.shape[0]) - dt * (alpha * np.eye(
        m.shape[0]) + m)))))


def _warn_euler(i: int, w: np.ndarray, b: np.ndarray, alpha: float, dt: float | str,
                rule: str) -> None:
    """Warns when the Euler steps of layer ``i`` diverge although its flow is stable."""
    if isinstance(dt, str):  # "auto": the step of `auto_dt` with the exact spectral norm
        m = alpha * np.eye(w.shape[1]) + b.T @ w
        s = float(np.linalg.norm(m, 2))
        step = min(AUTO_DT_SAFETY / s, AUTO_DT_MAX) if s > 0 else AUTO_DT_MAX
        radius = _euler_radius(w, b, alpha, step)
        if radius >= 1:
            warnings.warn(
                f"{rule}: layer {i}'s feedback dynamics are stable in continuous time, but even "
                f"dt='auto' (here {step:.4g}) gives an Euler map I - dt (alpha I + B_{i}^T "
                f"W_{i}) of spectral radius {radius:.4g} >= 1: eigenvalues of alpha I + B^T W "
                "lie more than 60 degrees off the positive real axis. Raise alpha.",
                RuntimeWarning, stacklevel=4)
        return
    radius = _euler_radius(w, b, alpha, dt)
    if radius >= 1:
        warnings.warn(
            f"{rule}: layer {i}'s feedback dynamics are stable in continuous time, but the "
            f"Euler steps diverge: the spectral radius of I - dt (alpha I + B_{i}^T W_{i}) "
            f"is {radius:.4g} >= 1 (dt={dt:g}); lower dt, or pass dt='auto' (a step chosen "
            "from W and B at every update, so it also follows W as training grows it).",
            RuntimeWarning, stacklevel=4)


def _warn_unstable(ws: list, bs: list, alpha: float, dt: float | str, rule: str) -> None:
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        if b is None:
            continue
        w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
        if w.ndim != 2:  # a vmapped init's callback sees one seed at a time; else skip
            continue
        margin = float(-alpha - np.min(np.linalg.eigvals(b.T @ w).real))
        if margin >= 0:
            warnings.warn(
                f"{rule}: the feedback dynamics of layer {i} are unstable (Podlaski & Machens "
                f"2020's condition): the max real part of the eigenvalues of -(alpha I + "
                f"B_{i}^T W_{i}) is {margin:.4g} >= 0 (alpha={alpha:g}); the inverted errors "
                "will not converge, whatever dt (also dt='auto'). Raise alpha, or use feedback "
                "closer to W (eigenvalues of B^T W with positive real part).",
                RuntimeWarning, stacklevel=3)
            continue
        _warn_euler(i, w, b, alpha, dt, rule)


@functools.cache
def _inverting_op(op: LinearOp, alpha: float, steps: int, dt: float):
    """``f(x, w, b) = op(x, w)`` whose backward sends the error down by `invert` (dynamic
    inversion through ``b``); ``w`` gets its ordinary gradient, ``b`` none."""
    return custom_linear_op(op, lambda g, x, w, b: invert(g, w, b, alpha, steps, dt, op, x),
                            lambda g, x, w, b: jnp.zeros_like(b))


@dataclasses.dataclass(frozen=True)
class InversionFeedback(LinearFeedback):
    """Layer ``i`` sends the error down by dynamic inversion through ``B_i`` (`invert`)."""

    alpha: float = 3.0
    steps: int = 50
    dt: float | Literal["auto"] = 0.2
    kind: ClassVar[str | None] = "fa"

    def linear(self, i: Any, op: LinearOp, x: Array, w: Array) -> Array:
        b = self.checked_feedback(i, w)
        if b is None:
            return op(x, w)
        return _inverting_op(op, self.alpha, self.steps, self.dt)(x, w, jax.lax.stop_gradient(b))


def dynamic_inversion(
    alpha: float = 3.0,
    steps: int = 50,
    dt: float | Literal["auto"] = 0.2,
    init: str | Initializer = "gaussian",
    scale: float | None = None,
    *,
    warn: bool = True,
) -> TapeRule:
    r"""Dynamic inversion: each layer's error is inverted through its forward weights by
    feedback-control dynamics, instead of transported back through ``W^\top``.

    Layer by layer from the top (row-major, ``B_l`` fixed, of ``W_l``'s shape), the error
    ``\delta_l = \partial L / \partial a_l`` drives a leaky controller whose output, sent back
    through ``B_l``, is the proposed change of the layer's input; the layer's own forward
    weights close the loop (`invert`):

    .. math::
        u_{k+1} = u_k + dt\,\bigl(-\alpha u_k + \delta_l - u_k B_l^\top W_l\bigr),\quad
        \delta_{l-1} = (u_T B_l^\top) \odot f'(a_{l-1}), \quad
        \text{updates}[l]_w = x_l^\top \delta_l .

    With ``T`` steps to convergence, ``\delta_{l-1} = \delta_l (\alpha I + B_l^\top W_l)^{-1}
    B_l^\top \odot f'`` and, for ``\alpha \to 0``, ``\delta_{l-1} W_l = \delta_l`` on a linear
    layer: the error is inverted (the pseudo-inverse ``W_l^+`` when ``B_l = W_l``), not
    transposed. Nonlinearities pass the inverted error through their derivative (the
    linearisation around the forward pass).

    **Stability** (the paper's condition): the controller converges only if every eigenvalue of
    ``-(\alpha I + B_l^\top W_l)`` has a negative real part (column-major: ``W_l B_l + \alpha
    I``, the issue's "``W B - \alpha I``" with B's sign absorbed); for ``\alpha = 0`` and an
    expanding layer ``B^\top W`` is singular and it fails. ``init`` checks it once on the
    initial weights and feedback and warns (`RuntimeWarning` naming the layer and the max real
    part; also when the Euler steps ``dt`` diverge although the flow is stable);
    `check_stability` reports it for any params and state. The check runs once, at init: as
    training grows ``W``, the eigenvalues of ``B^\top W`` grow and a fixed ``dt`` stable at init
    can leave the Euler map's stable region while the flow stays stable (measured on the
    podlaski2020 recipe, 784-1000-10 tanh on MNIST: modulus 23 after 15 epochs, Euler spectral
    radius 4.2 at ``dt = 0.2``, inverted errors 6e4x backprop's and test error 10.6% -> 48% in
    the second epoch). `invert` detects such a diverging iteration and returns NaN, so a run
    stops at the harness's non-finite check (the cause: ``dt`` too large for the grown ``W``)
    instead of training on garbage.

    **Adaptive step** ``dt="auto"`` (`auto_dt`): at every update and for every layer, ``dt =
    \min(1/\hat s, 1)`` with ``\hat s`` the spectral norm of ``M = \alpha I + B^\top W``
    from 20 matrix-free power iterations (under ``jit``/``vmap``, ``stop_gradient``; measured
    cost: a few percent of the inversion). Since every eigenvalue has ``|\lambda| \le s``, the
    Euler map ``I - dt\,M`` then contracts whenever the flow is stable with eigenvalues within
    60 degrees of the positive real axis (``\mathrm{Re}\lambda > |\lambda|/2``), however
    large ``W`` grows. It cannot save an unstable flow (an eigenvalue of ``M`` with real part
    ``\le 0``: the paper's condition fails) nor a stable one with eigenvalues closer to the
    imaginary axis (those need ``dt < 2\,\mathrm{Re}\lambda/|\lambda|^2``): ``init`` warns
    for both, and `invert` still returns NaN when the iteration diverges. The step shrinks as
    ``W`` grows, so ``steps`` integrate less time; raise ``steps`` if ``M`` is ill-conditioned.
    Podlaski & Machens' code uses a fixed ``dt = 0.5`` with 1000 steps (and a direct solve,
    NDI, for MNIST); the adaptive step is fbalign's. Otherwise, for long runs, pass a smaller
    fixed ``dt`` with more ``steps`` (the recipe: 0.05 and 100) and call `check_stability`
    on the trained params.

    Args:
      alpha: ``\alpha >= 0``, the controller's leak. The default 3 keeps random Gaussian
        feedback of the default scale stable at init on the MLPs we tried (the max real part
        of the eigenvalues of ``-B^T W`` was 0.5-2.7 over seeds and sizes from (5, 7, 6, 3) to
        (784, 1000, 10)); a large leak damps the inversion towards ``FA / alpha``.
      steps: ``T``, Euler steps of the dynamics per layer and batch.
      dt: the Euler step (time in units of the controller's time constant), a number > 0
        (default 0.2), or ``"auto"``: chosen from ``W`` and ``B`` at every update (above).
      init: initialiser of the fixed feedback B (``"gaussian"``, ``"uniform"``,
        ``"orthogonal"`` or a callable).
      scale: the initialiser's std/limit/gain.
      warn: check the stability condition in ``init`` and warn when it fails.

    Returns:
      A `TapeRule` with `DynamicInversionState` (dense MLPs). ``jax.grad`` form:
      `InversionFeedback` runs the same dynamics in each layer's backward.

    References:
      Podlaski & Machens (2020), "Biological credit assignment through dynamic inversion of
      feedforward networks", NeurIPS 33.
    """
    if not (isinstance(alpha, (int, float)) and alpha >= 0):
        raise ValueError(f"dynamic_inversion: alpha must be a number >= 0, got {alpha!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"dynamic_inversion: steps must be an int >= 1, got {steps!r}")
    _check_dt(dt, "dynamic_inversion")
    alpha = float(alpha)
    dt = dt if isinstance(dt, str) else float(dt)
    name = "dynamic_inversion"

    def init_fn(key: PRNGKey, params: Params) -> DynamicInversionState:
        layers = dense_layers(params)
        dtype = layers[0][0].dtype
        fb = draw_feedback(key, fa_feedback_shapes(params), init, scale, dtype, 1)
        if warn:
            ws = [w for w, _ in layers]
            if any(isinstance(a, jax.core.Tracer) for a in [*ws, *fb] if a is not None):
                # traced (jit/vmap of init): check on the host once the values exist
                jax.debug.callback(lambda w_, b_: _warn_unstable(list(w_), list(b_), alpha, dt,
                                                                 name), ws, list(fb))
            else:
                _warn_unstable(ws, list(fb), alpha, dt, name)
        return DynamicInversionState(fb, jnp.asarray(alpha, dtype))

    def update_fn(params: Params, state: DynamicInversionState, tape: Tape, error: Array,
                  **extra: Any):
        del extra
        check_feedback_shapes(state.feedback, fa_feedback_shapes(params), name, FA_ORIENTATION,
                              dtype=dense_layers(params)[0][0].dtype)
        tape.require_dense(name, "the inversion dynamics are stated for dense layers "
                           "(Podlaski & Machens 2020); train a fbalign.models.mlp")
        fb = state.feedback
        ws = [w for w, _ in dense_layers(params)]
        return chain_updates(params, tape, error,
                             lambda i, d: invert(d, ws[i], fb[i], alpha, steps, dt)), state

    return TapeRule(init_fn, update_fn, backward=lambda feedback, labels: InversionFeedback(
        feedback=feedback, alpha=alpha, steps=steps, dt=dt))
