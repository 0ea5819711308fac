"""CIFAR-100, otherwise the default recipe. ``configs/cifar100.py:trades`` picks a method."""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  c = default_config.get_config(method)
  c.data.name = "cifar100"
  return c
