"""SVHN (svhn_cropped): the common PGD-AT setting uses step 1/255 and lr 0.01."""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  c = default_config.get_config(method)
  c.data.name = "svhn_cropped"
  c.data.flip = False              # digits are not mirror-symmetric.
  c.attack.step_size = 1 / 255
  c.train.lr = 0.01
  c.train.epochs = 80
  c.train.lr_boundaries = (60, 70)
  return c
