"""The tutorial notebooks run from top to bottom at small sizes (``FBALIGN_NB_SMALL=1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_present():
    assert [p.name for p in NOTEBOOKS] == ["01_feedback_alignment.ipynb", "02_dfa_mnist.ipynb",
                                           "03_adapters.ipynb"]


# The MNIST and adapters notebooks are end-to-end runs (slow: `pytest -m slow`); the first runs
# in CI.
_SLOW = ("mnist", "adapters")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if any(k in p.stem for k in _SLOW) else p
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("FBALIGN_NB_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
