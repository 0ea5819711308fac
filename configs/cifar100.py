"""CIFAR-100, otherwise the default recipe. ``configs/cifar100.py:trades`` picks a method."""

from configs import default


def get_config(method: str = "sovr"):
  c = default.get_config(method)
  c.data.name = "cifar100"
  return c
