"""Helpers shared by the AutoAttack attacks (APGD, FAB, Square) in JAX.

Conventions of this package (as in ``sovr_jax.attacks.pgd``): the model is a
function ``model_fn(x) -> logits [N, K]``; inputs are images in [0, 1] with the
batch first (the project's models take NHWC); every attack is a pure function
of its inputs and an explicit ``jax.random`` key, vectorised over the batch,
with its iterations in ``jax.lax`` loops, so it can be ``jax.jit``-ed whole.

``active`` [N] bool masks the points an attack works on (the still-robust
points of AutoAttack, and False on the padding of a last batch): inactive
points are computed along with the others (shapes stay fixed, so nothing is
re-batched or recompiled) but never change and never keep a loop running.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
ModelFn = Callable[[Array], Array]

NORMS = ("linf", "l2")


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"{name} must be one of {valid}, got {value!r}.")


def check_common(x: Array, y: Array, *, eps: float, norm: str,
                 norms: tuple[str, ...] = NORMS) -> None:
  """Shapes of (x, y), eps > 0 and the norm; raises ValueError / AssertionError."""
  chex.assert_rank(y, 1)
  chex.assert_equal_shape_prefix((x, y), 1)
  chex.assert_type(y, int)
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps}.")
  check_choice("norm", norm, norms)


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
  if int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")


def active_mask(active: Array | None, y: Array) -> Array:
  """``active`` as a bool [N] array (all True if None)."""
  if active is None:
    return jnp.ones(y.shape, bool)
  chex.assert_shape(active, y.shape)
  return active.astype(bool)


def bcast(mask: Array, like: Array) -> Array:
  """A per-example [N] array shaped [N, 1, ..., 1] to broadcast against ``like``."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def flat(v: Array) -> Array:
  return v.reshape(v.shape[0], -1)


def linf_norm(v: Array) -> Array:
  """max_i |v_i| per example, [N]."""
  return jnp.max(jnp.abs(flat(v)), axis=1)


def l2_norm(v: Array) -> Array:
  """||v||_2 per example, [N]."""
  return jnp.sqrt(jnp.sum(jnp.square(flat(v)), axis=1))


def lp_norm(v: Array, norm: str) -> Array:
  return linf_norm(v) if norm == "linf" else l2_norm(v)


def normalize(v: Array, norm: str) -> Array:
  """v / (||v|| + 1e-12) per example (the reference's ``normalize``)."""
  return v / bcast(lp_norm(v, norm) + 1e-12, v)


def predict(model_fn: ModelFn, x: Array) -> Array:
  return jnp.argmax(model_fn(x), axis=-1)


def first_k_largest(logits: Array, k: Array | int) -> Array:
  """The class with the k-th largest logit (k = 1 is the argmax), per example.

  The reference's ``logits.sort(dim=1)[1][:, -k]``; ``k`` may be traced.
  """
  order = jnp.argsort(logits, axis=-1)  # ascending
  col = jnp.asarray(logits.shape[-1] - k, jnp.int32)
  return jnp.take_along_axis(order, jnp.broadcast_to(col, (logits.shape[0], 1)), axis=-1)[:, 0]
