"""Checkpoints: atomic checksummed files, exact restore, resume (in process and after SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

import fbalign as fb
from fbalign import checkpoint as C
from fbalign.data import load_teacher
from fbalign.train import fit, init_train_state


def _state(sizes=(4, 6, 3), rule="fa", seed=0):
    return init_train_state(fb.mlp(sizes), rule, optax.adam(1e-3), jax.random.PRNGKey(seed))


def _assert_bit_identical(a, b):
    la, da = jax.tree.flatten(a)
    lb, db = jax.tree.flatten(b)
    assert da == db
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_roundtrip_is_bit_exact_and_restores_types(tmp_path):
    st = _state()
    st = st._replace(params=jax.tree.map(lambda a: a + 0.1234567, st.params))
    path = C.save_checkpoint(tmp_path, st, {"step": 7, "note": "x"})
    assert path.name == "ckpt-000000007.msgpack"
    ck = C.load_checkpoint(tmp_path, target=_state(seed=1))  # another draw, same structure
    assert ck.step == 7 and ck.meta["note"] == "x" and ck.path == path
    _assert_bit_identical(ck.state, st)
    assert type(ck.state) is type(st) and type(ck.state.rule_state) is type(st.rule_state)
    assert ck.state.rule_state.feedback[0] is None
    # A target made by jax.eval_shape (nothing computed) restores the same arrays.
    shapes = jax.eval_shape(lambda: _state())
    _assert_bit_identical(C.load_checkpoint(path, target=shapes).state, st)
    # Typed PRNG keys come back as keys of the same implementation.
    keyed = {"k": jax.random.key(3), "x": jnp.arange(3.0)}
    C.save_checkpoint(tmp_path / "k", keyed, {"step": 1})
    back = C.load_checkpoint(tmp_path / "k", target={"k": jax.random.key(0), "x": jnp.zeros(3)})
    assert jnp.array_equal(jax.random.key_data(back.state["k"]), jax.random.key_data(keyed["k"]))


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    st = _state()
    C.save_checkpoint(tmp_path, st, {"step": 1})

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"cannot write checkpoint {tmp_path / 'ckpt-000000002.msgpack'}: No space left on "
            f"device; the previous checkpoint {tmp_path / 'ckpt-000000001.msgpack'} is kept")):
        C.save_checkpoint(tmp_path, st, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.msgpack"]  # no temp file
    assert C.load_checkpoint(tmp_path).step == 1


def test_keeps_newest_two_and_ignores_temp_files(tmp_path):
    st = _state()
    for s in (5, 10, 15):
        C.save_checkpoint(tmp_path, st, {"step": s})
    (tmp_path / ".ckpt-000000020.msgpack.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [
        "ckpt-000000010.msgpack", "ckpt-000000015.msgpack"]
    assert C.clean_temp_files(tmp_path)[0].name.endswith(".tmp")
    assert len(list(tmp_path.iterdir())) == 2


def test_corrupt_newest_is_detected_and_previous_used(tmp_path):
    st = _state()
    C.save_checkpoint(tmp_path, st, {"step": 1})
    newest = C.save_checkpoint(tmp_path, st, {"step": 2})
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # flip a bit inside the payload (the bulk of the file)
    newest.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match=f"{newest}.*corrupt.*SHA-256"):
        C.read_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="trying the previous checkpoint"):
        assert C.load_checkpoint(tmp_path).step == 1
    newest.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(C.CheckpointError, match="truncated or corrupt"):
        C.read_checkpoint(newest)
    with pytest.raises(C.CheckpointError, match="no checkpoint in"):
        C.load_checkpoint(tmp_path / "empty")


def test_restore_into_other_config_names_the_leaf(tmp_path):
    C.save_checkpoint(tmp_path, _state((4, 6, 3)), {"step": 1})
    with pytest.raises(C.CheckpointError, match=r"state.params\[0\]\['b'\] has shape \(6,\).*"
                                                r"needs shape \(8,\).*another configuration"):
        C.load_checkpoint(tmp_path, target=jax.eval_shape(lambda: _state((4, 8, 3))))
    with pytest.raises(C.CheckpointError, match="do not match, got 3 and 2 at path"):
        C.load_checkpoint(tmp_path, target=jax.eval_shape(lambda: _state((4, 6, 6, 3))))


def _drop_field(sd, field):
    """The state dict as a checkpoint written before a NamedTuple gained ``field`` holds it."""
    if isinstance(sd, dict):
        return {k: _drop_field(v, field) for k, v in sd.items() if k != field}
    return sd


@pytest.mark.parametrize("rule,field,used", [
    ("pal", "low_pass", {"tau_lo": 5.0}),
    ("dtp", "random_layer", None),
])
def test_a_checkpoint_from_before_a_new_none_field_restores(tmp_path, rule, field, used):
    """PALState.low_pass and TargetPropState.random_layer were added after checkpoints had been
    written; they default to None and stay None unless an option uses them. An old checkpoint
    restores into a state that does not use the field; one that uses it names what is missing."""
    model, opt = fb.mlp((4, 6, 3)), optax.adam(1e-3)
    state = init_train_state(model, rule, opt, jax.random.PRNGKey(0))
    C.save_checkpoint(tmp_path, state, {"step": 1})
    meta, sd = C.read_checkpoint(C.latest_checkpoint(tmp_path))
    old = _drop_field(sd, field)
    assert old != sd  # the field was there to drop
    restored = C.restore_state(jax.eval_shape(lambda: state), old)
    _assert_bit_identical(restored, state)
    if used is not None:  # a state that uses the field cannot come from the old file
        target = jax.eval_shape(lambda: init_train_state(
            model, fb.rules.get_rule(rule, **used), opt, jax.random.PRNGKey(0)))
        with pytest.raises(C.CheckpointError, match=field):
            C.restore_state(target, old)


def test_nonfinite_state_is_never_saved(tmp_path):
    st = _state()
    C.save_checkpoint(tmp_path, st, {"step": 1})
    bad = st._replace(params=[{**st.params[0], "w": st.params[0]["w"].at[0, 0].set(jnp.nan)},
                              st.params[1]])
    with pytest.raises(C.CheckpointError, match=r"step 2: state.params\[0\]\['w'\] holds NaN"):
        C.save_checkpoint(tmp_path, bad, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.msgpack"]


@pytest.fixture(scope="module")
def small():
    return load_teacher(seed=0, n_train=256, n_test=64, input_dim=8, output_dim=3)


def test_fit_resumes_mid_epoch_bit_identically(small, tmp_path):
    """Run A goes straight through 2 epochs. Run B is A's directory as a crash mid-epoch 2
    would have left it (the epoch-2 checkpoint and the records after step 12 never written);
    resumed, it ends bit-identical to A with the same records. A seed ensemble, so the vmapped
    path is covered; the CLI test below covers a single seed."""
    kw = dict(epochs=2, batch_size=32, log_every=4, progress=False, checkpoint_every=5, seeds=2)
    m = fb.mlp((8, 16, 3))
    a = fit(m, "dfa", optax.adam(1e-2), small, out_dir=tmp_path / "a", **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpts = C.list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-000000012.msgpack", "ckpt-000000016.msgpack"]
    ckpts[-1].unlink()
    assert C.read_checkpoint(ckpts[0])[0]["step_in_epoch"] == 4  # 4 of 8 steps into epoch 2
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "epoch": 2, "partial')  # killed while writing a record
    b = fit(m, "dfa", optax.adam(1e-2), small, out_dir=tmp_path / "b", resume=True, **kw)
    _assert_bit_identical(a.state, b.state)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in recs]
    assert strip(a.history) == strip(b.history)
    ra, rb = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab")
    assert strip(map(json.loads, ra)) == strip(map(json.loads, rb))
    assert [json.loads(r)["epoch"] for r in rb] == [1, 2]


def test_fit_resume_checks_settings_and_starts_over_without_checkpoint(small, tmp_path):
    m = fb.mlp((8, 16, 3))
    fit(m, "fa", optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
        out_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(C.CheckpointError, match="batch_size=32 there, 64 now"):
        fit(m, "fa", optax.sgd(0.1), small, epochs=2, batch_size=64, progress=False,
            out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="need out_dir or checkpoint_dir"):
        fit(m, "fa", optax.sgd(0.1), small, resume=True, progress=False)
    # No checkpoint yet (killed before the first): start from the beginning, drop stale records.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n{"ki')
    r = fit(m, "fa", optax.sgd(0.1), small, epochs=1, batch_size=32, progress=False,
            out_dir=tmp_path / "fresh", resume=True, checkpoint_every=0)
    lines = (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == r.history[0]


# ----------------------------------------------------------------------------------------------
# The CLI, killed with SIGKILL and resumed, in subprocesses.

_ARGS = ["train", "--rule", "fa", "--dataset", "teacher", "--hidden", "16", "--epochs", "3",
         "--batch-size", "64", "--optimizer", "adam", "--lr", "0.01", "--seed", "3",
         "--checkpoint-every", "5", "--log-every", "5", "--no-progress"]
# The victim sleeps after each checkpoint so that the kill lands mid-run (any point of the
# run is a "random step"; the sleep only leaves time to aim).
_SLOW = ("import sys, time\n"
         "import fbalign._src.train as T\n"
         "orig = T.save_checkpoint\n"
         "def slow(*a, **k):\n"
         "    p = orig(*a, **k)\n"
         "    time.sleep(0.15)\n"
         "    return p\n"
         "T.save_checkpoint = slow\n"
         "from fbalign.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", FBALIGN_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_cli_sigkill_then_resume_is_bit_identical(tmp_path):
    env = _env()
    full, victim = tmp_path / "full", tmp_path / "victim"
    ref = subprocess.Popen([sys.executable, "-m", "fbalign", *_ARGS, "--out", str(full)],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, *_ARGS, "--out", str(victim)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    target = random.Random().choice(range(10, 86, 5))  # 96 steps in all (3 x 32)
    ckdir = victim / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while True:
            steps = [int(p.name[5:14]) for p in C.list_checkpoints(ckdir)]
            if steps and max(steps) >= target:
                break
            assert proc.poll() is None, f"run ended before step {target}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.name[5:14]) for p in C.list_checkpoints(ckdir))
    assert killed_at < 96, "the victim had already finished"
    res = subprocess.run([sys.executable, "-m", "fbalign", "train", "--resume", str(victim),
                          "--no-progress"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    meta_f, sd_f = C.read_checkpoint(C.latest_checkpoint(full / "checkpoints"))
    meta_v, sd_v = C.read_checkpoint(C.latest_checkpoint(ckdir))
    assert meta_f["step"] == meta_v["step"] == 96
    _assert_bit_identical(sd_v, sd_f)  # params, optimizer state, feedback, key, step
    strip = lambda path: [{k: v for k, v in json.loads(s).items() if k != "epoch_time_s"}
                          for s in path.read_text().splitlines()]
    recs = strip(victim / "metrics.jsonl")
    assert recs == strip(full / "metrics.jsonl"), f"killed after checkpoint step {killed_at}"
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [1, 2, 3]
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]


def test_cli_resume_usage_errors(tmp_path, capsys):
    from fbalign.cli import main

    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"rule": "fa", "lr": 0.01}))
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.5"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "pass only one" in capsys.readouterr().err


def test_cli_resume_may_add_epochs(tmp_path, capsys):
    """A finished run resumed with more --epochs continues exactly as a longer run would."""
    from fbalign.cli import main

    base = ["train", "--rule", "dfa", "--dataset", "teacher", "--hidden", "8", "--batch-size",
            "256", "--optimizer", "sgd", "--lr", "0.05", "--no-progress"]
    assert main([*base, "--epochs", "2", "--out", str(tmp_path / "long")]) == 0
    assert main([*base, "--epochs", "1", "--out", str(tmp_path / "short")]) == 0
    assert main(["train", "--resume", str(tmp_path / "short"), "--epochs", "2",
                 "--on-nonfinite", "skip", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "short" / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["on_nonfinite"] == "skip"
    a = C.read_checkpoint(C.latest_checkpoint(tmp_path / "long" / "checkpoints"))
    b = C.read_checkpoint(C.latest_checkpoint(tmp_path / "short" / "checkpoints"))
    assert a[0]["step"] == b[0]["step"] == 16
    _assert_bit_identical(a[1], b[1])
    capsys.readouterr()


def test_cli_resume_counts_options_given_at_their_default_values(tmp_path, capsys):
    """An option on the command line counts as given even when its value is the parser's
    default: --seed 0 on a seed-3 run is refused, --epochs <default> extends the run."""
    from fbalign._src.cli import build_parser
    from fbalign.cli import main

    defaults = build_parser().parse_args(["train"])
    run = tmp_path / "run"
    base = ["train", "--dataset", "teacher", "--hidden", "8", "--batch-size", "256",
            "--optimizer", "sgd", "--lr", "0.05", "--no-progress"]
    assert main([*base, "--rule", "fa", "--seed", "3", "--epochs", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    for flag, value in (("--seed", defaults.seed), ("--rule", defaults.rule),
                        ("--hidden", ",".join(map(str, defaults.hidden)))):
        assert main(["train", "--resume", str(run), flag, str(value)]) == 2
        assert f"drop {flag}" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "can only extend a run" in capsys.readouterr().err
    assert defaults.epochs > 2
    assert main(["train", "--resume", str(run), "--epochs", str(defaults.epochs),
                 "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == defaults.epochs and "given_options" not in cfg
    recs = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r.get("kind") == "epoch"] == list(
        range(1, defaults.epochs + 1))


def test_a_flipped_bit_in_the_position_is_caught_like_one_in_the_weights(tmp_path):
    """Issue 17 item 3: the checksum covers the metadata too (epoch 13 -> 12 in the file is
    refused, not resumed from), the step must match the file name, and version-1 files (payload
    checksum only) still load."""
    st = _state()
    path = C.save_checkpoint(tmp_path, st, {"step": 7, "epoch": 13, "step_in_epoch": 0})
    raw = path.read_bytes()
    assert raw.count(b'"epoch": 13') == 1
    path.write_bytes(raw.replace(b'"epoch": 13', b'"epoch": 12'))
    with pytest.raises(C.CheckpointError, match="corrupt: meta and payload SHA-256"):
        C.read_checkpoint(path)
    path.write_bytes(raw)
    assert C.read_checkpoint(path)[0]["epoch"] == 13
    moved = path.with_name("ckpt-000000008.msgpack")
    path.rename(moved)
    with pytest.raises(C.CheckpointError, match="holds step 7, not the step 8 of its file name"):
        C.read_checkpoint(moved)
    # A version-1 file: the same blob with the payload-only checksum.
    from flax import serialization

    blob = serialization.msgpack_restore(raw)
    blob.update(version=1, sha256=__import__("hashlib").sha256(blob["payload"]).hexdigest())
    old = tmp_path / "v1" / "ckpt-000000007.msgpack"
    old.parent.mkdir()
    old.write_bytes(serialization.msgpack_serialize(blob))
    _assert_bit_identical(C.load_checkpoint(old, target=_state(seed=1)).state, st)


def test_resume_refuses_a_checkpoint_whose_position_does_not_add_up(small, tmp_path):
    """A checkpoint whose checksum is right but whose position is not (written by another
    tool, or edited and re-signed) would repeat or skip steps: refused with the file named."""
    m = fb.mlp((8, 16, 3))
    kw = dict(epochs=1, batch_size=32, progress=False, out_dir=tmp_path, checkpoint_every=3)
    fit(m, "fa", optax.sgd(0.1), small, **kw)
    ck = C.load_checkpoint(tmp_path / "checkpoints")
    assert (ck.meta["epoch"], ck.meta["step_in_epoch"], ck.step) == (1, 0, 8)
    for change, msg in [({"epoch": 0, "step_in_epoch": 0}, "step 8 != epoch 0 x 8 steps + 0"),
                        ({"epoch": 0, "step_in_epoch": 8}, "step_in_epoch 8 is outside"),
                        ({"history": []}, "0 epoch records for 1 finished epochs")]:
        C.save_checkpoint(tmp_path / "checkpoints", ck.state, {**ck.meta, **change})
        with pytest.raises(C.CheckpointError, match=re.escape(msg)):
            fit(m, "fa", optax.sgd(0.1), small, resume=True, **{**kw, "epochs": 2})
    step_key = next(k for k in ck.state if k in ("step", "4"))  # the raw state dict's counter
    C.save_checkpoint(tmp_path / "checkpoints",
                      {**ck.state, step_key: ck.state[step_key] + 1}, ck.meta)
    with pytest.raises(C.CheckpointError, match=r"state's step counter is \[9\], the meta's 8"):
        fit(m, "fa", optax.sgd(0.1), small, resume=True, **{**kw, "epochs": 2})


def test_cli_resume_item_5_cases(tmp_path, capsys):
    """Issue 17 item 5: resuming a run with records but no checkpoint is refused (it would
    restart from step 0 and replace them); --out elsewhere is refused, not ignored; an edited
    config.json value is named, not a traceback; resuming a finished run adds to its wall
    time instead of replacing it."""
    from fbalign.cli import main

    run = tmp_path / "run"
    base = ["train", "--rule", "fa", "--dataset", "teacher", "--hidden", "8", "--batch-size",
            "256", "--epochs", "1", "--no-progress", "--log-alignment-every", "0"]
    assert main([*base, "--out", str(run)]) == 0
    first = json.loads((run / "summary.json").read_text())["wall_time_s"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # finished: no steps
    assert json.loads((run / "summary.json").read_text())["wall_time_s"] >= first
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "else")]) == 2
    assert f"--resume continues the run in {run}, where it writes; drop --out" in \
        capsys.readouterr().err
    cfg_path = run / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value, msg in [("activation", "swish", "unknown activation 'swish'"),
                            ("hidden", [8, -1], "hidden sizes must be positive"),
                            ("form", "magic", "valid: explicit, grad"),
                            ("lr", -1.0, "not a valid --lr")]:
        cfg_path.write_text(json.dumps({**cfg, key: value}))
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{cfg_path}: {key} = {value!r} is not a valid" in err and msg in err, err
    cfg_path.write_text(json.dumps(cfg))
    shutil.rmtree(run / "checkpoints")
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(run)]) == 2
    assert "has 1 record(s)" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
