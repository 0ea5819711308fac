"""AutoAttack in JAX (sovr_jax.attacks.autoattack) against the reference, pyautoattack.

The model is a one-hidden-layer MLP on 8x8x3 images, defined identically in JAX and PyTorch
(sovr_jax.evaluation.targets.tiny_mlp), on random images labelled by the model (clean accuracy
100%), at an eps where about half the points can be broken. Iterations and queries are reduced for speed
(APGD/FAB 20 iterations, Square 300 queries).
"""

import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax.attacks import autoattack as aa
from sovr_jax.attacks.autoattack import common as aa_common
from sovr_jax.attacks.autoattack import ensemble as ensemble_lib
from sovr_jax.evaluation import targets
from tests import references

# The comparisons with the reference need it; the JAX AutoAttack's own tests run without it.
REFERENCE = ("torch", "pyautoattack")
needs_reference = references.needs(*REFERENCE)
if references.have(*REFERENCE):
  import torch
  from pyautoattack import AutoAttack
  from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
  from pyautoattack.fab_projections import projection_l2 as ref_projection_l2
  from pyautoattack.fab_projections import projection_linf as ref_projection_linf
  from pyautoattack.fab_pt import FABAttack_PT
  from pyautoattack.square import SquareAttack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logging.getLogger("auto-attack").setLevel(logging.ERROR)

N, EPS, EPS_L2, N_ITER, N_QUERIES, SEED, BATCH = 200, 0.02, 0.25, 20, 300, 0, 64
#: |robust accuracy (ours) - robust accuracy (reference)| allowed on N points. Repeated runs with
#: other seeds spread by <= 0.5 points (APGD) and <= 1.5 points (Square) on either side.
TOL = {"apgd-ce": 0.03, "apgd-t": 0.03, "fab-t": 0.02, "fab": 0.02, "fab-t-l2": 0.02,
       "square": 0.05, "square-l2": 0.05}


def _reference_apgd_iters(att, n_iter):
  """pyautoattack sets its checkpoint constants in __init__ from n_iter."""
  att.n_iter = n_iter
  att.n_iter_2 = max(int(0.22 * n_iter), 1)
  att.n_iter_min = max(int(0.06 * n_iter), 1)
  att.size_decr = max(int(0.03 * n_iter), 1)


@pytest.fixture(scope="module")
def setup():
  params = targets.tiny_mlp_params(SEED)
  x, y = targets.tiny_mlp_data(N, SEED, params)
  out = {"fn": targets.tiny_mlp_jax(params), "x": x, "y": y, "xj": jnp.asarray(x),
         "yj": jnp.asarray(y, jnp.int32)}
  if references.have(*REFERENCE):  # the PyTorch twin, for the reference's side
    out.update(torch=targets.tiny_mlp_torch(params),
               xt=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
               yt=torch.from_numpy(y))
  return out


def _correct_jax(fn, x_adv, y):
  return np.asarray(jnp.argmax(fn(jnp.asarray(x_adv)), -1)) == y


def _correct_torch(model, x_adv_nchw, y):
  with torch.no_grad():
    return model(x_adv_nchw).argmax(1).numpy() == y


@pytest.fixture(scope="module")
def ours(setup):
  """Each attack once on all N points (jitted), with its robust flags."""
  fn, xj, yj = setup["fn"], setup["xj"], setup["yj"]
  calls = {
      "apgd-ce": lambda k: aa.apgd(fn, xj, yj, k, eps=EPS, n_iter=N_ITER),
      "apgd-ce-l2": lambda k: aa.apgd(fn, xj, yj, k, eps=EPS_L2, norm="l2", n_iter=N_ITER),
      "apgd-t": lambda k: aa.apgd_targeted(fn, xj, yj, k, eps=EPS, n_iter=N_ITER),
      "fab-t": lambda k: aa.fab(fn, xj, yj, k, eps=EPS, n_iter=N_ITER),
      "fab": lambda k: aa.fab(fn, xj, yj, k, eps=EPS, n_iter=N_ITER, targeted=False),
      "fab-t-l2": lambda k: aa.fab(fn, xj, yj, k, eps=EPS_L2, norm="l2", n_iter=N_ITER),
      "square": lambda k: aa.square(fn, xj, yj, k, eps=EPS, n_queries=N_QUERIES),
      "square-l2": lambda k: aa.square(fn, xj, yj, k, eps=EPS_L2, norm="l2",
                                       n_queries=N_QUERIES),
  }
  out = {}
  for name, call in calls.items():
    f = jax.jit(call)
    x_adv = np.asarray(f(jax.random.PRNGKey(SEED)))
    out[name] = {"x_adv": x_adv, "robust": _correct_jax(fn, x_adv, setup["y"]), "jit": f}
  return out


@pytest.fixture(scope="module")
def reference(setup):
  """pyautoattack's robust flags for each attack alone (AutoAttack version='custom')."""
  model, xt, yt = setup["torch"], setup["xt"], setup["yt"]
  out = {}
  for name in ("apgd-ce", "apgd-t", "square", "square-l2"):
    l2 = name.endswith("-l2")
    adv = AutoAttack(model, attacks=[name.removesuffix("-l2")], device="cpu",
                     eps=EPS_L2 if l2 else EPS, norm="L2" if l2 else "Linf", seed=SEED,
                     version="custom")
    adv.apgd.n_restarts = 1
    _reference_apgd_iters(adv.apgd, N_ITER)
    _reference_apgd_iters(adv.apgd_targeted, N_ITER)
    adv.square.n_queries = N_QUERIES
    x_adv, _ = adv.run_standard_evaluation(xt, yt, batch_size=N)
    out[name] = _correct_torch(model, x_adv, setup["y"])
  for name, targeted, norm, eps in (("fab-t", True, "Linf", EPS), ("fab", False, "Linf", EPS),
                                    ("fab-t-l2", True, "L2", EPS_L2)):
    fab = FABAttack_PT(model, n_restarts=1, n_iter=N_ITER, eps=eps, seed=SEED, norm=norm,
                       targeted=targeted, n_target_classes=9, device="cpu")
    x_adv = fab.perturb(xt, yt)
    out[name] = _correct_torch(model, x_adv, setup["y"])
  return out


# --------------------------------------------------------------------------------------------
# The pieces against the reference's own functions.
# --------------------------------------------------------------------------------------------


@needs_reference
def test_dlr_losses_match_reference():
  rng = np.random.default_rng(0)
  logits = (3 * rng.standard_normal((64, 10))).astype(np.float32)
  y = rng.integers(0, 10, 64)
  y[:16] = logits[:16].argmax(1)  # both branches of the untargeted DLR
  t = (y + rng.integers(1, 10, 64)) % 10
  ref = APGDAttack(None, eps=0.1)
  ref_t = APGDAttack_targeted(None, eps=0.1)
  ref_t.y_target = torch.from_numpy(t)
  lt, yt = torch.from_numpy(logits), torch.from_numpy(y)
  np.testing.assert_allclose(np.asarray(aa.dlr_loss(jnp.asarray(logits), jnp.asarray(y))),
                             ref.dlr_loss(lt, yt).numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(aa.dlr_loss_targeted(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(t))),
      ref_t.dlr_loss_targeted(lt, yt).numpy(), rtol=1e-5, atol=1e-6)


@needs_reference
@pytest.mark.parametrize("n_iter", [10, 100])
def test_step_size_checkpoints_match_reference(setup, n_iter):
  """The iterations and windows at which the reference checks the step size, recorded by
  wrapping its check_oscillation during a real run."""
  ref = APGDAttack(setup["torch"], n_iter=n_iter, eps=EPS, seed=0, device="cpu")
  ref.init_hyperparam(setup["xt"][:4])
  calls, orig = [], ref.check_oscillation
  ref.check_oscillation = lambda x, j, k, y5, k3=0.75: (calls.append((j, k)),
                                                        orig(x, j, k, y5, k3))[1]
  ref.attack_single_run(setup["xt"][:4], setup["yt"][:4])
  assert aa.step_size_checkpoints(n_iter) == calls
  if n_iter == 100:  # ceil(p_j * 100) for p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99
    assert [i + 1 for i, _ in calls] == [22, 41, 57, 70, 80, 87, 93, 99]


@needs_reference
def test_check_oscillation_matches_reference():
  rng = np.random.default_rng(1)
  n_iter, n = 30, 16
  steps = rng.standard_normal((n_iter, n)).astype(np.float32)
  steps[:, :4] = np.round(steps[:, :4])  # ties (no increase)
  steps[25:] = 0.0  # not yet written (the first check's window wraps onto these rows)
  ref = APGDAttack(None, eps=0.1, device="cpu")
  for j, k in aa.step_size_checkpoints(n_iter) + [(2, 6), (0, 1)]:
    want = ref.check_oscillation(torch.from_numpy(steps), j, k, None, k3=0.75).numpy() > 0
    got = aa.check_oscillation(jnp.asarray(steps), j, k, 8, 0.75)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"j={j} k={k}")


def _projection_problems(seed, m=96, d=40):
  """Points in the box (some on its faces), normals (some zero coordinates) and offsets from
  just beside the point to beyond the box's reach."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(0, 1, (m, d)).astype(np.float32)
  t[:, :3] = 0.0
  t[:, 3:5] = 1.0
  w = rng.standard_normal((m, d)).astype(np.float32)
  w[:, 5:8] = 0.0
  scale = np.repeat([0.05, 0.5, 2.0, 20.0], m // 4)  # close, middle, far, out of the box
  b = (np.sum(w * t, 1) + scale * rng.standard_normal(m)).astype(np.float32)
  return t, w, b


@needs_reference
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_reference(norm):
  t, w, b = _projection_problems(2)
  ref = {"linf": ref_projection_linf, "l2": ref_projection_l2}[norm]
  want = ref(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b)).numpy()
  args = (jnp.asarray(t), jnp.asarray(w), jnp.asarray(b))
  if norm == "linf":
    np.testing.assert_allclose(np.asarray(aa.projection_linf_sorted(*args)), want, atol=2e-6)
  got = np.asarray({"linf": aa.projection_linf, "l2": aa.projection_l2}[norm](*args))
  np.testing.assert_allclose(got, want, atol=2e-6)  # bisection on lambda instead of a sort
  assert np.abs(want).max() > 0.1  # non-trivial steps
  assert np.all(t + got >= -1e-6) and np.all(t + got <= 1 + 1e-6)
  reach = np.abs(np.sum(w * (t + want), 1) - b) < 1e-4  # the box reaches the hyperplane
  assert 0 < reach.sum() < len(b)
  np.testing.assert_allclose(np.sum(w * (t + got), 1)[reach], b[reach], atol=1e-4)


@needs_reference
@pytest.mark.parametrize("loss,norm", [("ce", "linf"), ("dlr-targeted", "linf"), ("ce", "l2")])
def test_apgd_run_follows_the_reference_trajectory(setup, loss, norm):
  """From the same start the run is deterministic: ours and the reference's attack_single_run
  agree on the best loss, the best point and the success of (almost) every example; float
  round-off can flip the sign of a tiny gradient component and fork a trajectory."""
  n = 64
  x, y = setup["xj"][:n], setup["yj"][:n]
  xt, yt = setup["xt"][:n], setup["yt"][:n]
  eps = EPS if norm == "linf" else EPS_L2
  x_init = aa.init_point(jax.random.PRNGKey(3), x, eps=eps, norm=norm)
  targets = None
  if loss == "ce":
    ref = APGDAttack(setup["torch"], n_iter=N_ITER, eps=eps, norm=norm.capitalize()
                     if norm == "l2" else "Linf", seed=0, loss="ce", device="cpu")
  else:
    ref = APGDAttack_targeted(setup["torch"], n_iter=N_ITER, eps=eps, seed=0, device="cpu")
    with torch.no_grad():
      ref.y_target = setup["torch"](xt).sort(dim=1)[1][:, -2]
    targets = jnp.asarray(ref.y_target.numpy(), jnp.int32)
  ref.init_hyperparam(xt)
  xb, acc, loss_best, _ = ref.attack_single_run(
      xt, yt, x_init=torch.from_numpy(np.asarray(x_init).transpose(0, 3, 1, 2).copy()))
  run = aa.apgd_run(setup["fn"], x, y, x_init, eps=eps, norm=norm, loss=loss, n_iter=N_ITER,
                    targets=targets, early_stop=False)
  same_point = np.abs(np.asarray(run.x_best) - xb.detach().permute(0, 2, 3, 1).numpy()
                      ).reshape(n, -1).max(1) < 1e-5
  same_loss = np.isclose(np.asarray(run.loss_best), loss_best.numpy(), rtol=1e-4, atol=1e-5)
  assert same_point.mean() >= 0.9 and same_loss.mean() >= 0.9
  assert np.mean(np.asarray(run.acc) == acc.numpy()) >= 0.95
  assert 0.1 < acc.float().mean() < 0.9  # the attack had work to do


# --------------------------------------------------------------------------------------------
# Whole attacks.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-ce-l2", "apgd-t", "fab-t", "fab", "fab-t-l2",
                                  "square", "square-l2"])
def test_outputs_lie_in_the_ball_and_box(setup, ours, name):
  x, x_adv = setup["x"], ours[name]["x_adv"]
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  d = (x_adv - x).reshape(N, -1)
  if name.endswith("l2"):
    assert np.sqrt((d.astype(np.float64) ** 2).sum(1)).max() <= EPS_L2 * (1 + 1e-5)
  else:
    assert np.abs(d).max() <= EPS + 1e-6
  robust = ours[name]["robust"]
  assert np.array_equal(x_adv[robust], x[robust])  # points not broken come back as x
  assert 0.05 < robust.mean() < 0.95  # the attack broke some points, not all


@needs_reference
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "fab", "fab-t-l2", "square",
                                  "square-l2"])
def test_robust_accuracy_matches_reference(ours, reference, name):
  ours_acc, ref_acc = ours[name]["robust"].mean(), reference[name].mean()
  assert abs(ours_acc - ref_acc) <= TOL[name], (name, ours_acc, ref_acc)
  if name.startswith("fab"):  # deterministic (no random start): the same points
    assert np.mean(ours[name]["robust"] == reference[name]) >= 0.97


def test_attacks_are_deterministic_and_respect_active(setup, ours):
  key = jax.random.PRNGKey(SEED)
  for name in ("apgd-t", "square"):
    np.testing.assert_array_equal(np.asarray(ours[name]["jit"](key)), ours[name]["x_adv"])
  # Inactive points are never changed.
  active = np.arange(N) % 2 == 0
  x_adv = np.asarray(aa.square(setup["fn"], setup["xj"], setup["yj"], key, eps=EPS,
                               n_queries=50, active=jnp.asarray(active)))
  assert np.array_equal(x_adv[~active], setup["x"][~active])
  assert not np.array_equal(x_adv[active], setup["x"][active])


@pytest.mark.parametrize("attack,restarts", [("apgd-t", 1), ("apgd-ce", 3), ("fab-t", 1)])
def test_batched_runs_break_the_same_points(setup, attack, restarts):
  """Runs batched into one call (the 9 targets of APGD-T or FAB-T at once; or 4 at a time,
  with 3 inactive slots in the last call; APGD-CE's 3 restarts) break exactly the points that
  the definition, run by run, breaks, and keep (nearly always) the same example: that of the
  first run that broke the point."""
  fn, key, x, y = setup["fn"], jax.random.PRNGKey(SEED), setup["xj"], setup["yj"]
  loss = {"apgd-t": "dlr-targeted", "apgd-ce": "ce"}.get(attack)

  def run_all(c):
    if loss:
      f = lambda x, y: aa.apgd(fn, x, y, key, eps=EPS, loss=loss, n_iter=N_ITER,  # noqa: E731
                               n_restarts=restarts, runs_at_once=c)
    else:
      f = lambda x, y: aa.fab(fn, x, y, key, eps=EPS, n_iter=N_ITER,  # noqa: E731
                              runs_at_once=c)
    return np.asarray(jax.jit(f)(x, y))

  # The definition, run by run: APGD's run j starts from init_point(fold_in(key, j)), FAB-T's
  # (one restart) from x; the targeted attacks' run j targets the class with the (j + 2)-th
  # largest clean logit; a point is robust if no run breaks it.
  clean_logits = fn(x)
  if loss:
    run = jax.jit(lambda x0, t: aa.apgd_run(fn, x, y, x0, eps=EPS, loss=loss, n_iter=N_ITER,
                                            targets=t).acc)
  else:
    fab_run = jax.jit(lambda x0, t: aa.fab_run(fn, x, y, x0, eps=EPS, n_iter=N_ITER,
                                               targets=t).x_adv)

    def run(x0, t):  # robust: not (misclassified within eps)
      xa = np.asarray(fab_run(x0, t))
      inside = np.abs(xa - setup["x"]).reshape(N, -1).max(1) <= EPS
      return _correct_jax(fn, xa, setup["y"]) | ~inside
  want = np.ones(N, bool)
  for j in range(restarts if attack == "apgd-ce" else 9):
    x0 = aa.init_point(jax.random.fold_in(key, j), x, eps=EPS, norm="linf") if loss else x
    t = aa_common.first_k_largest(clean_logits, j + 2) if attack != "apgd-ce" else None
    want &= np.asarray(run(x0, t))
  one = run_all(1)
  robust = _correct_jax(fn, one, setup["y"])
  assert 0.2 < robust.mean() < 0.9
  np.testing.assert_array_equal(robust, want)
  for c in (4, 9):
    x_adv = run_all(c)
    np.testing.assert_array_equal(_correct_jax(fn, x_adv, setup["y"]), robust)
    assert np.abs(x_adv - setup["x"]).max() <= EPS + 1e-6 and 0 <= x_adv.min() <= x_adv.max() <= 1
    assert np.array_equal(x_adv[robust], setup["x"][robust])
    same = np.all((x_adv == one).reshape(N, -1), axis=1)
    assert same.mean() >= 0.9, same.mean()
  with pytest.raises(ValueError, match="runs_at_once"):
    aa.apgd(fn, x, y, key, eps=EPS, runs_at_once=0)


@needs_reference
def test_square_schedule_matches_reference():
  ref = SquareAttack(None, p_init=0.8, n_queries=5000, eps=0.1, resc_schedule=False)
  ref_resc = SquareAttack(None, p_init=0.8, n_queries=1000, eps=0.1, resc_schedule=True)
  for it in list(range(0, 30)) + [49, 50, 51, 199, 200, 201, 999, 1000, 4000, 4001, 6001, 9000]:
    assert aa.p_selection(it) == ref.p_selection(it)
    assert aa.p_selection(it, n_queries=1000, rescale_schedule=True) == ref_resc.p_selection(it)
  sizes = aa.square_sizes(5000, 32, 32)
  assert sizes[0] == 29 and sizes[-1] == 3 and np.all(np.diff(sizes) <= 0)
  # L2: the reference's max(round(sqrt(p h w)), 3), made odd, capped at the image side.
  for it in (0, 11, 60, 300, 700, 1500, 3000, 4999):
    s = max(int(round(math.sqrt(ref.p_selection(it) * 32 * 32))), 3)
    s = min(s + 1 - s % 2, 32)
    assert aa.square_sizes(5000, 32, 32, norm="l2")[it] == s, it


@needs_reference
@pytest.mark.parametrize("s", [1, 3, 5, 6, 29])
def test_square_l2_pattern_matches_reference(s):
  ref = SquareAttack(None, norm="L2", eps=0.5, device="cpu")
  want = ref.eta(s).numpy()  # randomly transposed
  got = aa.square_eta(s)
  assert np.allclose(got, want, atol=1e-6) or np.allclose(got.T, want, atol=1e-6)
  assert np.sum(got ** 2) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# The ensemble and the comparison script.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(setup):
  lines = []
  res = aa.run_standard(setup["fn"], setup["x"], setup["y"], SEED, eps=EPS, batch_size=BATCH,
                        n_iter=N_ITER, n_queries=N_QUERIES, log=lines.append)
  return res, lines


def test_ensemble_attacks_only_robust_points(setup, ours, ensemble):
  res, lines = ensemble
  s = res["summary"]
  assert s["attack_batch_size"] == {
      a: ensemble_lib.attack_batch_size(s["attacked"][a], BATCH, 1) for a in s["attacked"]}
  assert list(s["robust_acc_after"]) == list(aa.STANDARD_ATTACKS)
  assert s["clean_acc"] == 1.0 and s["n"] == N and s["seed"] == SEED and s["eps"] == EPS
  before = N
  for name in aa.STANDARD_ATTACKS:
    assert s["attacked"][name] == before  # exactly the points still robust
    after = round(s["robust_acc_after"][name] * N)
    assert after <= before and np.sum(res["broken_by"] == name) == before - after
    before = after
  assert s["robust_acc"] == pytest.approx(before / N) == pytest.approx(res["robust"].mean())
  assert json.loads(json.dumps(s)) == s
  # The per-example worst case: at most each attack's own robust accuracy (exactly for the
  # deterministic FAB-T; up to the randomness of the starts for the others).
  assert s["robust_acc"] <= ours["fab-t"]["robust"].mean()
  for name in ("apgd-ce", "apgd-t", "square"):
    assert s["robust_acc"] <= ours[name]["robust"].mean() + 0.01
  assert s["robust_acc"] < s["robust_acc_after"]["apgd-ce"]  # the others added something
  assert any("robust accuracy after APGD-T" in line for line in lines)


def test_ensemble_examples_are_valid(setup, ensemble):
  res, _ = ensemble
  checks = res["summary"]["checks"]
  assert checks["within_eps"] and checks["in_unit_range"] and checks["finite"]
  assert checks["broken_misclassified"] and checks["flags_disagree"] == 0
  assert checks["rejected_outside_ball"] == 0 and checks["max_perturbation"] <= EPS + 1e-6
  x, y, x_adv, robust = setup["x"], setup["y"], res["x_adv"], res["robust"]
  assert np.array_equal(x_adv[robust], x[robust])
  assert not np.any(_correct_jax(setup["fn"], x_adv[~robust], y[~robust]))
  assert np.array_equal(res["y_adv"] == y, robust)


def _on_the_data(v, x):
  """[B] bool: which rows of v are exactly one of the clean points x."""
  flat, xs = v.reshape(v.shape[0], -1), jnp.asarray(x).reshape(len(x), -1)
  return jnp.any(jnp.all(flat[:, None, :] == xs[None], -1), 1)


def test_decisions_are_made_on_model_fn_not_the_attack_network(setup, ensemble):
  """With an attack network that is the model on the clean points and says class 0 (+1e4)
  everywhere else, the attacks stop at once; the points still count as robust, because
  model_fn classifies their returned examples correctly. A bfloat16 attack network breaks
  about as many points as float32."""
  x, y, fn = setup["x"], setup["y"], setup["fn"]
  kw = dict(eps=EPS, batch_size=BATCH, n_iter=N_ITER, n_queries=N_QUERIES, log=None,
            attacks=("apgd-ce", "apgd-t"))
  labels_not_0 = y != 0

  def blind(v):
    z = fn(v)
    return z + jnp.where(_on_the_data(v, x), 0.0, 1e4)[:, None] * jax.nn.one_hot(0, z.shape[-1])
  res = aa.run_standard(fn, x[labels_not_0], y[labels_not_0], SEED, attack_model_fn=blind, **kw)
  s = res["summary"]
  assert s["settings"]["separate_attack_model"] and s["settings"]["attacked_on_model"] == 0
  assert s["robust_acc"] >= s["clean_acc"] - 0.1
  assert s["checks"]["broken_misclassified"] and s["checks"]["flags_disagree"] == 0
  normal = ensemble[0]["summary"]["robust_acc_after"]["apgd-t"]
  assert s["robust_acc"] > normal + 0.3

  bf16 = aa.run_standard(fn, x, y, SEED, attack_model_fn=lambda v: fn(v.astype(jnp.bfloat16)),
                         **kw)
  assert abs(bf16["summary"]["robust_acc"] - normal) <= 0.1
  assert bf16["summary"]["checks"]["broken_misclassified"]


def test_points_only_the_attack_network_gets_wrong_are_attacked_on_the_model(setup, ensemble):
  """An attack network (bfloat16, say) that misclassifies a clean point the model gets right
  would skip it in every attack (each attack attacks only what its network classifies
  correctly), leaving it robust. Such points are attacked on model_fn: here the 30
  smallest-margin points, which the attack network gets wrong clean and the model's own
  attacks break, are broken as in the model's own ensemble."""
  x, y, fn = setup["x"], setup["y"], setup["fn"]
  z = np.asarray(fn(jnp.asarray(x)))
  margin = np.take_along_axis(z, y[:, None], 1)[:, 0] - np.where(
      np.eye(z.shape[1], dtype=bool)[y], -np.inf, z).max(1)
  flipped = np.zeros(len(y), bool)
  flipped[np.argsort(margin)[:30]] = True
  flipped_x = jnp.asarray(x[flipped])

  def wrong_on_them(v):  # the model, but -1e4 on the true class of the flipped clean points
    z = fn(v)
    hit = jnp.all(v.reshape(v.shape[0], 1, -1) == flipped_x.reshape(1, len(flipped_x), -1), -1)
    true_class = jnp.asarray(y[flipped])[jnp.argmax(hit, 1)]
    return z - 1e4 * (hit.any(1)[:, None] * jax.nn.one_hot(true_class, z.shape[-1]))
  res = aa.run_standard(fn, x, y, SEED, eps=EPS, batch_size=BATCH, n_iter=N_ITER,
                        n_queries=N_QUERIES, log=None, attacks=("apgd-ce", "apgd-t"),
                        attack_model_fn=wrong_on_them)
  s, own = res["summary"], ensemble[0]
  assert s["settings"]["attacked_on_model"] == 30
  own_broken = int((~own["robust"][flipped]).sum())
  assert own_broken >= 20  # the smallest margins: the model's own attacks break most of them
  assert int((~res["robust"][flipped]).sum()) >= own_broken - 2
  assert s["checks"]["broken_misclassified"] and s["checks"]["flags_disagree"] == 0


def test_ensemble_with_runs_batched_breaks_the_same_points(setup, ensemble):
  """APGD-CE, APGD-T and FAB-T with all of their targets in one call: the same robust accuracy
  after each, recorded in the settings."""
  res = aa.run_standard(setup["fn"], setup["x"], setup["y"], SEED, eps=EPS, batch_size=BATCH,
                        n_iter=N_ITER, log=None, attacks=("apgd-ce", "apgd-t", "fab-t"),
                        runs_at_once=9)
  s, want = res["summary"], ensemble[0]["summary"]
  assert s["settings"]["runs_at_once"] == 9
  for name in ("apgd-ce", "apgd-t", "fab-t"):
    assert s["robust_acc_after"][name] == want["robust_acc_after"][name]
  assert s["checks"]["broken_misclassified"] and s["checks"]["within_eps"]


def test_bad_arguments_are_refused(setup):
  fn, x, y = setup["fn"], setup["xj"][:4], setup["yj"][:4]
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="loss"):
    aa.apgd(fn, x, y, key, eps=EPS, loss="hinge")
  with pytest.raises(ValueError, match="eps"):
    aa.apgd(fn, x, y, key, eps=0.0)
  with pytest.raises(ValueError, match="norm"):
    aa.fab(fn, x, y, key, eps=EPS, norm="l1")
  with pytest.raises(ValueError, match="at least 5 x 5"):
    aa.square(fn, x[:, :4, :4], y, key, eps=EPS, norm="l2")
  with pytest.raises(ValueError, match="attack"):
    aa.run_standard(fn, setup["x"][:4], setup["y"][:4], 0, eps=EPS, batch_size=4,
                    attacks=("pgd",))


SHARDED = """
import numpy as np, jax
from sovr_jax import sharding
from sovr_jax.attacks import autoattack as aa
from sovr_jax.evaluation import targets
assert len(jax.devices()) == 2
params = targets.tiny_mlp_params(0)
fn = targets.tiny_mlp_jax(params)
x, y = targets.tiny_mlp_data(48, 0, params)
res = [aa.run_standard(fn, x, y, 0, eps=0.02, batch_size=16, attacks=("apgd-ce", "fab-t", "square"),
                       n_iter=5, n_queries=50, log=None, mesh=sharding.make_mesh(jax.devices()[:k]))
       for k in (2, 1)]
assert len(set(res[0]["summary"]["devices"])) == 2
# Same keys, same random numbers; only float round-off (other kernels for the per-device
# shapes) differs, which can move FAB's boundary-hugging iterates across the boundary.
assert np.mean(res[0]["robust"] == res[1]["robust"]) >= 0.9
after = [r["summary"]["robust_acc_after"] for r in res]
assert all(abs(after[0][a] - after[1][a]) <= 2 / 48 for a in after[0])
assert 0 < res[0]["summary"]["robust_acc"] < 1 and res[0]["summary"]["checks"]["within_eps"]
# FAB-T's 9 targets in one call on 2 devices: the rows of a point stay on its device.
many = aa.run_standard(fn, x, y, 0, eps=0.02, batch_size=16, attacks=("fab-t",), n_iter=5,
                       log=None, mesh=sharding.make_mesh(jax.devices()[:2]), runs_at_once=9)
alone = aa.run_standard(fn, x, y, 0, eps=0.02, batch_size=16, attacks=("fab-t",), n_iter=5,
                        log=None, mesh=sharding.make_mesh(jax.devices()[:1]))
assert np.mean(many["robust"] == alone["robust"]) >= 0.9 and many["summary"]["checks"]["within_eps"]
print("OK", res[0]["summary"]["robust_acc_after"])
"""


def test_sharded_over_two_devices_gives_the_same_result():
  """The batch axis sharded over 2 (virtual CPU) devices: the same results as on one, up to
  float round-off; also with FAB-T's targets batched into one call."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_attack_batch_size_shrinks_to_the_points_left():
  assert ensemble_lib.attack_batch_size(365, 1000, 1) == 368
  assert ensemble_lib.attack_batch_size(1000, 1000, 1) == 1000
  assert ensemble_lib.attack_batch_size(2500, 1000, 1) == 1000
  assert ensemble_lib.attack_batch_size(3, 1000, 1) == 8
  assert ensemble_lib.attack_batch_size(3, 4, 1) == 4
  assert ensemble_lib.attack_batch_size(9, 96, 12) == 24  # a multiple of lcm(8, 12)


def test_flag_checks_tell_rounding_from_real_disagreement():
  """A point flagged broken whose re-evaluated margin is at rounding level is borderline; one
  re-evaluated as clearly correct fails the check."""
  y = np.array([0, 0, 0, 0])
  logits = np.array([[5.0, 1.0],      # robust, correct: agrees
                     [1.0, 3.0],      # broken, misclassified: agrees
                     [4.0, 3.9999],   # broken, but re-evaluated correct by 1e-4: borderline
                     [0.0, 0.0]], np.float32)  # robust, tie at 0 (argmax picks class 0)
  robust = np.array([True, False, False, True])
  broken = ~robust
  checks = ensemble_lib.flag_checks(robust, broken, logits, y)
  assert checks["broken_misclassified"] and checks["flags_disagree"] == 0
  assert checks["flags_disagree_borderline"] == 1
  assert checks["max_abs_margin_of_disagreeing"] == pytest.approx(1e-4, rel=0.1)
  logits[2] = [4.0, 3.0]  # re-evaluated correct by a clear margin: a real disagreement
  checks = ensemble_lib.flag_checks(robust, broken, logits, y)
  assert not checks["broken_misclassified"] and checks["flags_disagree"] == 1
  assert ensemble_lib.flag_checks(robust[:0], broken[:0], logits[:0], y[:0])["flags_disagree"] == 0
