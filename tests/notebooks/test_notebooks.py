"""Every notebook in notebooks/ runs top to bottom in SMOKE mode (LCM_SMOKE=1).

Each notebook is executed by nbclient in a fresh ``python3`` kernel of this interpreter, with
the notebooks directory as its working directory (as when a user opens it in Jupyter). Its
training runs go to a temporary directory (``LCM_NOTEBOOK_RUNS``), never into results/,
which the notebooks only read. Any cell error fails the test with the cell's traceback.
"""

from __future__ import annotations

import glob
import os

import nbclient  # the `notebooks` extra, which `make test` installs
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
EXPECTED = {"quickstart.ipynb", "compare_mixers.ipynb", "needle.ipynb", "kernels.ipynb"}


def test_every_notebook_is_present_and_clean():
  assert EXPECTED <= set(NOTEBOOKS), f"missing notebooks: {EXPECTED - set(NOTEBOOKS)}"
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 'SMOKE = os.environ.get("LCM_SMOKE", "0") == "1"' in code[0].source, name
    for c in code:  # committed without outputs
      assert not c.outputs and c.execution_count is None, f"{name}: stored outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
  runs = tmp_path / "runs"
  monkeypatch.setenv("LCM_SMOKE", "1")
  monkeypatch.setenv("LCM_NOTEBOOK_RUNS", str(runs))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # one CPU device (not the suite's 8 virtual ones); fast, unoptimised XLA compiles: the
  # smoke runs are compile-bound
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  results = os.path.join(ROOT, "results")
  before = _snapshot(results)
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=None, allow_errors=False,
      resources={"metadata": {"path": NOTEBOOK_DIR}})
  # jupyter_client starts the "python3" kernel with sys.executable (this venv's python)
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{e}", pytrace=False)
  assert _snapshot(results) == before, f"{name} wrote into results/"
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "SMOKE mode" in outputs


def _snapshot(root: str) -> dict[str, float]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[p] = os.path.getmtime(p)
  return out
