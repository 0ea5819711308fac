"""The package installs with pip and runs from anywhere: no import of the checkout's folders,
console entry points, and the torch-free JAX path with torch made unimportable."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """``pip install --no-deps --target T <checkout>`` (the dependencies are this venv's)."""
  target = tmp_path_factory.mktemp("site")
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                         "--target", str(target), REPO], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return target


def _env(target, **extra):
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu", **extra)
  env.pop("PYTHONSAFEPATH", None)
  return env


def test_installed_package_has_the_library_and_entry_points_only(installed):
  names = set(os.listdir(installed))
  assert "sovr_jax" in names and not {"configs", "tests", "scripts"} & names
  for script in ("sovr-train", "sovr-export", "sovr-autoattack"):
    assert os.path.exists(installed / "bin" / script), script
  assert os.path.exists(installed / "sovr_jax" / "evaluation" / "schema.py")


def test_train_entry_point_from_another_directory(installed, tmp_path):
  """The console script on a config file of the checkout, run from elsewhere: the library
  imports no top-level folder of the checkout (configs/ is read as a file)."""
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  proc = subprocess.run(
      [sys.executable, str(installed / "bin" / "sovr-train"), "--config",
       os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(cwd / "run"),
       "--config.train.epochs=1", "--config.train.lr_boundaries=()"],
      cwd=cwd, env=_env(installed), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Report:" in proc.stdout
  with open(cwd / "run" / "report.json") as f:
    report = json.load(f)
  assert report["versions"]["sovr_jax"] and report["test"]["final"]["epoch"] == 1
  bad = subprocess.run([sys.executable, str(installed / "bin" / "sovr-autoattack"),
                        "--workdir", str(cwd / "none"), "--engine", "jax"],
                       cwd=cwd, env=_env(installed), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "does not exist" in bad.stderr


TORCH_BLOCKED = r"""
import sys
sys.modules["torch"] = None          # import torch raises ImportError from here on
import json
from sovr_jax import autoattack_eval, cli, rundir
from sovr_jax.errors import MissingDependencyError
workdir = sys.argv[1]
run = rundir.restore_run(workdir, checkpoint="best")
out = {"restored_step": run.step}
res = autoattack_eval.run(["--workdir", workdir, "--engine", "jax", "--attacks", "apgd-ce",
                           "--n", "8", "--batch_size", "8", "--jax_pgd", "--out",
                           sys.argv[2]])
out["jax_robust_acc"] = res["jax"]["robust_acc"]
try:
  autoattack_eval.run(["--workdir", workdir, "--engine", "reference", "--n", "8",
                       "--out", sys.argv[2] + ".ref"])
except MissingDependencyError as e:
  out["reference_error"] = str(e)
from sovr_jax import export
try:
  export.export_workdir(workdir, sys.argv[2] + ".export")
except MissingDependencyError as e:
  out["export_error"] = str(e)
out["torch_loaded"] = sys.modules.get("torch") is not None
print("RESULT" + json.dumps(out))
"""


def test_jax_path_runs_with_torch_unimportable(trained_tiny_run, tmp_path):
  proc = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, trained_tiny_run,
                         str(tmp_path / "aa.json")], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out["restored_step"] > 0 and 0 <= out["jax_robust_acc"] <= 1
  assert not out["torch_loaded"]
  for key in ("reference_error", "export_error"):
    assert "torch" in out[key] and "pip install" in out[key], out
  with open(tmp_path / "aa.json") as f:
    assert json.load(f)["engine"] == "jax"
