"""Shared test configuration and helpers: CPU, offline data, tree comparison, PRNG keys.

Helpers are imported by test modules as ``from conftest import ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run tiny networks, so their time goes to XLA compiling, not to running: without
# LLVM's optimisation passes the suite runs about a third faster (measured on 2 cores: 113 s ->
# 63 s of CPU for test_synthetic_gradients.py). What the tests check is arithmetic, which the
# passes do not change beyond rounding; timings belong to benchmarks/, run without this flag.
# Subprocesses started by the tests inherit it. FBALIGN_TEST_XLA_OPT=1 keeps XLA's default.
if (os.environ.get("FBALIGN_TEST_XLA_OPT") != "1"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# Equality checks compare arithmetic: on a GPU, JAX's default float32 matmul is TF32 (about
# 1e-3 relative), so the tests (and the subprocesses they start) run every matmul at full
# precision (issue 17 item 17); on CPU nothing changes. FBALIGN_TEST_MATMUL_PRECISION=default
# keeps JAX's default.
if os.environ.get("FBALIGN_TEST_MATMUL_PRECISION", "highest") != "default":
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION",
                          os.environ.get("FBALIGN_TEST_MATMUL_PRECISION", "highest"))

import tempfile  # noqa: E402

import jax  # noqa: E402

# Tests compile the same small programs again and again, across files and xdist workers: a
# persistent compilation cache shared by the workers serves the repeats from disk.
# FBALIGN_TEST_JAX_CACHE names another directory, or "off".
_CACHE = os.environ.get("FBALIGN_TEST_JAX_CACHE",
                        os.path.join(tempfile.gettempdir(), "fbalign-test-jax-cache"))
if _CACHE != "off":
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def mnist_dir() -> Path | None:
    """Where tests may read MNIST: ``$FBALIGN_DATA``, else ``../shared/data``; None if absent."""
    env = os.environ.get("FBALIGN_DATA")
    for d in ([Path(env)] if env else []) + [SHARED_DATA]:
        if (d / "mnist.npz").exists():
            return d
    return None


def assert_trees_close(got, want, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Asserts two pytrees have the same structure and allclose leaves (None leaves skipped)."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"tree structures differ:\n  got  {got_def}\n  want {want_def}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"leaf {i}: shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"leaf {i}")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing may download at test time: the data loader runs offline in every test."""
    monkeypatch.setenv("FBALIGN_OFFLINE", "1")


def quick_reproduction(name: str, tmp_path: Path, capsys) -> Path:
    """Runs recipe ``name`` at its quick budget (``fbalign reproduce``) and checks that its
    claims hold and that the report puts the paper's number (where it has one) beside ours for
    every rule; returns the output directory."""
    import re

    from fbalign._src.reproduce import budget_rules, check_claims, recipes, results
    from fbalign.cli import main

    out = tmp_path / name
    assert main(["reproduce", name, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    report = (out / "report.md").read_text()
    for exp in recipes()[name]["experiment"]:
        assert check_claims(exp, results(out, exp, "quick")) == [], (name, exp["name"])
        for rule in budget_rules(exp, "quick"):  # the paper's number beside ours
            paper = exp.get("paper", {}).get(rule)
            row = next(line for line in report.splitlines() if line.startswith(f"| `{rule}` |")
                       and (paper is None
                            or re.search(rf"\| {paper}( \+- [\d.]+)? \|", line)))
            assert re.search(r"\| \d+(\.\d+)?(e-?\d+)? \+- ", row), row
    assert "Quick-budget checks: all hold." in report
    return out


def quick_reproduction_unread(name: str, tmp_path: Path, capsys) -> Path:
    """`quick_reproduction`, for a recipe whose paper numbers could not be read: every quick
    rule's report row must then say "not reported" beside ours."""
    from fbalign._src.reproduce import budget_rules, recipes

    out = quick_reproduction(name, tmp_path, capsys)
    report = (out / "report.md").read_text()
    for exp in recipes()[name]["experiment"]:
        for rule in budget_rules(exp, "quick"):
            assert exp.get("paper", {}).get(rule) is None
            row = next(line for line in report.splitlines() if line.startswith(f"| `{rule}` |"))
            assert "| not reported |" in row, row
    return out


def final_errors(exp_dir: Path, rules) -> dict:
    """Each rule's final test error (%) in a reproduction's experiment directory."""
    import json

    return {r: json.loads((exp_dir / r / "summary.json").read_text())["test_error"]
            for r in rules}


def run_config(exp_dir: Path, rule: str) -> dict:
    """One rule's saved run options (config.json) in a reproduction's experiment directory."""
    import json

    return json.loads((exp_dir / rule / "config.json").read_text())
