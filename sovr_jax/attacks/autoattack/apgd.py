"""Auto-PGD (APGD-CE, APGD-DLR, APGD-T) in JAX.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020 (Algorithm 1), following the
reference implementation (github.com/fra31/auto-attack, ``autopgd_base.py``;
here the ``pyautoattack`` package) step by step:

  x^(0)   = P(x + eps * u / ||u||),  u ~ U[-1, 1]^d (L-inf) or N(0, I) (L2)
  z^(k+1) = P(x^(k) + eta^(k) * s(grad L(x^(k))))
  x^(k+1) = P(x^(k) + a (z^(k+1) - x^(k)) + (1 - a)(x^(k) - x^(k-1))),
            a = 1 at k = 0, 0.75 afterwards,

with s = sign (L-inf) or g / ||g||_2 (L2), P the projection onto the eps-ball
intersected with [0, 1], and eta^(0) = 2 eps. At the checkpoints w_j (the
reference's integer version of p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), see ``step_size_checkpoints``)
the step size of an example is halved, and its iterate and gradient reset to
those of its best point, if

  * the loss increased in at most rho * k of the last k steps (the window k
    being the distance to the previous checkpoint), or
  * its step size was not halved at the previous checkpoint and its best loss
    has not improved since then.

Losses (maximised):
  * ``"ce"``:           l_CE(z, y)
  * ``"dlr"``:          -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
  * ``"dlr-targeted"``: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
with z_pi1 >= z_pi2 >= ... the sorted logits and t the target class.

Per example the run keeps the best-loss point and the last misclassified
iterate; ``apgd`` returns the misclassified iterate for every point it broke
and x for the others (the reference's ``perturb``). Restarts and target classes
attack only the points still robust (masked, see ``common``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sovr_jax import losses
from sovr_jax.attacks.autoattack import common

Array = jax.Array
ModelFn = common.ModelFn

LOSSES = ("ce", "dlr", "dlr-targeted")
#: The momentum weight of Algorithm 1 (a fixed 0.75 in the reference, not a parameter).
MOMENTUM = 0.75
#: The first step size is STEP_INIT * eps (L-inf and L2).
STEP_INIT = 2.0


def dlr_loss(logits: Array, labels: Array) -> Array:
  """DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), per example.

  The reference's ``APGDAttack.dlr_loss``: the second largest logit stands in
  for max_{i != y} z_i when y is the argmax, the largest otherwise.
  """
  logits = logits.astype(jnp.float32)
  top = jax.lax.top_k(logits, 3)[0]
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  y_is_top = jnp.argmax(logits, axis=-1) == labels
  other = jnp.where(y_is_top, top[:, 1], top[:, 0])
  return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_loss_targeted(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), per example.

  The reference's ``APGDAttack_targeted.dlr_loss_targeted`` (needs K >= 4).
  """
  logits = logits.astype(jnp.float32)
  top = jax.lax.top_k(logits, 4)[0]
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def loss_fn(loss: str) -> Callable[[Array, Array, Array | None], Array]:
  """Per-example loss(logits, labels, targets) to maximise."""
  common.check_choice("loss", loss, LOSSES)
  if loss == "ce":
    return lambda logits, labels, targets: losses.cross_entropy(logits, labels)
  if loss == "dlr":
    return lambda logits, labels, targets: dlr_loss(logits, labels)
  return dlr_loss_targeted


def step_size_checkpoints(n_iter: int) -> list[tuple[int, int]]:
  """[(i, k)]: the 0-based iterations i after which the step size is checked,
  and the window k (iterations since the previous check) used there.

  The reference's integer schedule: the first window is max(int(0.22 n), 1),
  each next one max(k - max(int(0.03 n), 1), max(int(0.06 n), 1)); for n = 100
  the checks end iterations 22, 41, 57, 70, 80, 87, 93, 99 (1-based), i.e.
  ceil(p_j n) for p_j = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99.
  """
  common.check_positive_int("n_iter", n_iter)
  k = max(int(0.22 * n_iter), 1)
  k_min = max(int(0.06 * n_iter), 1)
  size_decr = max(int(0.03 * n_iter), 1)
  out, counter = [], 0
  for i in range(n_iter):
    counter += 1
    if counter == k:
      out.append((i, k))
      k = max(k - size_decr, k_min)
      counter = 0
  return out


def check_oscillation(loss_steps: Array, i: Array | int, k: Array | int, k_max: int,
                      rho: float) -> Array:
  """Condition 1 of the step-size rule, per example (the reference's ``check_oscillation``).

  t = sum_{c=0}^{k-1} [L(i - c) > L(i - c - 1)], true where t <= k * rho. ``loss_steps`` is the
  [n_iter, N] buffer of the losses of iterations 0..n_iter-1 (zeros where not yet written);
  indices wrap around as in the reference (its index -1 is the buffer's last row). ``k`` may be
  traced; ``k_max`` >= k bounds the window statically.
  """
  n_iter = loss_steps.shape[0]
  c = jnp.arange(k_max)
  cur = jnp.take(loss_steps, (i - c) % n_iter, axis=0)
  prev = jnp.take(loss_steps, (i - c - 1) % n_iter, axis=0)
  increased = (cur > prev) & (c < k)[:, None]
  t = jnp.sum(increased.astype(jnp.float32), axis=0)
  return t <= k * rho


def init_point(rng: Array, x: Array, *, eps: float, norm: str) -> Array:
  """The reference's random start: clip(x + eps * u / ||u||, 0, 1).

  u ~ U[-1, 1]^d for L-inf (so one coordinate moves by exactly eps), N(0, I) for L2.
  """
  if norm == "linf":
    u = jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0)
  else:
    u = jax.random.normal(rng, x.shape, x.dtype)
  return jnp.clip(x + eps * common.normalize(u, norm), 0.0, 1.0)


def _project(x: Array, x_new: Array, *, eps: float, norm: str) -> Array:
  """The reference's projection onto the eps-ball around x, then [0, 1]."""
  if norm == "linf":
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
  delta = x_new - x
  radius = jnp.minimum(eps, common.l2_norm(delta))
  return jnp.clip(x + common.normalize(delta, "l2") * common.bcast(radius, x), 0.0, 1.0)


class APGDRun(NamedTuple):
  """One APGD run (the reference's ``attack_single_run``), per example."""
  x_best: Array       # [N, ...] the highest-loss point
  acc: Array          # [N] bool: no iterate was misclassified
  loss_best: Array    # [N] its loss
  x_best_adv: Array   # [N, ...] the last misclassified iterate (the start where none)


def apgd_run(model_fn: ModelFn, x: Array, y: Array, x_init: Array, *, eps: float,
             norm: str = "linf", loss: str = "ce", n_iter: int = 100, rho: float = 0.75,
             targets: Array | None = None, active: Array | None = None,
             early_stop: bool = True) -> APGDRun:
  """One APGD run of ``n_iter`` iterations from ``x_init`` (Algorithm 1; see the module doc).

  Args:
    model_fn: x -> logits [N, K].
    x: clean inputs in [0, 1], [N, ...]; y: int labels [N].
    x_init: the starting point (clipped to [0, 1]); ``init_point`` draws the reference's.
    eps, norm: the threat model ("linf" or "l2").
    loss: "ce", "dlr" or "dlr-targeted" (needs ``targets`` [N]).
    n_iter, rho: iterations and the oscillation threshold of the step-size rule.
    active: [N] bool, the points attacked (default all). The run stops early once every active
      point has a misclassified iterate (``early_stop``); the reference runs all n_iter, which
      changes only which misclassified iterate is returned.

  Returns:
    APGDRun(x_best, acc, loss_best, x_best_adv).
  """
  common.check_common(x, y, eps=eps, norm=norm)
  common.check_positive_int("n_iter", n_iter)
  if x_init.shape != x.shape:
    raise ValueError(f"x_init must have the shape of x {x.shape}, got {x_init.shape}.")
  if loss == "dlr-targeted" and targets is None:
    raise ValueError("loss='dlr-targeted' needs targets.")
  active = common.active_mask(active, y)
  crit = loss_fn(loss)
  x = jax.lax.stop_gradient(x)

  def total_loss(x_adv):
    logits = model_fn(x_adv)
    per_example = crit(logits, y, targets)
    return jnp.sum(per_example), (per_example, logits)

  grad_fn = jax.grad(total_loss, has_aux=True)

  checks = step_size_checkpoints(n_iter)
  is_check = np.zeros(n_iter, bool)
  window = np.zeros(n_iter, np.int32)
  for i, k in checks:
    is_check[i], window[i] = True, k
  k_max = max([k for _, k in checks] + [1])
  is_check, window = jnp.asarray(is_check), jnp.asarray(window)

  x_adv = jnp.clip(x_init, 0.0, 1.0)
  grad, (loss0, logits0) = grad_fn(x_adv)
  acc = jnp.argmax(logits0, axis=-1) == y
  n = y.shape[0]
  state = dict(
      i=jnp.zeros((), jnp.int32), x_adv=x_adv, x_adv_old=x_adv, grad=grad, grad_best=grad,
      x_best=x_adv, x_best_adv=x_adv, loss_best=loss0, acc=acc,
      loss_steps=jnp.zeros((n_iter, n), jnp.float32),
      step=jnp.full((n,), STEP_INIT * eps, jnp.float32),
      loss_best_last_check=loss0, reduced_last_check=jnp.ones((n,), bool))

  def step_direction(g):
    return jnp.sign(g) if norm == "linf" else common.normalize(g, "l2")

  def body(s):
    i = s["i"]
    x_adv, step = s["x_adv"], common.bcast(s["step"], x)
    a = jnp.where(i > 0, MOMENTUM, 1.0)
    z = _project(x, x_adv + step * step_direction(s["grad"]), eps=eps, norm=norm)
    x_new = _project(x, x_adv + (z - x_adv) * a + (x_adv - s["x_adv_old"]) * (1 - a),
                     eps=eps, norm=norm)
    grad, (loss_i, logits) = grad_fn(x_new)
    pred = jnp.argmax(logits, axis=-1) == y
    acc = s["acc"] & pred
    x_best_adv = jnp.where(common.bcast(~pred, x), x_new, s["x_best_adv"])
    loss_steps = s["loss_steps"].at[i].set(loss_i)
    improved = loss_i > s["loss_best"]
    x_best = jnp.where(common.bcast(improved, x), x_new, s["x_best"])
    grad_best = jnp.where(common.bcast(improved, x), grad, s["grad_best"])
    loss_best = jnp.where(improved, loss_i, s["loss_best"])

    # Step-size check (at the checkpoints only).
    k = window[i]
    oscillating = check_oscillation(loss_steps, i, k, k_max, rho)
    no_progress = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
    halve = is_check[i] & (oscillating | no_progress)
    reduced_last_check = jnp.where(is_check[i], halve, s["reduced_last_check"])
    loss_best_last_check = jnp.where(is_check[i], loss_best, s["loss_best_last_check"])
    return dict(
        i=i + 1, x_adv=jnp.where(common.bcast(halve, x), x_best, x_new), x_adv_old=x_adv,
        grad=jnp.where(common.bcast(halve, x), grad_best, grad), grad_best=grad_best,
        x_best=x_best, x_best_adv=x_best_adv, loss_best=loss_best, acc=acc,
        loss_steps=loss_steps, step=jnp.where(halve, s["step"] / 2.0, s["step"]),
        loss_best_last_check=loss_best_last_check, reduced_last_check=reduced_last_check)

  def cond(s):
    go = s["i"] < n_iter
    if early_stop:
      go = go & jnp.any(active & s["acc"])
    return go

  s = jax.lax.while_loop(cond, body, state)
  return APGDRun(x_best=s["x_best"], acc=s["acc"], loss_best=s["loss_best"],
                 x_best_adv=s["x_best_adv"])


def apgd(model_fn: ModelFn, x: Array, y: Array, rng: Array, *, eps: float,
         norm: str = "linf", loss: str = "ce", n_iter: int = 100, n_restarts: int = 1,
         target_class: int | None = None, n_target_classes: int = 9, rho: float = 0.75,
         active: Array | None = None, early_stop: bool = True, runs_at_once: int = 1) -> Array:
  """APGD (the reference's ``APGDAttack.perturb`` / ``APGDAttack_targeted.perturb``).

  Points misclassified on x (or not ``active``) are left as x. For ``loss`` "ce" / "dlr" the
  attack runs ``n_restarts`` times; for "dlr-targeted" it runs ``n_restarts`` times for each
  target class t(k) = the class with the k-th largest clean logit, k = ``target_class`` if given
  (2 = the runner-up), else k = 2 .. n_target_classes + 1 (APGD-T; capped at K). Run j (in the
  order target, then restart) starts from ``init_point(fold_in(rng, j), x)`` and attacks only
  the points still robust; a broken point keeps the example of the first run that broke it.

  ``runs_at_once`` = c > 1 batches c consecutive runs into one ``apgd_run`` on c x N rows (all
  of APGD-T's 9 targets at once with c = 9; ``common.run_in_calls``): bigger convolutions for
  the same work where the points stay robust, the usual case. Every row is computed
  independently, so the same points are broken (up to float rounding of other batch shapes)
  and, but for an early-stopped loop that runs longer, the same examples are kept.

  Args:
    model_fn: x -> logits [N, K].
    x: clean inputs in [0, 1], [N, ...]; y: int labels [N]; rng: key for the random starts.
    eps, norm, n_iter, rho: see ``apgd_run``.
    active: [N] bool, the points to attack (default all).
    early_stop: skip runs with no robust point left and stop a run once all its points are
      broken (the result is the same; False runs everything in full, for timing).
    runs_at_once: runs batched into one call (1: one after the other, as the reference).

  Returns:
    x_adv [N, ...]: the misclassified iterate for the broken points, x for the others.
  """
  common.check_common(x, y, eps=eps, norm=norm)
  common.check_choice("loss", loss, LOSSES)
  common.check_positive_int("n_restarts", n_restarts)
  x = jax.lax.stop_gradient(x)
  clean_logits = model_fn(x)
  num_classes = clean_logits.shape[-1]
  robust = (jnp.argmax(clean_logits, axis=-1) == y) & common.active_mask(active, y)
  if loss == "dlr-targeted":
    if num_classes < 4:
      raise ValueError(f"The targeted DLR loss needs >= 4 classes, got {num_classes}.")
    if target_class is not None:
      if not 2 <= target_class <= num_classes:
        raise ValueError(f"target_class must lie in [2, {num_classes}], got {target_class}.")
      ks = [int(target_class)]
    else:
      common.check_positive_int("n_target_classes", n_target_classes)
      ks = list(range(2, min(n_target_classes, num_classes - 1) + 2))
  else:
    ks = [1]  # unused
  ks = jnp.asarray(ks, jnp.int32)
  n_runs = int(ks.shape[0]) * n_restarts

  def attack_rows(js, active_rows):
    c = js.shape[0]
    x_init = common.stack_runs(
        lambda j: init_point(jax.random.fold_in(rng, j), x, eps=eps, norm=norm), js)
    targets = None
    if loss == "dlr-targeted":
      targets = common.run_targets(clean_logits, ks, n_restarts, js)
    run = apgd_run(model_fn, common.rows(x, c), common.rows(y, c), x_init, eps=eps, norm=norm,
                   loss=loss, n_iter=n_iter, rho=rho, targets=targets, active=active_rows,
                   early_stop=early_stop)
    return ~common.per_run(run.acc, c), common.per_run(run.x_best_adv, c)

  x_adv = common.run_in_calls(n_runs, runs_at_once, robust, x, attack_rows,
                              early_stop=early_stop)
  return jax.lax.stop_gradient(x_adv)


def apgd_targeted(model_fn: ModelFn, x: Array, y: Array, rng: Array, *, eps: float,
                  norm: str = "linf", n_iter: int = 100, n_restarts: int = 1,
                  n_target_classes: int = 9, rho: float = 0.75, active: Array | None = None,
                  early_stop: bool = True, runs_at_once: int = 1) -> Array:
  """APGD-T: ``apgd`` with the targeted DLR loss on the top ``n_target_classes`` other classes."""
  return apgd(model_fn, x, y, rng, eps=eps, norm=norm, loss="dlr-targeted", n_iter=n_iter,
              n_restarts=n_restarts, n_target_classes=n_target_classes, rho=rho,
              active=active, early_stop=early_stop, runs_at_once=runs_at_once)
