"""Flax Linen model zoo for adversarial training.

All models take images in [0, 1] (NHWC, any float dtype), normalise them internally with
``(x - mean) / std`` in float32, compute in ``dtype`` with float32 parameters, and return float32
logits ``[N, num_classes]`` from ``model.apply(variables, x, train=...)``. Models with BatchNorm keep
running statistics in the ``batch_stats`` collection (pass ``mutable=['batch_stats']`` with
``train=True``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from .common import count_params
from .preact_resnet import PreActBlock, PreActResNet18
from .resnet import BasicBlock, ResNet18
from .small_cnn import SmallCNN
from .wide_resnet import WideBasicBlock, WideResNet, WideResNet28_10, WideResNet34_10

MODELS: dict[str, type[nn.Module]] = {
  "preact_resnet18": PreActResNet18,
  "resnet18": ResNet18,
  "wrn34_10": WideResNet34_10,
  "wrn28_10": WideResNet28_10,
  "small_cnn": SmallCNN,
}


def get_model(
  name: str,
  *,
  num_classes: int,
  width: float = 1.0,
  dtype: Any = jnp.float32,
  mean: Sequence[float] = (0.0,),
  std: Sequence[float] = (1.0,),
) -> nn.Module:
  """Build a registered model by name.

  Args:
    name: one of ``MODELS`` ('preact_resnet18', 'resnet18', 'wrn34_10', 'wrn28_10', 'small_cnn').
    num_classes: number of output logits.
    width: channel multiplier (1.0 = the reference architecture).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    mean, std: normalisation statistics, one value (broadcast) or one per input channel.

  Raises:
    ValueError: if ``name`` is not registered.
  """
  if name not in MODELS:
    raise ValueError(
      f"get_model: unknown value {name!r} for argument 'name'; "
      f"valid names: {', '.join(sorted(MODELS))}"
    )
  return MODELS[name](
    num_classes=num_classes,
    width=width,
    dtype=dtype,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
  )


__all__ = [
  "MODELS",
  "get_model",
  "count_params",
  "PreActResNet18",
  "PreActBlock",
  "ResNet18",
  "BasicBlock",
  "WideResNet",
  "WideResNet34_10",
  "WideResNet28_10",
  "WideBasicBlock",
  "SmallCNN",
]
