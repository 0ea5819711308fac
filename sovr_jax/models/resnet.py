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

from .common import Dtype, check_logits, conv_bn, dense, global_avg_pool, normalize, scaled


class BasicBlock(nn.Module):
  """Post-activation basic block (kuangliu ``BasicBlock``, expansion 1).

  out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), where shortcut is
  conv1x1 + BN when the shape changes and the identity otherwise.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    kw = dict(train=train, fold_bn=fold_bn, dtype=self.dtype)
    out = nn.relu(conv_bn(self, x, self.features, 3, self.stride, 1, conv_name="conv1",
                          bn_name="bn1", **kw))
    out = conv_bn(self, out, self.features, 3, 1, 1, conv_name="conv2", bn_name="bn2", **kw)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv_bn(self, x, self.features, 1, self.stride, 0, conv_name="shortcut_conv",
                         bn_name="shortcut_bn", **kw)
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
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    """Logits [N, num_classes]; ``fold_bn`` (eval mode) folds every BatchNorm into the
    convolution before it (``common.conv_bn``: the same function up to rounding)."""
    batch = x.shape[0]
    out = normalize(x, self.mean, self.std, self.dtype)
    out = nn.relu(conv_bn(self, out, scaled(64, self.width), 3, 1, 1, train=train,
                          fold_bn=fold_bn, dtype=self.dtype, conv_name="conv1", bn_name="bn1"))
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        out = BasicBlock(
          features=scaled(base, self.width),
          stride=stride if i == 0 else 1,
          dtype=self.dtype,
          name=f"layer{stage}_{i}",
        )(out, train, fold_bn)
    out = global_avg_pool(out)
    logits = dense(self.num_classes, dtype=self.dtype, name="linear")(out)
    return check_logits(logits, batch, self.num_classes)
