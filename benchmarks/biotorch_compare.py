"""fbalign vs BioTorch: train-step time on the same architectures, batch and CPU threads.

    python -m venv /tmp/bt && /tmp/bt/bin/pip install torch==2.13.0 numpy \
        && /tmp/bt/bin/pip install --no-deps biotorch
    python benchmarks/biotorch_compare.py --torch-python /tmp/bt/bin/python
    python benchmarks/biotorch_compare.py --quick --torch-python /tmp/bt/bin/python

BioTorch (jsalbert/biotorch) needs PyTorch, which this project does not depend on, so the torch
side runs in its own virtual environment as a subprocess (``--torch-python``; default: the
``$BIOTORCH_PYTHON`` variable, else ``/tmp/bt/bin/python``). Both sides use the same number of
threads (``--threads``; JAX through XLA_FLAGS, torch through ``torch.set_num_threads``).

First a correctness check: the same MLP weights (and the same feedback matrices for FA) are
loaded into both libraries, one SGD step is taken on the same batch, and the new weights must
agree (bp and fa). Then, for ``--rounds`` rounds, the JAX side and the torch side are timed
alternately (every round times every variant ``--repeats`` times); the ratio per variant is the
median over rounds of fbalign's median step time over BioTorch's.

Variants: bp, fa, dfa, usf on the MLP 784-1000-1000-1000-10 (batch 128) and bp, fa, dfa on
LeNet-5 (batch 64; fbalign's LeNet5 has no sign-symmetry mode), SGD, tanh, cross-entropy.
fbalign runs one jitted step (`fbalign.train.make_train_step`); BioTorch runs
``BioModule(model, mode)`` with ``loss.backward(); optimizer.step()``. The ensemble rows compare
8 networks trained in one fbalign program (vmapped, and looped with ``lax.map``) with BioTorch
training one network at a time: models x steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

MLP_SIZES = (784, 1000, 1000, 1000, 10)
QUICK_MLP = (784, 64, 64, 10)

# The torch side: a standalone script run with the venv's python. It builds the same networks,
# converts them with BioTorch, and prints one JSON line of median step times.
TORCH_SIDE = r'''
import io, json, statistics, sys, time, contextlib
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from biotorch.module.biomodule import BioModule

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
MODES = {"bp": "backpropagation", "fa": "fa", "dfa": "dfa", "usf": "usf"}

def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)

class LeNet5(nn.Module):  # fbalign.lenet5: pad-2 conv6, pool, conv16, pool, 400-120-84-10, tanh
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2); self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(400, 120); self.f2 = nn.Linear(120, 84); self.f3 = nn.Linear(84, 10)
    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.c1(x)), 2)
        h = F.max_pool2d(torch.tanh(self.c2(h)), 2).flatten(1)
        return self.f3(torch.tanh(self.f2(torch.tanh(self.f1(h)))))

def convert(net, rule):
    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion report
        return BioModule(net, mode=MODES[rule], output_dim=10)

def make(arch, rule):
    net = mlp(cfg["mlp_sizes"]) if arch == "mlp" else LeNet5()
    return convert(net, rule)

def step_fn(model, rule, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    def step():
        opt.zero_grad(set_to_none=True)
        if rule == "dfa":
            out = model(x, targets=y, loss_function=F.cross_entropy)
        else:
            out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
    return step

result = {}
if cfg.get("check"):
    # One SGD step from given weights (and FA feedback) on a given batch; return new weights.
    d = np.load(cfg["check"])
    x = torch.from_numpy(d["x"]); y = torch.from_numpy(d["y"]).long()
    n = len(cfg["mlp_sizes"]) - 1
    for rule in ("bp", "fa"):
        model = make("mlp", rule)
        lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for i, lin in enumerate(lins):
                lin.weight.copy_(torch.from_numpy(d[f"w{i}"].T))
                lin.bias.copy_(torch.from_numpy(d[f"b{i}"]))
                if rule == "fa":
                    lin.weight_backward.copy_(torch.from_numpy(d[f"B{i}"].T))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
        result[f"check/{rule}"] = [lin.weight.detach().numpy().T.tolist() for lin in lins]
    print(json.dumps(result)); sys.exit(0)

for arch, rule, batch in cfg["variants"]:
    torch.manual_seed(0)
    model = make(arch, rule)
    x = torch.randn(batch, 784) if arch == "mlp" else torch.randn(batch, 1, 28, 28)
    y = torch.arange(batch) % 10
    step = step_fn(model, rule, x, y)
    for _ in range(cfg["warmup"]):
        step()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        times.append((time.perf_counter() - t0) / cfg["steps"])
    result[f"{arch}/{rule}"] = statistics.median(times)
print(json.dumps(result))
'''


def torch_python(arg: str | None) -> str:
    return arg or os.environ.get("BIOTORCH_PYTHON") or "/tmp/bt/bin/python"


def run_torch(py: str, cfg: dict, timeout: int = 1800) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    res = subprocess.run([py, "-c", TORCH_SIDE, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"the BioTorch side failed ({py}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_torch(py: str) -> str | None:
    """None if ``py`` imports torch and biotorch; else the reason, exactly."""
    if not Path(py).exists():
        return (f"{py} does not exist: create the venv (python -m venv /tmp/bt && /tmp/bt/bin/pip "
                "install torch==2.13.0 numpy && /tmp/bt/bin/pip install --no-deps biotorch)")
    res = subprocess.run([py, "-c", "import torch, biotorch, numpy; print(torch.__version__)"],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode:
        return f"{py} cannot import torch/biotorch/numpy: {res.stderr.strip().splitlines()[-1]}"
    return None


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------


def jax_variants(args):
    """{name: (step, state, x, y)} for fbalign, plus 8-seed ensembles (vmap and map)."""
    import jax
    import jax.numpy as jnp
    import optax

    import fbalign
    from fbalign._src.train import TrainState, ensemble_step, init_train_state, make_train_step

    opt = optax.sgd(1e-3)
    key = jax.random.PRNGKey(0)
    out = {}
    sizes = QUICK_MLP if args.quick else MLP_SIZES
    mlp = fbalign.mlp(sizes)
    lenet = fbalign.lenet5() if hasattr(fbalign, "lenet5") else None
    for arch, rule, batch in variant_list(args):
        if arch == "mlp":
            model, x = mlp, jax.random.normal(jax.random.PRNGKey(1), (batch, 784))
            state = init_train_state(model, fbalign.get_rule(rule), opt, key)
            form = "explicit"
        else:
            model, x = lenet, jax.random.normal(jax.random.PRNGKey(1), (batch, 28, 28, 1))
            params = model.init(key)
            state = TrainState(params, opt.init(params), model.init_rule_state(rule, key, params),
                               jnp.array(key), jnp.zeros((), jnp.int32))
            form = "grad"
        y = jnp.arange(batch) % 10
        step = make_train_step(model, rule, opt, form=form)
        out[f"{arch}/{rule}"] = (step, state, x, y)
        if rule == "fa":  # 8-seed ensembles in one program, one batch per network
            k = args.ensemble
            one = make_train_step(model, rule, opt, form=form, jit=False)
            ens_state = jax.tree.map(lambda a, k=k: jnp.stack([a] * k), state)
            for impl in ENSEMBLE_IMPLS:
                ens_step = jax.jit(ensemble_step(one, impl), donate_argnums=0)
                out[ensemble_name(arch, k, impl)] = (
                    ens_step, jax.tree.map(jnp.copy, ens_state), jnp.stack([x] * k),
                    jnp.stack([y] * k))
    return out


ENSEMBLE_IMPLS = ("vmap", "map")  # fbalign.train.ensemble_step: batched, or a loop over nets


def ensemble_name(arch: str, k: int, impl: str) -> str:
    return f"{arch}/fa x{k} ensemble ({impl})"


def variant_list(args):
    rules_mlp = ("bp", "fa") if args.quick else ("bp", "fa", "dfa", "usf")
    rules_lenet = ("bp", "fa") if args.quick else ("bp", "fa", "dfa")
    out = [("mlp", r, 16 if args.quick else 128) for r in rules_mlp]
    if "lenet" in args.models:
        out += [("lenet", r, 8 if args.quick else 64) for r in rules_lenet]
    return [v for v in out if v[0] in args.models]


LOOP = " [loop]"  # the variant's steps inside one jitted lax.scan, as `fit` runs them


def add_loops(variants, args, states) -> None:
    """For every variant, ``name + LOOP``: ``--steps`` steps in one jitted ``lax.scan`` (the
    epoch runner's on-device loop), compiled and warmed up from the variant's state."""
    import jax

    for name, (step, _, x, y) in list(variants.items()):
        def body(s, x, y, step=step):
            return jax.lax.scan(lambda c, _: (step(c, x, y)[0], None), s, None,
                                length=args.steps)[0]

        looped = jax.jit(body, donate_argnums=0)
        states[name + LOOP] = _bench.block(looped(jax.tree.map(jax.numpy.copy, states[name]),
                                                  x, y))
        variants[name + LOOP] = (looped, None, x, y)


def time_jax(variants, args, states) -> dict[str, float]:
    fns = {}
    for name, (step, _, x, y) in variants.items():
        def sample(name=name, step=step, x=x, y=y):
            s = states[name]
            if name.endswith(LOOP):
                s = step(s, x, y)
            else:
                for _ in range(args.steps):
                    s, _m = step(s, x, y)
            states[name] = _bench.block(s)
        fns[name] = sample
    # Single networks and ensembles are timed in separate interleaved groups: a sample taken
    # right after an 8-network step starts with cold caches, which would tax whichever single
    # variant follows it.
    out = {}
    for group in ([n for n in fns if "ensemble" not in n], [n for n in fns if "ensemble" in n]):
        if group:
            t = _bench.time_interleaved({n: fns[n] for n in group}, args.repeats)
            out.update({n: v["median"] / args.steps for n, v in t.items()})
    return out


def correctness(py: str, args) -> str:
    """Same weights, feedback and batch in both libraries: one SGD step agrees (bp, fa)."""
    import jax
    import numpy as np
    import optax

    import fbalign
    from fbalign._src.train import TrainState, make_train_step

    sizes = QUICK_MLP
    model = fbalign.mlp(sizes)
    params = model.init(jax.random.PRNGKey(3))
    fb = fbalign.get_rule("fa").init(jax.random.PRNGKey(4), params)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (32, 784)))
    y = np.arange(32) % 10
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "check.npz"
        arrays = {"x": x, "y": y}
        for i, p in enumerate(params):
            arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(p["w"]), np.asarray(p["b"])
            arrays[f"B{i}"] = np.asarray(fb.feedback[i]) if fb.feedback[i] is not None else \
                np.zeros_like(arrays[f"w{i}"])
        np.savez(path, **arrays)
        torch_res = run_torch(py, {"threads": args.threads or os.cpu_count(), "check": str(path),
                                   "mlp_sizes": list(sizes)})
    opt = optax.sgd(0.1)
    worst = 0.0
    for rule, rs in (("bp", fbalign.EmptyState()), ("fa", fb)):
        st = TrainState(params, opt.init(params), rs, jax.random.PRNGKey(0), np.int32(0))
        new, _ = make_train_step(model, rule, opt, jit=False)(st, x, y)
        for i, w in enumerate(torch_res[f"check/{rule}"]):
            err = float(np.max(np.abs(np.asarray(w) - np.asarray(new.params[i]["w"]))))
            worst = max(worst, err)
            assert err < 1e-5, f"{rule}: layer {i} differs from BioTorch by {err:.2e}"
    return (f"one SGD step (lr 0.1) from the same weights/feedback on the same batch gives the "
            f"same new weights in fbalign and BioTorch for bp and fa (max |diff| {worst:.1e})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (seconds)")
    p.add_argument("--torch-python", default=None, help="python of the BioTorch venv")
    p.add_argument("--models", default="mlp,lenet")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="samples per variant per round")
    p.add_argument("--steps", type=int, default=None, help="steps per sample")
    p.add_argument("--ensemble", type=int, default=8, help="ensemble size (default 8)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both sides")
    p.add_argument("--out", default=None, help="results dir (default benchmarks/results)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.steps = args.steps or (1 if args.quick else 3)
    out_dir = args.out or (None if args.quick else _bench.RESULTS)
    py = torch_python(args.torch_python)
    reason = check_torch(py)
    if reason:
        print(f"BioTorch comparison not run: {reason}")
        _bench.write_result(out_dir, "biotorch.md", f"# fbalign vs BioTorch\n\nNot run: {reason}\n")
        return 0 if args.quick else 1
    _bench.configure_threads(args.threads)
    info = _bench.machine(args.threads)
    threads = args.threads or os.cpu_count()
    note = correctness(py, args)
    print("correctness:", note)
    variants = jax_variants(args)
    states = {}
    for name, (step, st, x, y) in variants.items():  # compile + warm up
        states[name] = _bench.block(step(st, x, y)[0])
    add_loops(variants, args, states)
    vlist = variant_list(args)
    cfg = {"threads": threads, "variants": vlist, "warmup": 2, "repeats": args.repeats,
           "steps": args.steps, "mlp_sizes": list(QUICK_MLP if args.quick else MLP_SIZES)}
    rounds_j, rounds_t = [], []
    for r in range(args.rounds):
        order = (("jax", "torch") if r % 2 == 0 else ("torch", "jax"))
        for side in order:
            if side == "jax":
                rounds_j.append(time_jax(variants, args, states))
            else:
                rounds_t.append(run_torch(py, cfg))
        print(f"round {r + 1}/{args.rounds} done")
    rows = []
    k = args.ensemble
    pairs = list(zip(rounds_j, rounds_t, strict=True))
    for arch, rule, batch in vlist:
        name = f"{arch}/{rule}"
        ratios = [j[name + LOOP] / t[name] for j, t in pairs]
        call = statistics.median(j[name] / t[name] for j, t in pairs)
        jm = statistics.median(j[name + LOOP] for j in rounds_j)
        jc = statistics.median(j[name] for j in rounds_j)
        tm = statistics.median(t[name] for t in rounds_t)
        rows.append([arch, rule, batch, f"{jm * 1e3:.2f}", f"{jc * 1e3:.2f}", f"{tm * 1e3:.2f}",
                     f"{statistics.median(ratios):.3f}", f"{1 / statistics.median(ratios):.2f}x",
                     f"{1 / call:.2f}x"])
        if rule == "fa":
            for impl in ENSEMBLE_IMPLS:
                ename = ensemble_name(arch, k, impl)
                # models x steps per second: k / ensemble step vs 1 / BioTorch single step
                ens = [k / j[ename + LOOP] * t[name] for j, t in pairs]
                ens_call = statistics.median(k / j[ename] * t[name] for j, t in pairs)
                jem = statistics.median(j[ename + LOOP] for j in rounds_j)
                jec = statistics.median(j[ename] for j in rounds_j)
                rows.append([arch, f"fa, {k} seeds, {impl}", batch,
                             f"{jem * 1e3:.2f} ({k} nets)", f"{jec * 1e3:.2f} ({k} nets)",
                             f"{tm * 1e3:.2f} (1 net)",
                             f"{1 / statistics.median(ens):.3f} per net",
                             f"{statistics.median(ens):.2f}x models/s",
                             f"{ens_call:.2f}x models/s"])
    info["load_average_end"] = _bench.load_average()
    tver = subprocess.run([py, "-c", "import torch, importlib.metadata as m; print(torch."
                           "__version__, m.version('biotorch'))"], capture_output=True, text=True,
                          cwd=tempfile.gettempdir()).stdout.strip()
    table = _bench.md_table(["model", "rule", "batch", "fbalign ms/step in loop",
                             "fbalign ms/step per call", "BioTorch ms/step",
                             "time ratio fbalign (loop)/BioTorch", "fbalign speed-up (loop)",
                             "fbalign speed-up (per call)"], rows)
    print(table)
    text = ("# fbalign vs BioTorch: train-step time\n\n"
            f"`python benchmarks/biotorch_compare.py{' --quick' if args.quick else ''}`: "
            f"{args.rounds} alternating rounds x {args.repeats} samples x {args.steps} steps; "
            f"SGD, tanh, cross-entropy, float32; {threads} CPU threads on both sides. "
            f"torch / biotorch: {tver}.\n\n" + _bench.machine_md(info) +
            f"\nCorrectness first: {note}.\n\n" + table +
            "\nfbalign: one jitted step (MLP: explicit form; LeNet-5: jax.grad form), timed "
            f"as `fit` runs it ({args.steps} steps inside one jitted `lax.scan`, the epoch "
            "runner's on-device loop: *in loop*, the verdict) and as separate calls (*per "
            "call*: each also pays a program launch). BioTorch: "
            "`BioModule(net, mode)`, `loss.backward()`, `optimizer.step()` (eager PyTorch, its "
            "own training loop). The "
            "ensemble rows divide models x steps per second of an 8-network fbalign program "
            "by BioTorch's, which trains one network at a time; `vmap` batches the networks, "
            "`map` loops over them in the program (`fbalign.train.ensemble_step`; "
            "`fit(..., ensemble_impl=\"auto\")` picks map for conv nets on CPU). Timings are "
            "noisy on a shared machine: the side-by-side ratios are what matter.\n")
    _bench.write_result(out_dir, "biotorch.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
