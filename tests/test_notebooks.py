"""The Colab notebooks (colab/*.ipynb) run top to bottom in QUICK mode on the CPU, with torch
and without it.

Parameters are injected as papermill does: a cell tagged "injected-parameters" right after
the cell tagged "parameters" sets QUICK = True and a fresh WORKDIR. The kernel starts in
colab/, so the notebooks use this checkout and install nothing. Each notebook runs twice:
with torch (the PyTorch export and the reference AutoAttack beside the JAX one), and with
torch blocked (a first cell, unknown to the notebook, sets sys.modules["torch"] = None, as on
a TPU runtime without torch), where the notebook must skip the export and the reference with
a note and still finish with the JAX AutoAttack. Also checked: the committed notebooks carry
no outputs, and the set-up cell (the same in both) unpacks an uploaded archive safely and
stops with a clear message when it has nothing to install from.
"""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import tarfile
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))
CELL_TIMEOUT_S = 900
N_EVAL = 32
ATTACKS = ["apgd-ce", "apgd-t"]
N_ITER = 10  # QUICK's AA_N_ITER
BLOCK_TORCH = 'import sys; sys.modules["torch"] = None'
SKIP_NOTE = ("torch is not installed: the reference AutoAttack is skipped; the JAX AutoAttack "
             "below is the evaluation")


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


def _block_torch(nb, nbformat):
  """Inserts, as the very first cell, one that makes ``import torch`` fail in the kernel."""
  cell = nbformat.v4.new_code_cell(BLOCK_TORCH)
  cell.metadata["tags"] = ["injected-block-torch"]
  nb.cells.insert(0, cell)
  return nb


def _run_quick(path, workdir, monkeypatch, *, block_torch: bool):
  """Executes the notebook in QUICK mode; returns it with its outputs, and all its text."""
  nbformat, nb = _read(path)
  nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed "
                                 "(pip install -r requirements-torch.txt)")
  pytest.importorskip("ipykernel", reason="ipykernel is not installed "
                      "(pip install -r requirements-torch.txt)")
  from nbclient.exceptions import CellExecutionError  # pylint: disable=import-outside-toplevel

  nb = _inject(nb, nbformat, {"QUICK": True, "WORKDIR": workdir})
  if block_torch:
    nb = _block_torch(nb, nbformat)
  # The kernel inherits this environment: CPU jax, no GPU preallocation, no extra devices.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": COLAB}})
  t0 = time.time()
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)} failed in QUICK mode"
                f"{' with torch blocked' if block_torch else ''}:\n{str(e)[-6000:]}")
  print(f"{os.path.basename(path)}{' (torch blocked)' if block_torch else ''}: "
        f"{time.time() - t0:.1f} s")
  text = ""
  for c in nb.cells:
    if c.cell_type == "code":
      for o in c.outputs:
        text += o.get("text", "") + o.get("data", {}).get("text/plain", "")
  return nb, text


def _plots(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)


def _load(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


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
  pytest.importorskip("torch", reason="torch is not installed; the run without torch covers "
                      "the notebook (pip install -r requirements-torch.txt)")
  pytest.importorskip("pyautoattack", reason="pyautoattack is not installed "
                      "(pip install -r requirements-torch.txt)")
  workdir = str(tmp_path / "workdir")
  nb, text = _run_quick(path, workdir, monkeypatch, block_torch=False)

  # It used this checkout (nothing installed) and wrote what it promises.
  assert "nothing is installed" in text
  assert SKIP_NOTE not in text
  for name in ("report.json", "autoattack.json", "autoattack_jax.json",
               "autoattack_compare.json", "export/model.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  ref, jax_aa = _load(workdir, "autoattack.json"), _load(workdir, "autoattack_jax.json")
  assert (ref["engine"], jax_aa["engine"]) == ("reference", "jax")
  assert ref["n"] == jax_aa["n"] == N_EVAL
  assert ref["attacks"] == jax_aa["attacks"] == ATTACKS
  assert ref["settings"]["n_iter"] == jax_aa["settings"]["n_iter"] == N_ITER
  assert ref["clean_acc"] == pytest.approx(jax_aa["clean_acc"], abs=1 / N_EVAL)
  for r in (ref, jax_aa):
    assert 0.0 <= r["robust_acc"] <= r["clean_acc"] + 1e-9
  assert ref["robust_acc"] <= ref["upper_bounds"]["pgd20_acc"] + 1e-9
  # The summary showed both engines side by side, and plots were displayed.
  assert "AutoAttack, reference (pyautoattack)" in text and "AutoAttack, JAX" in text
  assert _plots(nb) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_in_quick_mode_without_torch(path, tmp_path, monkeypatch):
  workdir = str(tmp_path / "workdir")
  nb, text = _run_quick(path, workdir, monkeypatch, block_torch=True)

  assert "nothing is installed" in text
  # The export and the reference AutoAttack were skipped with the note ...
  assert SKIP_NOTE in text
  assert "torch is not installed: the PyTorch export" in text
  assert not os.path.exists(os.path.join(workdir, "export"))
  assert not os.path.exists(os.path.join(workdir, "autoattack.json"))
  assert not os.path.exists(os.path.join(workdir, "autoattack_compare.json"))
  # ... and the JAX AutoAttack is the evaluation.
  assert os.path.exists(os.path.join(workdir, "report.json"))
  jax_aa = _load(workdir, "autoattack_jax.json")
  assert jax_aa["engine"] == "jax"
  assert jax_aa["n"] == N_EVAL and jax_aa["attacks"] == ATTACKS
  assert 0.0 <= jax_aa["robust_acc"] <= jax_aa["clean_acc"] + 1e-9
  assert jax_aa["robust_acc"] <= jax_aa["upper_bounds"]["pgd20_acc"] + 1e-9
  assert "AutoAttack, JAX" in text and "JAX engine only" in text
  assert _plots(nb) >= 2


# ---------------------------------------------------------------------------------------------
# The set-up cell: the part that only runs outside a checkout (a fresh Colab runtime).
# ---------------------------------------------------------------------------------------------


def _setup_source(path) -> str:
  _, nb = _read(path)
  cells = [c.source for c in nb.cells
           if c.cell_type == "code" and "def safe_unpack(" in c.source]
  assert len(cells) == 1, f"{os.path.basename(path)} needs one set-up cell"
  return cells[0]


def _setup_functions() -> dict:
  """The imports and functions of the set-up cell, without running its install logic."""
  tree = ast.parse(_setup_source(NOTEBOOKS[0]))
  tree.body = [n for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
  namespace: dict = {}
  exec(compile(tree, "<set-up cell>", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_setup_cell_is_the_same_in_both_notebooks():
  assert len({_setup_source(p) for p in NOTEBOOKS}) == 1


def _repo_files(top: str) -> dict[str, bytes]:
  return {f"{top}sovr_jax/__init__.py": b"", f"{top}configs/default.py": b"",
          f"{top}pyproject.toml": b"[project]\nname = 'sovr-jax'\n"}


def _zip(path, files: dict[str, bytes]):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in files.items():
      zf.writestr(name, data)


def _tar(path, files: dict[str, bytes], links=()):
  """A .tar.gz of ``files``, plus (name, target, kind) links (kind: SYMTYPE or LNKTYPE)."""
  with tarfile.open(path, "w:gz") as tf:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
    for name, target, kind in links:
      info = tarfile.TarInfo(name)
      info.type, info.linkname = kind, target
      tf.addfile(info)


@pytest.mark.parametrize("with_data_filter", [True, False], ids=["data_filter", "explicit"])
def test_setup_cell_unpacks_archives_safely(tmp_path, monkeypatch, with_data_filter):
  ns = _setup_functions()
  if not with_data_filter:  # an older Python: the cell's own checks must refuse alone
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
  top = "sovr-jax-main/"

  # A GitHub-style archive (one top-level folder) unpacks to that folder, in zip and tar.
  good_zip, good_tar = tmp_path / "good.zip", tmp_path / "good.tar.gz"
  _zip(good_zip, {**_repo_files(top), "__MACOSX/._x": b""})
  _tar(good_tar, _repo_files(top), links=[(top + "cfg", "configs", tarfile.SYMTYPE),
                                          (top + "hard", top + "pyproject.toml",
                                           tarfile.LNKTYPE)])
  for archive in (good_zip, good_tar):
    dest = tmp_path / f"out-{archive.name}"
    root = ns["safe_unpack"](str(archive), str(dest))
    assert root == str(dest / "sovr-jax-main")
    assert os.path.isfile(os.path.join(root, "configs", "default.py"))

  # Absolute paths, '..' and links leading outside are refused, and nothing lands outside.
  outside = tmp_path / "victim"
  bad = {
      "zip_dotdot.zip": lambda p: _zip(p, {**_repo_files(top), "../victim": b"x"}),
      "zip_abs.zip": lambda p: _zip(p, {**_repo_files(top), str(outside): b"x"}),
      "tar_dotdot.tar.gz": lambda p: _tar(p, {**_repo_files(top), top + "../../victim": b"x"}),
      "tar_abs.tar.gz": lambda p: _tar(p, {**_repo_files(top), str(outside): b"x"}),
      "tar_symlink_abs.tar.gz": lambda p: _tar(p, _repo_files(top), links=[
          (top + "etc", str(tmp_path), tarfile.SYMTYPE)]),
      "tar_symlink_up.tar.gz": lambda p: _tar(p, _repo_files(top), links=[
          (top + "configs/up", "../../..", tarfile.SYMTYPE)]),
      "tar_hardlink_up.tar.gz": lambda p: _tar(p, _repo_files(top), links=[
          (top + "h", "../victim", tarfile.LNKTYPE)]),
  }
  for name, make in bad.items():
    archive = tmp_path / name
    make(archive)
    dest = tmp_path / f"out-{name}"
    with pytest.raises(ValueError, match="Refusing to unpack"):
      ns["safe_unpack"](str(archive), str(dest))
    assert not dest.exists(), name  # removed again
    assert not outside.exists(), name

  # An archive of something else is refused too.
  other = tmp_path / "other.zip"
  _zip(other, {"a/readme.txt": b"hello", "b/x.txt": b""})
  with pytest.raises(ValueError, match="holds no sovr-jax repository"):
    ns["safe_unpack"](str(other), str(tmp_path / "out-other"))


def test_setup_cell_stops_without_a_source(tmp_path, monkeypatch):
  """Outside a checkout with neither REPO_URL nor REPO_ARCHIVE, the cell stops before
  installing anything and says what to set."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # restored afterwards
  namespace = {"REPO_URL": "", "REPO_REF": "", "REPO_ARCHIVE": "", "WORKDIR": "runs/x"}
  with pytest.raises(ValueError) as e:
    exec(compile(_setup_source(NOTEBOOKS[0]), "<set-up cell>", "exec"),  # pylint: disable=exec-used
         namespace)
  for needed in ("REPO_URL", "REPO_ARCHIVE", "checkout"):
    assert needed in str(e.value)
  assert os.listdir(tmp_path) == []  # nothing cloned, unpacked or written
