"""The `LearningRule` step protocol: registry-driven conformance for every rule on every kind of
model it supports (fbalign MLP, Flax NNX, Flax Linen, Equinox, a plain function), the lifts of
tape rules, and the errors that name what a rule needs."""

from __future__ import annotations

import chex
import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from flax import nnx

import fbalign as fb
from fbalign.models import from_equinox, from_function, from_linen, from_nnx
from fbalign.rules import (
    RULES,
    Batch,
    LearningRule,
    StepContext,
    StepOutput,
    TapeRule,
    as_learning_rule,
)
from fbalign.train import init_train_state, make_train_step

X = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
Y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(5, 7, rngs=rngs), nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(jnp.tanh(linen.Dense(7)(x)))


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1, self.l2 = eqx.nn.Linear(5, 7, key=k1), eqx.nn.Linear(7, 3, key=k2)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _fn_net():
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (5, 7)) / 3, "w2": jax.random.normal(k2, (7, 3)) / 3}

    return from_function(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"], init)


WRAPPED = {
    "nnx": lambda: from_nnx(lambda rngs: NNXNet(rngs)),
    "linen": lambda: from_linen(LinenNet(), X),
    "equinox": lambda: from_equinox(lambda key: EqxNet(key)),
    "function": _fn_net,
}
ANY_MODEL_RULES = ["bp", "fg"]  # rules that only evaluate the network


def _conformance(model, rule_name):
    """eval_shape == init, vmap over seeds, a jitted vmapped step that compiles once and whose
    first step equals the eager one, finite updates that move the params."""
    opt = optax.sgd(0.05)
    rule = as_learning_rule(rule_name, network=model)
    assert isinstance(rule, LearningRule)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    states = jax.vmap(lambda k: init_train_state(model, rule, opt, k))(keys)
    one = jax.tree.map(lambda a: a[0], states)
    shapes = jax.eval_shape(lambda k: init_train_state(model, rule, opt, k), keys[0])
    assert jax.tree.structure(shapes) == jax.tree.structure(one)
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(one), strict=True):
        assert s.shape == a.shape and s.dtype == a.dtype
    step = make_train_step(model, rule, opt, jit=False)
    eager, m_eager = step(one, X, Y)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(eager.params))
    chex.clear_trace_counter()
    jstep = jax.jit(jax.vmap(chex.assert_max_traces(step, n=1), in_axes=(0, None, None)))
    new, m = jstep(states, X, Y)
    assert_trees_close(jax.tree.map(lambda a: a[0], new.params), eager.params, 1e-4, 1e-6)
    np.testing.assert_allclose(m["loss"][0], m_eager["loss"], rtol=1e-5)
    for _ in range(2):
        new, _ = jstep(new, X, Y)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                    jax.tree.leaves(states.params), strict=True)]
    assert any(moved)


# Tape rules in their explicit form are held to the same checks rule by rule in
# test_fa_family.test_registry_conformance; here: every rule with a step of its own, and the
# lifts of a few tape rules (stateless, DFA-style, stateful, synthetic gradients).
# ADMM keeps per-example variables (it needs Batch.index and num_examples, a ReLU net and a
# squared-error loss), Kickback a ReLU net with one output: test_admm and test_kickback hold them
# to the same checks (jit, vmap, eval_shape) with those.
PROTOCOL_RULES = sorted(({n for n, s in RULES.items() if not isinstance(s.make(), TapeRule)}
                         | {"bp", "fa", "dfa", "kp", "dni"}) - {"admm", "kickback"})


# Rules that train one kind of network conform on it (equilibrium propagation: its Hopfield net).
OWN_NETWORK = {"ep": lambda: fb.models.hopfield((5, 7, 3), "sigmoid", free_steps=10),
               "ff": lambda: fb.mlp((5, 7, 6, 3), activation="relu")}


@pytest.mark.parametrize("name", PROTOCOL_RULES)
def test_registered_rules_conform_on_the_mlp(name):
    _conformance(OWN_NETWORK.get(name, lambda: fb.mlp((5, 7, 6, 3)))(), name)


@pytest.mark.parametrize("kind", sorted(WRAPPED))
@pytest.mark.parametrize("name", ANY_MODEL_RULES)
def test_rules_without_layer_needs_conform_on_any_model(kind, name):
    _conformance(WRAPPED[kind](), name)


def test_backprop_on_a_wrapped_model_is_the_frameworks_gradient():
    module = NNXNet(nnx.Rngs(3))
    net = from_nnx(module)
    params = net.init(jax.random.PRNGKey(0))
    rule = as_learning_rule("bp", network=net)
    updates, _, out = rule.step(params, rule.init(None, params, net), Batch(X, Y), None,
                                StepContext(net, fb.cross_entropy))
    want = nnx.grad(lambda m: fb.cross_entropy(m(X), Y))(module)
    got_leaves = jax.tree.leaves(updates)
    want_leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(want, nnx.Param)))
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.output, module(X), rtol=1e-6)


@pytest.mark.parametrize("name", ["fa", "dfa", "kp", "dni"])
def test_tape_rules_on_a_wrapped_model_say_what_they_need(name):
    net = WRAPPED["nnx"]()
    with pytest.raises(TypeError, match=rf"rule '{name}' needs a network with .*layer_structure"
                                        r".*NNXNetwork.*fbalign.flax.convert"):
        make_train_step(net, name, optax.sgd(0.1))


def test_fit_trains_a_wrapped_equinox_model_with_forward_gradient(tmp_path):
    data = fb.data.load_dataset("digits", normalize="standardize")
    net = from_equinox(lambda key: eqx.nn.MLP(64, 10, 32, 1, activation=jnp.tanh, key=key))
    res = fb.train.fit(net, "fg", optax.sgd(0.05), data, epochs=2, batch_size=64,
                       rule_kwargs={"num_tangents": 32}, progress=False, seeds=2,
                       out_dir=tmp_path)
    errs = res.history[-1]["test_error"]
    assert len(errs) == 2 and max(errs) < 60.0  # chance is 90%


def test_fit_warns_when_every_seed_starts_from_one_instance():
    data = fb.data.load_dataset("digits")
    net = from_nnx(_digits_nnx())
    with pytest.warns(RuntimeWarning, match="same weights.*factory"):
        fb.train.fit(net, "bp", optax.sgd(0.01), data, epochs=0, seeds=2, progress=False)


def _digits_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.l(x)

    return Net(nnx.Rngs(0))


def test_a_tape_style_learning_rule_is_named_not_traced():
    def init(key, params):
        return fb.EmptyState()

    def update(params, state, tape, error, **extra):
        return params, state

    with pytest.raises(TypeError, match="TapeRule\\(init, update\\)"):
        make_train_step(fb.mlp((3, 2)), LearningRule(init, update), optax.sgd(0.1))


def test_tape_rules_lift_to_the_same_updates_in_both_forms_and_keep_update():
    model = fb.mlp((5, 7, 6, 3))
    params = model.init(jax.random.PRNGKey(0))
    tape_rule = fb.get_rule("fa")
    assert isinstance(tape_rule, TapeRule)
    state = tape_rule.init(jax.random.PRNGKey(1), params)
    ctx = StepContext(model, fb.cross_entropy)
    a = as_learning_rule("fa", "explicit").step(params, state, Batch(X, Y), None, ctx)
    b = as_learning_rule("fa", "grad").step(params, state, Batch(X, Y), None, ctx)
    assert_trees_close(a[0], b[0], 1e-5, 1e-7)
    assert isinstance(a[2], StepOutput)
    y, tape = model.forward(params, X)
    err = jax.grad(lambda o: fb.cross_entropy(o, Y))(y)
    assert_trees_close(tape_rule.update(params, state, tape, err)[0], a[0], 1e-6, 1e-8)


def test_batch_index_reaches_the_rule_in_fit():
    seen = []

    def init(key, params, network):
        return jnp.zeros((), jnp.int32)

    def step(params, state, batch, key, context):
        out = context.network.apply(params, batch.x)
        jax.debug.callback(lambda i: seen.append(np.asarray(i)), batch.index)
        zero = jax.tree.map(jnp.zeros_like, params)
        return zero, state, StepOutput(context.loss(out, batch.y), out)

    data = fb.data.load_dataset("digits")
    fb.train.fit(fb.mlp((64, 10)), LearningRule(init, step, name="spy"), optax.sgd(0.1), data,
                 epochs=1, batch_size=256, progress=False)
    idx = np.concatenate(seen)
    n = len(data.x_train)
    assert len(idx) == (n // 256) * 256 and len(set(idx.tolist())) == len(idx)
    assert idx.min() >= 0 and idx.max() < n


def _residual_net():
    from fbalign.models import Dense, Residual, sequential

    return sequential([Dense(7, "tanh"), Residual((Dense(4, "tanh"), Dense(7)), "tanh"),
                       Dense(3)], (5,))


GRAD_TAPE_RULES = sorted(n for n, s in RULES.items()
                         if isinstance(s.make(), TapeRule) and s.make().backward is not None)


@pytest.mark.parametrize("name", GRAD_TAPE_RULES)
def test_tape_rules_conform_on_a_residual_network_or_say_why_not(name):
    """A residual `sequential` network records no tape: every tape rule with a jax.grad form
    trains it through its `Backward` and conforms (jit, vmap over seeds, eval_shape, one
    compile), except rules whose feedback learns from the explicit form's recorded
    activations, which are refused by name."""
    net = _residual_net()
    if RULES[name].stateful and RULES[name].make().advance is None:
        with pytest.raises(ValueError, match=f"'{name}' changes its feedback state .* records "
                                             "none"):
            as_learning_rule(name, network=net)
        return
    _conformance(net, name)
