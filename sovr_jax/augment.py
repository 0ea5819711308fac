"""Training-time augmentation as pure, jittable JAX functions.

``random_crop_flip`` is the standard CIFAR recipe: torchvision's
``RandomCrop(32, padding=4)`` (zero padding, crop offsets uniform in
[0, 2 * pad] per axis) followed by ``RandomHorizontalFlip(p=0.5)``, drawn
independently per example from a single key. Images are float [N, H, W, C] in
[0, 1] (``to_float`` converts the uint8 arrays of ``sovr_jax.data``);
normalisation by mean/std belongs to the model, so that attacks work in
[0, 1] pixel space.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


@jax.jit
def to_float(images: Array) -> Array:
  """uint8 images -> float32 in [0, 1]."""
  chex.assert_type(images, jnp.uint8)
  return images.astype(jnp.float32) / 255.0


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def random_crop_flip(rng: Array, images: Array, *, pad: int = 4,
                     flip: bool = True) -> Array:
  """Per-example random crop after zero padding, then random horizontal flip.

  Args:
    rng: a PRNG key; each example gets its own offsets / flip from it.
    images: float [N, H, W, C].
    pad: zero padding on each side; offsets are uniform in [0, 2 * pad].
    flip: whether to flip each example horizontally with probability 0.5.

  Returns:
    float [N, H, W, C], same dtype. ``pad=0, flip=False`` is the identity.
  """
  chex.assert_rank(images, 4)
  chex.assert_type(images, float)
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}.")
  n, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(rng)
  out = images
  if pad > 0:
    padded = jnp.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

    def crop(img, off):
      return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
  chex.assert_shape(out, images.shape)
  return out
