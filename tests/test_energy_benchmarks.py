"""``benchmarks/energy_speed.py --quick`` runs: fbalign's PC and EP training steps and the relax
programs produce finite positive times, a missing peer is reported with the command that
creates it (never skipped silently), and, where the peers' venvs exist, one training step from
the same weights gives the same new weights in fbalign and in pcx / Laborieux et al.'s code.
Timings are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("energy_speed")


def _positive(xs) -> bool:
    xs = xs if isinstance(xs, list) else [xs]
    return bool(xs) and all(math.isfinite(v) and v > 0 for v in xs)


def _run(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    mod = _script()
    assert mod.main(["--quick", "--out", str(tmp_path), *extra]) == 0
    [md] = tmp_path.glob("energy_speed*.md")
    text = md.read_text()
    for field in ("Date", "CPU", "JAX", "Load average", "GPU"):
        assert f"| {field}" in text, f"no {field} in the machine table"
    return text, json.loads(md.with_suffix(".json").read_text())


@pytest.mark.slow
def test_energy_speed_quick_without_peers(tmp_path):
    missing = str(tmp_path / "no-venv" / "python")
    text, res = _run(tmp_path, "--pcx-python", missing, "--torch-python", missing)
    mod = _script()
    for kind, setup in (("pc", mod.SETUP["pcx"]), ("ep", mod.SETUP["torch"])):
        r = res[kind]
        assert r["skipped"] == f"{missing} does not exist; create it: {setup}"
        assert f"**peer not run**: {r['skipped']}" in text
        assert "peer_s" not in r
        for key in ("fbalign_call_s", "fbalign_loop_s", "fbalign_compile_s"):
            assert _positive(r[key]), (kind, key, r[key])
    assert len(res["relax"]) == 2
    for row in res["relax"]:
        assert _positive(list(row["ms_at_T_2T"].values())), row
        assert set(row["step_ms"]) == {"relax", "vg", "g"}
    assert "| PC vs pcx |" in text and "| EP vs Laborieux et al. |" in text


@pytest.mark.slow
def test_energy_speed_quick_with_peers(tmp_path, monkeypatch):
    """Against the real peers, when their venvs exist (see benchmarks/README.md); one thread
    (the peers' OpenMP threads spin badly on a loaded machine), restored afterwards."""
    mod = _script()
    for var in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    reasons = [mod.probe(mod.PCX_DEFAULT, "pcx, jax, optax, numpy", mod.SETUP["pcx"]),
               mod.probe(mod.TORCH_DEFAULT, "torch, numpy", mod.SETUP["torch"],
                         mod.LABORIEUX_DEFAULT)]
    if any(reasons):
        pytest.skip("; ".join(r for r in reasons if r))
    text, res = _run(tmp_path, "--only", "pc,ep", "--threads", "1")
    for kind in ("pc", "ep"):
        r = res[kind]
        assert "gives the same new weights in both" in r["check"]
        for key in ("peer_s", "fbalign_call_s", "fbalign_loop_s", "speedup_call"):
            assert _positive(r[key]), (kind, key, r[key])
    assert "pcx 0.6.3" in text or "pcx " in res["pcx_versions"]
    assert "torch" in res["torch_versions"]
