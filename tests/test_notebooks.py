"""The Colab notebooks (colab/*.ipynb) run top to bottom in QUICK mode on the CPU.

Parameters are injected as papermill does: a cell tagged "injected-parameters" right after
the cell tagged "parameters" sets QUICK = True and a fresh WORKDIR. The kernel starts in
colab/, so the notebooks use this checkout and install nothing. Also checked: the committed
notebooks carry no outputs.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))
CELL_TIMEOUT_S = 900


def _read(path):
  nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed "
                                 "(pip install -r requirements-torch.txt)")
  return nbformat, nbformat.read(path, as_version=4)


def _inject(nb, nbformat, params: dict):
  """Inserts an "injected-parameters" cell after the "parameters" cell (as papermill)."""
  cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
  where = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(where) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  cells.insert(where[0] + 1, cell)
  nb.cells = cells
  return nb


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"train_sovr.ipynb", "evaluate_checkpoint.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  _, nb = _read(path)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "QUICK = " in params[0].source and "WORKDIR = " in params[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_in_quick_mode(path, tmp_path, monkeypatch):
  nbformat, nb = _read(path)
  nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed "
                                 "(pip install -r requirements-torch.txt)")
  pytest.importorskip("ipykernel", reason="ipykernel is not installed "
                      "(pip install -r requirements-torch.txt)")
  from nbclient.exceptions import CellExecutionError  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "workdir")
  nb = _inject(nb, nbformat, {"QUICK": True, "WORKDIR": workdir})
  # The kernel inherits this environment: CPU jax, no GPU preallocation, no extra devices.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": COLAB}})
  t0 = time.time()
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)} failed in QUICK mode:\n{str(e)[-6000:]}")
  print(f"{os.path.basename(path)}: {time.time() - t0:.1f} s")

  # It used this checkout (nothing installed) and wrote what it promises.
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "nothing is installed" in text
  for name in ("report.json", "autoattack_best.json", "autoattack_jax_best.json",
               "export/model.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "autoattack_best.json")) as f:
    ref = json.load(f)
  with open(os.path.join(workdir, "autoattack_jax_best.json")) as f:
    jax_aa = json.load(f)
  assert ref["n"] == jax_aa["n"] == 32
  assert ref["attacks"] == jax_aa["attacks"] == ["apgd-ce", "apgd-t"]
  assert ref["clean_acc"] == pytest.approx(jax_aa["clean_acc"], abs=1 / 32)
  for r in (ref["robust_acc"], jax_aa["robust_acc"]):
    assert 0.0 <= r <= ref["clean_acc"] + 1e-9
  assert ref["robust_acc"] <= ref["jax_pgd20_acc"] + 1e-9
  # Plots were displayed.
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)
