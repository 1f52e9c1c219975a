"""Any model as an fbalign network: Flax NNX, Flax Linen, Equinox or a pair of functions.

The harness (`fbalign.train.fit`, `make_train_step`) trains objects with

* ``init(key, dtype=None) -> params``: a pytree of arrays, drawn once per seed;
* ``apply(params, x) -> y``: a batched forward, ``x`` of shape ``(batch, ...)``, ``y`` of shape
  ``(batch, n_out)``.

The wrappers here give any model that interface, so rules that only need a forward function
(backprop, forward gradient, evolution strategies) train it. They have no layer structure
(``layer_structure = False``, no ``forward`` recording a tape), so rules that read per-layer
activations (feedback alignment and its family) need a layered fbalign network instead.

Every wrapper is a frozen dataclass, used as a static object: close over it in ``jax.jit`` (or
pass it as a static argument: wrappers that hold arrays hash by identity), ``jax.vmap`` its
``init`` over keys and its ``apply`` over params for ensembles, and ``jax.grad`` a loss of
``apply`` w.r.t. the params. ``apply`` is pure: it rebuilds the model from the params and its
static rest on every call, so nothing the forward does leaks out of it.

``seeded`` tells whether ``init`` draws its params from the key. An NNX module or Equinox model
passed as an *instance* has ``seeded = False``: its ``init`` returns the instance's weights for
every key, so every member of an ensemble starts the same. Pass a factory to draw per-seed
weights; a harness checks `is_seeded` before running several seeds.

This module imports neither Flax nor Equinox until a wrapper needs them.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays

STATE_UPDATE_MODES = ("warn", "error", "ignore")
# The key a factory's static rest (RNG streams, batch statistics, non-float leaves) is built with.
_STATIC_SEED = 0


# --------------------------------------------------------------------------------------------
# helpers


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Casts the floating-point leaves of ``tree`` to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"init's dtype must be a floating-point dtype, got {dtype}")

    def cast(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(a, dtype)
        return a

    return jax.tree.map(cast, tree)


def _accepts_dtype(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``dtype`` keyword (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "dtype" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in params
    )


def _imported(module: str, attr: str) -> type | None:
    """``module.attr`` if ``module`` is already imported, else None (imports nothing)."""
    mod = sys.modules.get(module)
    return getattr(mod, attr, None) if mod is not None else None


def _path_str(path: tuple) -> str:
    """``"bn/mean"`` for a variable's key path (its trailing ``.value`` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def _import_equinox():
    try:
        import equinox
    except ImportError as e:
        raise ImportError(
            "fbalign.from_equinox needs Equinox: pip install equinox "
            "(or pip install fbalign[equinox])"
        ) from e
    return equinox


def is_seeded(network: Any) -> bool:
    """Whether ``network.init`` draws its params from the key (False for a wrapped instance).

    Networks without a ``seeded`` attribute count as seeded. A harness that runs several seeds
    checks this: an unseeded network would give every seed the same initial weights.

    Example:
      >>> net = from_function(lambda p, x: x @ p, lambda key: jax.random.normal(key, (3, 2)))
      >>> is_seeded(net)
      True
    """
    return bool(getattr(network, "seeded", True))


# --------------------------------------------------------------------------------------------
# plain functions


@dataclasses.dataclass(frozen=True)
class FunctionNetwork:
    """An fbalign network from ``apply(params, x)`` and ``init(key) -> params`` functions.

    Build it with `from_function`. ``init`` passes ``dtype`` on when the user's ``init_fn``
    takes a ``dtype`` keyword, else casts the floating-point leaves it returns.
    """

    apply_fn: Callable[[Params, Array], Array]
    init_fn: Callable[..., Params]

    layer_structure: ClassVar[bool] = False
    seeded: ClassVar[bool] = True

    def init(self, key: PRNGKey, dtype: Any = None) -> Params:
        """``init_fn(key)``; ``dtype`` (None: as ``init_fn`` makes them) for the float leaves."""
        if dtype is not None and _accepts_dtype(self.init_fn):
            return self.init_fn(key, dtype=dtype)
        return _cast_floats(self.init_fn(key), dtype)

    def apply(self, params: Params, x: Array) -> Array:
        """``apply_fn(params, x)``."""
        return self.apply_fn(params, x)


def from_function(
    apply: Callable[[Params, Array], Array], init: Callable[..., Params]
) -> FunctionNetwork:
    """Wraps an ``apply(params, x) -> y`` and an ``init(key) -> params`` as an fbalign network.

    Args:
      apply: the batched forward, ``x`` of shape ``(batch, ...)``.
      init: draws the params from a PRNG key; it may take a ``dtype`` keyword too.

    Returns:
      A `FunctionNetwork`.

    Example:
      >>> def init(key):
      ...     return {"w": jax.random.normal(key, (3, 2))}
      >>> net = from_function(lambda p, x: jnp.tanh(x @ p["w"]), init)
      >>> net.apply(net.init(jax.random.PRNGKey(0)), jnp.ones((5, 3))).shape
      (5, 2)
    """
    if not callable(apply) or not callable(init):
        raise TypeError("from_function needs two callables: apply(params, x) and init(key)")
    return FunctionNetwork(apply, init)


# --------------------------------------------------------------------------------------------
# Flax NNX


def _nnx_build(factory: Callable, key: PRNGKey) -> Any:
    from flax import nnx

    try:
        module = factory(nnx.Rngs(key))
    except Exception as e:
        e.add_note("fbalign.from_nnx calls its factory as factory(nnx.Rngs(key))")
        raise
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"from_nnx's factory must return an nnx.Module, got {type(module).__name__}"
        )
    return module


def _nnx_params(module: Any) -> dict:
    """The module's ``nnx.Param`` values as a nested dict of arrays (a snapshot)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NNXNetwork:
    """A Flax NNX module as an fbalign network; build it with `from_nnx`.

    Params are the module's ``nnx.Param`` values, a nested dict of arrays (the layout of
    ``nnx.to_pure_dict``). Every other variable (batch statistics, RNG streams, custom
    variables) is a static rest fixed when the wrapper is built: the harness never updates it.
    ``apply`` merges params and rest into a fresh module on every call and calls it.
    """

    module_type: str
    seeded: bool
    on_state_update: str
    graphdef: Any = dataclasses.field(repr=False)
    params_def: Any = dataclasses.field(repr=False)  # treedef of the nnx.Param State
    pure_def: Any = dataclasses.field(repr=False)  # treedef of the params dict
    order: tuple[int, ...] = dataclasses.field(repr=False)  # dict leaf of each State leaf
    rest_def: Any = dataclasses.field(repr=False)
    rest_paths: tuple[str, ...] = dataclasses.field(repr=False)
    rest_leaves: tuple[Any, ...] = dataclasses.field(repr=False)
    factory: Callable | None = dataclasses.field(default=None, repr=False)
    instance_params: dict | None = dataclasses.field(default=None, repr=False)
    _warned: list = dataclasses.field(default_factory=list, repr=False)

    layer_structure: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"NNXNetwork({self.module_type}, seeded={self.seeded})"

    def init(self, key: PRNGKey, dtype: Any = None) -> Params:
        """The module's ``nnx.Param`` values: built by the factory with ``nnx.Rngs(key)``, or
        the wrapped instance's weights (the same for every key: ``seeded`` is False).
        ``dtype`` (None: unchanged) casts the floating-point leaves."""
        if self.factory is None:
            params = self.instance_params
        else:
            params = _nnx_params(_nnx_build(self.factory, key))
        return _cast_floats(params, dtype)

    def _state(self, params: Params) -> Any:
        if jax.tree.structure(params) != self.pure_def:
            raise ValueError(
                f"{self!r}.apply got params of another structure than init's:\n"
                f"  got  {jax.tree.structure(params)}\n  want {self.pure_def}"
            )
        leaves = jax.tree.leaves(params)
        return jax.tree.unflatten(self.params_def, [leaves[i] for i in self.order])

    def apply(self, params: Params, x: Array) -> Array:
        """Merges ``params`` with the static rest into a fresh module and calls it on ``x``.

        Updates the forward makes to non-Param variables (BatchNorm statistics in training
        mode, Dropout's RNG counter) are discarded; ``on_state_update`` says whether that warns
        (once), raises or passes silently.
        """
        from flax import nnx

        rest = jax.tree.unflatten(self.rest_def, list(self.rest_leaves))
        module = nnx.merge(self.graphdef, self._state(params), rest)
        y = module(x)
        if self.on_state_update != "ignore":
            self._check_rest(nnx.state(module, nnx.Not(nnx.Param)))
        return y

    def _check_rest(self, after: Any) -> None:
        before = dict(zip(self.rest_paths, self.rest_leaves, strict=True))
        now = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(after)}
        changed = sorted(k for k in before.keys() | now.keys()
                         if k not in before or k not in now or before[k] is not now[k])
        if not changed:
            return
        msg = (
            f"the forward of {self.module_type} updated non-Param variables {changed}; "
            "fbalign's harness trains nnx.Param only, so these updates are discarded on every "
            "call (BatchNorm statistics keep their initial values, Dropout draws the same "
            "mask). Put the module in eval mode (module.eval(), or deterministic / "
            "use_running_average flags) or use a stateless model"
        )
        if self.on_state_update == "error":
            raise ValueError(msg)
        if not self._warned:
            self._warned.append(True)
            warnings.warn(msg, stacklevel=3)


def _nnx_network(module: Any, factory: Callable | None, on_state_update: str) -> NNXNetwork:
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    pure_paths, pure_def = jax.tree_util.tree_flatten_with_path(pure)
    index = {path: i for i, (path, _) in enumerate(pure_paths)}
    state_paths, params_def = jax.tree_util.tree_flatten_with_path(params)
    try:  # each Variable adds one key (its value) under the dict path of its leaf
        order = tuple(index[path[:-1]] for path, _ in state_paths)
    except KeyError as e:
        raise TypeError(
            f"from_nnx cannot map {type(module).__name__}'s nnx.Param state to a dict of arrays "
            f"(no dict leaf at {_path_str(e.args[0])})"
        ) from None
    if sorted(order) != list(range(len(pure_paths))):
        raise TypeError(f"from_nnx: {type(module).__name__}'s nnx.Param state has non-array "
                        "values; every Param must hold one array")
    rest_with_paths, rest_def = jax.tree_util.tree_flatten_with_path(rest)
    return NNXNetwork(
        module_type=type(module).__name__,
        seeded=factory is not None,
        on_state_update=on_state_update,
        graphdef=graphdef,
        params_def=params_def,
        pure_def=pure_def,
        order=order,
        rest_def=rest_def,
        rest_paths=tuple(_path_str(p) for p, _ in rest_with_paths),
        rest_leaves=tuple(v for _, v in rest_with_paths),
        factory=factory,
        instance_params=pure if factory is None else None,
    )


def from_nnx(model_or_factory: Any, *, on_state_update: str = "warn") -> NNXNetwork:
    """Wraps a Flax NNX module as an fbalign network.

    Params are the module's ``nnx.Param`` values (a nested dict of arrays); all other state
    (batch statistics, RNG streams) is a static rest that the harness never updates. Pass a
    factory to draw per-seed weights.

    Args:
      model_or_factory: an ``nnx.Module`` instance, or a factory
        ``lambda rngs: Model(..., rngs=rngs)``. With a factory, ``init(key)`` builds the module
        with ``nnx.Rngs(key)``, so each seed gets its own weights, and the static rest comes
        from a build with ``nnx.Rngs(0)``. With an instance, ``init`` returns a snapshot of the
        instance's weights for every key (``seeded`` is False), and the rest is the instance's.
      on_state_update: what ``apply`` does (at trace time) when the forward updates non-Param
        variables, updates that are discarded: ``"warn"`` (once), ``"error"`` or ``"ignore"``.

    Returns:
      An `NNXNetwork`.

    Example:
      >>> from flax import nnx
      >>> net = from_nnx(lambda rngs: nnx.Linear(3, 2, rngs=rngs))
      >>> net.apply(net.init(jax.random.PRNGKey(0)), jnp.ones((5, 3))).shape
      (5, 2)
    """
    from flax import nnx

    if on_state_update not in STATE_UPDATE_MODES:
        raise ValueError(f"unknown on_state_update {on_state_update!r}; valid: "
                         f"{', '.join(STATE_UPDATE_MODES)}")
    if isinstance(model_or_factory, nnx.Module):
        return _nnx_network(model_or_factory, None, on_state_update)
    if callable(model_or_factory):
        module = _nnx_build(model_or_factory, jax.random.PRNGKey(_STATIC_SEED))
        return _nnx_network(module, model_or_factory, on_state_update)
    raise TypeError(
        "from_nnx needs an nnx.Module or a factory lambda rngs: Model(..., rngs=rngs), got "
        f"{type(model_or_factory).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Flax Linen


@dataclasses.dataclass(frozen=True, eq=False)
class LinenNetwork:
    """A Flax Linen module as an fbalign network; build it with `from_linen`.

    ``init(key) = module.init(key, example_input)["params"]``,
    ``apply(params, x) = module.apply({"params": params}, x)``.
    """

    module: Any
    example_input: Any = dataclasses.field(repr=False)

    layer_structure: ClassVar[bool] = False
    seeded: ClassVar[bool] = True

    def init(self, key: PRNGKey, dtype: Any = None) -> Params:
        """The ``"params"`` collection of ``module.init(key, example_input)``; ``dtype``
        (None: unchanged) casts the floating-point leaves."""
        return _cast_floats(self.module.init(key, self.example_input).get("params", {}), dtype)

    def apply(self, params: Params, x: Array) -> Array:
        """``module.apply({"params": params}, x)``."""
        return self.module.apply({"params": params}, x)


def from_linen(module: Any, example_input: Any) -> LinenNetwork:
    """Wraps a Flax Linen module as an fbalign network.

    Args:
      module: a ``flax.linen.Module`` whose only variable collection is ``"params"``.
      example_input: an input batch ``module.init`` is traced with (its shapes and dtypes
        matter, not its values).

    Returns:
      A `LinenNetwork`.

    Raises:
      ValueError: the module has other variable collections (``batch_stats``, ...): the
        harness trains ``params`` only and would drop their updates.

    Example:
      >>> import flax.linen as nn
      >>> net = from_linen(nn.Dense(2), jnp.ones((1, 3)))
      >>> net.apply(net.init(jax.random.PRNGKey(0)), jnp.ones((5, 3))).shape
      (5, 2)
    """
    from flax import linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"from_linen needs a flax.linen.Module, got {type(module).__name__}")
    if example_input is None:
        raise ValueError("from_linen needs an example_input (an input batch) for module.init")
    example_input = jax.tree.map(jnp.asarray, example_input)
    variables = jax.eval_shape(lambda k: module.init(k, example_input),
                               jax.random.PRNGKey(_STATIC_SEED))
    others = sorted(set(variables) - {"params"})
    if others:
        raise ValueError(
            f"from_linen: {type(module).__name__} has variable collections {others} besides "
            "'params'; fbalign's harness trains 'params' only and would drop their updates. "
            "Use a module without them, or from_function(apply, init) with the other "
            "collections closed over"
        )
    return LinenNetwork(module, example_input)


# --------------------------------------------------------------------------------------------
# Equinox


def _eqx_build(factory: Callable, key: PRNGKey) -> Any:
    eqx = _import_equinox()
    try:
        model = factory(key)
    except Exception as e:
        e.add_note("fbalign.from_equinox calls its factory as factory(key)")
        raise
    if not isinstance(model, eqx.Module):
        raise TypeError(
            f"from_equinox's factory must return an eqx.Module, got {type(model).__name__}"
        )
    return model


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class EquinoxNetwork:
    """An Equinox model as an fbalign network; build it with `from_equinox`.

    Params are ``eqx.partition(model, eqx.is_inexact_array)[0]`` (the model with ``None``
    where its non-float leaves are); the rest is static. ``apply`` combines them and calls the
    model, vmapped over the batch unless ``batched``.
    """

    model_type: str
    seeded: bool
    batched: bool
    static: Any = dataclasses.field(repr=False)
    factory: Callable | None = dataclasses.field(default=None, repr=False)
    instance_params: Any = dataclasses.field(default=None, repr=False)

    layer_structure: ClassVar[bool] = False

    def __repr__(self) -> str:
        return (f"EquinoxNetwork({self.model_type}, seeded={self.seeded}, "
                f"batched={self.batched})")

    def init(self, key: PRNGKey, dtype: Any = None) -> Params:
        """The model's float arrays: built by the factory from ``key``, or the wrapped
        instance's (the same for every key: ``seeded`` is False). ``dtype`` (None: unchanged)
        casts them."""
        if self.factory is None:
            params = self.instance_params
        else:
            eqx = _import_equinox()
            params = eqx.partition(_eqx_build(self.factory, key), eqx.is_inexact_array)[0]
        return _cast_floats(params, dtype)

    def apply(self, params: Params, x: Array) -> Array:
        """``eqx.combine(params, static)`` called on ``x`` (``jax.vmap``-ed over its first axis
        unless ``batched``)."""
        eqx = _import_equinox()
        model = eqx.combine(params, self.static)
        try:
            return model(x) if self.batched else jax.vmap(model)(x)
        except Exception as e:
            e.add_note(
                f"fbalign.from_equinox(..., batched={self.batched}) "
                + ("calls the model on the whole batch x of shape "
                   f"{tuple(jnp.shape(x))}; a model that acts on one example needs "
                   "batched=False" if self.batched else
                   "calls the model on one example x[i] at a time (jax.vmap over x's first "
                   f"axis, x of shape {tuple(jnp.shape(x))}); a model that takes the whole "
                   "batch needs batched=True")
            )
            raise


def from_equinox(model_or_factory: Any, *, batched: bool = False) -> EquinoxNetwork:
    """Wraps an Equinox model as an fbalign network.

    Args:
      model_or_factory: an ``eqx.Module`` instance, or a factory
        ``lambda key: Model(..., key=key)`` (pass a factory to draw per-seed weights; with an
        instance ``init`` returns its weights for every key and ``seeded`` is False). The static
        rest of a factory's model comes from a build with ``PRNGKey(0)``.
      batched: False (the Equinox convention: the model acts on one example): ``apply`` vmaps it
        over the batch axis. True: ``apply`` calls it on the whole batch.

    Returns:
      An `EquinoxNetwork`. Stateful models (``eqx.nn.State``) and models that need a key at
      call time (dropout in training mode) are not supported.

    Example:
      >>> import equinox as eqx
      >>> net = from_equinox(lambda key: eqx.nn.Linear(3, 2, key=key))
      >>> net.apply(net.init(jax.random.PRNGKey(0)), jnp.ones((5, 3))).shape
      (5, 2)
    """
    eqx = _import_equinox()
    if isinstance(model_or_factory, eqx.Module):
        model, factory = model_or_factory, None
    elif callable(model_or_factory):
        factory = model_or_factory
        model = _eqx_build(factory, jax.random.PRNGKey(_STATIC_SEED))
    else:
        raise TypeError(
            "from_equinox needs an eqx.Module or a factory lambda key: Model(..., key=key), got "
            f"{type(model_or_factory).__name__}"
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return EquinoxNetwork(
        model_type=type(model).__name__,
        seeded=factory is not None,
        batched=bool(batched),
        static=static,
        factory=factory,
        instance_params=params if factory is None else None,
    )


# --------------------------------------------------------------------------------------------
# dispatch


def as_network(obj: Any, example_input: Any = None) -> Any:
    """Returns ``obj`` as an fbalign network (anything with ``init`` and ``apply``).

    * an fbalign network: returned unchanged;
    * a Flax Linen module: `from_linen` (needs ``example_input``);
    * a Flax NNX module instance: `from_nnx` (``seeded`` False: pass `from_nnx` a factory to
      draw per-seed weights);
    * an Equinox module instance: `from_equinox` (acting on one example; use
      ``from_equinox(model, batched=True)`` for a model that takes the batch).

    Factories and plain functions are ambiguous: wrap them with `from_nnx`, `from_equinox` or
    `from_function` explicitly.

    Example:
      >>> from flax import nnx
      >>> net = as_network(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> net.apply(net.init(jax.random.PRNGKey(0)), jnp.ones((5, 3))).shape
      (5, 2)
    """
    linen_module = _imported("flax.linen", "Module")
    nnx_module = _imported("flax.nnx", "Module")
    eqx_module = _imported("equinox", "Module")
    if linen_module is not None and isinstance(obj, linen_module):
        if example_input is None:
            raise ValueError(
                f"as_network: the Linen module {type(obj).__name__} needs an example_input "
                "(an input batch for module.init): as_network(module, example_input)"
            )
        return from_linen(obj, example_input)
    if nnx_module is not None and isinstance(obj, nnx_module):
        return from_nnx(obj)
    if eqx_module is not None and isinstance(obj, eqx_module):
        return from_equinox(obj)
    if (not isinstance(obj, type) and callable(getattr(obj, "init", None))
            and callable(getattr(obj, "apply", None))):
        return obj
    kinds = ("an fbalign network (init and apply), a flax.linen.Module (with example_input), "
             "an nnx.Module instance or an eqx.Module instance")
    if callable(obj):
        raise TypeError(
            f"as_network cannot tell what the callable {obj!r} is; it accepts {kinds}. Wrap "
            "factories and functions explicitly: from_nnx(lambda rngs: ...), "
            "from_equinox(lambda key: ...) or from_function(apply, init)"
        )
    raise TypeError(f"as_network accepts {kinds}; got {type(obj).__name__}. Plain functions: "
                    "from_function(apply, init)")
