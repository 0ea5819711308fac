"""Config validation: every key known, every name valid, every number finite and in range.

A config is an ``ml_collections.ConfigDict`` built by a file in configs/ that starts from
``sovr_jax.default_config.get_config`` (the schema). ``validate`` compares it against that
schema and raises :class:`sovr_jax.errors.ConfigError` naming the bad field, its value and
what is valid, before anything is loaded or compiled.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any

import ml_collections

from sovr_jax import data, default_config, methods
from sovr_jax.attacks import INITS, NORMS
from sovr_jax.errors import ConfigError

CHOICES = {
    "precision": ("float32", "bfloat16"),
    "data.source": data.SOURCES,
    "model.name": ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10", "small_cnn"),
    "attack.norm": NORMS,
    "attack.init": ("auto",) + INITS,
    "attack.bn_mode": ("eval", "batch"),
    "sovr.margin_on": ("adv", "clean"),
    "sovr.ovr_reduce": ("sum", "mean"),
    "train.schedule": ("piecewise", "cosine", "constant"),
}
#: Models whose BatchNorms the attack can fold into convolutions (``attack.fold_bn``).
FOLD_BN_MODELS = ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10")

#: The valid interval of every numeric field ("[" / "]" closed, "(" / ")" open). Values must
#: also be finite. Fields whose range depends on others (epochs) are checked in ``validate``.
RANGES = {
    "seed": "[0, 2147483647]",
    "data.val_size": "[0, inf)",
    "data.num_train": "[0, inf)",
    "data.num_test": "[0, inf)",
    "data.crop_pad": "[0, 16]",
    "model.width": "(0, 16]",
    "attack.eps": "[0, inf)",
    "attack.step_size": "[0, inf)",
    "attack.num_steps": "[0, 10000]",
    "sovr.ovr_fraction": "[0, 1]",
    "trades.beta": "[0, 100]",
    "mart.beta": "[-1, 100]",
    "mail.bias": "[-100, 100]",
    "mail.slope": "(0, 100]",
    "mail.beta": "[0, 100]",
    "mail.start_epoch": "[-1, inf)",
    "gairat.lam": "[-100, 100]",
    "gairat.start_epoch": "[-1, inf)",
    "train.batch_size": "[1, inf)",
    "train.epochs": "[1, 100000]",
    "train.lr": "(0, 10]",
    "train.momentum": "[0, 1)",
    "train.weight_decay": "[0, 1)",
    "train.lr_decay": "(0, 1]",
    "train.warmup_epochs": "[0, inf)",
    "train.log_every_steps": "[1, inf)",
    "train.steps_per_dispatch": "[1, 1000]",
    "eval.every_epochs": "[0, inf)",
    "eval.batch_size": "[1, inf)",
    "eval.pgd_steps": "[1, 10000]",
    "eval.step_size": "[0, inf)",
    "eval.cw_steps": "[0, 10000]",
    "eval.margin_examples": "[1, inf)",
    "checkpoint.every_epochs": "[1, inf)",
    "checkpoint.keep": "[1, 1000]",
}


def default_schema() -> ml_collections.ConfigDict:
  return default_config.get_config()


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """{"section.field": value} of every leaf of a (nested) ConfigDict or dict."""
  out = {}
  for key in cfg.keys():
    value = cfg[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def unknown_field_message(path: str, schema: Any | None = None) -> str:
  """'Unknown config field ...' with the closest name and the valid names of its section."""
  schema = default_schema() if schema is None else schema
  *sections, key = path.split(".")
  node, prefix = schema, ""
  for s in sections:
    if s not in node or not isinstance(node[s], ml_collections.ConfigDict):
      return unknown_field_message(prefix + s, schema)
    node, prefix = node[s], f"{prefix}{s}."
  close = difflib.get_close_matches(key, list(node.keys()), n=1)
  hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
  valid = ", ".join(prefix + k for k in sorted(node.keys()))
  return f"Unknown config field {path!r}.{hint} Valid fields here: {valid}."


def _check_keys(cfg: Any, schema: Any, prefix: str = "") -> None:
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(unknown_field_message(path))
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"Config field {path!r} must be a section, got {cfg[key]!r}.")
      _check_keys(cfg[key], schema[key], path + ".")


def _get(cfg: Any, path: str) -> Any:
  for part in path.split("."):
    cfg = cfg[part]
  return cfg


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"Config field {field!r}: {message}")


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_interval(value: float, interval: str) -> bool:
  lo_s, hi_s = interval[1:-1].split(",")
  lo, hi = float(lo_s), float(hi_s)
  above = value > lo if interval[0] == "(" else value >= lo
  below = value < hi if interval[-1] == ")" else value <= hi
  return above and below


def _check_number(field: str, value: Any, interval: str, integer: bool) -> None:
  kind = "an integer" if integer else "a number"
  _require(_is_number(value) and (not integer or float(value).is_integer()), field,
           f"must be {kind} in {interval}, got {value!r}.")
  _require(math.isfinite(value), field, f"must be finite, got {value!r}.")
  _require(_in_interval(float(value), interval), field,
           f"must lie in {interval}, got {value!r}.")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of ``cfg``."""
  schema = default_schema()
  _check_keys(cfg, schema)
  if cfg.method not in methods.METHODS:
    raise ConfigError(f"Config field 'method': unknown method {cfg.method!r}; valid methods: "
                      f"{sorted(methods.METHODS)}.")
  for path, valid in CHOICES.items():
    value = _get(cfg, path)
    _require(value in valid, path, f"got {value!r}; valid: {list(valid)}.")
  defaults = leaves(schema)
  for path, interval in RANGES.items():
    _check_number(path, _get(cfg, path), interval, isinstance(defaults[path], int))
  names = {"tfds": data.TFDS_NAMES, "synthetic": data.TFDS_NAMES,
           "embedded": data.EMBEDDED_NAMES}.get(cfg.data.source)
  _require(names is None or cfg.data.name in names, "data.name",
           f"got {cfg.data.name!r}; valid for data.source={cfg.data.source!r}: "
           f"{list(names or ())}.")
  _require(cfg.data.source != "image_folder" or cfg.data.path, "data.path",
           "data.source='image_folder' needs data.path (a folder or .tar.gz of "
           "<split>/<class>/*.jpg).")
  a, t = cfg.attack, cfg.train
  _require(not (a.norm == "linf" and a.eps > 1), "attack.eps",
           f"{a.eps:g} is larger than the [0, 1] image range; did you mean "
           f"{a.eps:g}/255 = {a.eps / 255:.6g}?")
  _require(not a.fold_bn or cfg.model.name in FOLD_BN_MODELS, "attack.fold_bn",
           f"folding BatchNorm is built for {list(FOLD_BN_MODELS)}, not "
           f"model.name={cfg.model.name!r}; set attack.fold_bn=False.")
  _require(not a.fold_bn or a.bn_mode == "eval", "attack.fold_bn",
           "only eval-mode BatchNorm (running statistics) can be folded; it needs "
           "attack.bn_mode='eval'.")
  _require(cfg.method != "gairat" or a.num_steps >= 2, "attack.num_steps",
           "GAIRAT needs at least 2 attack steps.")
  _require(t.warmup_epochs < t.epochs, "train.warmup_epochs",
           f"the warm-up ({t.warmup_epochs} epochs) must be shorter than the run "
           f"(train.epochs={t.epochs}).")
  bounds = list(t.lr_boundaries)
  for b in bounds:
    _check_number("train.lr_boundaries", b, "(0, inf)", False)
  _require(bounds == sorted(set(bounds)), "train.lr_boundaries",
           f"must be strictly increasing epochs, got {tuple(bounds)}.")
  # A boundary at the end itself (b = epochs) is allowed: quick runs shrink the epochs to
  # the first boundary (configs/tiny.py with train.epochs=1), and it acts as no decay.
  _require(not bounds or bounds[-1] <= t.epochs, "train.lr_boundaries",
           f"{tuple(bounds)} has a boundary past the last epoch (train.epochs={t.epochs}), "
           f"where it would never apply; lower it or raise train.epochs.")
  _require(not bounds or t.schedule != "piecewise" or bounds[0] > t.warmup_epochs,
           "train.lr_boundaries",
           f"the first decay (epoch {bounds[0] if bounds else None}) falls inside the warm-up "
           f"(train.warmup_epochs={t.warmup_epochs}); start the decays after the warm-up.")
  _require(cfg.mart.beta == -1 or cfg.mart.beta >= 0, "mart.beta",
           f"got {cfg.mart.beta!r}; use a weight in [0, 100], or -1 for the authors' value "
           f"for the model (6 for WRN, 5 otherwise).")
  for section in ("mail", "gairat"):
    start = cfg[section].start_epoch
    _require(start < t.epochs, f"{section}.start_epoch",
             f"{start} is at or past the last epoch (train.epochs={t.epochs}), so the "
             f"reweighting would never start; use -1 (the authors' fraction of the run) or an "
             f"earlier epoch.")


def from_dict(config: dict[str, Any]) -> ml_collections.ConfigDict:
  """A run's stored config (config.json) on top of today's defaults, so that a field added
  since the run was trained has its default (which keeps the old behaviour)."""
  cfg = default_schema()

  def update(node, values, prefix=""):
    for key, value in values.items():
      if isinstance(value, dict) and key in node and isinstance(node[key],
                                                                 ml_collections.ConfigDict):
        update(node[key], value, f"{prefix}{key}.")
      else:
        with node.unlocked():
          node[key] = tuple(value) if isinstance(value, list) else value
  update(cfg, config)
  return cfg


def model_signature(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that fix the shapes of a checkpoint."""
  return {"model.name": cfg.model.name, "model.width": float(cfg.model.width),
          "data.name": cfg.data.name, "method": cfg.method}
