"""Config validation: every key known, every name valid, every value in range.

A config is an ``ml_collections.ConfigDict`` built by a file in configs/ that
starts from ``configs/default.py``. ``validate`` compares it against the
default's schema and raises ``ValueError`` naming the bad field and listing
the valid choices, before anything is loaded or compiled.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from sovr_jax import data, methods
from sovr_jax.attacks import INITS, NORMS

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


def _default_schema() -> ml_collections.ConfigDict:
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


def _check_keys(cfg: Any, schema: Any, prefix: str = "") -> None:
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
      raise ValueError(
          f"Unknown config field {path!r}.{hint} Valid fields here: "
          f"{sorted(schema.keys())}.")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ValueError(f"Config field {path!r} must be a section, got {cfg[key]!r}.")
      _check_keys(cfg[key], schema[key], path + ".")


def _get(cfg: Any, path: str) -> Any:
  for part in path.split("."):
    cfg = cfg[part]
  return cfg


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ValueError(f"Config field {field!r}: {message}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of ``cfg``."""
  _check_keys(cfg, _default_schema())
  if cfg.method not in methods.METHODS:
    raise ValueError(f"Config field 'method': unknown method {cfg.method!r}; valid methods: "
                     f"{sorted(methods.METHODS)}.")
  for path, valid in CHOICES.items():
    value = _get(cfg, path)
    _require(value in valid, path, f"got {value!r}; valid: {list(valid)}.")
  names = {"tfds": data.TFDS_NAMES, "synthetic": data.TFDS_NAMES,
           "embedded": data.EMBEDDED_NAMES}.get(cfg.data.source)
  _require(names is None or cfg.data.name in names, "data.name",
           f"got {cfg.data.name!r}; valid for data.source={cfg.data.source!r}: {list(names or ())}.")
  _require(cfg.data.source != "image_folder" or cfg.data.path, "data.path",
           "data.source='image_folder' needs data.path (a folder or .tar.gz of "
           "<split>/<class>/*.jpg).")
  a, t, e = cfg.attack, cfg.train, cfg.eval
  _require(a.eps >= 0, "attack.eps", f"must be >= 0, got {a.eps}.")
  _require(not (a.norm == "linf" and a.eps > 1), "attack.eps",
           f"{a.eps:g} is larger than the [0, 1] image range; did you mean "
           f"{a.eps:g}/255 = {a.eps / 255:.6g}?")
  _require(a.step_size >= 0, "attack.step_size", f"must be >= 0, got {a.step_size}.")
  _require(a.num_steps >= 0, "attack.num_steps", f"must be >= 0, got {a.num_steps}.")
  _require(0.0 <= cfg.sovr.ovr_fraction <= 1.0, "sovr.ovr_fraction",
           f"must lie in [0, 1], got {cfg.sovr.ovr_fraction}.")
  _require(cfg.method != "gairat" or a.num_steps >= 2, "attack.num_steps",
           "GAIRAT needs at least 2 attack steps.")
  _require(cfg.model.width > 0, "model.width", f"must be > 0, got {cfg.model.width}.")
  _require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}.")
  _require(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}.")
  _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}.")
  _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}.")
  _require(list(t.lr_boundaries) == sorted(t.lr_boundaries), "train.lr_boundaries",
           f"must be increasing epochs, got {t.lr_boundaries}.")
  _require(t.log_every_steps > 0, "train.log_every_steps", "must be > 0.")
  _require(t.steps_per_dispatch >= 1, "train.steps_per_dispatch", "must be >= 1.")
  _require(e.every_epochs >= 0, "eval.every_epochs", "must be >= 0 (0 = never).")
  _require(e.batch_size > 0, "eval.batch_size", "must be > 0.")
  _require(cfg.checkpoint.every_epochs > 0, "checkpoint.every_epochs", "must be > 0.")
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1.")
  _require(cfg.data.val_size >= 0, "data.val_size", "must be >= 0.")
  _require(cfg.data.crop_pad >= 0, "data.crop_pad", "must be >= 0.")
  for beta_field in ("trades.beta", "mart.beta", "mail.beta"):
    _require(_get(cfg, beta_field) >= 0, beta_field, "must be >= 0.")


def model_signature(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that fix the shapes of a checkpoint (checked on resume)."""
  return {"model.name": cfg.model.name, "model.width": float(cfg.model.width),
          "data.name": cfg.data.name, "method": cfg.method}
