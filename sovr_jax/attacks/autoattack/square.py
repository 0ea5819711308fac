"""Square Attack, L-inf, in JAX.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020, as run by
AutoAttack (Croce & Hein, ICML 2020), following the reference implementation
(github.com/fra31/auto-attack ``square.py``; here the ``pyautoattack``
package).

Random search on the margin loss L(x') = z_y(x') - max_{k != y} z_k(x')
(minimised; the point is broken once L <= 0). Start: vertical stripes,
x^(0) = clip(x + eps * r, 0, 1) with r in {-1, 1} drawn per (column,
channel). Step i: a square of side s_i at a random position, in which every
channel c is set to the ball's edge, x_new = P(x^(i) + 2 eps r_c) (P the
projection onto the eps-ball and [0, 1]), kept if it lowers L or breaks the
point. The side is s_i = max(round(sqrt(p_i h w)), 1), capped at min(h, w),
with p_i from ``p_selection`` (p_init halved at the reference's query
counts 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; AutoAttack does not
rescale this schedule to n_queries).

Inputs are NHWC images (the project's layout).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sovr_jax import losses
from sovr_jax.attacks.autoattack import common

Array = jax.Array
ModelFn = common.ModelFn

#: (upper end of the query range, divisor of p_init) of the reference's schedule.
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def p_selection(it: int, *, p_init: float = 0.8, n_queries: int = 5000,
                rescale_schedule: bool = False) -> float:
  """The fraction p of pixels changed at iteration ``it`` (the reference's ``p_selection``)."""
  if rescale_schedule:
    it = int(it / n_queries * 10000)
  for upper, div in _P_SCHEDULE:
    if it <= upper:
      return p_init / div
  return p_init / 512


def square_sizes(n_queries: int, height: int, width: int, *, p_init: float = 0.8,
                 rescale_schedule: bool = False) -> np.ndarray:
  """Side s_i of the square at each iteration i (int32 [n_queries])."""
  out = np.empty(n_queries, np.int32)
  for i in range(n_queries):
    p = p_selection(i, p_init=p_init, n_queries=n_queries, rescale_schedule=rescale_schedule)
    s = max(int(round(math.sqrt(p * height * width))), 1)
    out[i] = min(s, min(height, width))
  return out


def margin(logits: Array, y: Array) -> Array:
  """z_y - max_{k != y} z_k (the reference's margin and, for loss='margin', its loss)."""
  return losses.logit_margin(logits, y)


def square(model_fn: ModelFn, x: Array, y: Array, rng: Array, *, eps: float,
           norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
           n_restarts: int = 1, rescale_schedule: bool = False, active: Array | None = None,
           early_stop: bool = True) -> Array:
  """Square Attack (L-inf, margin loss; the reference's ``SquareAttack.perturb``).

  Vectorised over the batch: every example draws its own square position (uniform over
  [0, h - s) x [0, w - s) as in the reference) and channel signs each iteration (the
  reference draws one position and one sign per channel for the whole batch per iteration).
  Only still-robust points (margin > 0) are updated; the loop ends when all ``active`` points
  are broken (``early_stop``) or after ``n_queries`` iterations.

  Args:
    model_fn: x -> logits [N, K]; x: clean NHWC inputs in [0, 1]; y: int labels [N].
    rng: key; eps: L-inf radius; n_queries: iterations (model queries) per restart.
    p_init, rescale_schedule: the square-size schedule (``p_selection``).
    active: [N] bool, the points to attack (default all); others are left as x.

  Returns:
    x_adv [N, H, W, C]: the misclassified point for the broken points, x for the others.
  """
  common.check_common(x, y, eps=eps, norm=norm, norms=("linf",))
  chex.assert_rank(x, 4)
  common.check_positive_int("n_queries", n_queries)
  common.check_positive_int("n_restarts", n_restarts)
  if not 0 < p_init <= 1:
    raise ValueError(f"p_init must lie in (0, 1], got {p_init}.")
  x = jax.lax.stop_gradient(x)
  n, h, w, c = x.shape
  sizes = jnp.asarray(square_sizes(n_queries, h, w, p_init=p_init,
                                   rescale_schedule=rescale_schedule))
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  robust = (common.predict(model_fn, x) == y) & common.active_mask(active, y)

  def one_restart(r, carry):
    robust, x_adv = carry
    key = jax.random.fold_in(rng, r)
    init_key, loop_key = jax.random.split(key)
    stripes = jnp.sign(jax.random.uniform(init_key, (n, 1, w, c), x.dtype, -1.0, 1.0))
    x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin_min = margin(model_fn(x_best), y)
    loss_min = margin_min

    def body(s):
      i = s["i"]
      to_fool = robust & (s["margin_min"] > 0)
      size = sizes[i]
      k_h, k_w, k_s = jax.random.split(jax.random.fold_in(loop_key, i), 3)
      vh = jnp.floor(jax.random.uniform(k_h, (n, 1)) * (h - size)).astype(jnp.int32)
      vw = jnp.floor(jax.random.uniform(k_w, (n, 1)) * (w - size)).astype(jnp.int32)
      in_rows = (rows >= vh) & (rows < vh + size)                       # [N, H]
      in_cols = (cols >= vw) & (cols < vw + size)                       # [N, W]
      window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]    # [N, H, W, 1]
      signs = jnp.sign(jax.random.uniform(k_s, (n, 1, 1, c), x.dtype, -1.0, 1.0))
      x_new = s["x_best"] + jnp.where(window, 2.0 * eps * signs, 0.0)
      x_new = jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
      m = margin(model_fn(x_new), y)
      improved = m < s["loss_min"]  # loss = margin
      loss_min = jnp.where(to_fool & improved, m, s["loss_min"])
      update = to_fool & (improved | (m <= 0))
      return dict(i=i + 1, loss_min=loss_min,
                  margin_min=jnp.where(update, m, s["margin_min"]),
                  x_best=jnp.where(common.bcast(update, x), x_new, s["x_best"]))

    def cond(s):
      go = s["i"] < n_queries
      if early_stop:
        go = go & jnp.any(robust & (s["margin_min"] > 0))
      return go

    def attack(_):
      state = dict(i=jnp.zeros((), jnp.int32), x_best=x_best, margin_min=margin_min,
                   loss_min=loss_min)
      s = jax.lax.while_loop(cond, body, state)
      broken = robust & (common.predict(model_fn, s["x_best"]) != y)
      return robust & ~broken, jnp.where(common.bcast(broken, x), s["x_best"], x_adv)

    if not early_stop:
      return attack(None)
    return jax.lax.cond(jnp.any(robust), attack, lambda _: (robust, x_adv), None)

  _, x_adv = jax.lax.fori_loop(0, n_restarts, one_restart, (robust, x))
  return jax.lax.stop_gradient(x_adv)
