"""PyTorch twins (sovr_jax.torch_models) and the export (sovr_jax.export).

Every architecture at a tiny width, with random parameters and non-trivial BatchNorm running
statistics: JAX and PyTorch logits agree to 1e-4 and CE input gradients to 1e-3 (relative, float32).
A real tiny training run (configs/tiny.py, 1 epoch, trained once per session) is exported and
reloaded from model.pt + model.json alone in a process where JAX cannot be imported.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import references

references.skip_module_without("torch")  # every test builds or loads a PyTorch twin
# pylint: disable=wrong-import-position,wrong-import-order
import torch

from sovr_jax import export, models, rundir, torch_models
from sovr_jax.testing import (jax_logits_and_grad, random_variables, rel_err,
                              torch_logits_and_grad)
from sovr_jax.models import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")

NUM_CLASSES = 7
CASES = [("preact_resnet18", 0.0625), ("resnet18", 0.0625), ("wrn34_10", 0.0625),
         ("wrn28_10", 0.0625), ("small_cnn", 0.25)]


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run):
  return trained_tiny_run


def _input_shape(name):
  return (28, 28, 1) if name == "small_cnn" else (32, 32, 3)


def make_variables(name, width, *, seed=0, batch=4):
  """A Flax model with per-channel mean/std, random params (BN scale/bias and biases too) and
  batch_stats from three train-mode forwards, then perturbed per channel.

  Returns (model, variables, x, mean, std)."""
  h, w, c = _input_shape(name)
  mean = tuple(np.linspace(0.4, 0.5, c).tolist())
  std = tuple(np.linspace(0.2, 0.3, c).tolist())
  model = models.get_model(name, num_classes=NUM_CLASSES, width=width, mean=mean, std=std)
  x = jax.random.uniform(jax.random.PRNGKey(seed), (batch, h, w, c))
  return model, random_variables(model, x, seed), x, mean, std


def torch_twin(name, width, variables, mean, std):
  h, w, c = _input_shape(name)
  sd = export.to_state_dict(name, variables["params"], variables["batch_stats"], mean=mean,
                            std=std)
  tm = torch_models.build_torch_model(name, num_classes=NUM_CLASSES, width=width, mean=mean,
                                      std=std, input_shape=(c, h, w))
  return torch_models.load_weights(tm, sd).eval(), sd


@pytest.mark.parametrize("name,width", CASES)
def test_logits_and_input_gradients_agree(name, width):
  model, variables, x, mean, std = make_variables(name, width)
  labels = jnp.arange(x.shape[0]) % NUM_CLASSES
  with jax.default_matmul_precision("float32"):  # no TF32 where JAX runs on a GPU
    jax_logits, jax_grad = jax_logits_and_grad(model, variables, x, labels)
  tm, sd = torch_twin(name, width, variables, mean, std)
  torch_logits, torch_grad = torch_logits_and_grad(tm, x, labels)

  assert rel_err(torch_logits, jax_logits) < 1e-4
  assert rel_err(torch_grad, jax_grad) < 1e-3
  assert float(np.abs(jax_grad).max()) > 0
  np.testing.assert_array_equal(torch_logits.argmax(1), np.asarray(jax_logits).argmax(1))
  # Same parameters, one for one; BN running statistics were exported, not left at 0/1.
  assert sum(p.numel() for p in tm.parameters()) == models.count_params(variables["params"])
  if name != "small_cnn":
    assert any(k.endswith("running_var") for k in sd)
    for k, t in tm.state_dict().items():
      if k.endswith("running_var"):
        assert not torch.allclose(t, torch.ones_like(t))


def test_full_width_parameter_counts_match_the_flax_models():
  # The Flax docstrings' counts at width 1 (10 classes); built on the meta device (no memory).
  expected = {"preact_resnet18": 11_172_170, "resnet18": 11_173_962, "wrn34_10": 46_160_474,
              "wrn28_10": 36_479_194, "small_cnn": 312_202}
  with torch.device("meta"):
    for name, count in expected.items():
      m = torch_models.build_torch_model(name, num_classes=10)
      assert sum(p.numel() for p in m.parameters()) == count, name


def test_scaled_matches_the_flax_rule():
  for base in (16, 32, 64, 128, 160, 200, 320, 512, 640):
    for width in (0.01, 0.03, 0.0625, 0.1, 0.125, 0.25, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0):
      assert torch_models.scaled(base, width) == common.scaled(base, width)


def test_unknown_architecture_is_refused_everywhere():
  with pytest.raises(ValueError, match="known architectures: preact_resnet18, resnet18"):
    torch_models.build_torch_model("vit_b16", num_classes=10)
  with pytest.raises(ValueError, match="known architectures"):
    export.to_state_dict("vit_b16", {}, {})


def test_state_dict_errors_are_clear():
  model, variables, _, mean, std = make_variables("preact_resnet18", 0.0625, batch=2)
  _, sd = torch_twin("preact_resnet18", 0.0625, variables, mean, std)
  tm = torch_models.build_torch_model("preact_resnet18", num_classes=NUM_CLASSES, width=0.0625,
                                      mean=mean, std=std)
  broken = dict(sd)
  del broken["layer2_0.shortcut.weight"]
  broken["layer9_0.conv1.weight"] = torch.zeros(1)
  with pytest.raises(ValueError) as e:
    torch_models.load_weights(tm, broken)
  msg = str(e.value)
  assert "missing keys (1): layer2_0.shortcut.weight" in msg
  assert "unexpected keys (1): layer9_0.conv1.weight" in msg
  assert "model.json" in msg
  wider = torch_models.build_torch_model("preact_resnet18", num_classes=NUM_CLASSES, width=0.125,
                                         mean=mean, std=std)
  with pytest.raises(ValueError, match="shape mismatches"):
    torch_models.load_weights(wider, sd)
  other_stats = torch_models.build_torch_model("preact_resnet18", num_classes=NUM_CLASSES,
                                               width=0.0625)
  with pytest.raises(ValueError, match="normalisation mean"):
    torch_models.load_weights(other_stats, sd)
  with pytest.raises(ValueError, match="pass variables\\['params'\\]"):
    export.to_state_dict("preact_resnet18", variables, None)
  with pytest.raises(ValueError, match="layers without batch_stats"):
    export.to_state_dict("preact_resnet18", variables["params"], None)


def test_export_workdir_errors(tmp_path, tiny_run):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.export_workdir(str(tmp_path / "nope"), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    export.export_workdir(str(tmp_path), str(tmp_path / "out"))
  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  shutil.copy(os.path.join(tiny_run, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="No best checkpoint.*--checkpoint latest"):
    export.export_workdir(str(empty), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="No latest checkpoint.*Train first"):
    export.export_workdir(str(empty), str(tmp_path / "out"), checkpoint="latest")
  with pytest.raises(ValueError, match="checkpoint must be one of"):
    export.export_workdir(str(empty), str(tmp_path / "out"), checkpoint="worst")
  with open(empty / "config.json") as f:
    d = json.load(f)
  d["config"]["model"]["name"] = "vit_b16"
  with open(empty / "config.json", "w") as f:
    json.dump(d, f)
  (empty / "checkpoints" / "1").mkdir(parents=True)
  with pytest.raises(ValueError, match="Unknown architecture 'vit_b16'; known architectures"):
    export.export_workdir(str(empty), str(tmp_path / "out"), checkpoint="latest")
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match="python -m sovr_jax.export"):
    export.load_exported(str(tmp_path / "out"))


def test_export_of_a_real_run_predicts_like_jax(tiny_run, tmp_path):
  out = tmp_path / "export"
  path = export.export_workdir(tiny_run, str(out))
  with open(path) as f:
    info = json.load(f)
  for key in ("architecture", "width", "num_classes", "mean", "std", "input_shape", "source",
              "dataset", "eps", "method", "sovr_jax_version", "weights_sha256", "config"):
    assert key in info, key
  assert info["architecture"] == "small_cnn" and info["input_shape"] == [1, 28, 28]
  assert info["source"]["checkpoint"] == "best"
  assert info["source"]["path"] == os.path.join(tiny_run, "best", str(info["source"]["step"]))
  assert info["dataset"] == "mnist5k" and info["eps"] == pytest.approx(0.1)
  assert info["export_check"]["max_rel_logit_diff"] < 1e-4

  run = rundir.restore_run(tiny_run)
  ds = run.dataset
  x = ds.test_images.astype(np.float32) / 255.0
  jax_logits = np.asarray(run.model.apply(run.variables, x, train=False))
  model = export.load_exported(str(out))
  assert not model.training
  with torch.no_grad():
    torch_logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_array_equal(torch_logits.argmax(1), jax_logits.argmax(1))
  assert rel_err(torch_logits, jax_logits) < 1e-4
  assert len(set(jax_logits.argmax(1).tolist())) > 1  # a real classifier, not a constant

  # A model.json that does not fit the weights; weights from another export.
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  info["width"] = 0.5
  with open(bad / "model.json", "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match="does not fit SmallCNN.*shape mismatches"):
    export.load_exported(str(bad))
  torch.save({"x": torch.zeros(1)}, bad / "model.pt")
  with pytest.raises(ValueError, match="SHA-256"):
    export.load_exported(str(bad))


def test_export_cli_and_loading_without_jax(tiny_run, tmp_path):
  out = tmp_path / "cli_export"
  proc = subprocess.run([sys.executable, "-m", "sovr_jax.export", "--workdir", tiny_run,
                         "--out", str(out), "--checkpoint", "latest"], cwd=REPO,
                        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "max relative logit difference" in proc.stdout
  with open(out / "model.json") as f:
    info = json.load(f)
  assert info["source"]["checkpoint"] == "latest"
  assert info["command"].startswith("python -m sovr_jax.export --workdir ")  # as typed

  x = np.random.default_rng(0).uniform(size=(5, 1, 28, 28)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  code = (
      "import sys\n"
      "for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'chex'):\n"
      "  sys.modules[m] = None  # any import of these now raises ImportError\n"
      "import numpy as np, torch\n"
      "from sovr_jax.export import load_exported\n"
      f"model = load_exported({str(out)!r})\n"
      f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
      "with torch.no_grad():\n"
      f"  np.save({str(tmp_path / 'y.npy')!r}, model(x).numpy())\n"
      "assert sys.modules['jax'] is None\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = rundir.restore_run(tiny_run, checkpoint="latest")
  jax_logits = np.asarray(run.model.apply(run.variables, x.transpose(0, 2, 3, 1), train=False))
  assert rel_err(np.load(tmp_path / "y.npy"), jax_logits) < 1e-4
