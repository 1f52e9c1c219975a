"""fbalign._src.linalg: linear algebra that jaxlib 0.10's CPU LAPACK kernels cannot deadlock
under vmap (a batched call blocks a pool worker until its chunks run; two at once on 2 cores
hang). The structural check: every LAPACK call that a vmapped program lowers to on the CPU is
unbatched. The values: equal to NumPy and to jax's own (batched) functions, gradients too."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbalign as fb
from fbalign._src import linalg
from fbalign._src.base import Batch, StepContext
from fbalign._src.losses import squared_error
from fbalign._src.rules.admm import admm, solve_weights
from fbalign._src.rules.hsic import hsic_bottleneck

B = 3  # the vmapped axis; no matrix dimension below is 3


def _lapack_operands(fn, *args) -> list[tuple[str, tuple[int, ...]]]:
    """Each LAPACK custom call of ``jit(fn)`` lowered for the CPU: (target, first operand's
    shape)."""
    txt = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    out = []
    for target, ty in re.findall(r"custom_call @(lapack\w+)\(.*?:\s*\(tensor<([^>]*)>", txt):
        out.append((target, tuple(int(d) for d in ty.split("x")[:-1])))
    return out


def _assert_unbatched(fn, *args) -> None:
    calls = _lapack_operands(fn, *args)
    assert calls, "the program lowers to no LAPACK call: the check would pass vacuously"
    batched = [c for c in calls if len(c[1]) > 2]
    assert not batched, f"batched LAPACK calls under vmap on the CPU: {batched}"


def _spd(rng, n, batch=()):
    m = rng.normal(size=(*batch, n, n + 2))
    return m @ np.swapaxes(m, -1, -2) + 0.5 * np.eye(n)


def test_the_detector_sees_jax_own_batched_calls():
    # the control: jax's functions under vmap lower to batched LAPACK calls (what hangs)
    a = jnp.ones((B, 5, 4))
    calls = _lapack_operands(jax.vmap(jnp.linalg.pinv), a)
    assert calls and all(len(shape) == 3 and shape[0] == B for _, shape in calls)
    m = jnp.asarray(_spd(np.random.default_rng(0), 4, (B,)))
    calls = _lapack_operands(jax.vmap(lambda m, b: jax.scipy.linalg.solve(m, b, assume_a="pos")),
                             m, m)
    assert any(len(shape) == 3 for _, shape in calls)


def test_pinv_equals_numpy_and_runs_unbatched_under_vmap():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(B, 6, 4))
    a[1, :, 3] = a[1, :, 0]  # rank-deficient
    with jax.enable_x64(True):
        got = jax.jit(jax.vmap(linalg.pinv))(jnp.asarray(a))
        np.testing.assert_allclose(got, np.linalg.pinv(a), atol=1e-10)
        np.testing.assert_allclose(linalg.pinv(jnp.asarray(a[0])), np.linalg.pinv(a[0]),
                                   atol=1e-10)
    _assert_unbatched(jax.vmap(linalg.pinv), jnp.asarray(a, jnp.float32))


def test_solve_spd_values_and_gradients_match_jax_batched_or_not():
    rng = np.random.default_rng(2)
    m, b, b1 = _spd(rng, 4, (B,)), rng.normal(size=(B, 4, 2)), rng.normal(size=(B, 4))
    c = rng.normal(size=(4, 2))

    def ours(m, b):
        return jnp.sum(jnp.sin(linalg.solve_spd(m, b)) * (c if b.ndim == 2 else c[:, 0]))

    def ref(m, b):
        x = jax.scipy.linalg.solve(m, b, assume_a="pos")
        return jnp.sum(jnp.sin(x) * (c if b.ndim == 2 else c[:, 0]))

    with jax.enable_x64(True):
        m_, b_, b1_ = jnp.asarray(m), jnp.asarray(b), jnp.asarray(b1)
        np.testing.assert_allclose(jax.vmap(linalg.solve_spd)(m_, b_), np.linalg.solve(m, b),
                                   atol=1e-10)
        np.testing.assert_allclose(linalg.solve_spd(m_[0], b1_[0]),
                                   np.linalg.solve(m[0], b1[0]), atol=1e-10)
        for rhs in (b_, b1_):
            g = jax.jit(jax.vmap(jax.grad(ours, argnums=(0, 1))))(m_, rhs)
            r = jax.vmap(jax.grad(ref, argnums=(0, 1)))(m_, rhs)
            for gi, ri in zip(g, r, strict=True):
                np.testing.assert_allclose(gi, ri, atol=1e-10)
        # the gradient of the sum over the batch (grad of vmap), and a symmetric-matrix
        # parametrisation (what HSIC differentiates): finite differences
        s = jnp.asarray(rng.normal(size=(4, 4)))

        def f(s):
            return jnp.sum(jax.vmap(lambda m: linalg.solve_spd(m + s @ s.T, b1_[0]))(m_) ** 2)

        d = jnp.asarray(rng.normal(size=(4, 4)))
        fd = (f(s + 1e-6 * d) - f(s - 1e-6 * d)) / 2e-6
        np.testing.assert_allclose(jnp.sum(jax.grad(f)(s) * d), fd, rtol=1e-6)
    m32, b32 = jnp.asarray(m, jnp.float32), jnp.asarray(b, jnp.float32)
    _assert_unbatched(jax.vmap(linalg.solve_spd), m32, b32)
    _assert_unbatched(jax.vmap(jax.grad(lambda m, b: linalg.solve_spd(m, b).sum(),
                                        argnums=(0, 1))), m32, b32)


def test_orthogonal_init_equals_jax_and_runs_unbatched_under_vmap():
    keys = jax.random.split(jax.random.PRNGKey(0), B)
    ours = jax.vmap(lambda k: linalg.orthogonal(2.0)(k, (5, 4)))(keys)
    ref = jax.vmap(lambda k: jax.nn.initializers.orthogonal(2.0)(k, (5, 4)))(keys)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(linalg.orthogonal()(keys[0], (4, 6), jnp.float32),
                               jax.nn.initializers.orthogonal()(keys[0], (4, 6)), atol=1e-6)
    _assert_unbatched(jax.vmap(lambda k: linalg.orthogonal()(k, (5, 4))), keys)
    _assert_unbatched(jax.vmap(lambda k: fb.orthogonal_feedback()(k, (5, 4))), keys)


def _vmapped_step(rule, model, x, y, idx, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(0), B)
    params = jax.vmap(lambda k: model.init(k, dtype))(keys)
    state = jax.vmap(lambda k, p: rule.init(k, p, model))(keys, params)
    ctx = StepContext(model, squared_error)

    def step(p, s, k):
        return rule.step(p, s, Batch(x, y, idx), k, ctx)

    return jax.vmap(step), (params, state, keys)


@pytest.mark.parametrize("weight_solve", ["pinv", "cholesky"])
def test_admm_ensemble_step_lowers_to_unbatched_lapack_calls(weight_solve):
    # `fbalign train --rule admm --seeds 2 --ensemble-impl vmap` hung in 2 of 3 runs before
    model = fb.mlp((6, 5, 4), activation="relu")
    rule = admm(num_examples=8, weight_solve=weight_solve)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(1), (8, 6), jnp.float64)
        y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 4)
        fn, args = _vmapped_step(rule, model, x, y, jnp.arange(8), jnp.float64)
        _assert_unbatched(fn, *args)
        # and the vmapped step equals one step per member
        upd, _, _ = jax.jit(fn)(*args)
        for i in range(B):
            one = jax.tree.map(lambda v, i=i: v[i], args)
            u1, _, _ = rule.step(one[0], one[1], Batch(x, y, jnp.arange(8)), one[2],
                                 StepContext(model, squared_error))
            for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(u1), strict=True):
                np.testing.assert_allclose(a[i], b, rtol=1e-8, atol=1e-8)


def test_hsic_ensemble_step_lowers_to_unbatched_lapack_calls():
    model = fb.mlp((6, 5, 4), activation="relu")
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 4)
    fn, args = _vmapped_step(hsic_bottleneck(normalized=True), model, x, y, None)
    _assert_unbatched(fn, *args)


def test_admm_cholesky_weight_solve_tends_to_the_pseudo_inverse():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        # full column rank: both solve the same least-squares problem; the ridge moves the
        # solution by about ridge / sigma_min^2 relative
        a, z = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
        p = solve_weights(jnp.asarray(a), jnp.asarray(z), True, "pinv")
        c = solve_weights(jnp.asarray(a), jnp.asarray(z), True, "cholesky")
        aug = np.concatenate([a, np.ones((40, 1))], 1)
        sv = np.linalg.svd(aug, compute_uv=False)
        bound = 10 * 1e-6 * np.mean(sv ** 2) / sv[-1] ** 2
        for k in ("w", "b"):
            np.testing.assert_allclose(c[k], p[k], atol=bound * np.abs(p[k]).max())
            assert not np.allclose(c[k], p[k], rtol=0, atol=1e-14)  # a different solver ran
        # a constant (always-zero) input column: pinv gives it weight 0, and so does the ridge
        a[:, 2] = 0.0
        c = solve_weights(jnp.asarray(a), jnp.asarray(z), False, "cholesky")
        np.testing.assert_allclose(c["w"][2], 0.0, atol=1e-12)
        np.testing.assert_allclose(c["w"], np.linalg.pinv(a) @ z, atol=1e-4)
    with pytest.raises(ValueError, match="weight_solve"):
        admm(num_examples=3, weight_solve="qr")


def test_admm_cholesky_trains_like_pinv_on_digits():
    data = fb.data.load_dataset("digits")
    n = len(data.x_train)
    errs = {}
    for ws in ("pinv", "cholesky"):
        res = fb.train.fit(fb.mlp((64, 64, 10), activation="relu"),
                           admm(num_examples=n, warm_start=10, weight_solve=ws),
                           optax.sgd(1.0), data, loss="squared_error", batch_size=n, epochs=15,
                           seed=0, progress=False)
        errs[ws] = float(res.history[-1]["test_error"])
    assert errs["cholesky"] < 10.0, errs  # percent
    assert abs(errs["cholesky"] - errs["pinv"]) < 2.0, errs
