"""The AutoAttack ensemble ("standard" version) in JAX.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020; the reference is
``AutoAttack.run_standard_evaluation`` (github.com/fra31/auto-attack; here the
``pyautoattack`` package). The attacks run one after the other, each on the
points that are still robust (correctly classified and not broken by an
earlier attack), so the robust accuracy is the per-example worst case over
the ensemble:

  robust(i) = [f(x_i) = y_i] * prod_a [f(A_a(x_i)) = y_i].

Standard version (L-inf and L2): APGD-CE (1 restart), APGD-T (9 target
classes, 1 restart each), FAB-T (9 target classes), each with 100 iterations,
and Square (5000 queries).

The points are processed in batches of ``batch_size`` (fewer rows when fewer
points are left for an attack: ``attack_batch_size``); the last batch is
padded (padding inactive) so each attack compiles once, and every attack is
one jitted call per batch, sharded over the devices of a mesh along the batch
axis. All batches of an attack are dispatched before any result is read back.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sovr_jax import sharding
from sovr_jax.attacks.autoattack import common
# The package exports functions named like these modules, so import from the modules.
from sovr_jax.attacks.autoattack.apgd import apgd as apgd_fn
from sovr_jax.attacks.autoattack.fab import fab as fab_fn
from sovr_jax.attacks.autoattack.square import square as square_fn

Array = jax.Array
ModelFn = common.ModelFn

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
#: Every attack known; the index of an attack here seeds its key (independent of the list run).
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")
#: Tolerance of the eps-ball check on returned examples (float32 rounding of x +- eps).
EPS_ATOL = 1e-6
#: The reference's check_square_sr threshold: a larger drop by Square is reported.
SQUARE_ALPHA = 0.002
#: A re-evaluated logit margin within this fraction of the largest |logit| is rounding-level.
BORDERLINE_RTOL = 1e-2


def make_attack(name: str, model_fn: ModelFn, *, eps: float, norm: str = "linf",
                n_iter: int = 100, n_queries: int = 5000, n_target_classes: int = 9,
                n_restarts: int = 1, early_stop: bool = True, runs_at_once: int = 1
                ) -> Callable[[Array, Array, Array, Array], Array]:
  """(x, y, active, rng) -> x_adv for one attack of the ensemble, standard settings.

  ``runs_at_once``: APGD's and FAB's runs (target classes x restarts) batched into one call
  (``common.run_in_calls``; the same points are broken). Square has one run.
  """
  common.check_choice("attack", name, ATTACKS)
  kw = dict(eps=eps, norm=norm, early_stop=early_stop)
  runs_kw = dict(kw, n_iter=n_iter, runs_at_once=runs_at_once)
  if name == "apgd-ce":
    f = functools.partial(apgd_fn, loss="ce", n_restarts=n_restarts, **runs_kw)
  elif name == "apgd-dlr":
    f = functools.partial(apgd_fn, loss="dlr", n_restarts=n_restarts, **runs_kw)
  elif name == "apgd-t":
    f = functools.partial(apgd_fn, loss="dlr-targeted", n_restarts=1,
                          n_target_classes=n_target_classes, **runs_kw)
  elif name == "fab-t":
    f = functools.partial(fab_fn, targeted=True, n_restarts=1,
                          n_target_classes=n_target_classes, **runs_kw)
  elif name == "fab":
    f = functools.partial(fab_fn, targeted=False, n_restarts=n_restarts, **runs_kw)
  else:
    f = functools.partial(square_fn, n_queries=n_queries, n_restarts=1, **kw)

  def attack(x, y, active, rng):
    return f(model_fn, x, y, rng, active=active)
  return attack


def _as_key(rng: Any) -> tuple[Array, int | None]:
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng)), int(rng)
  return rng, None


def attack_batch_size(num_points: int, batch_size: int, num_devices: int,
                      multiple: int = 8) -> int:
  """Rows per jitted call of an attack on ``num_points`` points: ``batch_size``, or fewer when
  fewer points are left, rounded up to a multiple of lcm(``multiple``, devices).

  Padding rows are computed like real ones, so attacking 365 robust points in batches of 1,000
  would spend 2.7x the work; each attack compiles once for its own batch shape anyway.
  """
  m = math.lcm(multiple, num_devices)
  return min(batch_size, -(-num_points // m) * m)


def _margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
  """z_y - max_{k != y} z_k per row (numpy)."""
  zy = np.take_along_axis(logits, y[:, None], 1)[:, 0]
  other = logits.copy()
  np.put_along_axis(other, y[:, None], -np.inf, 1)
  return zy - other.max(1)


def flag_checks(robust: np.ndarray, broken: np.ndarray, final_logits: np.ndarray,
                y: np.ndarray) -> dict[str, Any]:
  """Re-evaluation checks of the robust flags against the final examples' logits.

  ``broken`` marks the points an attack broke (clean-correct, not robust). Re-evaluating in
  other batches can flip a point whose margin is within rounding of zero (TF32 or bfloat16
  convolutions pick other algorithms for other batch shapes): a disagreement whose re-evaluated
  margin is at most ``BORDERLINE_RTOL`` times max(1, max_k |z_k|) counts as borderline, not as
  a failed check.
  """
  if len(y) == 0:
    return {"broken_misclassified": True, "flags_disagree": 0, "flags_disagree_borderline": 0,
            "max_abs_margin_of_disagreeing": 0.0}
  margin = _margins(final_logits, y)
  borderline = np.abs(margin) <= BORDERLINE_RTOL * np.maximum(1.0,
                                                               np.abs(final_logits).max(1))
  correct = final_logits.argmax(1) == y
  disagree = correct != robust
  return {
      "broken_misclassified": bool(np.all((~correct | borderline)[broken])),
      "flags_disagree": int(np.sum(disagree & ~borderline)),
      "flags_disagree_borderline": int(np.sum(disagree & borderline)),
      "max_abs_margin_of_disagreeing": float(np.abs(margin[disagree]).max())
                                       if disagree.any() else 0.0,
  }


def example_checks(x: np.ndarray, x_adv: np.ndarray, eps: float, norm: str) -> dict[str, Any]:
  """Are the returned examples valid: the largest perturbation, every example inside the
  eps-ball (up to float32 rounding, ``EPS_ATOL``), inside [0, 1], finite."""
  n = len(x)
  pert = _perturbation(x_adv, x, norm) if n else np.zeros(0)
  return {"max_perturbation": float(pert.max()) if n else 0.0,
          "within_eps": bool(np.all(pert <= eps + EPS_ATOL)),
          "in_unit_range": bool(n == 0 or (x_adv.min() >= 0 and x_adv.max() <= 1)),
          "finite": bool(np.isfinite(x_adv).all())}


def _perturbation(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
  d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


def run_standard(model_fn: ModelFn, x: Any, y: Any, rng: Any, *, eps: float,
                 norm: str = "linf", batch_size: int = 500,
                 attacks: Sequence[str] = STANDARD_ATTACKS, n_iter: int = 100,
                 n_queries: int = 5000, n_target_classes: int = 9, apgd_restarts: int = 1,
                 early_stop: bool = True, mesh: jax.sharding.Mesh | None = None,
                 log: Callable[[str], None] | None = print,
                 attack_model_fn: ModelFn | None = None,
                 after_attack: Callable[[dict[str, Any]], None] | None = None,
                 runs_at_once: int = 1) -> dict[str, Any]:
  """Runs the AutoAttack ensemble on (x, y) and returns the adversarial examples and a summary.

  Args:
    model_fn: x -> logits [N, K] (deterministic; e.g. BatchNorm in eval mode). With several
      devices its parameters should be replicated on ``mesh`` (``sharding.replicate``).
    x: inputs in [0, 1], [N, ...] (NHWC images for Square); y: int labels [N] (host arrays).
    rng: an int seed (recorded in the summary) or a key.
    eps, norm: the threat model ("linf" or "l2").
    batch_size: points per jitted call (a multiple of the mesh's device count).
    attacks: run in this order (``ATTACKS``); the standard list by default.
    n_iter, n_queries, n_target_classes, apgd_restarts: the standard settings 100, 5000, 9, 1
      (lower them for quick runs).
    early_stop: let attack loops end once their points are broken (False: every loop runs
      in full, on the points the attack was given; the results stay valid).
    mesh: the device mesh (default ``sharding.make_mesh()``, all devices).
    log: called with progress lines (None: silent).
    attack_model_fn: the network the attacks compute their losses and gradients on, e.g. the
      same weights in bfloat16 (about twice as fast on GPU/TPU matrix units); default
      ``model_fn``. Every decision is made on ``model_fn``: the clean accuracy, whether an
      attack's output breaks a point (a point only the attack network misclassifies stays
      robust and goes on to the next attack), the final checks, and which points the attack
      network can attack: those it gets wrong clean while ``model_fn`` gets them right are
      attacked on ``model_fn`` (summary ``settings.attacked_on_model``).
    after_attack: called after each attack with the state so far ({"attacks": names done,
      "clean", "robust", "broken_by" [N], "robust_acc_after", "time_s", "compile_s",
      "attacked"}), e.g. to save a partial result that a cut run keeps.
    runs_at_once: APGD and FAB runs batched into one call (9: APGD-T's and FAB-T's 9 targets
      at once, on 9x the rows; the same points are broken, see ``common.run_in_calls``). A
      speed knob: 1 by default.

  Returns:
    {"x_adv": [N, ...] float32 (x where not broken), "y_adv": [N] predictions on x_adv,
     "robust": [N] bool, "clean": [N] bool (correct on x), "broken_by": [N] str (the attack that broke the point, "" if none),
     "summary": JSON-able dict with clean_acc, robust_acc, robust_acc_after {attack: acc},
     time_s {attack: s} (compilation excluded, in compile_s), attacked {attack: points it
     attacked}, n, eps, norm, seed, attacks, batch_size, attack_batch_size {attack: rows per
     call}, settings, devices and checks (max
     perturbation, within eps, inside [0, 1], finite, every broken point misclassified on
     re-evaluation)}.
  """
  say = log if log is not None else (lambda _: None)
  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int32)
  common.check_choice("norm", norm, common.NORMS)
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps}.")
  if x.ndim < 2 or y.shape != (x.shape[0],):
    raise ValueError(f"x must be [N, ...] and y [N]; got {x.shape} and {y.shape}.")
  if x.size and (x.min() < 0 or x.max() > 1):
    raise ValueError(f"x must lie in [0, 1]; got [{x.min()}, {x.max()}].")
  attacks = list(attacks)
  for a in attacks:
    common.check_choice("attack", a, ATTACKS)
  if len(set(attacks)) != len(attacks):
    raise ValueError(f"attacks {attacks} names an attack twice.")
  common.check_positive_int("batch_size", batch_size)
  key, seed = _as_key(rng)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, "batch_size")
  data_sh, rep_sh = sharding.batch_sharded(mesh), sharding.replicated(mesh)
  n = len(x)

  def batches(idx, xs, bs=batch_size):
    """(selected indices, padded xs, y, active) per batch of ``bs`` rows of ``idx``."""
    for start in range(0, len(idx), bs):
      sel = idx[start:start + bs]
      pad = np.concatenate([sel, np.full(bs - len(sel), sel[-1])])
      active = np.arange(bs) < len(sel)
      yield (sel, jax.device_put(xs[pad], data_sh), jax.device_put(y[pad], data_sh),
             jax.device_put(active, data_sh))

  def jit_logits(fn):
    return jax.jit(lambda xb: fn(xb).astype(jnp.float32), in_shardings=data_sh,
                   out_shardings=data_sh)
  logits_fn = jit_logits(model_fn)

  def logits_all(xs, logits_fn=logits_fn):
    outs = [(sel, logits_fn(xb)) for sel, xb, _, _ in batches(np.arange(len(xs)), xs)]
    logits = None
    for sel, z in outs:
      z = np.asarray(z)[:len(sel)]
      if logits is None:
        logits = np.empty((len(xs),) + z.shape[1:], np.float32)
      logits[sel] = z
    return logits if logits is not None else np.zeros((0, 1), np.float32)

  def predict_all(xs):
    return logits_all(xs).argmax(1).astype(np.int32)

  clean_pred = predict_all(x)
  robust = clean_pred == y
  # Every attack skips the points its own network gets wrong clean. With a separate attack
  # network (bfloat16), a point that only it gets wrong would never be attacked and would stay
  # robust: such points are attacked on model_fn itself.
  on_model = np.zeros(n, bool)
  if attack_model_fn is not None and n:
    on_model = robust & (logits_all(x, jit_logits(attack_model_fn)).argmax(1) != y)
  clean_acc = float(robust.mean()) if n else 0.0
  x_adv = x.copy()
  broken_by = np.full(n, "", dtype=object)
  rejected = 0
  say(f"autoattack-jax: {n} points, {norm} eps={eps:.6g}, attacks {', '.join(attacks)}, "
      f"batch {batch_size}, {mesh.devices.size} device(s); clean accuracy {clean_acc:.2%}")

  def attack_points(name, net, idx, on_model_share):
    """Runs attack ``name`` on network ``net`` over the points ``idx``, in batches; marks the
    points whose output ``model_fn`` misclassifies inside the ball as broken. Returns (points
    broken, seconds, compile seconds, rows per call). ``on_model_share``: the points attacked
    on model_fn beside a separate attack network, with keys of their own."""
    nonlocal rejected
    bs = attack_batch_size(len(idx), batch_size, mesh.devices.size)
    attack = make_attack(name, net, eps=eps, norm=norm, n_iter=n_iter, n_queries=n_queries,
                         n_target_classes=n_target_classes, n_restarts=apgd_restarts,
                         early_stop=early_stop, runs_at_once=runs_at_once)

    def attack_and_predict(xb, yb, ab, kb):
      xa = attack(xb, yb, ab, kb)
      return xa, common.predict(model_fn, xa)

    jitted = jax.jit(attack_and_predict, in_shardings=(data_sh, data_sh, data_sh, rep_sh),
                     out_shardings=(data_sh, data_sh))
    attack_key = jax.random.fold_in(key, ATTACKS.index(name))
    if on_model_share:
      attack_key = jax.random.fold_in(attack_key, len(ATTACKS))
    say(f"autoattack-jax: {name}: compiling for batches of {bs} rows ...")
    t0 = time.perf_counter()
    shapes = (jax.ShapeDtypeStruct((bs,) + x.shape[1:], jnp.float32, sharding=data_sh),
              jax.ShapeDtypeStruct((bs,), jnp.int32, sharding=data_sh),
              jax.ShapeDtypeStruct((bs,), jnp.bool_, sharding=data_sh),
              jax.ShapeDtypeStruct(attack_key.shape, attack_key.dtype, sharding=rep_sh))
    compiled = jitted.lower(*shapes).compile()
    compile_secs = time.perf_counter() - t0

    t0 = time.perf_counter()
    pending = [(sel, compiled(xb, yb, ab, jax.random.fold_in(attack_key, b)))
               for b, (sel, xb, yb, ab) in enumerate(batches(idx, x, bs))]
    count = 0
    if log is not None and len(pending) > 1:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      pending = tqdm(pending, desc=f"autoattack-jax: {name}", unit="batch", leave=False,
                     mininterval=2.0)
    for sel, (xa, pa) in pending:
      xa, pa = np.asarray(xa)[:len(sel)], np.asarray(pa)[:len(sel)]
      fooled = pa != y[sel]
      inside = ((_perturbation(xa, x[sel], norm) <= eps + EPS_ATOL)
                & (xa.reshape(len(sel), -1).min(1) >= 0) & (xa.reshape(len(sel), -1).max(1) <= 1)
                & np.isfinite(xa.reshape(len(sel), -1)).all(1))
      rejected += int(np.sum(fooled & ~inside))
      broken = fooled & inside
      robust[sel[broken]] = False
      x_adv[sel[broken]] = xa[broken]
      broken_by[sel[broken]] = name
      count += int(broken.sum())
    return count, time.perf_counter() - t0, compile_secs, bs

  if on_model.any():
    say(f"autoattack-jax: {int(on_model.sum())} points only the attack network misclassifies "
        f"clean are attacked on the model itself")
  robust_after, time_s, compile_s, attacked, rows = {}, {}, {}, {}, {}
  for name in attacks:
    idx = np.flatnonzero(robust)
    if len(idx) == 0:
      say(f"autoattack-jax: no robust points left, skipping {name}")
      robust_after[name], time_s[name], compile_s[name], attacked[name] = 0.0, 0.0, 0.0, 0
      continue
    attacked[name] = int(len(idx))
    time_s[name] = compile_s[name] = 0.0
    broken_count = 0
    for net, group, share in ((attack_model_fn or model_fn, idx[~on_model[idx]], False),
                              (model_fn, idx[on_model[idx]], True)):
      if len(group) == 0:
        continue
      broken, secs, compile_secs, bs = attack_points(name, net, group, share)
      rows.setdefault(name, bs)
      broken_count += broken
      time_s[name] += secs
      compile_s[name] += compile_secs
    robust_after[name] = float(robust.mean())
    say(f"autoattack-jax: {name}: {broken_count} of {len(idx)} points broken; robust accuracy "
        f"after {name.upper()}: {robust_after[name]:.2%} ({time_s[name]:.2f} s, compile "
        f"{compile_s[name]:.1f} s)")
    if after_attack is not None:
      after_attack({"attacks": list(robust_after), "clean": clean_pred == y,
                    "robust": robust.copy(), "broken_by": broken_by.astype(str),
                    "robust_acc_after": dict(robust_after), "time_s": dict(time_s),
                    "compile_s": dict(compile_s), "attacked": dict(attacked)})

  final_logits = logits_all(x_adv)
  final_pred = final_logits.argmax(1).astype(np.int32) if n else np.zeros(0, np.int32)
  broken_mask = ~robust & (clean_pred == y)
  checks = {
      **example_checks(x, x_adv, eps, norm),
      **flag_checks(robust, broken_mask, final_logits, y),
      "rejected_outside_ball": rejected,
  }
  # The reference's check_square_sr: Square (gradient-free) lowering the accuracy below that
  # of the gradient-based attacks hints at gradient masking.
  others = [clean_acc] + [v for k, v in robust_after.items() if k != "square"]
  if "square" in robust_after and len(others) > 1:
    drop = min(others) - robust_after["square"]
    checks["square_decrease"] = float(max(drop, 0.0))
    if drop > SQUARE_ALPHA:
      say(f"autoattack-jax: WARNING: Square Attack has decreased the robust accuracy by "
          f"{drop:.2%}; the evaluation by the gradient-based attacks may be unreliable "
          f"(gradient masking?). Consider Square with more queries/restarts or an adaptive "
          f"attack.")
  if not (checks["within_eps"] and checks["in_unit_range"] and checks["finite"]
          and checks["broken_misclassified"] and checks["flags_disagree"] == 0):
    say(f"autoattack-jax: WARNING: adversarial-example checks failed: {checks}")
  robust_acc = float(robust.mean()) if n else 0.0
  say(f"autoattack-jax: robust accuracy {robust_acc:.2%}; max {norm} perturbation "
      f"{checks['max_perturbation']:.6f}; total attack time {sum(time_s.values()):.2f} s")
  summary = {
      "clean_acc": clean_acc, "robust_acc": robust_acc, "robust_acc_after": robust_after,
      "time_s": time_s, "compile_s": compile_s, "attacked": attacked, "n": int(n),
      "eps": float(eps), "norm": norm, "seed": seed, "attacks": attacks,
      "batch_size": int(batch_size), "attack_batch_size": rows,
      "settings": {"n_iter": n_iter, "n_queries": n_queries,
                   "n_target_classes": n_target_classes, "apgd_restarts": apgd_restarts,
                   "early_stop": early_stop, "runs_at_once": runs_at_once,
                   "separate_attack_model": attack_model_fn is not None,
                   "attacked_on_model": int(on_model.sum())},
      "devices": [str(d) for d in mesh.devices.flat], "checks": checks,
  }
  return {"x_adv": x_adv, "y_adv": final_pred, "robust": robust, "clean": clean_pred == y,
          "broken_by": broken_by.astype(str), "summary": summary}
