"""WideResNet (Zagoruyko & Komodakis, "Wide Residual Networks", 2016) in the form used by TRADES
(github.com/yaodongyu/TRADES ``models/wideresnet.py``), which follows xternalz/WideResNet-pytorch.

TRADES's file also builds an extra ``sub_block1`` that is never used in ``forward``; it only inflates
the PyTorch parameter count (WRN-34-10: 48,262,586 with it). It is omitted here, matching
xternalz's model: with 10 classes, WRN-34-10 has 46,160,474 parameters and WRN-28-10 36,479,194.
Dropout (rate 0 in the adversarial-training references) is omitted.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import (Dtype, batch_norm, check_logits, conv, conv_bn, dense, global_avg_pool,
                     normalize, scaled)


class WideBasicBlock(nn.Module):
  """xternalz/TRADES ``BasicBlock`` (pre-activation).

  If in == out: out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + x.
  Otherwise:    a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + convShortcut(a).
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    equal_in_out = x.shape[-1] == self.features
    act = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
    out = nn.relu(conv_bn(self, act, self.features, 3, self.stride, 1, train=train,
                          fold_bn=fold_bn, dtype=self.dtype, conv_name="conv1", bn_name="bn2"))
    out = conv(self.features, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    if equal_in_out:
      shortcut = x
    else:
      shortcut = conv(self.features, 1, self.stride, 0, dtype=self.dtype, name="convShortcut")(act)
    return out + shortcut


class WideResNet(nn.Module):
  """WideResNet-``depth``-``widen_factor`` (TRADES / xternalz variant, no dropout).

  conv1 3x3/16 -> 3 groups of n = (depth - 4) / 6 blocks with 16k, 32k, 64k channels
  (strides 1, 2, 2) -> BN -> ReLU -> global average pool -> linear.

  Attributes:
    depth: network depth; (depth - 4) must be divisible by 6.
    widen_factor: the k in WRN-depth-k.
    num_classes: number of output logits.
    width: extra channel multiplier applied to every layer, stem included
      (channels = max(1, round(base * width))); for building tiny test models.
    dtype: compute dtype; parameters stay float32.
    mean, std: per-channel (or broadcast) normalisation applied to [0, 1] inputs.
  """

  depth: int = 34
  widen_factor: int = 10
  num_classes: int = 10
  width: float = 1.0
  dtype: Dtype = jnp.float32
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fold_bn: bool = False) -> jax.Array:
    """Logits [N, num_classes]; ``fold_bn`` (eval mode) folds each block's bn2 into its conv1
    (``common.conv_bn``: the same function up to rounding)."""
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1; got depth={self.depth}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    batch = x.shape[0]
    out = normalize(x, self.mean, self.std, self.dtype)
    out = conv(scaled(16, self.width), 3, 1, 1, dtype=self.dtype, name="conv1")(out)
    for group, (base, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
      for i in range(n):
        out = WideBasicBlock(
          features=scaled(base, self.width),
          stride=stride if i == 0 else 1,
          dtype=self.dtype,
          name=f"block{group}_{i}",
        )(out, train, fold_bn)
    out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
    out = global_avg_pool(out)
    logits = dense(self.num_classes, dtype=self.dtype, name="fc")(out)
    return check_logits(logits, batch, self.num_classes)


class WideResNet34_10(WideResNet):
  """WRN-34-10, the standard adversarial-training CIFAR model (46,160,474 params at 10 classes)."""

  depth: int = 34
  widen_factor: int = 10


class WideResNet28_10(WideResNet):
  """WRN-28-10 (36,479,194 params at 10 classes)."""

  depth: int = 28
  widen_factor: int = 10
