"""Export a trained Flax model to PyTorch: ``model.pt`` (a state dict) + ``model.json``.

    python -m sovr_jax.export --workdir runs/sovr --out runs/sovr/export [--checkpoint best|latest]

The exported model is the twin in ``sovr_jax.torch_models`` (same layers, NCHW inputs in [0, 1],
normalisation inside) with the checkpoint's weights and BatchNorm running statistics. It is what
AutoAttack (``python -m sovr_jax.autoattack_eval``, after Croce & Hein, ICML 2020) attacks, and
what anyone can load without JAX:

    from sovr_jax.export import load_exported
    model = load_exported("runs/sovr/export")     # torch.nn.Module in eval() mode

Parameter conversion (Flax -> PyTorch): conv kernels HWIO -> OIHW, dense kernels (in, out) ->
(out, in) (SmallCNN flattens in NCHW order in Flax too, so its fc1 needs no permutation), BatchNorm
scale/bias/mean/var -> weight/bias/running_mean/running_var (+ num_batches_tracked = 0). Flax keeps
the biased batch variance in its running statistics; both frameworks use the stored value as is in
eval mode, so the exported model computes the same function as ``model.apply(v, x, train=False)``.

Only ``export_workdir`` and ``compare_with_jax`` need JAX (through
``sovr_jax.rundir.restore_run``), and they import it lazily: ``to_state_dict`` (any arrays numpy
can read) and ``load_exported`` work with torch + numpy + json + ``sovr_jax.torch_models``
alone. torch itself is imported only when a function needs it; without it the error says how
to install it, and the rest of sovr_jax never needs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any, Sequence

from typing import TYPE_CHECKING

import numpy as np

import sovr_jax
from sovr_jax import cli, jsonio, optional, rundir
from sovr_jax.errors import InvalidFileError, NotFoundError

if TYPE_CHECKING:
  import torch  # pylint: disable=unused-import


def _torch():
  """torch and the twins (``torch_models``), imported here: the rest of sovr_jax needs none."""
  optional.require("torch", purpose="The PyTorch export")
  import torch  # pylint: disable=import-outside-toplevel,redefined-outer-name
  from sovr_jax import torch_models  # pylint: disable=import-outside-toplevel
  return torch, torch_models

#: Written into model.json; bump on incompatible changes of the format.
FORMAT = "sovr_jax.export/1"
WEIGHTS_FILE = "model.pt"
INFO_FILE = "model.json"
#: Test images compared between the JAX and the exported model at export time.
EXPORT_CHECK_EXAMPLES = 16
#: Largest max|logit difference| / max|logit| accepted by that check (float32 on both sides).
EXPORT_CHECK_RTOL = 1e-3

_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}


# --------------------------------------------------------------------------------------------
# Flax variables -> PyTorch state dict.
# --------------------------------------------------------------------------------------------


def _flatten(tree: Any, what: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if not isinstance(tree, Mapping):
    raise ValueError(f"{what} must be a nested mapping of arrays (a Flax variable collection), "
                     f"got {type(tree).__name__} at {'/'.join(prefix) or 'the top level'}.")
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(_flatten(value, what, path))
    else:
      out[path] = value
  return out


def _to_tensor(value: Any) -> torch.Tensor:
  torch, _ = _torch()
  arr = np.asarray(value)  # jax.Array, numpy or anything array-like; no JAX import needed.
  return torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32)))


def to_state_dict(name: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None,
                  *, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
  """Converts Flax ``params`` and ``batch_stats`` of model ``name`` to a PyTorch state dict.

  The Flax module path becomes the PyTorch module path (``layer1_0/conv1/kernel`` ->
  ``layer1_0.conv1.weight``), which matches ``torch_models.build_torch_model(name, ...)``.

  Args:
    name: the architecture (one of ``torch_models.ARCHITECTURES``).
    params: ``variables['params']``.
    batch_stats: ``variables['batch_stats']`` (None or {} for models without BatchNorm).
    mean, std: if given, the normalisation buffers ``mean``/``std`` are included (shape
      [1, C, 1, 1]); otherwise the loading model keeps the values it was built with.

  Returns:
    ``{name: float32 tensor}`` plus int64 ``num_batches_tracked`` (0) for each BatchNorm.

  Raises:
    ValueError: unknown architecture; the whole variables dict passed as ``params``; unknown
      leaf names or ranks; BatchNorm layers without running statistics (or vice versa).
  """
  torch, torch_models = _torch()
  torch_models.check_architecture(name)
  if isinstance(params, Mapping) and "params" in params:
    raise ValueError("to_state_dict got the whole variables dict; pass variables['params'] and "
                     "variables['batch_stats'] separately.")
  sd: dict[str, torch.Tensor] = {}
  bn_modules = set()
  for path, value in _flatten(params, "params").items():
    *module, leaf = path
    if leaf not in _PARAM_LEAVES:
      raise ValueError(f"Unexpected parameter {'/'.join(path)!r} (leaf {leaf!r}); expected leaves "
                       f"{sorted(_PARAM_LEAVES)}. Is this a sovr_jax.models model?")
    tensor = _to_tensor(value)
    if leaf == "kernel":
      if tensor.dim() == 4:    # HWIO -> OIHW
        tensor = tensor.permute(3, 2, 0, 1).contiguous()
      elif tensor.dim() == 2:  # (in, out) -> (out, in)
        tensor = tensor.t().contiguous()
      else:
        raise ValueError(f"Kernel {'/'.join(path)!r} has rank {tensor.dim()}; expected 4 (conv) "
                         f"or 2 (dense).")
    elif leaf == "scale":
      bn_modules.add(tuple(module))
    sd[".".join(module + [_PARAM_LEAVES[leaf]])] = tensor
  stat_modules = set()
  for path, value in _flatten(batch_stats or {}, "batch_stats").items():
    *module, leaf = path
    if leaf not in _STAT_LEAVES:
      raise ValueError(f"Unexpected batch statistic {'/'.join(path)!r}; expected leaves "
                       f"{sorted(_STAT_LEAVES)}.")
    stat_modules.add(tuple(module))
    sd[".".join(module + [_STAT_LEAVES[leaf]])] = _to_tensor(value)
  if bn_modules != stat_modules:
    no_stats = sorted("/".join(m) for m in bn_modules - stat_modules)
    no_bn = sorted("/".join(m) for m in stat_modules - bn_modules)
    raise ValueError(
        f"BatchNorm parameters and running statistics do not match (layers without batch_stats: "
        f"{no_stats or 'none'}; batch_stats without layers: {no_bn or 'none'}). Pass "
        f"variables['batch_stats'] of the same model as batch_stats.")
  for module in sorted(bn_modules):
    sd[".".join(module + ("num_batches_tracked",))] = torch.tensor(0, dtype=torch.long)
  if (mean is None) != (std is None):
    raise ValueError("Give both mean and std, or neither.")
  if mean is not None:
    sd["mean"] = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
    sd["std"] = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
  return sd


# --------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------


def compare_with_jax(run: rundir.RestoredRun, torch_model: torch.nn.Module,
                     images: np.ndarray) -> dict[str, Any]:
  """JAX (float32) vs PyTorch logits on uint8 NHWC ``images``: max relative difference
  (max |diff| / max |logit|) and predicted-label agreement."""
  import jax  # pylint: disable=import-outside-toplevel
  torch, _ = _torch()

  x = images.astype(np.float32) / 255.0
  with jax.default_matmul_precision("float32"):
    apply = jax.jit(lambda v, x: run.model.apply(v, x, train=False))
    jax_logits = np.asarray(apply(run.variables, x))
  param = next(torch_model.parameters())
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(param.device)
    torch_logits = torch_model(xt).cpu().numpy()
  diff = float(np.abs(jax_logits - torch_logits).max())
  scale = max(float(np.abs(jax_logits).max()), 1e-12)
  return {"n": int(len(x)), "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / scale,
          "label_agreement": float(np.mean(jax_logits.argmax(-1) == torch_logits.argmax(-1)))}


def export_workdir(workdir: str, out_dir: str, *, checkpoint: str = "best",
                   dataset: Any = None, check_examples: int = EXPORT_CHECK_EXAMPLES,
                   robustbench: bool = False) -> str:
  """Exports the newest ``checkpoint`` ("best" or "latest") of a training run to ``out_dir``.

  Writes ``out_dir/model.pt`` (the PyTorch state dict, ``torch.save``) and ``out_dir/model.json``
  (architecture, width, num_classes, mean, std, input shape, source checkpoint and step, data
  set, eps, method, the full training config, versions, and the result of a JAX-vs-PyTorch check
  on the first ``check_examples`` test images, 0 = all), both atomically. ``dataset`` avoids
  reloading the run's data.
  ``robustbench``: also ``out_dir/robustbench.pt`` + ``robustbench.json`` (see
  ``sovr_jax.robustbench_export.export_run``; recorded under model.json's "robustbench", with
  the reason when the architecture has no RobustBench class).

  Returns:
    The path of ``model.json``.

  Raises:
    FileNotFoundError: no workdir / config.json / checkpoint (the message says what to do).
    ValueError: unknown architecture, or weights that do not fit the architecture.
    RuntimeError: the exported model disagrees with the JAX model (a bug; please report it).
  """
  torch, torch_models = _torch()
  from sovr_jax import robustbench_export  # pylint: disable=import-outside-toplevel
  if robustbench:
    robustbench_export.robustbench_dir()  # not installed: fail before the restore
  torch_models.check_architecture(rundir.read_config(workdir)["model"]["name"])
  run = rundir.restore_run(workdir, checkpoint=checkpoint, dataset=dataset)
  cfg, ds = run.cfg, run.dataset
  h, w, c = ds.image_shape
  sd = to_state_dict(cfg.model.name, run.variables["params"], run.variables["batch_stats"],
                     mean=ds.mean, std=ds.std)
  tmodel = torch_models.build_torch_model(cfg.model.name, num_classes=ds.num_classes,
                                          width=cfg.model.width, mean=ds.mean, std=ds.std,
                                          input_shape=(c, h, w))
  torch_models.load_weights(tmodel, sd).eval()
  check = compare_with_jax(run, tmodel, ds.test_images[:check_examples or None])
  check["rtol"] = EXPORT_CHECK_RTOL
  if not check["max_rel_logit_diff"] <= EXPORT_CHECK_RTOL:
    raise RuntimeError(
        f"The exported PyTorch model disagrees with the JAX model on {check['n']} test images "
        f"(max relative logit difference {check['max_rel_logit_diff']:.3g} > "
        f"{EXPORT_CHECK_RTOL}); nothing was written. This is a bug in sovr_jax.export or "
        f"sovr_jax.torch_models; please report it with the workdir's config.json.")
  rb = (robustbench_export.export_run(run, sd, out_dir, reference=tmodel,
                                      images=ds.test_images[:check_examples or None])
        if robustbench else None)

  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, WEIGHTS_FILE)
  tmp = f"{weights}.tmp-{os.getpid()}"
  torch.save(sd, tmp)
  os.replace(tmp, weights)
  a = cfg.attack
  info = {
      "format": FORMAT,
      "architecture": cfg.model.name,
      "width": float(cfg.model.width),
      "num_classes": int(ds.num_classes),
      "mean": list(ds.mean),
      "std": list(ds.std),
      "input_shape": [int(c), int(h), int(w)],
      "layout": "NCHW",
      "input_range": [0.0, 1.0],
      "weights": WEIGHTS_FILE,
      "weights_sha256": jsonio.sha256(weights),
      "num_params": int(sum(v.numel() for k, v in sd.items()
                            if not k.endswith(("running_mean", "running_var",
                                               "num_batches_tracked"))
                            and k not in torch_models.NORMALIZATION_BUFFERS)),
      "source": {"workdir": run.workdir, "checkpoint": run.checkpoint,
                 "path": run.checkpoint_path, "step": run.step, **run.meta},
      "dataset": ds.name,
      "num_test": int(ds.num_test),
      "method": cfg.method,
      "eps": float(a.eps),
      "norm": a.norm,
      "attack": a.to_dict(),
      "precision": cfg.precision,
      "seed": int(cfg.seed),
      "config": run.config,
      "export_check": check,
      "sovr_jax_version": sovr_jax.__version__,
      "versions": _versions(),
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": rundir.command(),
  }
  if rb is not None:
    info["robustbench"] = rb
  path = os.path.join(out_dir, INFO_FILE)
  jsonio.write_json_atomic(path, info)
  return path


def _versions() -> dict[str, str]:
  torch, _ = _torch()
  out = {"python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "sovr_jax": sovr_jax.__version__}
  for mod in ("jax", "flax"):
    m = sys.modules.get(mod)
    if m is not None and hasattr(m, "__version__"):
      out[mod] = m.__version__
  return out


# --------------------------------------------------------------------------------------------
# Loading (torch only).
# --------------------------------------------------------------------------------------------


def read_export_info(path: str) -> tuple[str, dict[str, Any]]:
  """(model.json path, its contents) for an export directory or a model.json path."""
  json_path, info = jsonio.read_json_in(
      path, INFO_FILE,
      "Export a training run first: python -m sovr_jax.export --workdir W --out DIR")
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    raise InvalidFileError(f"{json_path} is not a sovr_jax export (format {found!r} where "
                           f"{FORMAT!r} was expected); re-export with python -m sovr_jax.export.")
  return os.path.abspath(json_path), info


def load_exported(path: str, *, map_location: str | torch.device = "cpu",
                  check_hash: bool = True) -> torch.nn.Module:
  """Rebuilds an exported model from ``model.json`` + ``model.pt`` (torch only, no JAX).

  Args:
    path: the export directory or its model.json.
    map_location: device for the weights (and the returned model).
    check_hash: verify model.pt's SHA-256 against model.json.

  Returns:
    The ``torch_models`` twin with the exported weights, in ``eval()`` mode.

  Raises:
    FileNotFoundError: missing model.json / model.pt.
    ValueError: not an export, a hash mismatch, an unknown architecture, or weights that do not
      fit the architecture (listing missing/unexpected keys).
  """
  json_path, info = read_export_info(path)
  weights = os.path.join(os.path.dirname(json_path), info.get("weights", WEIGHTS_FILE))
  if not os.path.exists(weights):
    raise NotFoundError(f"{weights} (named by {json_path}) not found; copy it next to "
                            f"model.json or re-export.")
  if check_hash and info.get("weights_sha256") and jsonio.sha256(weights) != info["weights_sha256"]:
    raise InvalidFileError(f"{weights} does not match the SHA-256 in {json_path}: the weights and "
                     f"model.json come from different exports. Re-export, or pass "
                     f"check_hash=False if you changed the weights on purpose.")
  torch, torch_models = _torch()
  model = torch_models.build_torch_model(
      info["architecture"], num_classes=info["num_classes"], width=info["width"],
      mean=info["mean"], std=info["std"], input_shape=info["input_shape"])
  state_dict = torch.load(weights, map_location="cpu", weights_only=True)
  torch_models.load_weights(model, state_dict)
  return model.to(map_location).eval()


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


@cli.guarded
def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m sovr_jax.export",
      description="Export a sovr_jax training run's checkpoint to PyTorch (model.pt + model.json).")
  parser.add_argument("--workdir", required=True, help="the training run's --workdir")
  parser.add_argument("--out", required=True, help="output directory (created if needed)")
  parser.add_argument("--checkpoint", choices=rundir.CHECKPOINT_KINDS, default="best",
                      help="best-by-validation (default) or the latest checkpoint")
  parser.add_argument("--check_examples", type=int, default=EXPORT_CHECK_EXAMPLES,
                      help="test images on which JAX and PyTorch logits and labels are compared "
                           "(0 = the whole test split)")
  parser.add_argument("--robustbench", action="store_true",
                      help="also write robustbench.pt + robustbench.json for RobustBench's own "
                           "architecture classes (docs/robustbench.md)")
  args = parser.parse_args(argv)
  path = export_workdir(args.workdir, args.out, checkpoint=args.checkpoint,
                        check_examples=args.check_examples, robustbench=args.robustbench)
  with open(path) as f:
    info = json.load(f)
  check = info["export_check"]
  print(f"Exported {info['architecture']} (width {info['width']}, {info['num_params']:,} params, "
        f"{info['dataset']}) from {info['source']['path']} (step {info['source']['step']}) to "
        f"{path}; JAX vs PyTorch on {check['n']} test images: max relative logit difference "
        f"{check['max_rel_logit_diff']:.2e}, label agreement {check['label_agreement']:.2%}.")
  if "robustbench" in info:
    from sovr_jax import robustbench_export  # pylint: disable=import-outside-toplevel
    print(robustbench_export.summary_line(info["robustbench"]))
  return path


if __name__ == "__main__":
  main()
