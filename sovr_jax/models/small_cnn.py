"""SmallCNN for MNIST-sized inputs (28x28x1), after TRADES (github.com/yaodongyu/TRADES
``models/small_cnn.py``; Zhang et al., ICML 2019), which follows Carlini & Wagner's MNIST model.

Dropout (used by TRADES only in its classifier, rate 0.5) and BatchNorm are omitted. The flatten is
done in NCHW order so that a PyTorch twin's ``fc1.weight`` equals ``dense kernel.T``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import Dtype, check_logits, conv, dense, normalize, scaled


class SmallCNN(nn.Module):
  """conv3x3/32-ReLU, conv3x3/32-ReLU, maxpool 2, conv3x3/64-ReLU, conv3x3/64-ReLU, maxpool 2,
  flatten, dense 200-ReLU, dense 200-ReLU, dense num_classes. No padding, all layers with bias.

  Attributes:
    num_classes: number of output logits.
    width: multiplier for the conv channels and the 200 hidden units.
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
    del train  # no BatchNorm / dropout
    batch = x.shape[0]
    out = normalize(x, self.mean, self.std, self.dtype)
    c1, c2, hidden = scaled(32, self.width), scaled(64, self.width), scaled(200, self.width)
    out = nn.relu(conv(c1, 3, 1, 0, use_bias=True, dtype=self.dtype, name="conv1")(out))
    out = nn.relu(conv(c1, 3, 1, 0, use_bias=True, dtype=self.dtype, name="conv2")(out))
    out = nn.max_pool(out, (2, 2), strides=(2, 2), padding=((0, 0), (0, 0)))
    out = nn.relu(conv(c2, 3, 1, 0, use_bias=True, dtype=self.dtype, name="conv3")(out))
    out = nn.relu(conv(c2, 3, 1, 0, use_bias=True, dtype=self.dtype, name="conv4")(out))
    out = nn.max_pool(out, (2, 2), strides=(2, 2), padding=((0, 0), (0, 0)))
    out = jnp.transpose(out, (0, 3, 1, 2)).reshape(batch, -1)  # PyTorch's NCHW flatten order
    out = nn.relu(dense(hidden, dtype=self.dtype, name="fc1")(out))
    out = nn.relu(dense(hidden, dtype=self.dtype, name="fc2")(out))
    logits = dense(self.num_classes, dtype=self.dtype, name="fc3")(out)
    return check_logits(logits, batch, self.num_classes)
