"""Tests for sovr_jax.augment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax import augment

N, H, W, C = 32, 8, 8, 3


def _images(seed=0):
  # Distinct strictly-positive values, so a window of the zero-padded image
  # is identified uniquely.
  x = np.random.default_rng(seed).permutation(N * H * W * C)
  return jnp.asarray((x.reshape(N, H, W, C) + 1) / (N * H * W * C + 1),
                     jnp.float32)


def _match(out, img, pad):
  """Returns (dy, dx, flipped) such that out is that window of the padded img."""
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      win = padded[dy:dy + H, dx:dx + W]
      if np.array_equal(out, win):
        return dy, dx, False
      if np.array_equal(out, win[:, ::-1]):
        return dy, dx, True
  return None


def test_to_float():
  x = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1))
  y = augment.to_float(x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, np.asarray(x) / 255.0, rtol=1e-6)
  assert float(y.min()) == 0.0 and float(y.max()) == 1.0
  with pytest.raises(AssertionError):
    augment.to_float(y)


def test_shape_dtype_range():
  x = _images()
  y = augment.random_crop_flip(jax.random.key(0), x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  with pytest.raises(AssertionError):
    augment.random_crop_flip(jax.random.key(0), x[0])


def test_identity_without_pad_and_flip():
  x = _images()
  y = augment.random_crop_flip(jax.random.key(0), x, pad=0, flip=False)
  np.testing.assert_array_equal(y, x)


def test_flip_only_really_flips():
  x = _images()
  y = np.asarray(augment.random_crop_flip(jax.random.key(1), x, pad=0))
  flipped = [np.array_equal(y[i], np.asarray(x[i])[:, ::-1]) for i in range(N)]
  same = [np.array_equal(y[i], np.asarray(x[i])) for i in range(N)]
  assert all(f != s for f, s in zip(flipped, same))
  assert 0 < sum(flipped) < N


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_window_of_the_padded_image(flip):
  pad = 2
  x = _images()
  y = np.asarray(augment.random_crop_flip(jax.random.key(2), x, pad=pad,
                                          flip=flip))
  found = [_match(y[i], np.asarray(x[i]), pad) for i in range(N)]
  assert all(f is not None for f in found)
  offsets = {f[:2] for f in found}
  assert len(offsets) > 5  # Per-example offsets, not one for the batch.
  assert any(f[:2] != (pad, pad) for f in found)
  flips = [f[2] for f in found]
  if flip:
    assert 0 < sum(flips) < N
  else:
    assert not any(flips)


def test_deterministic_per_key_and_jittable():
  x = _images()
  a = augment.random_crop_flip(jax.random.key(3), x)
  b = augment.random_crop_flip(jax.random.key(3), x)
  c = augment.random_crop_flip(jax.random.key(4), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  f = jax.jit(lambda k, im: augment.random_crop_flip(k, im, pad=4))
  np.testing.assert_array_equal(f(jax.random.key(3), x), a)
  # Legacy uint32 keys work too.
  d = augment.random_crop_flip(jax.random.PRNGKey(3), x)
  assert d.shape == x.shape


def test_offsets_cover_0_to_2_pad_and_flips_are_fair():
  """torchvision's RandomCrop(32, padding=4) draws each offset uniformly from 0..8 inclusive
  and RandomHorizontalFlip flips with probability 0.5: over 1,024 copies of one image every
  offset appears, about 1/9 each, and about half are flipped."""
  pad, n = 4, 1024
  img = np.asarray(_images()[0])
  x = jnp.asarray(np.broadcast_to(img, (n,) + img.shape))
  y = np.asarray(augment.random_crop_flip(jax.random.key(5), x, pad=pad))
  found = [_match(y[i], img, pad) for i in range(n)]
  assert all(f is not None for f in found)
  for axis in (0, 1):
    counts = np.bincount([f[axis] for f in found], minlength=2 * pad + 1)
    assert len(counts) == 2 * pad + 1 and counts.min() > 60, counts  # ~114 each
  assert abs(np.mean([f[2] for f in found]) - 0.5) < 0.05
