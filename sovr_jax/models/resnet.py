"""ResNet-18 for CIFAR-sized inputs, after kuangliu's pytorch-cifar ``models/resnet.py``
(github.com/kuangliu/pytorch-cifar) and He et al., "Deep Residual Learning for Image Recognition"
(2016): 3x3 stem with stride 1 and no max-pool. With 10 classes and width 1.0 the model has
11,173,962 parameters.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import Dtype, batch_norm, check_logits, conv, dense, global_avg_pool, normalize, scaled


class BasicBlock(nn.Module):
  """Post-activation basic block (kuangliu ``BasicBlock``, expansion 1).

  out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), where shortcut is
  conv1x1 + BN when the shape changes and the identity otherwise.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = conv(self.features, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
    out = conv(self.features, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, 0, dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = batch_norm(train, dtype=self.dtype, name="shortcut_bn")(shortcut)
    else:
      shortcut = x
    return nn.relu(out + shortcut)


class ResNet18(nn.Module):
  """CIFAR ResNet-18 (kuangliu variant).

  conv1 3x3/64 -> BN -> ReLU -> 4 stages x 2 BasicBlocks (64, 128, 256, 512; strides 1, 2, 2, 2)
  -> global average pool -> linear.

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
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    batch = x.shape[0]
    out = normalize(x, self.mean, self.std, self.dtype)
    out = conv(scaled(64, self.width), 3, 1, 1, dtype=self.dtype, name="conv1")(out)
    out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        out = BasicBlock(
          features=scaled(base, self.width),
          stride=stride if i == 0 else 1,
          dtype=self.dtype,
          name=f"layer{stage}_{i}",
        )(out, train)
    out = global_avg_pool(out)
    logits = dense(self.num_classes, dtype=self.dtype, name="linear")(out)
    return check_logits(logits, batch, self.num_classes)
