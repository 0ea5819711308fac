"""Config validation: every bad value of every field is refused with a message naming it."""

import math
import numbers

import pytest

from configs import tiny
from sovr_jax import config_lib
from sovr_jax.errors import ConfigError

NAN, INF = float("nan"), float("inf")

# (field, bad value, words the message must contain). Every numeric field of the schema has
# a non-finite case (where its type allows one) and an out-of-range case.
BAD_VALUES = [
    ("seed", -1, "[0, 2147483647]"),
    ("data.val_size", -1, "[0, inf)"),
    ("data.num_train", -5, "[0, inf)"),
    ("data.num_test", -5, "[0, inf)"),
    ("data.crop_pad", 40, "[0, 16]"),
    ("model.width", 0.0, "(0, 16]"),
    ("model.width", NAN, "finite"),
    ("model.width", INF, "finite"),
    ("attack.eps", -0.1, "[0, inf)"),
    ("attack.eps", NAN, "finite"),
    ("attack.eps", 8.0, "8/255"),
    ("attack.step_size", -0.01, "[0, inf)"),
    ("attack.step_size", INF, "finite"),
    ("attack.num_steps", -1, "[0, 10000]"),
    ("sovr.ovr_fraction", 1.5, "[0, 1]"),
    ("sovr.ovr_fraction", NAN, "finite"),
    ("trades.beta", -1.0, "[0, 100]"),
    ("trades.beta", INF, "finite"),
    ("mart.beta", -0.5, "or -1 for the authors' value"),
    ("mart.beta", -2.0, "[-1, 100]"),
    ("mart.beta", NAN, "finite"),
    ("mail.bias", NAN, "finite"),
    ("mail.bias", 1e6, "[-100, 100]"),
    ("mail.slope", 0.0, "(0, 100]"),
    ("mail.slope", INF, "finite"),
    ("mail.beta", -2.0, "[0, 100]"),
    ("mail.beta", NAN, "finite"),
    ("mail.start_epoch", -2, "[-1, inf)"),
    ("mail.start_epoch", 2, "never start"),
    ("gairat.lam", NAN, "finite"),
    ("gairat.lam", -1e3, "[-100, 100]"),
    ("gairat.start_epoch", 5, "never start"),
    ("train.batch_size", 0, "[1, inf)"),
    ("train.epochs", 0, "[1, 100000]"),
    ("train.lr", 0.0, "(0, 10]"),
    ("train.lr", 1e9, "(0, 10]"),
    ("train.lr", INF, "finite"),
    ("train.lr", NAN, "finite"),
    ("train.momentum", 1.0, "[0, 1)"),
    ("train.momentum", NAN, "finite"),
    ("train.weight_decay", -1e-4, "[0, 1)"),
    ("train.weight_decay", INF, "finite"),
    ("train.lr_decay", 0.0, "(0, 1]"),
    ("train.lr_decay", 2.0, "(0, 1]"),
    ("train.lr_decay", NAN, "finite"),
    ("train.warmup_epochs", -1, "[0, inf)"),
    ("train.warmup_epochs", 2, "shorter than the run"),
    ("train.lr_boundaries", (3,), "past the last epoch"),
    ("train.lr_boundaries", (1, 1), "strictly increasing"),
    ("train.lr_boundaries", (0.0,), "(0, inf)"),
    ("train.lr_boundaries", (NAN,), "finite"),
    ("train.log_every_steps", 0, "[1, inf)"),
    ("train.steps_per_dispatch", 0, "[1, 1000]"),
    ("eval.every_epochs", -1, "[0, inf)"),
    ("eval.batch_size", 0, "[1, inf)"),
    ("eval.pgd_steps", 0, "[1, 10000]"),
    ("eval.step_size", -0.1, "[0, inf)"),
    ("eval.step_size", NAN, "finite"),
    ("eval.cw_steps", -1, "[0, 10000]"),
    ("eval.margin_examples", 0, "[1, inf)"),
    ("checkpoint.every_epochs", 0, "[1, inf)"),
    ("checkpoint.keep", 0, "[1, 1000]"),
]


def _set(cfg, field, value):
  *sections, key = field.split(".")
  node = cfg
  for s in sections:
    node = node[s]
  node[key] = value


@pytest.mark.parametrize("field,value,words", BAD_VALUES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(field, value, words):
  cfg = tiny.get_config("sovr")  # 2 epochs, lr boundary at 1
  _set(cfg, field, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert repr(field) in str(e.value) and words in str(e.value), str(e.value)


def test_every_numeric_field_has_a_range_and_bad_values_above():
  fields = config_lib.leaves(config_lib.default_schema())
  numeric = {k for k, v in fields.items()
             if isinstance(v, numbers.Real) and not isinstance(v, bool)}
  assert numeric == set(config_lib.RANGES)
  tried = {f for f, _, _ in BAD_VALUES}
  assert numeric <= tried, sorted(numeric - tried)
  floats = {k for k in numeric if isinstance(fields[k], float)}
  non_finite = {f for f, v, _ in BAD_VALUES if isinstance(v, float) and not math.isfinite(v)}
  assert floats <= non_finite, sorted(floats - non_finite)


def test_unknown_fields_list_the_valid_ones():
  cfg = tiny.get_config()
  with cfg.unlocked():
    cfg.train.lr_boundary = (1,)
  with pytest.raises(ConfigError, match="Did you mean 'train.lr_boundaries'") as e:
    config_lib.validate(cfg)
  assert "train.lr_decay" in str(e.value) and "train.warmup_epochs" in str(e.value)
  assert "'trainx'" in config_lib.unknown_field_message("trainx.lr")
  assert "train" in config_lib.unknown_field_message("trainx.lr")


def test_names_are_checked():
  for field, value in (("method", "sovr2"), ("model.name", "resnet50"),
                       ("data.source", "web"), ("train.schedule", "linear")):
    cfg = tiny.get_config()
    _set(cfg, field, value)
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
      config_lib.validate(cfg)


@pytest.mark.parametrize("name", ["default", "cifar100", "svhn", "mnist", "quickstart", "tiny",
                                  "study"])
def test_every_config_file_validates(name):
  mod = __import__(f"configs.{name}", fromlist=["get_config"])
  for method in ("sovr", "trades", "gairat", "mail_at"):
    config_lib.validate(mod.get_config(method))


def test_fold_bn_needs_a_model_it_is_built_for_and_eval_mode_batchnorm():
  cfg = tiny.get_config("sovr")
  cfg.attack.fold_bn = True
  with pytest.raises(ConfigError, match="'attack.fold_bn'.*not model.name='small_cnn'"):
    config_lib.validate(cfg)
  cfg.model.name = "preact_resnet18"
  config_lib.validate(cfg)
  cfg.attack.bn_mode = "batch"
  with pytest.raises(ConfigError, match="'attack.fold_bn'.*bn_mode='eval'"):
    config_lib.validate(cfg)
