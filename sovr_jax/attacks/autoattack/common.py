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


def run_in_calls(n_runs: int, runs_at_once: int, robust: Array, x: Array,
                 attack_rows: Callable[[Array, Array], tuple[Array, Array]], *,
                 early_stop: bool) -> Array:
  """The runs j = 0 .. n_runs - 1 of an attack (target classes x restarts), each on the points
  still robust, ``runs_at_once`` = c of them batched into one call on c x N rows.

  ``attack_rows(js, active_rows)`` runs the runs ``js`` [c] (c = ``js.shape[0]``, static) on
  the point-major rows (row i * c + r is point i in run js[r]; ``rows`` and ``per_run``
  convert) and returns ``(broken [c, N] bool, x_found [c, N, ...])``. A call's runs attack
  the points robust at its start; a point keeps the example of the first run (in j order) that
  broke it, so with independent rows the broken points and kept examples are those of the runs
  one after the other (only an early-stopped loop that runs longer keeps another example).
  Slots past the last run (c not dividing n_runs) are computed, inactive. With
  ``early_stop``, a call with no robust point left is skipped. Returns x_adv [N, ...]: the
  kept examples, x elsewhere.
  """
  check_positive_int("runs_at_once", runs_at_once)
  c = min(runs_at_once, n_runs)

  def one_call(i, carry):
    robust, x_adv = carry
    js = i * c + jnp.arange(c)
    valid = js < n_runs

    def attack(_):
      broken, found = attack_rows(js, (robust[:, None] & valid[None, :]).reshape(-1))
      broken = broken & valid[:, None] & robust[None, :]      # [c, N]
      first = jnp.argmax(broken, axis=0)                      # the first run that broke it
      kept = jnp.take_along_axis(found, first.reshape((1, -1) + (1,) * (x.ndim - 1)), 0)[0]
      hit = jnp.any(broken, axis=0)
      return robust & ~hit, jnp.where(bcast(hit, x), kept, x_adv)

    if not early_stop:
      return attack(None)
    return jax.lax.cond(jnp.any(robust), attack, lambda _: (robust, x_adv), None)

  return jax.lax.fori_loop(0, -(-n_runs // c), one_call, (robust, x))[1]


def rows(a: Array, c: int) -> Array:
  """[N, ...] -> [N * c, ...], point-major (row i * c + r), so that a batch sharding of the
  points carries over to the rows without moving data."""
  n = a.shape[0]
  return jnp.broadcast_to(a[:, None], (n, c) + a.shape[1:]).reshape((n * c,) + a.shape[1:])


def per_run(a: Array, c: int) -> Array:
  """[N * c, ...] point-major -> [c, N, ...]."""
  return jnp.swapaxes(a.reshape((a.shape[0] // c, c) + a.shape[1:]), 0, 1)


def stack_runs(fn: Callable[[Array], Array], js: Array) -> Array:
  """fn(j) [N, ...] for each run of ``js`` [c], as point-major rows [N * c, ...]."""
  out = jax.vmap(fn, out_axes=1)(js)
  return out.reshape((out.shape[0] * out.shape[1],) + out.shape[2:])


def run_targets(clean_logits: Array, ks: Array, n_restarts: int, js: Array) -> Array:
  """The target of each run of ``js`` as point-major rows [N * c]: run j targets the class with
  the ks[j // n_restarts]-th largest clean logit (runs past the last are given the last's)."""
  n_runs = ks.shape[0] * n_restarts
  return stack_runs(lambda j: first_k_largest(
      clean_logits, ks[jnp.minimum(j, n_runs - 1) // n_restarts]), js)
