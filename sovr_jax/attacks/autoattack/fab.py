"""FAB (Fast Adaptive Boundary) attack, L-inf and L2, targeted (FAB-T) and untargeted, in JAX.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020 (Algorithm 1), as run by AutoAttack (Croce & Hein,
ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), following the reference implementation
(github.com/fra31/auto-attack: ``fab_base.py``, ``fab_pt.py``,
``fab_projections.py``; here the ``pyautoattack`` package).

Per iteration, with x the clean point and x^(k) the iterate: linearise the
decision boundary between the label y and a class s,

  f_s(z) ~ f_s(x^(k)) + <grad f_s(x^(k)), z - x^(k)>,  f_s = z_s - z_y,

with s the target class t (FAB-T) or the class whose linearised boundary is
closest, argmin_s |f_s| / ||grad f_s||_* (untargeted; ||.||_* the dual norm: L1
for L-inf, L2 for L2). Let proj(p) be the minimal-norm step d with p + d on
that hyperplane and in [0, 1]^d (``projection_linf``, ``projection_l2``),
d1 = proj(x^(k)), d2 = proj(x), and

  alpha = min(max(||d1|| / (||d1|| + ||d2||), 0), alpha_max),
  x^(k+1) = clip((1 - alpha)(x^(k) + eta d1) + alpha (x + eta d2), 0, 1).

When x^(k+1) is misclassified it is kept if closer to x than the best so far,
and the iterate steps back: x^(k+1) <- x + beta (x^(k+1) - x). A point counts
as broken when its closest misclassified iterate lies within eps of x.
AutoAttack's standard version runs FAB-T with n_iter = 100, alpha_max = 0.1,
eta = 1.05, beta = 0.9, one restart (no random start) for each of the 9
runner-up classes; only still-robust points are attacked (masked, see
``common``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sovr_jax.attacks.autoattack import common

Array = jax.Array
ModelFn = common.ModelFn

#: The reference's "no adversarial example yet" distance.
NO_ADV = 1e10


def _solve_breakpoints(weight: Array, brk: Array, need: Array, n_bisect: int) -> Array:
  """Per row, lambda >= 0 with g(lambda) = sum_i weight_i min(lambda, brk_i) = need.

  g is increasing and piecewise linear (weight, brk >= 0). ``n_bisect`` bisection steps on
  lambda bracket the solution to float precision (no sort of the breakpoints, which is slow in
  XLA), then lambda is solved for exactly on the linear piece above the bracket's lower end.
  Rows with need >= g(inf) (the box does not reach the hyperplane) get max_i brk_i.
  """
  def g(lam):
    return jnp.sum(weight * jnp.minimum(lam[:, None], brk), axis=1)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = g(mid) < need
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  hi0 = jnp.max(jnp.where(weight > 0, brk, 0.0), axis=1)
  lo, hi = jax.lax.fori_loop(0, n_bisect, bisect, (jnp.zeros_like(hi0), hi0))
  free = brk > lo[:, None]                      # not yet at their bound on the final piece
  fixed_sum = jnp.sum(jnp.where(free, 0.0, weight * brk), axis=1)
  free_w = jnp.sum(jnp.where(free, weight, 0.0), axis=1)
  lam = jnp.clip((need - fixed_sum) / jnp.where(free_w > 0, free_w, 1.0), lo, hi)
  return jnp.where(need < jnp.sum(weight * brk, axis=1), lam, hi0)


def _orient(points: Array, w: Array, b: Array) -> tuple[Array, Array]:
  """(w, c): w's sign flipped per row so that c = <w, p> - b >= 0 (the decrease needed)."""
  chex.assert_rank(points, 2)
  chex.assert_equal_shape((points, w))
  chex.assert_shape(b, points.shape[:1])
  c = jnp.sum(w * points, axis=1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0).astype(w.dtype)
  return w * sign[:, None], c * sign


def projection_linf(points: Array, w: Array, b: Array, *, n_bisect: int = 32) -> Array:
  """Minimal L-inf step onto the hyperplane {z : <w, z> = b} inside the box [0, 1]^D.

  Solves the problem of the reference's ``fab_projections.projection_linf`` per row: the step
  d [M, D] with ||d||_inf minimal such that <w, p + d> = b and p + d in [0, 1]^D, or, if the box
  does not reach the hyperplane, the box corner that comes closest. With the sign of (w, b)
  chosen so that <w, p> >= b, coordinate i moves towards its bound a_i (1 where w_i < 0, else
  0), by min(lambda, q_i) with q_i = |a_i - p_i|, and lambda solves

      sum_i |w_i| min(lambda, q_i) = <w, p> - b

  (``_solve_breakpoints``). The reference sorts the breakpoints q_i and bisects over their
  ranks; same result up to float round-off (``projection_linf_sorted`` is the line-by-line
  port).

  Args:
    points: [M, D] points p; w: [M, D] normals; b: [M] offsets.
  """
  w, need = _orient(points, w, b)
  a = (w < 0).astype(points.dtype)
  q = a - points * (2 * a - 1)                  # distance to the bound a_i
  lam = _solve_breakpoints(jnp.abs(w), q, need, n_bisect)
  return (2 * a - 1) * jnp.minimum(lam[:, None], q) * (w != 0)


def projection_l2(points: Array, w: Array, b: Array, *, n_bisect: int = 32) -> Array:
  """Minimal L2 step onto the hyperplane {z : <w, z> = b} inside the box [0, 1]^D.

  The problem of the reference's ``fab_projections.projection_l2``: with the sign of (w, b)
  chosen so that <w, p> >= b, the step is d_i = -min(lambda, r_i) w_i, where r_i is where
  coordinate i reaches its bound (p_i / w_i for w_i > 0, (p_i - 1) / w_i for w_i < 0) and lambda
  solves

      sum_i w_i^2 min(lambda, r_i) = <w, p> - b

  (``_solve_breakpoints``; lambda = (<w, p> - b) / ||w||^2, the plain projection, when no
  coordinate saturates). When the box does not reach the hyperplane every coordinate goes to
  its bound. As in the reference, coordinates with |w_i| <= 1e-8 do not move.

  Args:
    points: [M, D] points p; w: [M, D] normals; b: [M] offsets.
  """
  w, need = _orient(points, w, b)
  moves = jnp.abs(w) > 1e-8
  safe_w = jnp.where(moves, w, 1.0)
  r = jnp.where(moves, jnp.maximum(points / safe_w, (points - 1) / safe_w), 0.0)
  lam = _solve_breakpoints(jnp.where(moves, w * w, 0.0), r, need, n_bisect)
  return -jnp.minimum(lam[:, None], r) * w * moves


def projection_linf_sorted(points: Array, w: Array, b: Array) -> Array:
  """``projection_linf`` as the reference computes it (a line-by-line port, for checking).

  The reference's ``fab_projections.projection_linf`` vectorised over rows: returns d [M, D]
  with ||d||_inf minimal such that <w, p + d> = b and p + d in [0, 1]^D, or, if the box does not
  reach the hyperplane, the box corner that comes closest. With the signs chosen so that
  <w, p> >= b, coordinate i moves towards its bound a_i (1 where w_i < 0, else 0) by
  min(lambda, |a_i - p_i|); the largest breakpoint |a_i - p_i| below the optimal lambda is found
  by bisection over the sorted breakpoints, then lambda solves <w, d(lambda)> = b - <w, p>.

  Args:
    points: [M, D] points p; w: [M, D] normals; b: [M] offsets.
  """
  chex.assert_rank(points, 2)
  chex.assert_equal_shape((points, w))
  chex.assert_shape(b, points.shape[:1])
  t = points
  num = t.shape[1]
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0).astype(w.dtype)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2 * a - 1)
  indp = jnp.argsort(p, axis=1)
  b = b - jnp.sum(w * t, axis=1)
  b0 = jnp.sum(w * d, axis=1)
  indp2 = indp[:, ::-1]
  ws = jnp.take_along_axis(w, indp2, axis=1)
  bs2 = -ws * jnp.take_along_axis(d, indp2, axis=1)
  s = jnp.cumsum(jnp.abs(ws), axis=1)
  sb = jnp.cumsum(bs2, axis=1) + b0[:, None]
  b2 = sb[:, -1] - s[:, -1] * jnp.take_along_axis(p, indp[:, :1], axis=1)[:, 0]
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & ~c_l

  def take(v, idx):
    return jnp.take_along_axis(v, idx[:, None], axis=1)[:, 0]

  def bisect(_, bounds):
    lb, ub = bounds
    mid = (lb + ub) // 2
    indcurr = take(indp, num - 1 - mid)
    b2 = take(sb, mid) - take(s, mid) * take(p, indcurr)
    c = b - b2 > 0
    return jnp.where(c, mid, lb), jnp.where(c, ub, mid)

  m = t.shape[0]
  lb0 = jnp.zeros((m,), jnp.int32)
  ub0 = jnp.full((m,), num - 1, jnp.int32)
  nitermax = math.ceil(math.log2(num)) if num > 1 else 0
  lb, _ = jax.lax.fori_loop(0, nitermax, bisect, (lb0, ub0))

  lmbd_l = jnp.maximum((b - sb[:, -1]) / (-s[:, -1]), 0.0)
  d_l = (2 * a - 1) * lmbd_l[:, None]
  lmbd_2 = jnp.maximum((b - take(sb, lb)) / (-take(s, lb)), 0.0)[:, None]
  d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


PROJECTIONS = {"linf": projection_linf, "l2": projection_l2}
#: The dual norm of each threat model (the distance to a linearised boundary is |f| / ||g||_*).
_DUAL_NORM = {"linf": lambda g: jnp.sum(jnp.abs(g), axis=-1),
              "l2": lambda g: jnp.sqrt(jnp.sum(g * g, axis=-1))}


class FABRun(NamedTuple):
  """One FAB run (the reference's ``attack_single_run``), per example."""
  x_adv: Array   # [N, ...] the closest misclassified iterate (x where none)
  dist: Array    # [N] its distance to x in the run's norm (NO_ADV where none)


def _boundary(model_fn: ModelFn, x1: Array, y: Array, targets: Array | None,
              norm: str = "linf") -> tuple[Array, Array]:
  """(f, grad f) of the boundary to attack at x1: f = z_t - z_y (targeted), else the class
  with the closest linearised boundary (the reference's ``get_diff_logits_grads_batch``)."""
  logits, vjp = jax.vjp(model_fn, x1)
  num_classes, out_dtype = logits.shape[-1], logits.dtype
  logits = logits.astype(jnp.float32)
  onehot_y = jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
  z_y = jnp.sum(logits * onehot_y, axis=-1)
  if targets is not None:
    onehot_t = jax.nn.one_hot(targets, num_classes, dtype=logits.dtype)
    (g,) = vjp((onehot_t - onehot_y).astype(out_dtype))
    return jnp.sum(logits * onehot_t, axis=-1) - z_y, g.astype(jnp.float32)
  eye = jnp.eye(num_classes, dtype=out_dtype)
  jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, (x1.shape[0], num_classes)))[0])(eye)
  jac = jnp.moveaxis(jac, 0, 1).astype(jnp.float32)  # [N, K, ...]
  jac_y = jnp.take_along_axis(jac, common.bcast(y, jac), axis=1)
  dg = jac - jac_y
  df = jnp.where(onehot_y > 0, NO_ADV, logits - z_y[:, None])
  dist = jnp.abs(df) / (1e-12 + _DUAL_NORM[norm](dg.reshape(dg.shape[:2] + (-1,))))
  ind = jnp.argmin(dist, axis=1)
  f = jnp.take_along_axis(df, ind[:, None], axis=1)[:, 0]
  g = jnp.take_along_axis(dg, common.bcast(ind, dg), axis=1)[:, 0]
  return f, g


def fab_run(model_fn: ModelFn, x: Array, y: Array, x_start: Array, *, eps: float,
            norm: str = "linf", n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
            beta: float = 0.9, targets: Array | None = None, active: Array | None = None,
            early_stop: bool = True) -> FABRun:
  """One FAB run of ``n_iter`` iterations from ``x_start`` (see the module doc).

  ``targets`` [N] gives FAB-T, None the untargeted FAB (a full Jacobian per iteration). With
  ``early_stop`` the run ends once every ``active`` point has a misclassified iterate within eps
  (the reference keeps shrinking the distance; that cannot change which points are broken at
  eps, only how far inside the ball the returned example lies).
  """
  common.check_common(x, y, eps=eps, norm=norm)
  common.check_positive_int("n_iter", n_iter)
  chex.assert_equal_shape((x, x_start))
  active = common.active_mask(active, y)
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  n = x.shape[0]
  x0 = common.flat(x)

  def body(s):
    x1 = s["x1"]
    f, g = _boundary(model_fn, x1, y, targets, norm)
    w = common.flat(g)
    b = -f + jnp.sum(w * common.flat(x1), axis=1)
    d3 = PROJECTIONS[norm](jnp.concatenate([common.flat(x1), x0], 0),
                           jnp.concatenate([w, w], 0), jnp.concatenate([b, b], 0))
    d1, d2 = d3[:n].reshape(x.shape), d3[n:].reshape(x.shape)
    a0 = jnp.maximum(common.lp_norm(d3, norm), 1e-8)
    a1, a2 = a0[:n], a0[n:]
    alpha = common.bcast(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x)
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + d2 * eta) * alpha, 0.0, 1.0)
    is_adv = common.predict(model_fn, x1) != y
    dist = common.lp_norm(x1 - x, norm)
    closer = is_adv & (dist < s["dist"])
    return dict(
        i=s["i"] + 1,
        x1=jnp.where(common.bcast(is_adv, x), x + (x1 - x) * beta, x1),
        x_adv=jnp.where(common.bcast(closer, x), x1, s["x_adv"]),
        dist=jnp.where(closer, dist, s["dist"]))

  def cond(s):
    go = s["i"] < n_iter
    if early_stop:
      go = go & jnp.any(active & (s["dist"] > eps))
    return go

  state = dict(i=jnp.zeros((), jnp.int32), x1=x_start.astype(jnp.float32), x_adv=x,
               dist=jnp.full((n,), NO_ADV, jnp.float32))
  s = jax.lax.while_loop(cond, body, state)
  return FABRun(x_adv=s["x_adv"], dist=s["dist"])


def random_start(rng: Array, x: Array, *, eps: float, norm: str = "linf") -> Array:
  """The reference's random start of restarts > 0: clip(x + eps/2 * u / ||u||, 0, 1), with
  u ~ U[-1, 1]^d (L-inf) or N(0, I) (L2)."""
  if norm == "linf":
    u = jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0)
  else:
    u = jax.random.normal(rng, x.shape, x.dtype)
  return jnp.clip(x + 0.5 * eps * u / common.bcast(common.lp_norm(u, norm), x), 0.0, 1.0)


def fab(model_fn: ModelFn, x: Array, y: Array, rng: Array, *, eps: float,
        norm: str = "linf", targeted: bool = True, n_iter: int = 100, n_restarts: int = 1,
        n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, active: Array | None = None, early_stop: bool = True,
        runs_at_once: int = 1) -> Array:
  """FAB-T (``targeted``) or FAB: the reference's ``FABAttack.perturb`` (L-inf or L2).

  FAB-T runs ``n_restarts`` times for each target class t(k) = the class with the k-th largest
  clean logit, k = 2 .. n_target_classes + 1 (capped at K); each run attacks the points still
  robust; restarts after the first start at ``random_start`` (AutoAttack's standard version uses
  one restart, so FAB-T is deterministic). A point is broken when the returned example is
  misclassified and within eps (in ``norm``).

  Args:
    model_fn: x -> logits [N, K]; x: clean inputs in [0, 1], [N, ...]; y: int labels [N].
    rng: key for the random starts of restarts > 0.
    active: [N] bool, the points to attack (default all); others are left as x.
    early_stop: skip runs with no robust point and end a run once all its points are broken.
    runs_at_once: runs (target classes x restarts) batched into one call on that many times
      the rows (``common.run_in_calls``: the same points are broken; 1: one after the other, as
      the reference).

  Returns:
    x_adv [N, ...]: the closest adversarial example found for the broken points, x elsewhere.
  """
  common.check_common(x, y, eps=eps, norm=norm)
  for name, v in (("n_iter", n_iter), ("n_restarts", n_restarts),
                  ("n_target_classes", n_target_classes)):
    common.check_positive_int(name, v)
  x = jax.lax.stop_gradient(x)
  clean_logits = model_fn(x)
  num_classes = clean_logits.shape[-1]
  robust = (jnp.argmax(clean_logits, axis=-1) == y) & common.active_mask(active, y)
  ks = list(range(2, min(n_target_classes, num_classes - 1) + 2)) if targeted else [1]
  ks = jnp.asarray(ks, jnp.int32)
  n_runs = int(ks.shape[0]) * n_restarts

  def attack_rows(js, active_rows):
    c = js.shape[0]
    def start(j):
      return jnp.where(j % n_restarts > 0,
                       random_start(jax.random.fold_in(rng, j), x, eps=eps, norm=norm), x)
    targets = None
    if targeted:
      targets = common.run_targets(clean_logits, ks, n_restarts, js)
    xr = common.rows(x, c)
    yr = common.rows(y, c)
    run = fab_run(model_fn, xr, yr, common.stack_runs(start, js), eps=eps, norm=norm,
                  n_iter=n_iter, alpha_max=alpha_max, eta=eta, beta=beta, targets=targets,
                  active=active_rows, early_stop=early_stop)
    found = ((common.predict(model_fn, run.x_adv) != yr)
             & (common.lp_norm(run.x_adv - xr, norm) <= eps))
    return common.per_run(found, c), common.per_run(run.x_adv, c)

  x_adv = common.run_in_calls(n_runs, runs_at_once, robust, x, attack_rows,
                              early_stop=early_stop)
  return jax.lax.stop_gradient(x_adv)
