"""A seconds-long config for tests and smoke runs: 256 MNIST-5k digits, a tiny CNN, PGD-3."""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  c = default_config.shrink(default_config.get_config(method))
  c.data.name = "mnist5k"
  c.data.source = "embedded"
  c.data.crop_pad = 1
  c.data.flip = False
  c.model.name = "small_cnn"
  c.model.width = 0.25
  c.attack.eps = 0.1
  c.attack.step_size = 0.04
  return c
