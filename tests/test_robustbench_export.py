"""RobustBench-ready export (sovr_jax.robustbench_export).

RobustBench's own classes are loaded here from the installed package's files (not through our
module), with the constructor arguments written out, so a wrong entry of our table fails. The
full-width PreActResNet-18 is checked against the JAX model; ResNet-18 and WideResNet-28-10
against our PyTorch twin (which tests/test_export.py checks against JAX at a tiny width).
robustbench must be installed (pip install --no-deps robustbench==1.1.1): without it these tests
fail with that line, they do not skip.
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from tests import references

references.skip_module_without("torch")  # every test builds or loads a PyTorch model
# pylint: disable=wrong-import-position,wrong-import-order
import torch

from sovr_jax import default_config, export, models, torch_models
from sovr_jax import robustbench_export as rbx
from sovr_jax.testing import random_variables, rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
INSTALL = "pip install --no-deps robustbench==1.1.1"


def robustbench_file(module):
  """robustbench/model_zoo/architectures/<module>.py, executed on its own (not via rbx)."""
  spec = importlib.util.find_spec("robustbench")
  if spec is None or not spec.submodule_search_locations:
    pytest.fail(f"robustbench is not installed; these tests need it: {INSTALL}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model_zoo", "architectures",
                      f"{module}.py")
  mod_spec = importlib.util.spec_from_file_location(f"_test_robustbench_{module}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def rb_resnet():
  return robustbench_file("resnet")


@pytest.fixture(scope="module")
def rb_wide_resnet():
  return robustbench_file("wide_resnet")


def normalize(x):
  mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
  return (x - mean) / std


@pytest.fixture(scope="module")
def preact():
  """Full-width Flax PreActResNet-18 with random params and BN statistics, its twin, its state
  dict and 4 random NHWC images in [0, 1]."""
  model = models.get_model("preact_resnet18", num_classes=10, width=1.0, mean=CIFAR_MEAN,
                           std=CIFAR_STD)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = random_variables(model, x, 0)
  sd = export.to_state_dict("preact_resnet18", variables["params"], variables["batch_stats"],
                            mean=CIFAR_MEAN, std=CIFAR_STD)
  twin = torch_models.build_torch_model("preact_resnet18", num_classes=10, mean=CIFAR_MEAN,
                                        std=CIFAR_STD)
  torch_models.load_weights(twin, sd).eval()
  return types.SimpleNamespace(model=model, variables=variables, x=np.asarray(x), sd=sd,
                               twin=twin)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def randomize_(module, seed):
  """Non-trivial BN affine parameters and running statistics and biases (in place)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.normal_(0, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
      elif isinstance(m, torch.nn.Linear) and m.bias is not None:
        m.bias.normal_(0, 0.1, generator=g)
  return module


def test_preact_resnet18_loads_strictly_into_robustbench_and_predicts_like_jax(preact,
                                                                              rb_resnet):
  rb_sd = rbx.to_robustbench_state_dict("preact_resnet18", preact.sd)
  assert "mean" not in rb_sd and "std" not in rb_sd
  assert "layer2.0.shortcut.0.weight" in rb_sd and "bn.running_var" in rb_sd
  net = rb_resnet.PreActResNet(rb_resnet.PreActBlockV2, [2, 2, 2, 2], num_classes=10,
                               bn_before_fc=True)
  net.load_state_dict(rb_sd, strict=True)
  net.eval()
  xt = nchw(preact.x)
  with torch.no_grad():
    rb_logits = net(normalize(xt)).numpy()
    twin_logits = preact.twin(xt).numpy()
  with jax.default_matmul_precision("float32"):
    jax_logits = np.asarray(preact.model.apply(preact.variables, preact.x, train=False))
  assert rel_err(rb_logits, twin_logits) < 1e-4
  assert rel_err(rb_logits, jax_logits) < 1e-4
  assert float(np.abs(jax_logits).max()) > 0
  # The BN running statistics came along (not RobustBench's fresh 0 / 1).
  assert not torch.allclose(net.bn.running_var, torch.ones_like(net.bn.running_var))


@pytest.mark.parametrize("name", ["resnet18", "wrn28_10"])
def test_resnet18_and_wide_resnet_load_strictly_and_predict_like_the_twin(name, rb_resnet,
                                                                         rb_wide_resnet):
  twin = randomize_(torch_models.build_torch_model(name, num_classes=10, mean=CIFAR_MEAN,
                                                   std=CIFAR_STD), seed=1).eval()
  if name == "resnet18":
    net = rb_resnet.ResNet(rb_resnet.BasicBlock, [2, 2, 2, 2], num_classes=10)
  else:
    net = rb_wide_resnet.WideResNet(depth=28, num_classes=10, widen_factor=10, sub_block1=False)
  net.load_state_dict(rbx.to_robustbench_state_dict(name, twin.state_dict()), strict=True)
  net.eval()
  x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    assert rel_err(net(normalize(x)).numpy(), twin(x).numpy()) < 1e-5


def test_every_supported_architecture_maps_to_exactly_the_robustbench_keys():
  # On the meta device: the keys and shapes of all four, WRN-34-10 included, for free.
  with torch.device("meta"):
    for name in rbx.ARCHITECTURES:
      twin = torch_models.build_torch_model(name, num_classes=100)
      rb_sd = rbx.to_robustbench_state_dict(name, twin.state_dict())
      net = rbx.build_network(name, num_classes=100)
      assert set(rb_sd) == set(net.state_dict()), name
      assert len(rb_sd) == len(twin.state_dict()) - 2, name  # all but mean / std
  assert set(rbx.ARCHITECTURES) | set(rbx.UNSUPPORTED) == set(torch_models.ARCHITECTURES)


def write_autoattack(workdir, file, **overrides):
  result = {"clean_acc": 0.81234, "robust_acc": 0.45678, "n": 1000, "eps": 8 / 255,
            "norm": "Linf", "version": "standard",
            "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "dataset": "cifar10",
            "model": {"architecture": "preact_resnet18", "step": 500}}
  result.update(overrides)
  with open(os.path.join(workdir, file), "w") as f:
    json.dump(result, f)


def test_export_files_load_with_and_without_sovr_jax(preact, rb_resnet, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  write_autoattack(workdir, "autoattack.json")
  out = tmp_path / "export"
  summary = rbx.write_export(
      str(out), architecture="preact_resnet18", state_dict=preact.sd, mean=CIFAR_MEAN,
      std=CIFAR_STD, dataset="cifar10", norm="linf", eps=8 / 255, workdir=str(workdir),
      num_test=10000, source={"checkpoint": "best", "step": 500}, reference=preact.twin,
      images=preact.x)
  assert summary["export_check"]["max_rel_logit_diff"] < 1e-5
  assert sorted(os.listdir(out)) == ["robustbench.json", "robustbench.pt"]  # no temp files
  xt = nchw(preact.x)
  with torch.no_grad():
    twin_logits = preact.twin(xt).numpy()

  # With sovr_jax: the loader.
  model = rbx.load_robustbench(str(out))
  assert isinstance(model, rbx.NormalizedModel) and not model.training
  assert type(model.model).__name__ == "PreActResNet"
  with torch.no_grad():
    assert rel_err(model(xt).numpy(), twin_logits) < 1e-5
  with pytest.raises(ValueError, match="NCHW batches of shape \\(N, 3, 32, 32\\)"):
    model(torch.zeros(1, 3, 64, 64))

  # Without sovr_jax: RobustBench's class, a strict load, the JSON's normalisation (as in
  # docs/robustbench.md).
  with open(out / "robustbench.json") as f:
    info = json.load(f)
  spec = info["sovr_jax"]["robustbench_class"]
  assert spec == {"module": "resnet", "class": "PreActResNet",
                  "kwargs": {"block": "PreActBlockV2", "num_blocks": [2, 2, 2, 2],
                             "bn_before_fc": True, "num_classes": 10}}
  net = rb_resnet.PreActResNet(rb_resnet.PreActBlockV2, [2, 2, 2, 2], num_classes=10,
                               bn_before_fc=True)
  net.load_state_dict(torch.load(out / "robustbench.pt", weights_only=True), strict=True)
  mu = torch.tensor(info["sovr_jax"]["mean"]).view(1, 3, 1, 1)
  sigma = torch.tensor(info["sovr_jax"]["std"]).view(1, 3, 1, 1)
  with torch.no_grad():
    assert rel_err(net.eval()((xt - mu) / sigma).numpy(), twin_logits) < 1e-5

  # In a process where JAX cannot be imported; robustbench/__init__.py is never run.
  np.save(tmp_path / "x.npy", xt.numpy())
  code = (
      "import sys\n"
      "for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'chex'):\n"
      "  sys.modules[m] = None\n"
      "import numpy as np, torch\n"
      "from sovr_jax.robustbench_export import load_robustbench\n"
      f"model = load_robustbench({str(out / 'robustbench.json')!r})\n"
      "with torch.no_grad():\n"
      f"  y = model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).numpy()\n"
      f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
      "assert 'robustbench' not in sys.modules, 'robustbench/__init__.py was imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert rel_err(np.load(tmp_path / "y.npy"), twin_logits) < 1e-5

  # Weights from another export; a missing export.
  torch.save({"x": torch.zeros(1)}, out / "robustbench.pt")
  with pytest.raises(ValueError, match="SHA-256"):
    rbx.load_robustbench(str(out))
  with pytest.raises(FileNotFoundError, match="--robustbench"):
    rbx.load_robustbench(str(tmp_path / "nowhere"))


def modelinfo_fields():
  """The fields of robustbench.utils.ModelInfo, read from the source (importing it would need
  pandas, timm, ...)."""
  path = os.path.join(rbx.robustbench_dir(), "utils.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef) and node.name == "ModelInfo":
      return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
  raise AssertionError(f"no ModelInfo in {path}")


def test_model_info_from_the_autoattack_results(tmp_path):
  workdir = str(tmp_path)

  def info(**kw):
    aa, notes = rbx.find_autoattack_result(workdir, norm="linf", step=500, dataset="cifar10")
    return rbx.model_info(architecture="wrn34_10", dataset="cifar10", norm="linf",
                          eps=8 / 255, autoattack=aa, num_test=10000, notes=notes, **kw)

  write_autoattack(workdir, "autoattack_jax.json", clean_acc=0.7, robust_acc=0.4, n=200)
  write_autoattack(workdir, "autoattack.json")
  d = info(extra={"weights_sha256": "abc"})
  assert set(d) - {"sovr_jax"} == set(rbx.MODEL_INFO_FIELDS)
  assert set(rbx.MODEL_INFO_FIELDS) <= modelinfo_fields()
  assert d["clean_acc"] == "81.23" and d["autoattack_acc"] == "45.68" == d["reported"]
  assert d["eps"] == "8/255" and d["dataset"] == "cifar10"
  assert d["architecture"] == "WideResNet-34-10" and d["number_forward_passes"] == 1
  assert d["additional_data"] is False and d["link"] is None
  assert "run by sovr_jax" in d["footnote"] and "n=1000" in d["footnote"]
  assert "image folder" not in d["footnote"]
  assert "read from an image folder (e.g. a JPEG copy)" in info(data_source="image_folder")[
      "footnote"]
  s = d["sovr_jax"]
  assert s["threat_model"] == "Linf" and s["weights_sha256"] == "abc"
  assert s["autoattack"]["engine"] == "reference" and s["autoattack"]["n"] == 1000
  assert any("1000 of the 10000" in n for n in s["notes"])
  json.dumps(d, allow_nan=False)

  # The JAX engine's result when the reference's is for another checkpoint.
  write_autoattack(workdir, "autoattack.json", model={"step": 400})
  d = info()
  assert d["clean_acc"] == "70.00" and d["autoattack_acc"] == "40.00"
  assert d["sovr_jax"]["autoattack"]["engine"] == "jax"
  assert "JAX engine" in d["footnote"] and "n=200" in d["footnote"]
  assert any("step 400" in n for n in d["sovr_jax"]["notes"])

  # None usable: null accuracies and how to get them.
  os.remove(os.path.join(workdir, "autoattack_jax.json"))
  write_autoattack(workdir, "autoattack.json", robust_acc=None)
  d = info()
  assert d["clean_acc"] is None and d["autoattack_acc"] is None and d["reported"] is None
  assert d["footnote"] is None and d["eps"] == "8/255"
  assert "python -m sovr_jax.autoattack_eval --workdir W" in d["sovr_jax"]["autoattack"]["how_to"]
  assert any("robust_acc missing" in n for n in d["sovr_jax"]["notes"])

  assert rbx.format_eps(0.5, "l2") == "0.5" and rbx.format_eps(0.031, "linf") == "0.031"
  assert rbx.format_eps(4 / 255, "Linf") == "4/255"


def fake_run(name, width, workdir, image_shape=(32, 32, 3)):
  """What export_run reads of a sovr_jax.rundir.RestoredRun."""
  cfg = default_config.get_config("sovr")
  cfg.model.name, cfg.model.width = name, width
  rng = np.random.default_rng(0)
  c = image_shape[-1]
  ds = types.SimpleNamespace(image_shape=image_shape, mean=CIFAR_MEAN[:c], std=CIFAR_STD[:c],
                             name="cifar10", num_test=10000, num_classes=10,
                             test_images=rng.integers(0, 256, (3,) + image_shape, np.uint8))
  return types.SimpleNamespace(cfg=cfg, config=cfg.to_dict(), dataset=ds, workdir=workdir,
                               step=500, checkpoint="best", meta={},
                               checkpoint_path=os.path.join(workdir, "best", "500"))


def test_export_run_writes_the_export_or_says_why_not(preact, tmp_path):
  workdir = str(tmp_path)
  write_autoattack(workdir, "autoattack_jax.json")
  run = fake_run("preact_resnet18", 1.0, workdir)
  out = tmp_path / "export"
  result = rbx.export_run(run, preact.sd, str(out), reference=preact.twin,
                          images=run.dataset.test_images)
  assert result["written"] and result["export_check"]["n"] == 3
  line = rbx.summary_line(result)
  assert "RobustBench export:" in line and "autoattack_acc 45.68 (jax" in line
  with open(out / "robustbench.json") as f:
    s = json.load(f)["sovr_jax"]
  assert s["source"]["step"] == 500 and s["source"]["workdir"] == workdir
  assert s["mean"] == list(CIFAR_MEAN) and len(s["weights_sha256"]) == 64

  for run, what in [(fake_run("small_cnn", 1.0, workdir, (28, 28, 1)), "no SmallCNN"),
                    (fake_run("preact_resnet18", 0.5, workdir), "at width 0.5"),
                    (fake_run("resnet18", 1.0, workdir, (64, 64, 3)), "avg_pool2d\\(out, 4\\)")]:
    out = tmp_path / f"export_{run.cfg.model.name}"
    result = rbx.export_run(run, {}, str(out))
    assert not result["written"] and not out.exists()
    assert rbx.summary_line(result).startswith("RobustBench export not written: ")
    assert re.search(what, result["reason"]), result["reason"]


def test_unsupported_models_and_missing_robustbench_give_clear_errors(monkeypatch):
  with pytest.raises(rbx.RobustBenchUnsupportedError,
                     match="No RobustBench export for 'small_cnn': RobustBench has no SmallCNN"
                           ".*preact_resnet18, resnet18, wrn34_10, wrn28_10.*load_exported"):
    rbx.check_supported("small_cnn", input_shape=(1, 28, 28))
  tiny = torch_models.build_torch_model("preact_resnet18", num_classes=10, width=0.0625)
  with pytest.raises(ValueError, match="at width 0.0625.*width 1.0.*--config.model.width=1.0"):
    rbx.to_robustbench_state_dict("preact_resnet18", tiny.state_dict(), width=0.0625)
  with pytest.raises(ValueError, match="does not fit RobustBench's PreActResNet.*width-1.0"):
    rbx.to_robustbench_state_dict("preact_resnet18", tiny.state_dict())  # width not passed
  with pytest.raises(ValueError, match="3x32x32 images only"):
    rbx.check_supported("wrn34_10", input_shape=(3, 64, 64))
  with pytest.raises(ValueError, match="known architectures"):
    rbx.check_supported("vit_b16")

  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(rbx, "_MODULES", {})
  with pytest.raises(ImportError, match="pip install --no-deps robustbench==1.1.1"):
    rbx.build_network("resnet18")


def test_export_cli_prints_why_small_cnn_has_no_robustbench_export(trained_tiny_run, tmp_path):
  out = tmp_path / "cli_export"
  proc = subprocess.run([sys.executable, "-m", "sovr_jax.export", "--workdir", trained_tiny_run,
                         "--out", str(out), "--robustbench", "--check_examples", "4"],
                        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("RobustBench export not written: No RobustBench export for 'small_cnn': RobustBench "
          "has no SmallCNN") in proc.stdout
  assert sorted(os.listdir(out)) == ["model.json", "model.pt"]
  with open(out / "model.json") as f:
    rb = json.load(f)["robustbench"]
  assert rb["written"] is False and "small_cnn" in rb["reason"]
