"""Square Attack, L-inf and L2, in JAX.

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

L2 (the reference's L2 branch): the start is a 5 x 5 grid of tiles of side
h // 5, each holding the pattern ``square_eta`` (two opposite-signed halves of
concentric rectangles weighted 1 / (k + 1)^2) times a random sign per channel,
scaled to norm eps. Each step takes the perturbation delta = x^(i) - x, draws
two windows W1, W2 of odd side s_i = max(round(sqrt(p_i h w)), 3), sets
delta on W2 to 0 and on W1, per channel, to

  (eta_s r_c + delta_W1 / ||delta_W1||) rescaled to norm
  sqrt(max(eps^2 - ||delta||^2, 0) / C + ||delta_(W1 u W2)||^2),

and proposes x_new = clip(x + eps delta / ||delta||, 0, 1).

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
                 rescale_schedule: bool = False, norm: str = "linf") -> np.ndarray:
  """Side s_i of the square at each iteration i (int32 [n_queries]); for L2 at least 3, odd."""
  out = np.empty(n_queries, np.int32)
  for i in range(n_queries):
    p = p_selection(i, p_init=p_init, n_queries=n_queries, rescale_schedule=rescale_schedule)
    s = int(round(math.sqrt(p * height * width)))
    if norm == "l2":
      s = max(s, 3)
      s += 1 - s % 2
    out[i] = min(max(s, 1), min(height, width))
  return out


def _eta_rectangles(a: int, b: int) -> np.ndarray:
  """The reference's L2 ``eta_rectangles``: concentric rectangles weighted 1 / (k + 1)^2 on
  an a x b grid, unit L2 norm."""
  delta = np.zeros((a, b))
  if a == 0 or b == 0:
    return delta
  r, c = a // 2, b // 2
  for k in range(max(r, c) + 1):
    delta[max(r - k, 0):min(r + k + 1, a), max(c - k, 0):min(c + k + 1, b)] += 1.0 / (k + 1) ** 2
  return delta / np.sqrt(np.sum(delta ** 2))


def square_eta(s: int) -> np.ndarray:
  """The L2 Square Attack's s x s pattern (the reference's ``eta`` before its random
  transpose): the top half rectangles, the bottom half their negative, unit L2 norm."""
  delta = np.zeros((s, s))
  delta[:s // 2] = _eta_rectangles(s // 2, s)
  delta[s // 2:] = -_eta_rectangles(s - s // 2, s)
  return delta / np.sqrt(np.sum(delta ** 2))


def _eta_table(sizes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """(index [n_queries] into the table, table [K, 2, h, w]): ``square_eta`` of every size of
  the schedule and its transpose, at the top-left corner of an h x w zero image."""
  distinct = sorted(set(int(s) for s in sizes))
  table = np.zeros((len(distinct), 2, h, w), np.float32)
  for k, s in enumerate(distinct):
    eta = square_eta(s)
    table[k, 0, :s, :s], table[k, 1, :s, :s] = eta, eta.T
  return np.searchsorted(distinct, sizes).astype(np.int32), table


def _l2_start_patterns(h: int, w: int) -> np.ndarray:
  """[T, 2, h, w]: the L2 start's tiles (``square_eta`` of side h // 5 on a grid starting at
  (h - 5 s) // 2), each as placed and transposed."""
  s = h // 5
  start = (h - 5 * s) // 2
  eta = square_eta(s)
  tiles = []
  for i in range(h // s):
    for j in range(w // s):
      vh, vw = start + i * s, start + j * s
      if vh >= h or vw >= w:
        continue
      tile = np.zeros((2, h, w), np.float32)
      for t, e in enumerate((eta, eta.T)):
        tile[t, vh:vh + s, vw:vw + s] = e[:h - vh, :w - vw]
      tiles.append(tile)
  return np.stack(tiles)


def margin(logits: Array, y: Array) -> Array:
  """z_y - max_{k != y} z_k (the reference's margin and, for loss='margin', its loss)."""
  return losses.logit_margin(logits, y)


def square(model_fn: ModelFn, x: Array, y: Array, rng: Array, *, eps: float,
           norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
           n_restarts: int = 1, rescale_schedule: bool = False, active: Array | None = None,
           early_stop: bool = True) -> Array:
  """Square Attack (L-inf or L2, margin loss; the reference's ``SquareAttack.perturb``).

  Vectorised over the batch: every example draws its own square positions (uniform over
  [0, h - s) x [0, w - s) as in the reference), channel signs and, for L2, pattern orientations
  each iteration (the reference draws one position, one orientation and one sign per channel
  for the whole batch per iteration). Only still-robust points (margin > 0) are updated; the
  loop ends when all ``active`` points are broken (``early_stop``) or after ``n_queries``
  iterations.

  Args:
    model_fn: x -> logits [N, K]; x: clean NHWC inputs in [0, 1]; y: int labels [N].
    rng: key; eps, norm: the threat model; n_queries: iterations (model queries) per restart.
    p_init, rescale_schedule: the square-size schedule (``p_selection``).
    active: [N] bool, the points to attack (default all); others are left as x.

  Returns:
    x_adv [N, H, W, C]: the misclassified point for the broken points, x for the others.
  """
  common.check_common(x, y, eps=eps, norm=norm)
  chex.assert_rank(x, 4)
  common.check_positive_int("n_queries", n_queries)
  common.check_positive_int("n_restarts", n_restarts)
  if not 0 < p_init <= 1:
    raise ValueError(f"p_init must lie in (0, 1], got {p_init}.")
  x = jax.lax.stop_gradient(x)
  n, h, w, c = x.shape
  if norm == "l2" and min(h, w) < 5:
    raise ValueError(f"L2 Square starts from a 5 x 5 grid of tiles: images must be at least "
                     f"5 x 5 pixels, got {h} x {w}.")
  sizes = square_sizes(n_queries, h, w, p_init=p_init, rescale_schedule=rescale_schedule,
                       norm=norm)
  if norm == "linf":
    start, propose = _linf_start(x, eps), _linf_proposal(x, eps, jnp.asarray(sizes))
  else:
    start, propose = _l2_start(x, eps), _l2_proposal(x, eps, sizes)
  robust = (common.predict(model_fn, x) == y) & common.active_mask(active, y)

  def one_restart(r, carry):
    robust, x_adv = carry
    init_key, loop_key = jax.random.split(jax.random.fold_in(rng, r))
    x_best = start(init_key)
    margin_min = margin(model_fn(x_best), y)
    loss_min = margin_min

    def body(s):
      i = s["i"]
      to_fool = robust & (s["margin_min"] > 0)
      x_new = propose(jax.random.fold_in(loop_key, i), i, s["x_best"])
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


def _signs(key: Array, shape: tuple[int, ...], dtype) -> Array:
  return jnp.sign(jax.random.uniform(key, shape, dtype, -1.0, 1.0))


def _window(k_h: Array, k_w: Array, size: Array, n: int, h: int,
            w: int) -> tuple[Array, Array, Array]:
  """(mask [N, H, W, 1] bool, top [N], left [N]): a size x size square at a uniform position
  per example."""
  vh = jnp.floor(jax.random.uniform(k_h, (n, 1)) * (h - size)).astype(jnp.int32)
  vw = jnp.floor(jax.random.uniform(k_w, (n, 1)) * (w - size)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
  in_rows = (rows >= vh) & (rows < vh + size)                       # [N, H]
  in_cols = (cols >= vw) & (cols < vw + size)                       # [N, W]
  return (in_rows[:, :, None] & in_cols[:, None, :])[..., None], vh[:, 0], vw[:, 0]


def _linf_start(x: Array, eps: float):
  """key -> x^(0): vertical stripes, clip(x + eps r, 0, 1), r in {-1, 1} per column, channel."""
  n, _, w, c = x.shape
  return lambda key: jnp.clip(x + eps * _signs(key, (n, 1, w, c), x.dtype), 0.0, 1.0)


def _linf_proposal(x: Array, eps: float, sizes: Array):
  """(key, i, x_best) -> x_new: a square of side sizes[i] moved to the ball's edge."""
  n, h, w, c = x.shape

  def propose(key, i, x_best):
    k_h, k_w, k_s = jax.random.split(key, 3)
    window, _, _ = _window(k_h, k_w, sizes[i], n, h, w)
    x_new = x_best + jnp.where(window, 2.0 * eps * _signs(k_s, (n, 1, 1, c), x.dtype), 0.0)
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
  return propose


def _l2_start(x: Array, eps: float):
  """key -> x^(0): the grid of ``square_eta`` tiles with random signs, at norm eps."""
  n, h, w, c = x.shape
  tiles = jnp.asarray(_l2_start_patterns(h, w))                     # [T, 2, H, W]

  def start(key):
    k_t, k_s = jax.random.split(key)
    flip = jax.random.bernoulli(k_t, 0.5, (n, tiles.shape[0])).astype(jnp.int32)
    placed = jnp.take_along_axis(tiles[None], flip[:, :, None, None, None], axis=2)[:, :, 0]
    signs = _signs(k_s, (n, tiles.shape[0], c), x.dtype)           # [N, T, C]
    delta = jnp.einsum("nthw,ntc->nhwc", placed, signs)
    return jnp.clip(x + eps * common.normalize(delta, "l2"), 0.0, 1.0)
  return start


def _l2_proposal(x: Array, eps: float, sizes: np.ndarray):
  """(key, i, x_best) -> x_new: the L2 step of the module doc on windows of side sizes[i]."""
  n, h, w, c = x.shape
  index, table = _eta_table(sizes, h, w)
  index, table, sizes = jnp.asarray(index), jnp.asarray(table), jnp.asarray(sizes)

  def sq_norm(v, mask):  # per (example, channel) squared norm over a window, [N, 1, 1, C]
    return jnp.sum(jnp.where(mask, v * v, 0.0), axis=(1, 2), keepdims=True)

  def propose(key, i, x_best):
    k_h, k_w, k_h2, k_w2, k_t, k_s = jax.random.split(key, 6)
    win1, vh, vw = _window(k_h, k_w, sizes[i], n, h, w)
    win2, _, _ = _window(k_h2, k_w2, sizes[i], n, h, w)
    delta = x_best - x
    flip = jax.random.bernoulli(k_t, 0.5, (n,)).astype(jnp.int32)
    eta = table[index[i]][flip]                                      # [N, H, W] top-left
    eta = jax.vmap(lambda e, a, b: jnp.roll(e, (a, b), axis=(0, 1)))(eta, vh, vw)[..., None]
    new = eta * _signs(k_s, (n, 1, 1, c), x.dtype) + delta / (
        1e-12 + jnp.sqrt(sq_norm(delta, win1)))
    budget = jnp.sqrt(jnp.maximum(eps ** 2 - jnp.sum(delta * delta, axis=(1, 2, 3),
                                                     keepdims=True), 0.0) / c
                      + sq_norm(delta, win1 | win2))
    new = new / (1e-12 + jnp.sqrt(sq_norm(new, win1))) * budget
    delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
    return jnp.clip(x + eps * common.normalize(delta, "l2"), 0.0, 1.0)
  return propose
