"""RobustBench-ready export: ``robustbench.pt`` + ``robustbench.json`` next to ``model.pt``.

    python -m sovr_jax.export --workdir runs/sovr --out runs/sovr/export --robustbench

RobustBench (Croce et al., "RobustBench: a standardized adversarial robustness benchmark",
NeurIPS 2021 Datasets and Benchmarks; github.com/RobustBench/robustbench, version 1.1.1) builds
every model of its zoo from an architecture class in ``robustbench/model_zoo/architectures`` and
loads a checkpoint into it. This module writes our PyTorch twin's weights
(``sovr_jax.torch_models``) under that class's parameter names:

================  ==========================================================================
sovr_jax          RobustBench 1.1.1 class (file in ``robustbench/model_zoo/architectures``)
================  ==========================================================================
preact_resnet18   ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)`` (resnet.py)
resnet18          ``ResNet(BasicBlock, [2, 2, 2, 2])`` (resnet.py)
wrn34_10          ``WideResNet(depth=34, widen_factor=10, sub_block1=False)`` (wide_resnet.py)
wrn28_10          ``WideResNet(depth=28, widen_factor=10, sub_block1=False)`` (wide_resnet.py)
small_cnn         none (RobustBench has no SmallCNN and no MNIST leaderboard)
================  ==========================================================================

Why these match (read against the installed files): ``PreActBlockV2`` applies its 1x1 shortcut
conv to relu(bn1(x)) as our ``PreActBlock`` (robust_overfitting's), and ``bn_before_fc=True`` is
our final BN-ReLU (the zoo's ``Rice2020OverfittingNetL2`` in ``robustbench/model_zoo/cifar10.py``
builds the same network); ``ResNet``'s ``BasicBlock`` is kuangliu's, our ``shortcut_conv`` /
``shortcut_bn`` being its ``shortcut.0`` / ``shortcut.1``; ``WideResNet``'s block applies
``convShortcut`` to relu(bn1(x)) when the width changes, its fc has a bias (``bias_last=True``,
the default) and ``dropRate=0.0``. All use BatchNorm with eps 1e-5, as ours. They differ in two
ways that limit the export to **width 1.0 and 3x32x32 inputs**: the channel counts are fixed, and
they pool with a fixed kernel (``F.avg_pool2d(out, 4)``, 8 for WideResNet), the global mean pool
of our models only on 32x32 images.

Normalisation: RobustBench's architecture classes have none; a zoo entry adds ``mu``/``sigma``
buffers in a subclass (e.g. ``Rice2020OverfittingNetL2``). So ``robustbench.pt`` holds exactly
the architecture's state dict (it loads with ``load_state_dict(strict=True)``), the mean and std
go into ``robustbench.json``, and :class:`NormalizedModel` (normalise, then the network) is what
:func:`load_robustbench` returns.

``robustbench.json`` has the fields of the zoo's model-info files (``ModelInfo`` in
``robustbench/utils.py`` and the example in the docstring of
``robustbench/leaderboard/template.py``): link, name, authors, additional_data,
number_forward_passes, dataset, venue, architecture, eps, clean_acc, reported, autoattack_acc,
footnote; accuracies are percentage strings with 2 decimals and eps a string ("8/255"). The
accuracies come from the run's AutoAttack result (``W/autoattack.json``, else
``W/autoattack_jax.json``; ``python -m sovr_jax.autoattack_eval --workdir W``). Everything else
(normalisation, class and constructor arguments, source checkpoint, SHA-256, the threat model,
the AutoAttack engine and n) is under the key ``"sovr_jax"``.

RobustBench's classes are loaded from the installed package's files by path, without running
``robustbench/__init__.py`` (which imports torchvision, pandas, timm, ...): install it with
``pip install --no-deps robustbench==1.1.1``. This module imports torch, never JAX.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import sys
import types
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

import sovr_jax
from sovr_jax import jsonio, rundir, torch_models
from sovr_jax.errors import InvalidFileError, SovrError

#: Written into robustbench.json's "sovr_jax" section; bump on incompatible changes.
FORMAT = "sovr_jax.robustbench/1"
WEIGHTS_FILE = "robustbench.pt"
INFO_FILE = "robustbench.json"
#: The RobustBench release whose classes the mapping was written against.
ROBUSTBENCH_VERSION = "1.1.1"
INSTALL_HINT = f"pip install --no-deps robustbench=={ROBUSTBENCH_VERSION}"
#: The only input shape (C, H, W) RobustBench's CIFAR classes compute our function on.
INPUT_SHAPE = (3, 32, 32)
#: AutoAttack result files in a workdir (``sovr_jax.autoattack_eval``), preferred first.
#: The run's AutoAttack results, in order of preference (the reference engine first).
AUTOATTACK_FILES = tuple((e, rundir.AUTOATTACK_FILES[e]) for e in ("reference", "jax"))
AUTOATTACK_ENGINES = {
    "reference": "reference engine: pyautoattack on the PyTorch export",
    "jax": "JAX engine: sovr_jax.attacks.autoattack on the JAX model",
}
AUTOATTACK_HINT = "python -m sovr_jax.autoattack_eval --workdir W"
#: The top-level keys of robustbench.json besides "sovr_jax" (a subset of ModelInfo's fields).
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes",
                     "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                     "autoattack_acc", "footnote")
#: Largest max|logit difference| / max|logit| between the RobustBench model and our twin.
CHECK_RTOL = 1e-3
_ARCH_FILES = ("resnet", "wide_resnet")
_THREAT_MODELS = {"linf": "Linf", "l2": "L2"}


class RobustBenchNotInstalledError(SovrError, ImportError):
  """robustbench (its architecture files) cannot be found; the message gives the install line."""


class RobustBenchUnsupportedError(SovrError, ValueError):
  """The model has no RobustBench architecture class (architecture, width or input shape)."""


# --------------------------------------------------------------------------------------------
# The architecture table and the key mapping.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one of our architectures maps onto a RobustBench class.

  Attributes:
    name: our architecture (``torch_models.ARCHITECTURES``).
    title: the zoo's "architecture" string.
    module: the file (without .py) in ``robustbench/model_zoo/architectures``.
    class_name: the class in that file.
    kwargs: constructor arguments besides ``num_classes``, JSON-able (a block class by name).
    renames: (regex, replacement) pairs; the first that matches our key gives RobustBench's key,
      a key that none matches keeps its name.
    head: our (and RobustBench's) final linear layer, whose rows are the classes.
    pool: the kernel of RobustBench's fixed ``F.avg_pool2d`` (= the global mean on 32x32).
  """

  name: str
  title: str
  module: str
  class_name: str
  kwargs: Mapping[str, Any]
  renames: tuple[tuple[str, str], ...]
  head: str
  pool: int


_RESNET_RENAMES = (
    (r"^layer(\d)_(\d+)\.shortcut_conv\.(.+)$", r"layer\1.\2.shortcut.0.\3"),
    (r"^layer(\d)_(\d+)\.shortcut_bn\.(.+)$", r"layer\1.\2.shortcut.1.\3"),
    (r"^layer(\d)_(\d+)\.(.+)$", r"layer\1.\2.\3"),
)
_PREACT_RENAMES = (
    (r"^layer(\d)_(\d+)\.shortcut\.weight$", r"layer\1.\2.shortcut.0.weight"),
    (r"^layer(\d)_(\d+)\.(.+)$", r"layer\1.\2.\3"),
)
_WRN_RENAMES = ((r"^block(\d)_(\d+)\.(.+)$", r"block\1.layer.\2.\3"),)
_WRN_KWARGS = {"sub_block1": False, "dropRate": 0.0, "bias_last": True}

ARCHITECTURES: dict[str, Architecture] = {
    "preact_resnet18": Architecture(
        "preact_resnet18", "PreActResNet-18", "resnet", "PreActResNet",
        {"block": "PreActBlockV2", "num_blocks": [2, 2, 2, 2], "bn_before_fc": True},
        _PREACT_RENAMES, "linear", 4),
    "resnet18": Architecture(
        "resnet18", "ResNet-18", "resnet", "ResNet",
        {"block": "BasicBlock", "num_blocks": [2, 2, 2, 2]}, _RESNET_RENAMES, "linear", 4),
    "wrn34_10": Architecture(
        "wrn34_10", "WideResNet-34-10", "wide_resnet", "WideResNet",
        {"depth": 34, "widen_factor": 10, **_WRN_KWARGS}, _WRN_RENAMES, "fc", 8),
    "wrn28_10": Architecture(
        "wrn28_10", "WideResNet-28-10", "wide_resnet", "WideResNet",
        {"depth": 28, "widen_factor": 10, **_WRN_KWARGS}, _WRN_RENAMES, "fc", 8),
}
#: Our architectures without a RobustBench class, and why.
UNSUPPORTED = {
    "small_cnn": "RobustBench has no SmallCNN (TRADES's MNIST network) among its architectures "
                 "and no MNIST leaderboard",
}
#: Constructor arguments that name a class of the same file.
_CLASS_ARGS = ("block",)


def check_supported(name: str, *, width: float = 1.0,
                    input_shape: Sequence[int] = INPUT_SHAPE) -> Architecture:
  """The :class:`Architecture` of ``name``, or a clear error if it cannot be exported.

  Raises:
    ValueError: not one of our architectures at all.
    RobustBenchUnsupportedError: no RobustBench class, a width other than 1.0, or an input shape
      (C, H, W) other than 3x32x32.
  """
  torch_models.check_architecture(name)
  supported = ", ".join(ARCHITECTURES)
  if name not in ARCHITECTURES:
    raise RobustBenchUnsupportedError(
        f"No RobustBench export for {name!r}: {UNSUPPORTED.get(name, 'no matching class')}. "
        f"RobustBench-ready exports exist for {supported}; the plain PyTorch export "
        f"(model.pt + model.json, sovr_jax.export.load_exported) is unaffected.")
  arch = ARCHITECTURES[name]
  if float(width) != 1.0:
    raise RobustBenchUnsupportedError(
        f"No RobustBench export for {name!r} at width {width:g}: RobustBench's "
        f"{arch.class_name} has the fixed channel counts of width 1.0. Train with "
        f"--config.model.width=1.0 for a RobustBench model, or use the plain PyTorch export.")
  shape = tuple(int(s) for s in input_shape)
  if shape != INPUT_SHAPE:
    raise RobustBenchUnsupportedError(
        f"No RobustBench export for {name!r} with inputs of shape (C, H, W) = {shape}: "
        f"RobustBench's {arch.class_name} takes 3x32x32 images only (its first conv has 3 input "
        f"channels and it pools with F.avg_pool2d(out, {arch.pool}), the global mean pool of "
        f"our model only on 32x32 inputs). Use the plain PyTorch export for this model.")
  return arch


def robustbench_key(name: str, key: str) -> str:
  """RobustBench's name of our twin's state-dict entry ``key`` (``layer2_0.shortcut.weight`` ->
  ``layer2.0.shortcut.0.weight`` for preact_resnet18)."""
  for pattern, repl in check_supported(name).renames:
    if re.match(pattern, key):
      return re.sub(pattern, repl, key)
  return key


def key_mapping(name: str, keys: Sequence[str]) -> dict[str, str]:
  """``{our key: RobustBench key}`` for the twin's state-dict ``keys`` (normalisation buffers
  ``mean``/``std`` left out: RobustBench's classes have none)."""
  return {k: robustbench_key(name, k) for k in keys
          if k not in torch_models.NORMALIZATION_BUFFERS}


def to_robustbench_state_dict(name: str, state_dict: Mapping[str, torch.Tensor], *,
                              width: float = 1.0,
                              input_shape: Sequence[int] = INPUT_SHAPE
                              ) -> dict[str, torch.Tensor]:
  """Our twin's state dict (``sovr_jax.export.to_state_dict``) under RobustBench's names.

  The tensors are shared, not copied; ``mean``/``std`` are dropped (they go into the JSON). The
  result is checked against RobustBench's class built on the meta device (no memory): it has
  exactly the class's keys and shapes, so ``load_state_dict(strict=True)`` accepts it.

  Raises:
    RobustBenchUnsupportedError: see :func:`check_supported`.
    RobustBenchNotInstalledError: robustbench is not installed.
    ValueError: the state dict does not fit the class (missing / unexpected keys, shapes).
  """
  arch = check_supported(name, width=width, input_shape=input_shape)
  head = f"{arch.head}.weight"
  if head not in state_dict:
    raise ValueError(f"The state dict has no {head!r}; expected the state dict of our {name} "
                     f"twin (sovr_jax.export.to_state_dict).")
  mapping = key_mapping(name, list(state_dict))
  out = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
  with torch.device("meta"):
    expected = build_network(arch.name, num_classes=int(state_dict[head].shape[0])).state_dict()
  missing = sorted(set(expected) - set(out))
  unexpected = sorted(set(out) - set(expected))
  shapes = [f"{k}: {tuple(out[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(out)
            if k in expected and tuple(out[k].shape) != tuple(expected[k].shape)]
  if missing or unexpected or shapes:
    raise ValueError(
        f"Our {name} state dict does not fit RobustBench's {arch.class_name}"
        f"({_kwargs_repr(arch.kwargs)}): missing {missing[:8]}, unexpected {unexpected[:8]}, "
        f"shape mismatches {shapes[:8]}. Is it the state dict of a width-1.0 {name} twin? If "
        f"it is, the installed robustbench is not {ROBUSTBENCH_VERSION} ({INSTALL_HINT}).")
  return out


def _kwargs_repr(kwargs: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" if k in _CLASS_ARGS else f"{k}={v!r}" for k, v in kwargs.items())


# --------------------------------------------------------------------------------------------
# RobustBench's classes, loaded by file path.
# --------------------------------------------------------------------------------------------

_MODULES: dict[str, types.ModuleType] = {}


def robustbench_dir() -> str:
  """The installed ``robustbench`` package directory, found without importing it.

  Raises:
    RobustBenchNotInstalledError: with the install line.
  """
  try:
    # find_spec of a top-level package locates it without running its __init__.py.
    spec = importlib.util.find_spec("robustbench")
  except (ImportError, ValueError):
    spec = None
  locations = list(getattr(spec, "submodule_search_locations", None) or [])
  if not locations:
    raise RobustBenchNotInstalledError(
        f"robustbench is not installed in this Python ({sys.executable}); the RobustBench "
        f"export needs its architecture classes. Install it without its dependencies (which "
        f"include torchvision): {INSTALL_HINT}")
  return locations[0]


def robustbench_version() -> str | None:
  """The installed robustbench's version (package metadata; None if unknown)."""
  try:
    return importlib.metadata.version("robustbench")
  except importlib.metadata.PackageNotFoundError:
    return None


def architecture_module(module: str) -> types.ModuleType:
  """``robustbench/model_zoo/architectures/<module>.py``, executed on its own (it imports only
  torch), or the already imported module if robustbench itself was imported."""
  if module not in _ARCH_FILES:
    raise ValueError(f"Unknown RobustBench architecture file {module!r}; expected one of "
                     f"{_ARCH_FILES}.")
  full = f"robustbench.model_zoo.architectures.{module}"
  if full in sys.modules:
    return sys.modules[full]
  if module not in _MODULES:
    path = os.path.join(robustbench_dir(), "model_zoo", "architectures", f"{module}.py")
    if not os.path.exists(path):
      raise RobustBenchNotInstalledError(
          f"{path} not found: the installed robustbench ({robustbench_version()}) is not the "
          f"one this export was written for. Install it with: {INSTALL_HINT}")
    spec = importlib.util.spec_from_file_location(f"_sovr_jax_robustbench_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _MODULES[module] = mod
  return _MODULES[module]


def robustbench_class(module: str, class_name: str) -> type:
  """A class of RobustBench's ``model_zoo/architectures/<module>.py``."""
  mod = architecture_module(module)
  cls = getattr(mod, class_name, None)
  if not isinstance(cls, type) or not issubclass(cls, nn.Module):
    raise RobustBenchNotInstalledError(
        f"{mod.__file__} has no nn.Module class {class_name!r}; the installed robustbench "
        f"({robustbench_version()}) differs from {ROBUSTBENCH_VERSION}: {INSTALL_HINT}")
  return cls


def build_from_spec(module: str, class_name: str, kwargs: Mapping[str, Any]) -> nn.Module:
  """RobustBench's ``class_name(**kwargs)`` from ``model_zoo/architectures/<module>.py``
  (the "sovr_jax.robustbench_class" entry of robustbench.json; a block class by name)."""
  kw = dict(kwargs)
  for k in _CLASS_ARGS:
    if k in kw:
      kw[k] = robustbench_class(module, kw[k])
  return robustbench_class(module, class_name)(**kw)


def class_spec(name: str, num_classes: int) -> dict[str, Any]:
  """{"module", "class", "kwargs"} of RobustBench's class for our architecture ``name``."""
  arch = check_supported(name)
  return {"module": arch.module, "class": arch.class_name,
          "kwargs": {**arch.kwargs, "num_classes": int(num_classes)}}


def build_network(name: str, *, num_classes: int = 10) -> nn.Module:
  """RobustBench's (freshly initialised) network for our architecture ``name``."""
  spec = class_spec(name, num_classes)
  return build_from_spec(spec["module"], spec["class"], spec["kwargs"])


class NormalizedModel(nn.Module):
  """``model((x - mu) / sigma)`` for NCHW images in [0, 1]: what the zoo's entries do in a
  subclass (``mu``/``sigma`` buffers, e.g. ``Rice2020OverfittingNetL2`` in
  ``robustbench/model_zoo/cifar10.py``). ``model`` is RobustBench's network."""

  def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
               input_shape: Sequence[int] = INPUT_SHAPE):
    super().__init__()
    self.model = model
    self.input_shape = tuple(int(s) for s in input_shape)
    c = self.input_shape[0]
    for buffer, values, what in (("mu", mean, "mean"), ("sigma", std, "std")):
      values = [float(v) for v in values]
      if len(values) not in (1, c) or (what == "std" and min(values) <= 0):
        raise ValueError(f"{what} must have 1 or {c} entries (std > 0), got {values}.")
      self.register_buffer(buffer, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"This RobustBench model takes NCHW batches of shape (N, "
                       f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}.")
    # NCHW-contiguous, as in torch_models._Normalized.normalize (a channels-last strided input
    # can crash torch 2.13's oneDNN convolution backward on some CPUs).
    return self.model(((x - self.mu) / self.sigma).contiguous())


# --------------------------------------------------------------------------------------------
# Model info (the zoo's JSON) from the run's AutoAttack result.
# --------------------------------------------------------------------------------------------


def threat_model(norm: str) -> str:
  """RobustBench's threat-model name ("Linf" or "L2") of our ``attack.norm``."""
  tm = _THREAT_MODELS.get(str(norm).lower())
  if tm is None:
    raise ValueError(f"attack.norm {norm!r} has no RobustBench threat model; expected one of "
                     f"{sorted(_THREAT_MODELS)}.")
  return tm


def format_eps(eps: float, norm: str) -> str:
  """eps as the zoo writes it: "8/255" for an L-inf eps on the 1/255 grid, else "0.5"."""
  k = float(eps) * 255
  if threat_model(norm) == "Linf" and round(k) >= 1 and abs(k - round(k)) <= 1e-6 * k:
    return f"{int(round(k))}/255"
  return f"{float(eps):.6g}"


def format_acc(acc: float | None) -> str | None:
  """A fraction as the zoo's percentage string with 2 decimals (0.4567 -> "45.67")."""
  return None if acc is None else f"{100 * float(acc):.2f}"


def _is_fraction(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and 0 <= v <= 1)


def _unusable(result: Any, *, norm: str, step: int | None, dataset: str | None) -> str | None:
  """Why an AutoAttack result cannot be used for this export (None if it can)."""
  if not isinstance(result, dict):
    return "not a JSON object"
  bad = [k for k in ("clean_acc", "robust_acc") if not _is_fraction(result.get(k))]
  if bad:
    return f"{', '.join(bad)} missing or not a fraction in [0, 1]"
  if not isinstance(result.get("n"), int) or result["n"] < 1:
    return "n missing or not a positive integer"
  if not isinstance(result.get("eps"), (int, float)) or not result["eps"] > 0:
    return "eps missing or not positive"
  if str(result.get("norm", "")).lower() != norm.lower():
    return f"norm {result.get('norm')!r}, but the run's threat model is {norm}"
  aa_step = (result.get("model") or {}).get("step")
  if step is not None and aa_step is not None and int(aa_step) != int(step):
    return f"it is for step {aa_step}, the exported checkpoint is step {step}"
  if dataset is not None and result.get("dataset") not in (None, dataset):
    return f"it is for data set {result.get('dataset')!r}, the run's is {dataset!r}"
  return None


def find_autoattack_result(workdir: str | None, *, norm: str, step: int | None = None,
                           dataset: str | None = None
                           ) -> tuple[dict[str, Any] | None, list[str]]:
  """The run's AutoAttack result: ``W/autoattack.json`` (reference engine) if usable, else
  ``W/autoattack_jax.json``. A file is skipped if unreadable, if it lacks clean_acc / robust_acc
  (fractions), n, eps or norm, or if it is for another threat model, step or data set.

  Returns:
    ({"engine", "path", "result"} or None, notes on the files skipped).
  """
  notes = []
  for engine, file in AUTOATTACK_FILES:
    path = os.path.join(workdir, file) if workdir else None
    if path is None or not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      notes.append(f"{path} skipped: unreadable ({e})")
      continue
    why = _unusable(result, norm=threat_model(norm), step=step, dataset=dataset)
    if why:
      notes.append(f"{path} skipped: {why}")
      continue
    return {"engine": engine, "path": os.path.abspath(path), "result": result}, notes
  return None, notes


def _attacks_text(result: Mapping[str, Any]) -> str:
  attacks = result.get("attacks")
  version = result.get("version", "standard")
  names = ", ".join(attacks) if isinstance(attacks, (list, tuple)) and attacks else None
  return f"{version}: {names}" if names else str(version)


def model_info(*, architecture: str, dataset: str, norm: str, eps: float,
               autoattack: Mapping[str, Any] | None = None, num_test: int | None = None,
               test_subset: int = 0, notes: Sequence[str] = (),
               extra: Mapping[str, Any] | None = None,
               data_source: str | None = None) -> dict[str, Any]:
  """robustbench.json: the zoo's model-info fields, and ``extra`` under "sovr_jax".

  Format: ``ModelInfo`` in ``robustbench/utils.py`` and the example in the docstring of
  ``generate_leaderboard`` (``robustbench/leaderboard/template.py``). link, name, authors and
  venue are left null for the author to fill; additional_data is false (sovr_jax trains on the
  data set's train split only); reported is our own AutoAttack number (replace it with the
  paper's if it reports another).

  Args:
    architecture: our architecture name.
    dataset: the run's data set name ("cifar10", ...).
    norm: the run's ``attack.norm`` (linf / l2).
    eps: the training eps, used when there is no AutoAttack result.
    autoattack: :func:`find_autoattack_result`'s first value, or None.
    num_test: size of the run's test split (for the footnote).
    test_subset: the run's ``data.num_test`` (0 = the whole test set).
    notes: warnings to record (AutoAttack files skipped, ...).
    extra: more entries for the "sovr_jax" section.
    data_source: the run's ``data.source``; "image_folder" is said in the footnote (a JPEG
      copy's pixels, and so its accuracies, differ from the original data set's).
  """
  arch = check_supported(architecture)
  tm = threat_model(norm)
  section: dict[str, Any] = {"format": FORMAT, "threat_model": tm}
  notes = list(notes)
  if autoattack is None:
    clean = robust = footnote = None
    section["autoattack"] = {
        "engine": None, "n": None, "eps": float(eps),
        "how_to": f"No AutoAttack result in the workdir: run `{AUTOATTACK_HINT}` (or "
                  f"`--engine jax`), then export again with --robustbench to fill clean_acc, "
                  f"reported and autoattack_acc."}
  else:
    r = autoattack["result"]
    if not math.isclose(float(r["eps"]), float(eps), rel_tol=1e-6):
      notes.append(f"AutoAttack's eps {float(r['eps']):.6g} differs from the training eps "
                   f"{float(eps):.6g}; eps and the accuracies here are AutoAttack's.")
    eps, n = float(r["eps"]), int(r["n"])
    clean, robust = format_acc(r["clean_acc"]), format_acc(r["robust_acc"])
    if test_subset:
      points = f"n={n} points of a random {test_subset}-point subset of the {dataset} test set"
    elif num_test and n >= num_test:
      points = f"the whole {dataset} test set (n={n})"
    else:
      points = f"n={n} of the {num_test or 'all'} {dataset} test points"
    footnote = (f"AutoAttack ({_attacks_text(r)}) was run by sovr_jax "
                f"({AUTOATTACK_ENGINES.get(autoattack['engine'], autoattack['engine'])}) on "
                f"{points}.")
    if data_source == "image_folder":
      footnote += (f" The {dataset} images were read from an image folder (e.g. a JPEG copy), "
                   f"whose pixels, and so the accuracies, can differ from the original "
                   f"{dataset}'s.")
    section["autoattack"] = {
        "engine": autoattack["engine"], "path": autoattack["path"], "n": n, "eps": eps,
        "norm": r["norm"], "version": r.get("version", "standard"), "attacks": r.get("attacks"),
        "clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"], "seed": r.get("seed"),
        "created": r.get("created")}
    if num_test and n < num_test:
      notes.append(f"AutoAttack ran on {n} of the {num_test} test points; RobustBench's "
                   f"leaderboards use 10000 (--n 10000).")
  if dataset not in ("cifar10", "cifar100"):
    notes.append(f"RobustBench has no {dataset!r} leaderboard for this architecture (it has "
                 f"cifar10, cifar100 and imagenet).")
  section["notes"] = notes
  section.update(extra or {})
  info = {
      "link": None,
      "name": None,
      "authors": None,
      "additional_data": False,
      "number_forward_passes": 1,
      "dataset": dataset,
      "venue": None,
      "architecture": arch.title,
      "eps": format_eps(eps, tm),
      "clean_acc": clean,
      "reported": robust,
      "autoattack_acc": robust,
      "footnote": footnote,
      "sovr_jax": section,
  }
  return info


# --------------------------------------------------------------------------------------------
# Writing and loading.
# --------------------------------------------------------------------------------------------


def compare(model: nn.Module, reference: nn.Module, images: np.ndarray) -> dict[str, Any]:
  """Logits of ``model`` vs ``reference`` on uint8 (or [0, 1] float) NHWC ``images``: max
  relative difference (max |diff| / max |reference logit|) and label agreement."""
  x = np.asarray(images)
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    a, b = model(xt).numpy(), reference(xt).numpy()
  diff = float(np.abs(a - b).max())
  return {"n": int(len(x)), "max_abs_logit_diff": diff,
          "max_rel_logit_diff": diff / max(float(np.abs(b).max()), 1e-12),
          "label_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))), "rtol": CHECK_RTOL}


def write_export(out_dir: str, *, architecture: str, state_dict: Mapping[str, torch.Tensor],
                 mean: Sequence[float], std: Sequence[float], dataset: str, norm: str,
                 eps: float, width: float = 1.0, input_shape: Sequence[int] = INPUT_SHAPE,
                 workdir: str | None = None, num_test: int | None = None,
                 test_subset: int = 0, source: Mapping[str, Any] | None = None,
                 reference: nn.Module | None = None,
                 images: np.ndarray | None = None) -> dict[str, Any]:
  """Writes ``out_dir/robustbench.pt`` and ``out_dir/robustbench.json`` (each atomically).

  Args:
    out_dir: output directory (created if needed).
    architecture, width, input_shape: our model's; see :func:`check_supported`.
    state_dict: our twin's state dict (``sovr_jax.export.to_state_dict``).
    mean, std: the normalisation the model was trained with (into the JSON).
    dataset, norm, eps: the run's data set, ``attack.norm`` and ``attack.eps``.
    workdir: the training run, searched for autoattack.json / autoattack_jax.json.
    num_test, test_subset: the test split's size and ``data.num_test`` (for the footnote).
    source: provenance recorded under "sovr_jax.source" (checkpoint, step, ...).
    reference, images: if given, the wrapped RobustBench model must predict like
      ``reference`` (our twin, normalising inside) on these NHWC images (max relative logit
      difference <= CHECK_RTOL), before anything is written.

  Returns:
    {"weights", "info": the two paths, "robustbench_class", "autoattack_acc", "export_check"}.

  Raises:
    RobustBenchUnsupportedError, RobustBenchNotInstalledError, ValueError: as
      :func:`to_robustbench_state_dict`.
    RuntimeError: the RobustBench model disagrees with ``reference`` (a bug; please report it).
  """
  rb_sd = to_robustbench_state_dict(architecture, state_dict, width=width,
                                    input_shape=input_shape)
  arch = ARCHITECTURES[architecture]
  num_classes = int(rb_sd[f"{arch.head}.weight"].shape[0])
  spec = class_spec(architecture, num_classes)
  check = None
  if reference is not None and images is not None and len(images):
    net = build_from_spec(spec["module"], spec["class"], spec["kwargs"])
    net.load_state_dict(rb_sd, strict=True)
    model = NormalizedModel(net, mean, std).eval()
    check = compare(model, reference.eval(), images)
    if not check["max_rel_logit_diff"] <= CHECK_RTOL:
      raise RuntimeError(
          f"RobustBench's {arch.class_name} with the exported weights disagrees with the "
          f"sovr_jax twin on {check['n']} images (max relative logit difference "
          f"{check['max_rel_logit_diff']:.3g} > {CHECK_RTOL}); nothing was written. This is a "
          f"bug in sovr_jax.robustbench_export (or a robustbench other than "
          f"{ROBUSTBENCH_VERSION}); please report it.")

  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, WEIGHTS_FILE)
  tmp = f"{weights}.tmp-{os.getpid()}"
  torch.save(rb_sd, tmp)
  os.replace(tmp, weights)
  aa, notes = find_autoattack_result(workdir, norm=norm, step=(source or {}).get("step"),
                                     dataset=dataset)
  extra = {
      "architecture": architecture,
      "robustbench_class": spec,
      "mean": [float(m) for m in mean],
      "std": [float(s) for s in std],
      "input_shape": list(INPUT_SHAPE),
      "layout": "NCHW",
      "input_range": [0.0, 1.0],
      "weights": WEIGHTS_FILE,
      "weights_sha256": jsonio.sha256(weights),
      "source": dict(source or {}, workdir=workdir),
      "export_check": check,
      "versions": {"robustbench": robustbench_version(), "torch": torch.__version__,
                   "sovr_jax": sovr_jax.__version__, "python": platform.python_version()},
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  info = model_info(architecture=architecture, dataset=dataset, norm=norm, eps=eps,
                    autoattack=aa, num_test=num_test, test_subset=test_subset, notes=notes,
                    extra=extra, data_source=(source or {}).get("data_source"))
  path = os.path.join(out_dir, INFO_FILE)
  jsonio.write_json_atomic(path, info)
  return {"weights": weights, "info": path, "robustbench_class": spec,
          "autoattack_acc": info["autoattack_acc"], "clean_acc": info["clean_acc"],
          "autoattack_engine": info["sovr_jax"]["autoattack"]["engine"],
          "export_check": check}


def export_run(run: Any, state_dict: Mapping[str, torch.Tensor], out_dir: str, *,
               reference: nn.Module | None = None,
               images: np.ndarray | None = None) -> dict[str, Any]:
  """The RobustBench export of a restored training run (``sovr_jax.rundir.RestoredRun``), for
  ``sovr_jax.export.export_workdir``.

  Returns:
    :func:`write_export`'s summary with "written": True, or {"written": False, "reason": ...}
    for a model that RobustBench has no class for (small_cnn, width != 1, not 3x32x32), in
    which case nothing is written.

  Raises:
    RobustBenchNotInstalledError: robustbench is not installed (the message has the fix).
    RuntimeError: see :func:`write_export`.
  """
  cfg, ds = run.cfg, run.dataset
  h, w, c = ds.image_shape
  try:
    check_supported(cfg.model.name, width=cfg.model.width, input_shape=(c, h, w))
  except RobustBenchUnsupportedError as e:
    return {"written": False, "reason": str(e)}
  source = {"checkpoint": run.checkpoint, "path": run.checkpoint_path, "step": int(run.step),
            "method": cfg.method, "data_source": cfg.data.source}
  out = write_export(
      out_dir, architecture=cfg.model.name, state_dict=state_dict, mean=ds.mean, std=ds.std,
      dataset=ds.name, norm=cfg.attack.norm, eps=float(cfg.attack.eps),
      width=cfg.model.width, input_shape=(c, h, w), workdir=run.workdir,
      num_test=int(ds.num_test), test_subset=int(cfg.data.num_test or 0), source=source,
      reference=reference, images=images)
  return {"written": True, **out}


def summary_line(result: Mapping[str, Any]) -> str:
  """One line about :func:`export_run`'s result, for the export command."""
  if not result.get("written"):
    return f"RobustBench export not written: {result['reason']}"
  if result.get("autoattack_engine"):
    acc = (f"clean_acc {result['clean_acc']}, autoattack_acc {result['autoattack_acc']} "
           f"({result['autoattack_engine']} AutoAttack engine)")
  else:
    acc = f"no AutoAttack result (clean_acc etc. are null; run {AUTOATTACK_HINT})"
  return (f"RobustBench export: {result['weights']} + {result['info']} "
          f"({result['robustbench_class']['class']}; {acc}).")


def read_info(path: str) -> tuple[str, dict[str, Any]]:
  """(robustbench.json path, its contents) for an export directory or the JSON's path."""
  json_path, info = jsonio.read_json_in(
      path, INFO_FILE, "Export a training run with: python -m sovr_jax.export --workdir W "
      "--out DIR --robustbench")
  section = info.get("sovr_jax") if isinstance(info, dict) else None
  if not isinstance(section, dict) or section.get("format") != FORMAT:
    raise InvalidFileError(f"{json_path} is not a sovr_jax RobustBench export (no 'sovr_jax' "
                           f"section with format {FORMAT!r}); re-export with python -m "
                           f"sovr_jax.export --robustbench.")
  return os.path.abspath(json_path), info


def load_robustbench(path: str, *, map_location: str | torch.device = "cpu",
                     check_hash: bool = True) -> NormalizedModel:
  """RobustBench's class with the exported weights (``load_state_dict(strict=True)``), wrapped
  in :class:`NormalizedModel` with the recorded mean/std, in ``eval()`` mode. No JAX.

  Args:
    path: the export directory or its robustbench.json.
    map_location: device of the returned model.
    check_hash: verify robustbench.pt's SHA-256 against robustbench.json.

  Raises:
    FileNotFoundError: missing robustbench.json / robustbench.pt.
    ValueError: not such an export, or a hash mismatch.
    RobustBenchNotInstalledError: robustbench is not installed.
    RuntimeError: (from torch) the weights do not fit the class.
  """
  json_path, info = read_info(path)
  section = info["sovr_jax"]
  weights = os.path.join(os.path.dirname(json_path), section.get("weights", WEIGHTS_FILE))
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights} (named by {json_path}) not found; copy it next to "
                            f"{INFO_FILE} or re-export.")
  if check_hash and section.get("weights_sha256") and jsonio.sha256(weights) != section[
      "weights_sha256"]:
    raise ValueError(f"{weights} does not match the SHA-256 in {json_path}: the weights and the "
                     f"JSON come from different exports. Re-export, or pass check_hash=False.")
  spec = section["robustbench_class"]
  net = build_from_spec(spec["module"], spec["class"], spec["kwargs"])
  net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
  model = NormalizedModel(net, section["mean"], section["std"], section["input_shape"])
  return model.to(map_location).eval()


__all__ = [
    "ARCHITECTURES",
    "INSTALL_HINT",
    "NormalizedModel",
    "RobustBenchNotInstalledError",
    "RobustBenchUnsupportedError",
    "UNSUPPORTED",
    "build_network",
    "check_supported",
    "export_run",
    "find_autoattack_result",
    "key_mapping",
    "load_robustbench",
    "model_info",
    "robustbench_dir",
    "summary_line",
    "to_robustbench_state_dict",
    "write_export",
]
