"""Shared pieces of the model zoo: input normalisation, layer factories, helpers.

Conventions (see docs "Models" section): inputs are images in [0, 1], NHWC, any float dtype;
normalisation ``(x - mean) / std`` happens inside the model in float32 and the result is cast to
the compute ``dtype``. Parameters are always stored in float32 (``param_dtype=jnp.float32``).
Every convolution uses explicit integer padding (never ``"SAME"``, which pads stride-2
convolutions asymmetrically), so a PyTorch (NCHW) twin can reproduce the models exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

PARAM_DTYPE = jnp.float32

#: Explicit paddings (the PyTorch ``padding=1`` / ``padding=0``).
PAD1 = ((1, 1), (1, 1))
PAD0 = ((0, 0), (0, 0))


def scaled(base: int, width: float) -> int:
  """Channel count ``base`` scaled by the width multiplier: ``max(1, int(round(base * width)))``."""
  return max(1, int(round(base * width)))


def _stats_vector(values: Sequence[float], channels: int, what: str) -> jax.Array:
  values = tuple(float(v) for v in values)
  if len(values) not in (1, channels):
    raise ValueError(
      f"{what} has {len(values)} entries; expected 1 (broadcast) or {channels} "
      f"(one per input channel)"
    )
  return jnp.asarray(values, dtype=jnp.float32)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Dtype) -> jax.Array:
  """Check an NHWC image batch and return ``((x - mean) / std)`` computed in float32, cast to ``dtype``.

  ``mean`` and ``std`` have either one entry (broadcast over channels) or one per channel.
  """
  chex.assert_rank(x, 4)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"model input must be a floating-point image in [0, 1] (NHWC); got dtype {x.dtype}"
    )
  channels = x.shape[-1]
  m = _stats_vector(mean, channels, "mean")
  s = _stats_vector(std, channels, "std")
  return ((x.astype(jnp.float32) - m) / s).astype(dtype)


def check_logits(logits: jax.Array, batch: int, num_classes: int) -> jax.Array:
  """Assert the logits shape ``[batch, num_classes]`` and return them as float32."""
  chex.assert_shape(logits, (batch, num_classes))
  return logits.astype(jnp.float32)


def conv(
  features: int,
  kernel: int,
  stride: int,
  padding: int,
  *,
  dtype: Dtype,
  use_bias: bool = False,
  name: str | None = None,
) -> nn.Conv:
  """A ``kernel x kernel`` convolution with explicit symmetric integer padding (PyTorch semantics)."""
  return nn.Conv(
    features=features,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=PARAM_DTYPE,
    name=name,
  )


#: BatchNorm's epsilon (PyTorch's default).
BN_EPS = 1e-5


def batch_norm(train: bool, *, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm matching PyTorch's defaults (momentum 0.1 in PyTorch = 0.9 here, eps 1e-5).

  Statistics are reduced in float32 with the two-pass variance (``use_fast_variance=False``),
  like PyTorch. Note: Flax keeps the *biased* batch variance in ``batch_stats['var']`` whereas
  PyTorch's running_var uses the unbiased one, so running variances differ by a factor
  n / (n - 1) (n = N * H * W) after training-mode updates.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=BN_EPS,
    dtype=dtype,
    param_dtype=PARAM_DTYPE,
    use_fast_variance=False,
    name=name,
  )


def conv_bn(module: nn.Module, x: jax.Array, features: int, kernel: int, stride: int,
            padding: int, *, train: bool, fold_bn: bool, dtype: Dtype, conv_name: str,
            bn_name: str) -> jax.Array:
  """``bn(conv(x))``: a convolution without bias, then BatchNorm, called inside ``module``'s
  compact ``__call__`` (the variables are ``conv_name``'s and ``bn_name``'s either way).

  With ``fold_bn`` in eval mode, the same map as one convolution with a bias: eval-mode
  BatchNorm is the per-channel affine map bn(z) = (z - mean) * scale / sqrt(var + eps) + bias
  = a z + b, so bn(conv(x, W)) = conv(x, W a) + b, with W a scaling the output channels of W
  (float32, then cast to ``dtype``). Exact up to rounding; it saves the separate pass of the
  BatchNorm over the activations (the attack's forwards and input gradients, where the weights
  are fixed). Training mode (batch statistics) is never folded.
  """
  if not fold_bn or train or module.is_initializing():
    z = conv(features, kernel, stride, padding, dtype=dtype, name=conv_name)(x)
    return batch_norm(train, dtype=dtype, name=bn_name)(z)
  params, stats = module.variables["params"], module.variables["batch_stats"]
  a = params[bn_name]["scale"] * jax.lax.rsqrt(stats[bn_name]["var"] + BN_EPS)
  b = params[bn_name]["bias"] - stats[bn_name]["mean"] * a
  w = params[conv_name]["kernel"] * a  # HWIO: a scales the output channels
  z = jax.lax.conv_general_dilated(
    x.astype(dtype), w.astype(dtype), (stride, stride), ((padding, padding), (padding, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return z + b.astype(dtype)


def dense(features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
  """A fully connected layer with bias (float32 params, ``dtype`` compute)."""
  return nn.Dense(features=features, dtype=dtype, param_dtype=PARAM_DTYPE, name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC tensor (= ``F.avg_pool2d(out, 4)`` at 32x32 inputs)."""
  return jnp.mean(x, axis=(1, 2))


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree.

  Pass the ``params`` collection (``variables['params']``), not the whole variables dict, so
  that BatchNorm running statistics (``batch_stats``) are not counted.
  """
  return int(sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params)))
