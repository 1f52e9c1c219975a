"""Every benchmark script's ``--quick`` mode runs and its correctness checks pass.

Only correctness is asserted here (the scripts assert explicit == grad forms, FA with B = W ==
backprop, hand FLOP counts == XLA's, ensemble members == separate runs, fbalign == BioTorch on
one SGD step); timings are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _run(name: str, tmp_path: Path, *extra: str) -> str:
    mod = _script(name)
    assert mod.main(["--quick", "--out", str(tmp_path), *extra]) == 0
    files = list(tmp_path.glob("*.md"))
    assert len(files) == 1, files
    text = files[0].read_text()
    for field in ("Date", "CPU", "JAX", "Load average", "GPU"):
        assert f"| {field}" in text, f"{name}: no {field} in the machine table"
    return text


@pytest.mark.slow
def test_step_time_quick(tmp_path):
    text = _run("step_time", tmp_path)
    assert "FA with B = W equals backprop" in text
    assert "explicit form == jax.grad form" in text
    for variant in ("bp (grad)", "fa (explicit)", "dfa (explicit)", "dfa (grad)"):
        assert f"| {variant} |" in text
    assert "LeNet-5" in text


def test_roofline_quick(tmp_path):
    text = _run("roofline", tmp_path)
    assert "Measured matmul rate" in text
    for rule in ("bp (grad)", "fa (explicit)", "dfa (explicit)"):
        assert f"| {rule} |" in text


@pytest.mark.slow  # an end-to-end run: `pytest -m slow` (CI time)
def test_ensemble_scaling_quick(tmp_path):
    text = _run("ensemble_scaling", tmp_path)
    assert "each of the 2 ensemble networks equals its separate run" in text
    assert "| 1 |" in text and "| 2 |" in text


@pytest.mark.slow
def test_memory_quick(tmp_path):
    text = _run("memory", tmp_path)
    assert "baseline" in text
    for rule in ("bp", "fa", "dfa"):
        assert f"fbalign train --rule {rule} |" in text


def test_biotorch_compare_quick(tmp_path):
    """Runs against BioTorch when its venv exists; otherwise the script must say exactly why."""
    mod = _script("biotorch_compare")
    reason = mod.check_torch(mod.torch_python(None))
    if reason:
        assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
        assert f"Not run: {reason}" in (tmp_path / "biotorch.md").read_text()
        pytest.skip(f"BioTorch not installed: {reason}")
    text = _run("biotorch_compare", tmp_path)
    assert "same new weights in fbalign and BioTorch for bp and fa" in text
    assert "| mlp | bp |" in text and "| mlp | fa |" in text
    assert "8 seeds, vmap" in text and "8 seeds, map" in text
