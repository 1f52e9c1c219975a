"""Writes the tutorial notebooks with nbformat (outputs are not stored; CI executes them).

    python notebooks/make_notebooks.py

Sizes: each notebook's first code cell reads ``FBALIGN_NB_SMALL`` (set by the tests) to pick
small settings; edit that cell for longer runs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


NB1 = [
    md("""
# Feedback alignment on the linear task

Lillicrap et al. (2016) showed that a network can learn when the error is sent backwards through
**fixed random matrices** `B` instead of the transposed forward weights. This notebook repeats
their first experiment -- a 30-20-10 linear network learning `y = T x` -- with `fbalign`, and
watches *why* it works: the forward weights come to align with the feedback, so the updates
that feedback alignment (FA) makes point within 90 degrees of the true gradient.

Rules compared: backprop (BP), FA, and "shallow" learning (only the output layer learns).
"""),
    code("""
import os

SMALL = os.environ.get("FBALIGN_NB_SMALL", "") not in ("", "0")  # set by the tests
STEPS = 300 if SMALL else 3000       # SGD steps (20 fresh examples each)
EVERY = 10 if SMALL else 25          # measure every EVERY steps
SEEDS = 2 if SMALL else 5
"""),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fbalign as fb
from fbalign.metrics import make_alignment_probe
from fbalign.train import TrainState, make_train_step
"""),
    md("""
## The task and the three rules

`T ~ U[-1, 1]`, `x ~ N(0, I)`, forward weights `W ~ U[-0.01, 0.01]`, FA feedback
`B ~ U[-0.5, 0.5]`, no biases. A rule is a pair of pure functions `TapeRule(init, update)`;
"shallow" is four lines: zero updates everywhere but the output layer.
"""),
    code("""
model = fb.mlp((30, 20, 10), activation="linear", use_bias=False,
               kernel_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -0.01, 0.01))


def shallow():
    def init(key, params):
        return fb.EmptyState()

    def update(params, state, tape, error, **extra):
        ups = [jax.tree.map(jnp.zeros_like, p) for p in params[:-1]]
        ups.append({"w": tape.inputs[-1].T @ (error * tape.derivs[-1])})
        return ups, state

    return fb.TapeRule(init, update)


rules = {"BP": fb.backprop(), "FA": fb.feedback_alignment(init="uniform", scale=0.5),
         "shallow": shallow()}
opt = optax.sgd(0.01)
"""),
    md("""
## Training, with alignment measured along the way

`make_alignment_probe` returns a pure function of the training state: the angle between each
layer's update and the true gradient on a fixed batch, the angle between `B` and `W`, and the
Lillicrap criterion `e^T W B e > 0` (fraction of examples). Everything runs inside one
`jax.jit`: `lax.scan` over steps, `vmap` over seeds.
"""),
    code("""
def train(rule, seed):
    k_t, k_w, k_b, k_data, k_test = jax.random.split(jax.random.PRNGKey(seed), 5)
    t_mat = jax.random.uniform(k_t, (30, 10), minval=-1.0, maxval=1.0)
    x_test = jax.random.normal(k_test, (500, 30))
    y_test = x_test @ t_mat
    params = model.init(k_w)
    state = TrainState(params, opt.init(params), rule.init(k_b, params), k_data,
                       jnp.zeros((), jnp.int32))
    step = make_train_step(model, rule, opt, "squared_error", jit=False)
    probe = make_alignment_probe(model, rule, "squared_error", x_test[:100], y_test[:100],
                                 jit=False)

    def measure(st):
        m = probe(st)
        err = jnp.sum((model.apply(st.params, x_test) - y_test) ** 2) / jnp.sum(y_test ** 2)
        return {"error": err, **m}

    def chunk(st, i):
        def one(st, k):
            x = jax.random.normal(k, (20, 30))
            return step(st, x, x @ t_mat)[0], None

        st, _ = jax.lax.scan(one, st, jax.random.split(jax.random.fold_in(k_data, i), EVERY))
        return st, measure(st)

    _, curves = jax.lax.scan(chunk, state, jnp.arange(STEPS // EVERY))
    return curves


results = {name: jax.jit(jax.vmap(lambda s, r=r: train(r, s)))(jnp.arange(SEEDS))
           for name, r in rules.items()}
steps = EVERY * np.arange(1, STEPS // EVERY + 1)
for name, c in results.items():
    print(f"{name:8s} final normalised error {float(jnp.mean(c['error'][:, -1])):.3g}")
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, c in results.items():
    axes[0].plot(steps, np.exp(np.log(np.asarray(c["error"])).mean(0)), label=name)
axes[0].set(yscale="log", xlabel="step", ylabel="normalised squared error",
            title="Learning y = Tx")
fa = results["FA"]
axes[1].plot(steps, np.asarray(fa["update_angle_l0"]).mean(0), label="hidden update vs BP")
axes[1].plot(steps, np.asarray(fa["feedback_angle_l1"]).mean(0), "--", label="B vs W")
axes[1].axhline(90, color="grey", linestyle=":")
axes[1].set(ylim=(0, 100), xlabel="step", ylabel="degrees", title="FA: alignment")
axes[2].plot(steps, np.asarray(fa["criterion_l1"]).mean(0))
axes[2].set(ylim=(0, 1.05), xlabel="step", ylabel="fraction of examples",
            title="Lillicrap criterion e^T W B e > 0")
for ax in axes[:2]:
    ax.legend()
for ax in axes:
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()
"""),
    md("""
BP and FA both drive the error down by orders of magnitude; shallow learning cannot (the random
hidden layer throws information away, and is tiny). FA's hidden-layer update starts at about
90 degrees from the gradient -- pure noise -- and within a few hundred steps lies well inside
90 degrees: the output weights `W` have turned towards `B`, so `B` carries useful error
information. That is *feedback alignment*.
"""),
    code("""
final = {k: float(jnp.mean(v["error"][:, -1])) for k, v in results.items()}
assert final["FA"] < 1e-2 and final["BP"] < 1e-2 and final["shallow"] > 0.2, final
assert float(jnp.mean(results["FA"]["update_angle_l0"][:, -1])) < 80
"""),
]

NB2 = [
    md("""
# Direct feedback alignment vs feedback alignment vs backprop on MNIST

Nokland (2016): with *direct* feedback alignment (DFA) every hidden layer receives the output
error through its own fixed random matrix `B_l` (shape `n_out x n_l`) -- no backward pass through
the network at all. This notebook trains BP, FA and DFA on MNIST (or, if no MNIST copy is found,
on the 8x8 digits shipped with `fbalign`), each as a small ensemble of seeds trained in one
vmapped program, logs alignment diagnostics while training, and plots them with
`fbalign.plot`.
"""),
    code("""
import os

SMALL = os.environ.get("FBALIGN_NB_SMALL", "") not in ("", "0")  # set by the tests
EPOCHS = 3 if SMALL else 10
SEEDS = 2 if SMALL else 3
HIDDEN = (64, 64) if SMALL else (800, 800)
N_TRAIN = 3000 if SMALL else None    # None: the full training set
BATCH, LR = (32, 3e-3) if SMALL else (64, 1e-3)   # Adam
PROBE_EVERY = 20 if SMALL else 200   # steps between alignment measurements
"""),
    code("""
import tempfile
from pathlib import Path

import optax
from IPython.display import Image, Markdown, display

import fbalign as fb
from fbalign.data import DataError, load_digits, load_mnist
from fbalign.metrics import make_alignment_probe
from fbalign.plot import plot_runs
from fbalign.train import fit


def find_data():  # MNIST from $FBALIGN_DATA or the cache, else ../shared/data, else digits
    places = [None] + [d / "shared" / "data" for d in (Path.cwd().parent, Path.cwd().parents[1])]
    for place in places:
        if place is not None and not (place / "mnist.npz").exists():
            continue
        try:
            return load_mnist(place, download=False)
        except DataError:
            pass
    return load_digits()


data = find_data()
if N_TRAIN and len(data.x_train) > N_TRAIN:
    data = data._replace(x_train=data.x_train[:N_TRAIN], y_train=data.y_train[:N_TRAIN],
                         x_test=data.x_test[:2000], y_test=data.y_test[:2000])
print(data.name, data.x_train.shape, data.x_test.shape)
"""),
    md("""
## Train each rule, logging alignment

`fit(..., seeds=K)` trains `K` networks at once. `make_alignment_probe` measures, every
`PROBE_EVERY` steps on a fixed batch, the angle between each layer's update and the true
gradient, the angle between `B_l` and what it stands in for (FA: `W_l`; DFA: the product of the
downstream weights, transposed), and the Lillicrap criterion. Records go to `metrics.jsonl`.
"""),
    code("""
runs = Path(tempfile.mkdtemp(prefix="fbalign-nb-"))
model = fb.mlp((data.input_dim, *HIDDEN, 10), activation="tanh")
table = []
for rule in ("bp", "fa", "dfa"):
    probe = make_alignment_probe(model, rule, "cross_entropy", data.x_train[:256],
                                 data.y_train[:256])
    res = fit(model, rule, optax.adam(LR), data, epochs=EPOCHS, batch_size=BATCH, seeds=SEEDS,
              probe_fn=probe, probe_every=PROBE_EVERY, out_dir=runs / rule, progress=False)
    last = res.history[-1]
    table.append(f"| {rule} | {last['test_error_mean']:.2f} +- {last['test_error_std']:.2f} |")
display(Markdown(f"**{data.name}**, tanh MLP {HIDDEN}, {EPOCHS} epochs, {SEEDS} seeds\\n\\n"
                 "| rule | test error (%) |\\n|---|---|\\n" + "\\n".join(table)))
"""),
    code("""
png = plot_runs([runs / r for r in ("bp", "fa", "dfa")], runs / "rules.png",
                labels=["BP", "FA", "DFA"], bar=True)
display(Image(filename=str(png)))
"""),
    md("""
The update angles of FA and DFA start near 90 degrees (random feedback carries no information)
and fall as training aligns the forward weights with the feedback; BP is the reference at 0.
The same figure comes from the command line:

```bash
fbalign compare --rules bp,fa,dfa --seeds 3 --dataset mnist --hidden 800,800 --epochs 10
fbalign plot runs/compare-mnist-*/fa runs/compare-mnist-*/dfa --out rules.png
```
"""),
    code("""
errs = [float(line.split("|")[2].split("+-")[0]) for line in table]
assert max(errs) < 40, errs  # every rule learns well above chance, even at the smallest size
"""),
]


NB3 = [
    md("""
# Adapters: a Flax CNN and an Equinox MLP, converted in one call

`fbalign.flax.convert` and `fbalign.equinox.convert` switch an existing model's linear and conv
layers to a feedback rule, keeping its weights. Here a CNN written the way Flax's own MNIST
example writes it is converted to feedback alignment (FA; Lillicrap et al. 2016), direct
feedback alignment (DFA; Nokland 2016), Kolen-Pollack (KP; Akrout et al. 2019) and uniform
sign symmetry (uSF; Liao et al. 2016), one call each, and trained; then an `eqx.nn.MLP`
the same way. `compare_to_backprop` shows how far each rule's first update is from backprop's.
"""),
    code("""
import os

SMALL = os.environ.get("FBALIGN_NB_SMALL", "") not in ("", "0")  # set by the tests
STEPS = 150 if SMALL else 1500       # SGD steps of 32 digits
"""),
    code("""
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fbalign as fb
import fbalign.equinox as fe
import fbalign.flax as ff

data = fb.data.load_dataset("digits")  # 8x8 UCI digits, embedded in the package
x_train = jnp.asarray(data.x_train).reshape(-1, 8, 8, 1)
y_train = jnp.asarray(data.y_train)
x_test = jnp.asarray(data.x_test).reshape(-1, 8, 8, 1)
y_test = jnp.asarray(data.y_test)
"""),
    md("""
## A Flax CNN, as Flax's MNIST example writes it
"""),
    code("""
class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_error(model):
    predict = model.predict if isinstance(model, ff.DirectFeedbackModel) else model
    return float(jnp.mean(jnp.argmax(predict(x_test), -1) != y_test)) * 100
"""),
    md("""
One call per rule. DFA traces the model once on a sample input to find each tap's shape; KP's
feedback learns, so its training step is `fbalign.flax.train_step` with `feedback_lr` (an
`nnx.Optimizer` alone would leave the feedback fixed, and `convert` warns about that).
"""),
    code("""
base = CNN(rngs=nnx.Rngs(0))
models = {
    "bp": nnx.clone(base),
    "fa": ff.convert(base, "fa", rngs=nnx.Rngs(1)),
    "dfa": ff.convert(base, "dfa", rngs=nnx.Rngs(1), sample_input=x_train[:2]),
    "kp": ff.convert(base, "kp", rngs=nnx.Rngs(1)),
    "usf": ff.convert(base, "usf", rngs=nnx.Rngs(1)),
}
print(ff.summary(models["fa"]))
for name in ("fa", "dfa", "usf"):
    print(name)
    print(ff.compare_to_backprop(models[name], loss_fn, x_train[:256], y_train[:256]))
"""),
    code("""
LR = 0.1


@partial(nnx.jit, static_argnums=4)
def step(model, opt, x, y, feedback_lr):
    return ff.train_step(model, opt, loss_fn, x, y, feedback_lr=feedback_lr)


flax_errors = {}
for name, model in models.items():
    opt = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)  # KP: plain SGD at feedback_lr
    for i in range(STEPS):
        j = (i * 32) % (len(x_train) - 32)
        loss = step(model, opt, x_train[j:j + 32], y_train[j:j + 32],
                    LR if name == "kp" else None)
    flax_errors[name] = test_error(model)
print({k: f"{v:.1f}%" for k, v in flax_errors.items()})
assert all(v < 75 for v in flax_errors.values()), flax_errors  # every rule learns (chance: 90%)
"""),
    md("""
## An Equinox MLP

Equinox models take one example per call and are `vmap`-ed over the batch; the converted DFA
model gives each example its own output error under `vmap`. Fixed feedback is stored so that
`eqx.filter(model, eqx.is_inexact_array)` never hands it to the optimizer.
"""),
    code("""
mlp = eqx.nn.MLP(64, 10, 64, depth=2, activation=jax.nn.tanh, key=jax.random.key(0))
xs_train, xs_test = x_train.reshape(-1, 64), x_test.reshape(-1, 64)


def eqx_loss(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


eqx_errors = {}
for name in ("bp", "fa", "dfa"):
    model = mlp if name == "bp" else fe.convert(mlp, name, key=jax.random.key(1))
    tx = optax.adam(3e-3)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def eqx_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(eqx_loss)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    for i in range(STEPS):
        j = (i * 32) % (len(xs_train) - 32)
        model, opt_state, loss = eqx_step(model, opt_state, xs_train[j:j + 32],
                                          y_train[j:j + 32])
    pred = jnp.argmax(jax.vmap(model)(xs_test), -1)
    eqx_errors[name] = float(jnp.mean(pred != y_test)) * 100
print({k: f"{v:.1f}%" for k, v in eqx_errors.items()})
assert all(v < 75 for v in eqx_errors.values()), eqx_errors  # chance: 90%
"""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    for name, cells in (("01_feedback_alignment.ipynb", NB1), ("02_dfa_mnist.ipynb", NB2),
                        ("03_adapters.ipynb", NB3)):
        path = HERE / name
        nbformat.write(build(cells), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
