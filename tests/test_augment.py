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
