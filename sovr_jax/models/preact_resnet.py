"""PreActResNet-18 as used by fast adversarial training (Wong et al., 2020) and robust overfitting
(Rice et al., 2020): github.com/locuslab/fast_adversarial and github.com/locuslab/robust_overfitting
(``preactresnet.py``), itself after He et al., "Identity Mappings in Deep Residual Networks" (2016).

Unlike kuangliu's PreActResNet, these references apply a final BatchNorm + ReLU before pooling.
With 10 classes and width 1.0 the model has 11,172,170 parameters.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import (Dtype, batch_norm, check_logits, conv, conv_bn, dense, global_avg_pool,
                     normalize, scaled)


class PreActBlock(nn.Module):
  """Pre-activation basic block (PyTorch reference ``PreActBlock``, expansion 1).

  out = relu(bn1(x)); shortcut = conv1x1(out) if the shape changes else x;
  out = conv2(relu(bn2(conv1(out)))) + shortcut.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, 0, dtype=self.dtype, name="shortcut")(out)
    else:
      shortcut = x
    out = conv_bn(self, out, self.features, 3, self.stride, 1, train=train, fold_bn=fold_bn,
                  dtype=self.dtype, conv_name="conv1", bn_name="bn2")
    out = nn.relu(out)
    out = conv(self.features, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """PreActResNet-18 for 32x32 inputs (Rice et al. 2020 / Wong et al. 2020 variant).

  conv1 3x3/64 -> 4 stages x 2 PreActBlocks (64, 128, 256, 512; strides 1, 2, 2, 2)
  -> BN -> ReLU -> global average pool -> linear.

  Attributes:
    num_classes: number of output logits.
    width: channel multiplier (channels = max(1, round(base * width))).
    dtype: compute dtype; parameters stay float32.
    mean, std: per-channel (or broadcast) normalisation applied to [0, 1] inputs.
  """

  num_classes: int = 10
  width: float = 1.0
  dtype: Dtype = jnp.float32
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    """Logits [N, num_classes]; ``fold_bn`` (eval mode) folds each block's bn2 into its conv1
    (``common.conv_bn``: the same function up to rounding)."""
    batch = x.shape[0]
    out = normalize(x, self.mean, self.std, self.dtype)
    out = conv(scaled(64, self.width), 3, 1, 1, dtype=self.dtype, name="conv1")(out)
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        out = PreActBlock(
          features=scaled(base, self.width),
          stride=stride if i == 0 else 1,
          dtype=self.dtype,
          name=f"layer{stage}_{i}",
        )(out, train, fold_bn)
    out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(out))
    out = global_avg_pool(out)
    logits = dense(self.num_classes, dtype=self.dtype, name="linear")(out)
    return check_logits(logits, batch, self.num_classes)
