"""MNIST with TRADES's SmallCNN at eps 0.3 (step 0.01, 40 steps)."""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  c = default_config.get_config(method)
  c.data.name = "mnist"
  c.data.crop_pad = 0
  c.data.flip = False
  c.model.name = "small_cnn"
  c.attack.eps = 0.3
  c.attack.step_size = 0.01
  c.attack.num_steps = 40
  c.eval.step_size = 0.01
  c.eval.pgd_steps = 40
  c.train.lr = 0.01
  c.train.weight_decay = 0.0
  c.train.epochs = 100
  c.train.lr_boundaries = (55, 75, 90)
  return c
