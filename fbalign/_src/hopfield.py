"""A layered continuous Hopfield network: the energy-based model equilibrium propagation trains.

Scellier & Bengio (2017), "Equilibrium propagation: bridging the gap between energy-based models
and backpropagation", Frontiers in Computational Neuroscience 11:24, eq. (1), restricted to a
layered architecture (as in their experiments and in Laborieux et al. 2021): the input ``x`` is
clamped, the states ``s_1, ..., s_L`` are free, ``s_L`` is the output, and only consecutive
layers interact (symmetric weights ``W_l`` couple ``s_{l-1}`` and ``s_l``). `EnergyNetwork` is
the interface equilibrium propagation needs, shared with the convolutional network of
``hopfield_conv``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fbalign._src.activations import get_activation
from fbalign._src.base import Array, Params, PRNGKey
from fbalign._src.checks import check_choice
from fbalign._src.relax import RelaxResult, relax


@jax.custom_jvp
def hard_sigmoid(s: Array) -> Array:
    """``rho(s) = clip(s, 0, 1)`` with ``rho'(s) = 1`` on the closed interval ``[0, 1]`` and 0
    outside (``jnp.clip``'s autodiff gives 1/2 at the ends, which would halve the drive of
    states that start at 0)."""
    return jnp.clip(s, 0.0, 1.0)


@hard_sigmoid.defjvp
def _hard_sigmoid_jvp(primals, tangents):
    (s,), (ds,) = primals, tangents
    inside = (s >= 0) & (s <= 1)
    return hard_sigmoid(s), jnp.where(inside, ds, jnp.zeros_like(ds))


def squashed_sgd(step_size: float,
                 squash: Callable[[Array], Array]) -> optax.GradientTransformation:
    """A descent step passed through ``squash`` for `relax`: ``s <- squash(s - step_size * g)``
    (the update returned is that minus ``s``). With ``squash = rho`` and ``step_size = 1`` on
    ``E = 1/2 ||s||^2 - Phi`` it is the prototypical fixed-point iteration ``s <- rho(dPhi/ds)``
    of Ernoult et al. (2019) and Laborieux et al. (2021); with ``squash = clip(., 0, 1)`` it is
    `projected_sgd`."""
    if not step_size > 0:
        raise ValueError(f"squashed_sgd: step_size must be positive, got {step_size}")

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(grads: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("squashed_sgd needs the current states (params) to squash")
        new = jax.tree.map(lambda s, g: squash(s - step_size * g) - s, params, grads)
        return new, state

    return optax.GradientTransformation(init, update)


def projected_sgd(step_size: float, low: float = 0.0,
                  high: float = 1.0) -> optax.GradientTransformation:
    """Projected gradient descent for `relax`: ``s <- clip(s - step_size * g, low, high)``
    (the update returned is that minus ``s``). Scellier & Bengio (2017) clip the states of their
    hard-sigmoid network to ``[0, 1]`` after every step; at ``step_size = 1`` the step is
    ``s_l <- rho(drive_l)``, Laborieux et al.'s (2021) fixed-point iteration (all layers at
    once)."""
    return squashed_sgd(step_size, lambda s: jnp.clip(s, low, high))


def hopfield_activation(name: str) -> Callable[[Array], Array]:
    """``"hard_sigmoid"`` (`hard_sigmoid`, the papers' choice) or any name `get_activation`
    knows (``"sigmoid"``, ``"tanh"``, ``"steep_sigmoid"``: smooth, so the energy has a Hessian
    everywhere)."""
    return hard_sigmoid if name == "hard_sigmoid" else get_activation(name)


DYNAMICS = ("descent", "prototypical")


class EnergyNetwork:
    """The interface equilibrium propagation (`fbalign.rules.equilibrium_propagation`) needs of
    an energy-based network with its input clamped; `HopfieldNetwork` (dense) and
    ``ConvHopfieldNetwork`` (`conv_hopfield`) implement it.

    A subclass is a frozen dataclass with the fields ``activation``, ``free_steps``,
    ``step_size``, ``tol``, ``readout`` and ``dynamics``, and defines ``num_layers`` (weight
    layers: one params entry each), ``num_states`` (free state layers), ``init``,
    ``energy(params, x, states)`` (summed over the batch; the readout's params, when there is
    one, do not enter it), ``zero_states``, ``prepare_input`` (checks ``x``, naming the shape
    expected) and ``readout_input`` (the last state as a ``(batch, features)`` matrix). This
    base gives the dynamics (`free_phase`, `relax_states`), `activity`, ``output`` and
    ``apply``.

    ``readout=True`` is Laborieux et al.'s (2021) cross-entropy setting: the last weight layer
    is a readout outside the energy, ``o = rho(s_last) W_out + b_out`` (the logits; their
    ``softmax=True``), trained by the loss; ``output`` returns ``o``. Else ``output`` is the
    last state ``s_L``.

    ``dynamics`` is how the states relax (`relax_states`): ``"descent"``, gradient descent on
    ``E`` (projected onto ``[0, 1]`` for the hard sigmoid), the states entering ``E`` through
    ``rho``; or ``"prototypical"``, Ernoult et al.'s (2019) discrete-time "prototypical"
    model that Laborieux et al.'s (2021) code runs: the states are activities (they enter
    ``E`` and the readout unchanged, `activity`) and each step is ``s <- rho(s - eta dF/ds)``,
    at ``eta = 1`` their ``s <- rho(dPhi/ds)`` with ``Phi = 1/2 ||s||^2 - F``.
    """

    layer_structure = False  # no feedforward chain (no `forward` tape, no `apply(backward=)`)

    @property
    def num_states(self) -> int:
        """The number of free state layers: ``num_layers`` less the readout's."""
        return self.num_layers - (1 if self.readout else 0)

    def rho(self, s: Array) -> Array:
        """The activation ``rho`` applied elementwise."""
        return hopfield_activation(self.activation)(s)

    def activity(self, s: Array) -> Array:
        """What a state contributes to the energy and the readout: ``rho(s)`` (``dynamics=
        "descent"``) or ``s`` itself (``"prototypical"``: the state already is ``rho`` of its
        drive)."""
        return s if self.dynamics == "prototypical" else self.rho(s)

    def output(self, params: Params, states: list[Array]) -> Array:
        """The prediction read from ``states``: the readout's logits ``activity(s_last) W_out +
        b_out`` (``readout=True``; params' last entry) or the last state ``s_L``."""
        if not self.readout:
            return states[-1]
        out = params[-1]
        return self.readout_input(self.activity(states[-1])) @ out["w"] + out["b"]

    def free_phase(self, params: Params, x: Array, *, init: list[Array] | None = None,
                   steps: int | None = None, step_size: float | None = None,
                   tol: float | None = None, record: bool = False) -> RelaxResult:
        """Relaxes ``E`` with ``x`` clamped (`relax`), from ``init`` (zeros by default), for
        ``steps`` (default ``free_steps``) steps of ``step_size`` (default the network's;
        ``tol`` default the network's). Returns the `RelaxResult`; ``state[-1]`` is the last
        state layer (``s_L``, or the readout's input)."""
        x = self.prepare_input(x)
        start = self.zero_states(x, params[0]["w"].dtype) if init is None else init
        return self.relax_states(lambda s: self.energy(params, x, s), start,
                                 steps=self.free_steps if steps is None else steps,
                                 step_size=step_size, tol=self.tol if tol is None else tol,
                                 record=record)

    def relax_states(self, energy: Callable[[list[Array]], Array], init: list[Array], *,
                     steps: int, step_size: float | None = None, tol: float | None = None,
                     record: bool = False) -> RelaxResult:
        """`relax` of ``energy`` over the states with this network's dynamics: plain gradient
        descent for a smooth ``rho``; for the hard sigmoid, descent projected onto ``[0, 1]``
        (`projected_sgd`), so states never sit on the flat parts where ``rho' = 0`` and the
        descent does not oscillate around the kinks at 0 and 1. There, ``grad_norm`` (and
        ``tol``) measure the unprojected gradient, which stays non-zero for states pinned at
        0 or 1: prefer fixed step counts. ``dynamics="prototypical"``: ``s <- rho(s - eta
        dE/ds)`` (`squashed_sgd`), whose fixed points are not zeros of ``dE/ds``, so ``tol``
        is refused."""
        eta = self.step_size if step_size is None else step_size
        if self.dynamics == "prototypical":
            if tol is not None:
                raise ValueError(_PROTOTYPICAL_TOL)
            opt = squashed_sgd(eta, self.rho)
        else:
            opt = projected_sgd(eta) if self.activation == "hard_sigmoid" else None
        return relax(energy, init, steps=steps, step_size=eta, optimizer=opt, tol=tol,
                     record=record)

    def apply(self, params: Params, x: Array) -> Array:
        """The prediction (`output`) at the end of the free phase from ``s = 0``: ``s_L``, or
        the readout's logits."""
        return self.output(params, self.free_phase(params, x).state)


_PROTOTYPICAL_TOL = (
    "dynamics='prototypical' relaxes by s <- rho(s - eta dE/ds), whose fixed points are not "
    "zeros of dE/ds, so a tolerance on |dE/ds| would never stop it: use fixed step counts "
    "(tol=None) or dynamics='descent'")


def check_relaxation_options(where: str, activation: str, free_steps: int,
                             step_size: float, dynamics: str = "descent",
                             tol: float | None = None) -> None:
    """Raises a `ValueError` naming ``where`` and the option for an unknown activation or
    ``dynamics``, a ``free_steps`` that is not a positive int, a non-positive ``step_size``, or
    a ``tol`` with prototypical dynamics."""
    hopfield_activation(activation)
    check_choice(where, "dynamics", dynamics, DYNAMICS)
    if dynamics == "prototypical" and tol is not None:
        raise ValueError(f"{where}: {_PROTOTYPICAL_TOL}")
    if isinstance(free_steps, bool) or not isinstance(free_steps, int) or free_steps < 1:
        raise ValueError(f"{where}: free_steps must be a positive int, got {free_steps!r}")
    if not step_size > 0:
        raise ValueError(f"{where}: step_size must be positive, got {step_size}")


@dataclasses.dataclass(frozen=True)
class HopfieldNetwork(EnergyNetwork):
    r"""A layered Hopfield network with input clamped; params ``[{"w": (d_{l-1}, d_l), "b":
    (d_l,)}, ...]`` (the MLP's layout). Build one with `hopfield`.

    The energy of one example (Scellier & Bengio 2017, eq. 1, layered) is

    .. math:: E(s) = \tfrac12 \sum_{l=1}^L \|s_l\|^2 - \sum_{l=1}^L \rho(s_{l-1})^\top W_l
              \rho(s_l) - \sum_{l=1}^L b_l^\top \rho(s_l),

    with ``rho(s_0) := x``: the clamped input enters unchanged (as in Laborieux et al.'s code),
    so inputs need not lie in ``[0, 1]``. `energy` sums it over the batch, so that each
    example's relaxation ``s <- s - step_size * dE/ds`` is independent of the batch size (the
    rules divide parameter gradients by the batch size themselves). Its gradient is

    ``dE/ds_l = s_l - rho'(s_l) * (rho(s_{l-1}) W_l + b_l + rho(s_{l+1}) W_{l+1}^T)``

    (the last term absent for ``l = L``). `apply` runs the free phase from ``s = 0`` and returns
    ``s_L``, the prediction.

    With ``readout=True`` (Laborieux et al. 2021's cross-entropy setting) the last size is a
    readout outside the energy: the states are ``s_1, ..., s_{L-1}``, ``E`` sums up to
    ``L - 1``, and the prediction is the logits ``rho(s_{L-1}) W_L + b_L`` (`EnergyNetwork`).

    Attributes:
      sizes: ``(d_0, d_1, ..., d_L)``: input, hidden and output sizes.
      activation: ``rho``: ``"hard_sigmoid"`` (default), ``"sigmoid"``, ``"tanh"``...
      free_steps: the free phase's number of descent steps (the most steps, with ``tol``).
      step_size: the descent's step size ``eta`` (``relax``'s ``step_size``).
      tol: None runs exactly ``free_steps`` steps; else stop once ``max |dE/ds| < tol``.
      readout: the last layer is a readout outside the energy (needs a hidden layer).
      dynamics: ``"descent"`` (the energy above, descended) or ``"prototypical"``: ``rho``
        leaves the energy (``rho(s) -> s`` in ``E``, ``E = 1/2 ||s||^2 - Phi`` with Ernoult
        et al.'s primitive ``Phi = sum_l s_{l-1} W_l s_l + b_l s_l``) and enters the step,
        ``s <- rho(s - eta dE/ds)`` (`EnergyNetwork`); for the hard sigmoid the two agree.
    """

    sizes: tuple[int, ...]
    activation: str = "hard_sigmoid"
    free_steps: int = 40
    step_size: float = 0.5
    tol: float | None = None
    readout: bool = False
    dynamics: str = "descent"

    def __post_init__(self):
        if len(self.sizes) < 2:
            raise ValueError(f"hopfield: needs at least input and output sizes, got {self.sizes}")
        for s in self.sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise ValueError(f"hopfield: layer sizes must be positive integers, got "
                                 f"{self.sizes}")
        if self.readout and len(self.sizes) < 3:
            raise ValueError(f"hopfield: readout=True takes the last size as a readout outside "
                             f"the energy, so it needs at least one hidden layer, got sizes "
                             f"{self.sizes}; add a hidden size or use readout=False")
        check_relaxation_options("hopfield", self.activation, self.free_steps, self.step_size,
                                 self.dynamics, self.tol)

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """Glorot-uniform weights (Laborieux et al. 2021 use PyTorch's uniform fan-in init;
        Scellier & Bengio 2017 Glorot), zero biases."""
        kinit = jax.nn.initializers.glorot_uniform()
        keys = jax.random.split(key, self.num_layers)
        return [{"w": kinit(k, (din, dout), dtype), "b": jnp.zeros((dout,), dtype)}
                for k, din, dout in zip(keys, self.sizes[:-1], self.sizes[1:], strict=True)]

    def zero_states(self, x: Array, dtype: Any = None) -> list[Array]:
        """``[s_1, ..., s_L]`` (``s_{L-1}`` last with a readout) all zero, ``(batch, d_l)``
        each: the free phase's start."""
        dtype = x.dtype if dtype is None else dtype
        return [jnp.zeros((x.shape[0], d), dtype) for d in self.sizes[1:1 + self.num_states]]

    def prepare_input(self, x: Array) -> Array:
        """``x`` unchanged if it is ``(batch, d_0)``, else a `ValueError` naming that shape."""
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"hopfield expects inputs of shape (batch, {self.sizes[0]}), got "
                             f"{tuple(x.shape)}"
                             + ("; flatten images first" if x.ndim > 2 else ""))
        return x

    def readout_input(self, r: Array) -> Array:
        """The last state's activity as the readout's ``(batch, d_{L-1})`` input (unchanged)."""
        return r

    def energy(self, params: Params, x: Array, states: list[Array]) -> Array:
        """``E(s)`` summed over the batch (see the class docstring); ``states`` is
        ``[s_1, ..., s_L]`` (``num_states`` of them); a readout's params are not used."""
        if len(params) != self.num_layers or len(states) != self.num_states:
            raise ValueError(f"hopfield: {self.num_layers} layers and {self.num_states} states, "
                             f"got {len(params)} param layers and {len(states)} states")
        rhos = [x] + [self.activity(s) for s in states]
        e = 0.5 * sum(jnp.sum(s**2) for s in states)
        for layer, below, above in zip(params[:self.num_states], rhos[:-1], rhos[1:],
                                       strict=True):
            e = e - jnp.sum((below @ layer["w"]) * above) - jnp.sum(above * layer["b"])
        return e


def hopfield(sizes: tuple[int, ...] | list[int], activation: str = "hard_sigmoid", *,
             free_steps: int = 40, step_size: float | None = None, tol: float | None = None,
             readout: bool = False, dynamics: str = "descent") -> HopfieldNetwork:
    """A layered Hopfield network (`HopfieldNetwork`) for equilibrium propagation (Scellier &
    Bengio 2017, "Equilibrium propagation: bridging the gap between energy-based models and
    backpropagation"). ``readout=True``: the last size is Laborieux et al.'s (2021) readout
    outside the energy, for ``equilibrium_propagation(cost="cross_entropy")``.
    ``dynamics="prototypical"``: Ernoult et al.'s (2019) discrete-time ``s <- rho(dPhi/ds)``
    (Laborieux et al.'s code; e.g. with ``activation="steep_sigmoid"``, their ``my_sigmoid``).
    ``step_size`` defaults to 0.5 for descent and 1.0 (the plain fixed-point iteration) for
    prototypical dynamics.

    Example:
      >>> net = fbalign.models.hopfield((64, 128, 10), free_steps=40, step_size=0.5)
      >>> fbalign.train.fit(net, fbalign.rules.equilibrium_propagation(beta=0.5), opt, data,
      ...                   loss="squared_error")
    """
    if step_size is None:
        step_size = 1.0 if dynamics == "prototypical" else 0.5
    return HopfieldNetwork(tuple(sizes), activation, free_steps, step_size, tol, readout,
                           dynamics)
