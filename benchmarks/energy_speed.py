"""Energy-based rules: fbalign's predictive coding (PC) vs pcx, equilibrium propagation (EP) vs
Laborieux et al.'s PyTorch code, and the cost of one `fbalign.relax` step.

    python benchmarks/energy_speed.py                 # full run, writes results/energy_speed.md
    python benchmarks/energy_speed.py --quick         # tiny sizes, one round (seconds)
    python benchmarks/energy_speed.py --only relax    # one part: pc, ep, relax (comma-separated)

The peers need packages that fbalign does not depend on, so each runs in its own virtual
environment, as a subprocess of this script that stays alive for the whole run (so it compiles
once) and answers "time" requests; the two sides are timed alternately (ours, peer, peer, ours,
...). Peer setup (paths are the defaults; override with the flags or the variables named):

    python -m venv /tmp/pcx-venv && /tmp/pcx-venv/bin/pip install pcx
        # --pcx-python or $PCX_PYTHON; pcx 0.6.3 pins jax<0.5, so it cannot share our venv
    python -m venv /tmp/ep-torch-venv \\
        && /tmp/ep-torch-venv/bin/pip install torch==2.13.0 numpy
        # --torch-python or $EP_TORCH_PYTHON
    a checkout of GitHub's Laborieux-Axel/Equilibrium-Propagation (commit 93660ed) in
    /tmp/laborieux        # --laborieux-dir or $LABORIEUX_DIR

A missing peer is reported (with these commands) and its comparison skipped, never silently.

**PC vs pcx** (pcx's MNIST MLP: ``examples/discriminative_experiments/MLP/mnist`` of
liukidar/pcx): MLP 784-128-128-128-10, leaky ReLU, squared-error output clamped to the one-hot
target, T = 8 inference steps of SGD with momentum on the activities (fresh per batch), AdamW on
the weights, batch 128. pcx runs its documented ``train_on_batch`` (``pxf.jit``, one call per
batch, the inference loop unrolled in Python); fbalign runs
``make_train_step(mlp, predictive_coding(...), adamw)``, timed per call and as ``fit`` runs it
(steps inside one jitted ``lax.scan``).

**EP vs Laborieux et al. (2021)** (their ``check/train_mnist.sh`` MNIST MLP): 784-512-10, hard
sigmoid, T1 = 30 free steps, T2 = 10 nudged steps, beta = 0.1 (one-sided), squared-error
nudging, batch 50, Adam (lr 5e-4). Their step is composed from their own ``model_utils``
functions, as their ``train`` loop does (``init_neurons``, ``P_MLP.forward`` for T1 and T2
steps, ``copy``, ``compute_syn_grads``, ``optimizer.step()``); it is imported from their
checkout, not copied. Their dynamics ``s <- rho(dPhi/ds)`` equal fbalign's hard-sigmoid
relaxation at step size 1 (projected descent), so fbalign runs ``hopfield(..., step_size=1.0)``
with ``equilibrium_propagation(beta=0.1, nudged_steps=10)``.

Correctness first, for both peers: the same weights and batch are loaded on both sides, one
training step with plain SGD on the weights is taken, and the new weights must agree.

**Inference-step cost**: per step, ``relax`` (as PC's inference and EP's free phase call it)
against a jitted ``lax.scan`` of bare energy gradients (``jax.value_and_grad`` of the same
energy, then ``s - eta * g``). Each is timed at T and 2T steps, interleaved; the per-step cost
is ``(t(2T) - t(T)) / T`` (fixed costs cancel). Target: relax / gradient <= 1.2.

Threads: ``--threads`` (default: all cores) for both sides; 1 makes XLA single-threaded
(``--xla_cpu_multi_thread_eigen=false``), torch gets ``torch.set_num_threads(threads)``, and
OMP/MKL variables are set for every process.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

PC_FULL = {"sizes": [784, 128, 128, 128, 10], "T": 8, "batch": 128, "lr_x": 0.1,
           "momentum_x": 0.35, "lr_w": 2.5e-4, "wd_w": 0.03}
PC_QUICK = {**PC_FULL, "sizes": [784, 32, 32, 10], "T": 3, "batch": 16}
EP_FULL = {"sizes": [784, 512, 10], "T1": 30, "T2": 10, "beta": 0.1, "batch": 50, "lr": 5e-4}
EP_QUICK = {**EP_FULL, "sizes": [784, 32, 10], "T1": 5, "T2": 2, "batch": 8}
CHECK_LR = 0.1  # SGD on the weights for the one-step correctness checks
# wall: elapsed time (the verdict on a quiet machine); cpu: this process's CPU time, with
# --threads 1 much less disturbed by other processes on a loaded machine (not by cache sharing)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

PCX_DEFAULT = os.environ.get("PCX_PYTHON") or "/tmp/pcx-venv/bin/python"
TORCH_DEFAULT = os.environ.get("EP_TORCH_PYTHON") or "/tmp/ep-torch-venv/bin/python"
LABORIEUX_DEFAULT = os.environ.get("LABORIEUX_DIR") or "/tmp/laborieux"
SETUP = {
    "pcx": "python -m venv /tmp/pcx-venv && /tmp/pcx-venv/bin/pip install pcx",
    "torch": ("python -m venv /tmp/ep-torch-venv && /tmp/ep-torch-venv/bin/pip "
              "install torch==2.13.0 numpy"),
    "laborieux": ("put a checkout of GitHub's Laborieux-Axel/Equilibrium-Propagation (commit "
                  "93660ed) in /tmp/laborieux (or pass --laborieux-dir)"),
}

# ----------------------------------------------------------------------------------------------
# Peer sides: standalone scripts run with the peer venv's python. argv[1] is a JSON config. With
# "check" they take one SGD step from given weights and print the new weights; else they build
# and warm up the step, print {"ready": ..., "first_call_s": ...}, then answer JSON lines on
# stdin: {"cmd": "time", "repeats": k, "steps": s} -> {"samples": [seconds per step, ...]}.
# ----------------------------------------------------------------------------------------------

PEER_LOOP = r'''
def serve(fns):
    # fns: {name: (step, sync)}; every "time" request samples each in turn, alternating order
    clock = time.process_time if cfg.get("clock") == "cpu" else time.perf_counter
    first = {}
    for name, (step, sync) in fns.items():
        t0 = time.perf_counter(); step(); sync()
        first[name] = time.perf_counter() - t0
        for _ in range(2):
            step()
        sync()
    print(json.dumps({"ready": True, "first_call_s": first}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] != "time":
            break
        samples = {name: [] for name in fns}
        for i in range(req["repeats"]):
            for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                step, sync = fns[name]
                t0 = clock()
                for _ in range(req["steps"]):
                    step()
                sync()
                samples[name].append((clock() - t0) / req["steps"])
        print(json.dumps({"samples": samples}), flush=True)
'''

PCX_SIDE = r'''
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp, optax
import pcx as px, pcx.predictive_coding as pxc, pcx.nn as pxnn, pcx.functional as pxf
import pcx.utils as pxu

cfg = json.loads(sys.argv[1])
px.RKG.seed(0)

class Model(pxc.EnergyModule):  # pcx's MNIST MLP (examples/discriminative_experiments/MLP)
    def __init__(self, sizes, act_fn):
        super().__init__()
        self.act_fn = px.static(act_fn)
        self.layers = [pxnn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.vodes = [pxc.Vode() for _ in sizes[1:-1]] + [pxc.Vode(pxc.se_energy)]
        self.vodes[-1].h.frozen = True

    def __call__(self, x, y):
        for v, l in zip(self.vodes[:-1], self.layers[:-1]):
            x = v(self.act_fn(l(x)))
        x = self.vodes[-1](self.layers[-1](x))
        if y is not None:
            self.vodes[-1].set("h", y)
        return self.vodes[-1].get("u")

@pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0, 0), out_axes=0)
def forward(x, y, *, model):
    return model(x, y)

@pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0,),
          out_axes=(None, 0), axis_name="batch")
def energy(x, *, model):
    y_ = model(x, None)
    return jax.lax.psum(model.energy(), "batch"), y_

@pxf.jit(static_argnums=0)
def train_on_batch(T, x, y, *, model, optim_w, optim_h):
    model.train()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)
    optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))
    for _ in range(T):
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            _, g = pxf.value_and_grad(pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]),
                                      has_aux=True)(energy)(x, model=model)
        optim_h.step(model, g["model"])
    optim_h.clear()
    with pxu.step(model, clear_params=pxc.VodeParam.Cache):
        _, g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]),
                                  has_aux=True)(energy)(x, model=model)
    optim_w.step(model, g["model"], scale_by=1.0 / x.shape[0])

sizes, B = cfg["sizes"], cfg["batch"]
model = Model(sizes, jax.nn.leaky_relu)
with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
    forward(jnp.zeros((B, sizes[0])), None, model=model)
if cfg.get("check"):
    d = np.load(cfg["check"])
    for i, layer in enumerate(model.layers):
        layer.nn.weight.set(jnp.asarray(d[f"w{i}"].T))
        layer.nn.bias.set(jnp.asarray(d[f"b{i}"]))
    w_opt = optax.sgd(cfg["check_lr"])
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y1h"])
else:
    w_opt = optax.adamw(cfg["lr_w"], weight_decay=cfg["wd_w"])
    x = jax.random.normal(jax.random.PRNGKey(1), (B, sizes[0]))
    y = jax.nn.one_hot(jnp.arange(B) % sizes[-1], sizes[-1])
optim_w = pxu.Optim(lambda: w_opt, pxu.M(pxnn.LayerParam)(model))
optim_h = pxu.Optim(lambda: optax.sgd(cfg["lr_x"], momentum=cfg["momentum_x"]))

def step():
    train_on_batch(cfg["T"], x, y, model=model, optim_w=optim_w, optim_h=optim_h)

def sync():
    jax.block_until_ready(model.layers[0].nn.weight.get())

if cfg.get("check"):
    step()
    print(json.dumps({"w": [np.asarray(l.nn.weight.get()).T.tolist() for l in model.layers]}))
    sys.exit(0)

# The same PC step as plain JAX in this venv (no pcx): inference unrolled as pcx's is, AdamW.
# pcx / this = pcx's own overhead; this / fbalign = mostly the two JAX/XLA versions.
act = lambda a: jax.nn.leaky_relu(a)

def pc_energy(p, z):
    e, h = 0.0, x
    for i, (w, b) in enumerate(p):
        mu = h @ w + b
        if i < len(p) - 1:
            e, h = e + 0.5 * jnp.sum((z[i] - act(mu)) ** 2), z[i]
        else:
            e = e + 0.5 * jnp.sum((y - mu) ** 2)
    return e

h_opt = optax.sgd(cfg["lr_x"], momentum=cfg["momentum_x"])

@jax.jit
def pure_step(p, o):
    z, h = [], x
    for w, b in p[:-1]:
        h = act(h @ w + b)
        z.append(h)
    ho = h_opt.init(z)
    for _ in range(cfg["T"]):
        u, ho = h_opt.update(jax.grad(pc_energy, argnums=1)(p, z), ho, z)
        z = optax.apply_updates(z, u)
    g = jax.tree.map(lambda a: a / x.shape[0], jax.grad(pc_energy)(p, z))
    u, o = w_opt.update(g, o, p)
    return optax.apply_updates(p, u), o

ref = {"p": [(jnp.asarray(l.nn.weight.get()).T, jnp.asarray(l.nn.bias.get()))
             for l in model.layers]}
ref["o"] = w_opt.init(ref["p"])

def ref_step():
    ref["p"], ref["o"] = pure_step(ref["p"], ref["o"])

def ref_sync():
    jax.block_until_ready(ref["p"])
''' + PEER_LOOP + "\nserve({'peer': (step, sync), 'plain_jax': (ref_step, ref_sync)})\n"

EP_TORCH_SIDE = r'''
import json, sys, time, types, importlib.util
import numpy as np
import torch

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
# Their model_utils imports torchvision and matplotlib for its data and plotting helpers, which
# this benchmark does not call; stand-ins are used where those packages are not installed.
if importlib.util.find_spec("torchvision") is None:
    sys.modules["torchvision"] = types.ModuleType("torchvision")
if importlib.util.find_spec("matplotlib") is None:
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda *a, **k: None
    mpl.pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules["matplotlib"], sys.modules["matplotlib.pyplot"] = mpl, mpl.pyplot
sys.path.insert(0, cfg["laborieux_dir"])
from model_utils import P_MLP, hard_sigmoid, copy  # Laborieux et al.'s code, imported

archi, B, T1, T2, beta = cfg["sizes"], cfg["batch"], cfg["T1"], cfg["T2"], cfg["beta"]
model = P_MLP(archi, activation=hard_sigmoid)
criterion = torch.nn.MSELoss(reduction="none")
if cfg.get("check"):
    d = np.load(cfg["check"])
    with torch.no_grad():
        for i, syn in enumerate(model.synapses):
            syn.weight.copy_(torch.from_numpy(d[f"w{i}"].T.copy()))
            syn.bias.copy_(torch.from_numpy(d[f"b{i}"]))
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"]).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["check_lr"])
else:  # their main.py: one Adam parameter group per layer
    optimizer = torch.optim.Adam([{"params": s.parameters(), "lr": cfg["lr"]}
                                  for s in model.synapses])
    x = torch.rand(B, archi[0])
    y = torch.arange(B) % archi[-1]

def step():  # the body of their train() for alg='EP', one-sided nudging
    neurons = model.init_neurons(x.size(0), x.device)
    neurons = model(x, y, neurons, T1, beta=0.0, criterion=criterion)
    neurons_1 = copy(neurons)
    neurons = model(x, y, neurons, T2, beta=beta, criterion=criterion)
    neurons_2 = copy(neurons)
    model.compute_syn_grads(x, y, neurons_1, neurons_2, (0.0, beta), criterion)
    optimizer.step()

def sync():
    pass  # eager CPU torch: every op has finished when step() returns

if cfg.get("check"):
    step()
    print(json.dumps({"w": [s.weight.detach().numpy().T.tolist() for s in model.synapses]}))
    sys.exit(0)
''' + PEER_LOOP + "\nserve({'peer': (step, sync)})\n"


def peer_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JAX_"))}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["JAX_PLATFORMS"] = "cpu"
    return env


class Peer:
    """A peer's side as a long-lived subprocess answering timing requests (see PEER_LOOP)."""

    def __init__(self, py: str, code: str, cfg: dict, threads: int):
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([py, "-u", "-c", code, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=peer_env(threads),
                                     cwd=tempfile.gettempdir())
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.err.seek(0)
        raise RuntimeError(f"the peer side exited ({self.proc.args[0]}):\n"
                           f"{self.err.read()[-3000:]}")

    def time(self, repeats: int, steps: int) -> dict[str, list[float]]:
        self.proc.stdin.write(json.dumps({"cmd": "time", "repeats": repeats, "steps": steps})
                              + "\n")
        self.proc.stdin.flush()
        return self._read()["samples"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_check(py: str, code: str, cfg: dict, threads: int) -> dict:
    res = subprocess.run([py, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                         env=peer_env(threads), cwd=tempfile.gettempdir(), timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"the peer's correctness step failed ({py}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def probe(py: str, modules: str, setup: str, extra_path: str | None = None) -> str | None:
    """None if ``py`` imports ``modules``; else why not, with the command that fixes it."""
    if not Path(py).exists():
        return f"{py} does not exist; create it: {setup}"
    code = f"import {modules}"
    res = subprocess.run([py, "-c", code], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"{py} cannot `{code}` ({last}); create it: {setup}"
    if extra_path is not None and not (Path(extra_path) / "model_utils.py").exists():
        return f"{extra_path}/model_utils.py not found: {SETUP['laborieux']}"
    return None


def peer_versions(py: str, names: tuple[str, ...]) -> str:
    code = ("import importlib.metadata as m\nfor n in " + repr(names) + ":\n    try: "
            "print(n, m.version(n))\n    except Exception: pass")
    res = subprocess.run([py, "-c", code], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    return ", ".join(res.stdout.split("\n")[:-1]) if res.returncode == 0 else "unknown"


# ----------------------------------------------------------------------------------------------
# fbalign sides
# ----------------------------------------------------------------------------------------------


def fb_pc(cfg: dict, weight_opt=None):
    """(model, rule, optimizer) of fbalign's side of the PC comparison."""
    import optax

    import fbalign
    from fbalign.rules import predictive_coding

    model = fbalign.mlp(tuple(cfg["sizes"]), activation="leaky_relu")
    rule = predictive_coding(steps=cfg["T"], step_size=cfg["lr_x"],
                             inference_optimizer=optax.sgd(cfg["lr_x"],
                                                           momentum=cfg["momentum_x"]))
    opt = weight_opt or optax.adamw(cfg["lr_w"], weight_decay=cfg["wd_w"])
    return model, rule, opt


def fb_ep(cfg: dict, weight_opt=None):
    import optax

    from fbalign.models import hopfield
    from fbalign.rules import equilibrium_propagation

    net = hopfield(tuple(cfg["sizes"]), "hard_sigmoid", free_steps=cfg["T1"], step_size=1.0)
    rule = equilibrium_propagation(beta=cfg["beta"], nudged_steps=cfg["T2"])
    return net, rule, weight_opt or optax.adam(cfg["lr"])


def one_step_check(kind: str, cfg: dict, py: str, threads: int, extra: dict) -> str:
    """Same weights and batch on both sides, one SGD step: the new weights must agree."""
    import jax
    import numpy as np
    import optax

    from fbalign._src.train import TrainState, make_train_step

    model, rule, opt = (fb_pc if kind == "pc" else fb_ep)(cfg, optax.sgd(CHECK_LR))
    params = model.init(jax.random.PRNGKey(3))
    n, d0, k = 16, cfg["sizes"][0], cfg["sizes"][-1]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((n, d0)) if kind == "pc" else rng.random((n, d0))).astype("f4")
    y = np.arange(n) % k
    arrays = {"x": x, "y": y, "y1h": np.eye(k, dtype="f4")[y]}
    for i, p in enumerate(params):
        arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(p["w"]), np.asarray(p["b"])
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "check.npz", **arrays)
        peer_cfg = {**cfg, **extra, "batch": n, "check": str(Path(tmp) / "check.npz"),
                    "check_lr": CHECK_LR, "threads": threads}
        peer = run_check(py, PCX_SIDE if kind == "pc" else EP_TORCH_SIDE, peer_cfg, threads)
    loss = "squared_error"
    st = TrainState(params, opt.init(params), rule.init(jax.random.PRNGKey(0), params, model),
                    jax.random.PRNGKey(0), np.int32(0))
    new, _ = make_train_step(model, rule, opt, loss, jit=False)(st, x, y)
    worst, scale = 0.0, 0.0
    for i, w in enumerate(peer["w"]):
        old = np.asarray(params[i]["w"])
        ours = np.asarray(new.params[i]["w"])
        worst = max(worst, float(np.max(np.abs(np.asarray(w) - ours))))
        scale = max(scale, float(np.max(np.abs(ours - old))))
    assert scale > 0, f"{kind}: the step did not change the weights"
    assert worst < 1e-4 * max(1.0, scale) + 1e-6, (
        f"{kind}: fbalign and the peer disagree after one step: max |diff| {worst:.2e} "
        f"(largest weight change {scale:.2e})")
    return (f"one step (SGD lr {CHECK_LR} on the weights) from the same weights on the same "
            f"batch of {n} gives the same new weights in both (max |diff| {worst:.1e}; largest "
            f"weight change {scale:.1e})")


def fb_timers(kind: str, cfg: dict, steps: int, clock=time.perf_counter):
    """Compiles fbalign's step; returns (compile seconds, per-call sample fn, in-loop sample
    fn), each sample fn returning seconds per step."""
    import jax
    import jax.numpy as jnp

    from fbalign._src.train import init_train_state, make_train_step

    model, rule, opt = (fb_pc if kind == "pc" else fb_ep)(cfg)
    step = make_train_step(model, rule, opt, "squared_error")
    state = init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    B, d0, k = cfg["batch"], cfg["sizes"][0], cfg["sizes"][-1]
    key = jax.random.PRNGKey(1)
    x = (jax.random.normal(key, (B, d0)) if kind == "pc" else jax.random.uniform(key, (B, d0)))
    y = jnp.arange(B) % k
    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0

    def body(s, x, y):
        return jax.lax.scan(lambda c, _: (step(c, x, y)[0], None), s, None, length=steps)[0]

    looped = jax.jit(body, donate_argnums=0)
    holder = {"s": _bench.block(compiled(state, x, y)[0])}
    holder["s"] = _bench.block(looped(holder["s"], x, y))  # compile + warm up the loop

    def per_call():
        t0 = clock()
        s = holder["s"]
        for _ in range(steps):
            s, _m = compiled(s, x, y)
        holder["s"] = _bench.block(s)
        return (clock() - t0) / steps

    def in_loop():
        t0 = clock()
        holder["s"] = _bench.block(looped(holder["s"], x, y))
        return (clock() - t0) / steps

    for _ in range(2):
        per_call()
    return compile_s, per_call, in_loop


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def compare(kind: str, cfg: dict, peer_run: tuple | None, args) -> dict:
    """Alternating rounds of fbalign (per call, in loop) and the peer; speed-ups per round.
    ``peer_run`` is ``(python, code, extra config)``, or None: fbalign's side alone."""
    threads = args.threads_used
    out: dict = {}
    if peer_run is not None:
        out["check"] = one_step_check(kind, cfg, peer_run[0], threads, peer_run[2])
        print(f"{kind} correctness: {out['check']}")
    compile_s, per_call, in_loop = fb_timers(kind, cfg, args.steps, CLOCKS[args.clock])
    peer = None
    if peer_run is not None:
        py, code, extra = peer_run
        peer = Peer(py, code, {**cfg, **extra, "threads": threads, "clock": args.clock}, threads)
    ours_call, ours_loop, theirs, plain, loads = [], [], [], [], []
    try:
        for r in range(args.rounds):
            for side in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
                if side == "ours":
                    c, lp = [], []
                    for i in range(args.repeats):  # alternate the two fbalign forms too
                        for f, samples in ((per_call, c), (in_loop, lp))[:: 1 - 2 * (i % 2)]:
                            samples.append(f())
                    ours_call.append(statistics.median(c))
                    ours_loop.append(statistics.median(lp))
                elif peer is not None:
                    got = peer.time(args.repeats, args.steps)
                    theirs.append(statistics.median(got["peer"]))
                    if "plain_jax" in got:
                        plain.append(statistics.median(got["plain_jax"]))
            loads.append(_bench.load_average())
            peer_text = f"; peer {theirs[-1] * 1e3:.2f} ms" if theirs else ""
            peer_text += f" (plain JAX there {plain[-1] * 1e3:.2f} ms)" if plain else ""
            print(f"  {kind} round {r + 1}/{args.rounds}: fbalign {ours_call[-1] * 1e3:.2f} ms "
                  f"per call, {ours_loop[-1] * 1e3:.2f} in loop{peer_text} (load {loads[-1]})")
    finally:
        if peer is not None:
            peer.close()
    out.update({"fbalign_compile_s": compile_s, "fbalign_call_s": ours_call,
                "fbalign_loop_s": ours_loop, "load": loads})
    if peer is not None:
        first = peer.ready["first_call_s"]["peer"]
        out.update({"peer_first_call_s": first,
                    "peer_compile_s": max(first - statistics.median(theirs), 0.0),
                    "peer_s": theirs,
                    "speedup_call": [t / o for t, o in zip(theirs, ours_call, strict=True)],
                    "speedup_loop": [t / o for t, o in zip(theirs, ours_loop, strict=True)]})
        if plain:
            out.update({"plain_jax_s": plain,
                        "plain_jax_first_call_s": peer.ready["first_call_s"]["plain_jax"],
                        "pcx_over_plain": [t / q for t, q in zip(theirs, plain, strict=True)],
                        "plain_over_fbalign_loop": [q / o for q, o in
                                                    zip(plain, ours_loop, strict=True)]})
    return out


# ----------------------------------------------------------------------------------------------
# Inference-step cost: relax vs bare energy gradients
# ----------------------------------------------------------------------------------------------


def relax_problems(quick: bool) -> dict:
    """{name: (energy(states), init states, relax(energy, init, steps) -> states, eta)}."""
    import jax
    import jax.numpy as jnp
    import optax

    from fbalign._src.losses import squared_error
    from fbalign._src.relax import relax
    from fbalign._src.rules.predictive_coding import feedforward, pc_energy

    pc = PC_QUICK if quick else PC_FULL
    model, _, _ = fb_pc(pc)
    params = model.init(jax.random.PRNGKey(0))
    acts = model.activations()
    x = jax.random.normal(jax.random.PRNGKey(1), (pc["batch"], pc["sizes"][0]))
    y = jnp.arange(pc["batch"]) % pc["sizes"][-1]
    z0 = list(feedforward(params, acts, x)[1][:-1])
    pc_e = lambda p, z: pc_energy(p, acts, [x, *z], z, y, squared_error)  # noqa: E731
    eta = pc["lr_x"]
    net_name = f"PC {'-'.join(map(str, pc['sizes']))} b{pc['batch']}"
    out = {f"{net_name}, plain descent":
           (pc_e, params, z0, lambda e, z, t: relax(e, z, steps=t, step_size=eta).state, eta)}
    if not quick:  # the optimizer PC is timed with above
        mom = optax.sgd(eta, momentum=pc["momentum_x"])
        out[f"{net_name}, SGD momentum {pc['momentum_x']}"] = (
            pc_e, params, z0, lambda e, z, t: relax(e, z, steps=t, optimizer=mom).state, eta)
    ep = EP_QUICK if quick else EP_FULL
    net, _, _ = fb_ep(ep)
    hp = net.init(jax.random.PRNGKey(0))
    xe = jax.random.uniform(jax.random.PRNGKey(1), (ep["batch"], ep["sizes"][0]))
    s0 = net.zero_states(xe)
    out[f"EP {'-'.join(map(str, ep['sizes']))} b{ep['batch']}, hard sigmoid, projected "
        "(free phase)"] = (lambda p, s: net.energy(p, xe, s), hp, s0,
                           lambda e, s, t: net.relax_states(e, s, steps=t).state, 1.0)
    return out


def gradient_loop(energy, eta: float, use_value: bool):
    """``steps`` bare descent steps ``s - eta * dE/ds`` in a jitted ``lax.scan``. With
    ``use_value`` the energy's value is summed into the carry, so XLA must compute it (relax
    needs it: a non-finite energy stops the loop); without, XLA drops it (gradient only)."""
    import jax
    import jax.numpy as jnp

    def run(p, s, t):
        def body(c, _):
            s, acc = c
            e, g = jax.value_and_grad(lambda s: energy(p, s))(s)
            s = jax.tree.map(lambda a, b: a - eta * b, s, g)
            return (s, acc + e if use_value else acc), None
        return jax.lax.scan(body, (s, jnp.zeros(())), None, length=t)[0]
    return run


REFS = {"vg": "value_and_grad, value used", "g": "gradient only"}


def relax_cost(args) -> list[dict]:
    import jax

    clock = CLOCKS[args.clock]
    T = 4 if args.quick else 32
    rows = []
    for name, (energy, params, init, run_relax, eta) in relax_problems(args.quick).items():
        loops = {"relax": lambda p, s, t, run_relax=run_relax, energy=energy:
                 run_relax(lambda c: energy(p, c), s, t),
                 "vg": gradient_loop(energy, eta, True), "g": gradient_loop(energy, eta, False)}
        progs = {}
        for kind, run in loops.items():
            for t in (T, 2 * T):
                progs[(kind, t)] = jax.jit(lambda p, s, t=t, run=run: run(p, s, t))
                _bench.block(progs[(kind, t)](params, init))
        samples: dict = {k: [] for k in progs}
        per_step: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.rounds):
            rnd: dict = {k: [] for k in progs}
            for i in range(args.repeats * 2):  # forward, then reversed order
                for key in (list(progs) if i % 2 == 0 else list(progs)[::-1]):
                    t0 = clock()
                    for _ in range(args.steps):
                        out = progs[key](params, init)
                    _bench.block(out)
                    rnd[key].append((clock() - t0) / args.steps)
            m = {k: statistics.median(v) for k, v in rnd.items()}
            for k, v in rnd.items():
                samples[k] += v
            for kind in loops:
                per_step[kind].append((m[(kind, 2 * T)] - m[(kind, T)]) / T * 1e3)
        row = {"problem": name, "T": T, "load": _bench.load_average(),
               "ms_at_T_2T": {f"{k} {t}": statistics.median(v) * 1e3
                              for (k, t), v in samples.items()},
               "step_ms": per_step}
        for ref in REFS:
            row[f"ratio_{ref}"] = [r / g if g > 0 else float("nan")
                                   for r, g in zip(per_step["relax"], per_step[ref], strict=True)]
        rows.append(row)
        print(f"  relax cost, {name}: relax {statistics.median(per_step['relax']):.4f} ms/step, "
              f"value_and_grad {statistics.median(per_step['vg']):.4f}, gradient only "
              f"{statistics.median(per_step['g']):.4f}; ratios "
              f"{statistics.median(row['ratio_vg']):.2f} / {statistics.median(row['ratio_g']):.2f}")
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def med(xs: list[float], scale: float = 1.0) -> str:
    return f"{statistics.median(xs) * scale:.2f}"


def compare_rows(name: str, cfg_text: str, res: dict, target: float,
                 quick: bool) -> list[list[str]]:
    rows = []
    for form, key in (("in loop (as `fit` runs it)", "loop"), ("per call", "call")):
        ours = med(res[f"fbalign_{key}_s"], 1e3)
        if "peer_s" not in res:
            rows.append([name, cfg_text, form, ours, "not run", "", ""])
            continue
        sp = res[f"speedup_{key}"]
        verdict = ("quick: too small to judge" if quick else
                   "met" if statistics.median(sp) >= target else "MISSED")
        rows.append([name, cfg_text, form, ours, med(res["peer_s"], 1e3),
                     f"**{med(sp)}x** ({spread(sp)})", f">= {target}x: {verdict}"])
    return rows


def compare_note(kind: str, label: str, res: dict) -> str:
    text = f"{label}: "
    if "skipped" in res:
        text += f"**peer not run**: {res['skipped']}. "
    else:
        text += f"correctness: {res['check']}. "
    text += f"Compile: fbalign {res['fbalign_compile_s']:.2f} s (`lower().compile()` of the step)"
    if "peer_s" in res:
        text += (f"; peer first call {res['peer_first_call_s']:.2f} s, i.e. "
                 f"{res['peer_compile_s']:.2f} s over a steady step "
                 f"({'trace + compile' if kind == 'pc' else 'eager PyTorch: no compile'})")
    if "plain_jax_s" in res:
        text += (f". Attribution: the same PC step written in plain JAX (no pcx; inference "
                 f"unrolled like pcx's) in pcx's venv takes {med(res['plain_jax_s'], 1e3)} ms "
                 f"(first call {res['plain_jax_first_call_s']:.2f} s): pcx / plain JAX = "
                 f"{med(res['pcx_over_plain'])} ({spread(res['pcx_over_plain'])}), pcx's own "
                 f"overhead; plain JAX there / fbalign in loop = "
                 f"{med(res['plain_over_fbalign_loop'])} "
                 f"({spread(res['plain_over_fbalign_loop'])}), the JAX/XLA versions and "
                 f"fbalign's `lax.scan` inference")
    return text + f". Load average per round: {', '.join(res['load'])}."


def report(info: dict, args, results: dict) -> str:
    th = args.threads_used
    lines = ["# Energy-based rules: fbalign vs pcx (PC), vs Laborieux et al. (EP), relax cost",
             "", f"`{args.command}`: {args.rounds} alternating rounds x {args.repeats} samples "
             f"x {args.steps} steps; {args.clock} clock; {th} CPU thread(s) on every side (XLA "
             f"{'single-threaded' if th == 1 else 'default thread pool'}, "
             f"torch.set_num_threads({th}), OMP/MKL_NUM_THREADS={th}); float32; synthetic "
             "batches (timings do not depend on the values).", "", _bench.machine_md(info)]
    vers = [f"fbalign side: JAX {info['jax']}, jaxlib {info.get('jaxlib', '?')}"]
    for key, label in (("pcx_versions", "pcx venv"), ("torch_versions", "torch venv")):
        if key in results:
            vers.append(f"{label}: {results[key]}")
    if "laborieux_commit" in results:
        vers.append(f"Laborieux et al. checkout: {results['laborieux_commit']}")
    lines += ["Versions: " + "; ".join(vers) + ".", ""]
    header = ["comparison", "setup", "fbalign timed", "fbalign ms/step", "peer ms/step",
              "peer / fbalign: median (range over rounds)", "target"]
    rows, notes = [], []
    for kind, label, target in (("pc", "PC vs pcx", 2.0), ("ep", "EP vs Laborieux et al.", 3.0)):
        if kind in results:
            rows += compare_rows(label, results[kind]["setup"], results[kind], target,
                                 args.quick)
            notes.append(compare_note(kind, label, results[kind]))
    if rows:
        lines += ["## Training step vs peers", "", _bench.md_table(header, rows)]
        lines += [f"- {n}" for n in notes] + [""]
    if "relax" in results:
        rrows = []
        for r in results["relax"]:
            ms, st = r["ms_at_T_2T"], r["step_ms"]
            verdict = ("quick: too small to judge" if args.quick else
                       "met" if statistics.median(r["ratio_vg"]) <= 1.2 else "MISSED")
            rrows.append([r["problem"], f"{r['T']} / {2 * r['T']}",
                          " / ".join(f"{ms[f'{k} {t}']:.2f}" for k in ("relax", "vg", "g")
                                     for t in (r["T"], 2 * r["T"])),
                          f"{med(st['relax'], 1e3)} / {med(st['vg'], 1e3)} / "
                          f"{med(st['g'], 1e3)}",
                          f"**{med(r['ratio_vg'])}** ({spread(r['ratio_vg'])})",
                          f"{med(r['ratio_g'])} ({spread(r['ratio_g'])})", verdict, r["load"]])
        lines += ["## One relax step vs one energy gradient", "",
                  _bench.md_table(["energy", "T / 2T", "ms at T, 2T: relax, value_and_grad, "
                                   "gradient only", "us/step: relax / value_and_grad / "
                                   "gradient only", "relax / value_and_grad: median (range)",
                                   "relax / gradient only", "target <= 1.2 (vs value_and_grad)",
                                   "load after"], rrows),
                  "Per step = (t(2T) - t(T)) / T of each jitted program (fixed costs cancel); "
                  "the six programs are sampled interleaved in every round, the ratio is taken "
                  "per round. *value_and_grad*: `lax.scan` of `jax.value_and_grad(energy)` and "
                  "`s - eta * g`, the value summed into the carry so that it is computed; "
                  "*gradient only*: the same with the value unused, which XLA drops. relax is "
                  "`fbalign.relax` as PC's inference (`optimizer=` for momentum) and EP's free "
                  "phase (`HopfieldNetwork.relax_states`: projected descent) call it; it needs "
                  "the energy's value at every step (a non-finite energy stops the loop).", ""]
    return "\n".join(lines)


def result_name(args, parts: list[str]) -> str:
    """energy_speed[_<parts>][_threads<N>][_cpu]: a partial or differently configured run does
    not overwrite the default full report."""
    name = "energy_speed"
    if sorted(parts) != ["ep", "pc", "relax"]:
        name += "_" + "_".join(parts)
    if args.threads:
        name += f"_threads{args.threads}"
    return name + ("_cpu" if args.clock == "cpu" else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (seconds)")
    p.add_argument("--only", default="pc,ep,relax", help="parts to run: pc, ep, relax")
    p.add_argument("--pcx-python", default=None, help="python of the pcx venv")
    p.add_argument("--torch-python", default=None, help="python of the torch venv")
    p.add_argument("--laborieux-dir", default=None, help="checkout of Laborieux et al.'s code")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5)")
    p.add_argument("--repeats", type=int, default=None, help="samples per side per round")
    p.add_argument("--steps", type=int, default=None, help="training steps per sample")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="wall (default) or cpu: process CPU time (use with --threads 1)")
    p.add_argument("--out", default=None, help="results dir (default benchmarks/results)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("pc", "ep", "relax")]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; valid: pc, ep, relax")
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 10)
    args.threads_used = args.threads or os.cpu_count()
    args.command = " ".join(["python benchmarks/energy_speed.py",
                             *(argv if argv is not None else sys.argv[1:])])
    out_dir = args.out or (None if args.quick else _bench.RESULTS)
    _bench.configure_threads(args.threads)
    pcx_py = args.pcx_python or PCX_DEFAULT
    torch_py = args.torch_python or TORCH_DEFAULT
    lab_dir = args.laborieux_dir or LABORIEUX_DEFAULT
    info = _bench.machine(args.threads)
    info["jaxlib"] = importlib.metadata.version("jaxlib")
    results: dict = {}
    if "pc" in parts:
        cfg = PC_QUICK if args.quick else PC_FULL
        reason = probe(pcx_py, "pcx, jax, optax, numpy", SETUP["pcx"])
        if reason:
            print(f"PC vs pcx: the peer is not run: {reason}")
        else:
            results["pcx_versions"] = peer_versions(pcx_py, ("pcx", "jax", "jaxlib", "equinox",
                                                             "optax"))
        results["pc"] = {
            "setup": (f"MLP {'-'.join(map(str, cfg['sizes']))}, leaky ReLU, batch "
                      f"{cfg['batch']}, T = {cfg['T']}, AdamW"),
            **({"skipped": reason} if reason else {}),
            **compare("pc", cfg, None if reason else (pcx_py, PCX_SIDE, {}), args)}
    if "ep" in parts:
        cfg = EP_QUICK if args.quick else EP_FULL
        reason = probe(torch_py, "torch, numpy", SETUP["torch"], lab_dir)
        if reason:
            print(f"EP vs Laborieux et al.: the peer is not run: {reason}")
        else:
            results["torch_versions"] = peer_versions(torch_py, ("torch", "numpy"))
            commit = Path(lab_dir) / "COMMIT"
            results["laborieux_commit"] = (commit.read_text().strip()[:12] if commit.exists()
                                           else f"{lab_dir} (commit not recorded)")
        results["ep"] = {
            "setup": (f"Hopfield {'-'.join(map(str, cfg['sizes']))}, hard sigmoid, batch "
                      f"{cfg['batch']}, T1 = {cfg['T1']}, T2 = {cfg['T2']}, beta = "
                      f"{cfg['beta']}, Adam"),
            **({"skipped": reason} if reason else {}),
            **compare("ep", cfg, None if reason else
                      (torch_py, EP_TORCH_SIDE, {"laborieux_dir": lab_dir}), args)}
    if "relax" in parts:
        results["relax"] = relax_cost(args)
    info["load_average_end"] = _bench.load_average()
    text = report(info, args, results)
    print(text)
    name = result_name(args, parts)
    _bench.write_result(out_dir, f"{name}.md", text)
    if out_dir is not None:
        _bench.write_result(out_dir, f"{name}.json",
                            json.dumps({"machine": info, "args": vars(args), **results},
                                       indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
