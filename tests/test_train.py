"""The train step: every method, optimizer, schedule, BatchNorm handling, sharding."""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from sovr_jax import bench, config_lib, methods, models, sharding, train
from sovr_jax.errors import ConfigError
from tests.references import needs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ConvBnDense(nn.Module):
  """Every kind of variable a model of ours has (conv and dense kernels, biases, BatchNorm's
  scale and running statistics) in three layers, cheap to initialise op by op and to compile.
  The tests of the step's BatchNorm handling, every method's included, use it: with
  PreActResNet-18 at width 1/16 each took 15-30 s in the suite on two cores, mostly compiling
  (the architectures have their own tests: tests/test_models.py, tests/test_export.py)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _setup(method, *, model_name="small_cnn", batch=16, model=None, **overrides):
  """The config's step, state and a random batch for ``method``; ``model`` (a Flax module on
  28x28x1 images) replaces the config's SmallCNN."""
  cfg = tiny.get_config(method)
  cfg.model.name = model_name
  cfg.train.batch_size = batch
  for k, v in overrides.items():
    sec, field = k.split("__")
    cfg[sec][field] = v
  config_lib.validate(cfg)
  shape = (28, 28, 1) if model_name == "small_cnn" else (16, 16, 3)
  if model is None:
    model = models.get_model(model_name, num_classes=10, width=cfg.model.width, mean=(0.5,),
                             std=(0.25,))
  schedule = train.make_schedule(cfg, steps_per_epoch=4)
  state = train.create_train_state(jax.random.PRNGKey(0), model, shape, train.make_optimizer(cfg, schedule))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch,) + shape).astype(np.uint8)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  step = train.make_train_step(cfg, steps_per_epoch=4, schedule=schedule,
                               reweight_start_epoch=methods.reweight_start_epoch(cfg.method, cfg, 2))
  return cfg, state, step, (images, labels)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_without_nan(method):
  _, state, step, batch = _setup(method, model=_ConvBnDense(), batch=8)
  step = jax.jit(step)
  params0 = state.params
  for _ in range(3):
    state, m = step(state, batch, jax.random.PRNGKey(1))
  m = jax.device_get(m)
  for k, v in m.items():
    assert np.isfinite(v), (method, k, v)
  assert int(state.step) == 3
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params0, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  if method == "sovr":
    np.testing.assert_allclose(m["switched"], 0.5)  # ceil(0.4 * 8) / 8
  if method == "ovr":
    assert m["switched"] == 1.0


def test_the_compiled_initial_state_is_model_init_and_the_optimizers_state():
  """create_train_state compiles the initialisation as one program (on the CPU at XLA's LLVM
  level 2): bitwise model.init's variables op by op (the figures of a seed stay those of the
  eager code), and tx.init of them."""
  model, tx = _ConvBnDense(), optax.sgd(0.1, momentum=0.9)
  rng = jax.random.PRNGKey(3)
  state = train.create_train_state(rng, model, (6, 6, 2), tx)
  eager = model.init(rng, jnp.zeros((1, 6, 6, 2)), train=False)
  assert float(jnp.abs(eager["params"]["Conv_0"]["kernel"]).min()) > 0  # random, not zeros
  chex.assert_trees_all_equal({"params": state.params, "batch_stats": state.batch_stats},
                              eager, train.init_variables(rng, model, (6, 6, 2)))
  chex.assert_trees_all_equal(state.opt_state, tx.init(eager["params"]))
  assert int(state.step) == 0 and state.apply_fn == model.apply and state.tx is tx


def test_grad_norm_is_the_global_l2_norm():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.full((4,), -2.0)}}
  want = np.sqrt(np.sum(np.arange(6.0) ** 2) + 4 * 4.0)
  np.testing.assert_allclose(train.global_norm(tree), want, rtol=1e-6)


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_batchnorm_stats_come_from_the_training_forward_only(bn_mode):
  """The attack must not update the running statistics. With eps = 0 and no
  augmentation the attack's output is x, so the new statistics must equal one
  train-mode forward on x from the old ones (the attack runs 3 more forwards)."""
  _, state, step, (images, labels) = _setup(
      "pgd_at", model=_ConvBnDense(), batch=8, attack__eps=0.0, data__crop_pad=0,
      data__flip=False, attack__bn_mode=bn_mode)
  new_state, _ = jax.jit(step)(state, (images, labels), jax.random.PRNGKey(3))
  x = images.astype(np.float32) / 255.0
  _, upd = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                          train=True, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(upd["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.batch_stats),
                                                   jax.tree.leaves(new_state.batch_stats))]
  assert any(changed)


@needs("torch")
def test_sgd_matches_torch():
  """optax chain == torch.optim.SGD(momentum, weight_decay) over a few steps."""
  import torch  # pylint: disable=import-outside-toplevel
  cfg = tiny.get_config()
  cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay = 0.1, 0.9, 5e-4
  tx = train.make_optimizer(cfg, optax.constant_schedule(0.1))
  w = np.random.default_rng(0).standard_normal(5).astype(np.float32)
  grads = [np.random.default_rng(i).standard_normal(5).astype(np.float32) for i in range(1, 4)]
  p, s = jnp.asarray(w), tx.init(jnp.asarray(w))
  tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
  opt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=5e-4)
  for g in grads:
    u, s = tx.update(jnp.asarray(g), s, p)
    p = optax.apply_updates(p, u)
    tw.grad = torch.from_numpy(g.copy())
    opt.step()
  np.testing.assert_allclose(p, tw.detach().numpy(), rtol=1e-6, atol=1e-7)


# lr = 0.2, 10 steps per epoch, 8 epochs, x0.1 at epochs 6 and 7 (absolute), warm-up 0 or 1
# epoch: {step: lr}, written by hand from the formulas in train.make_schedule's docstring.
_SCHEDULE_TABLE = {
    ("piecewise", 0): {0: 0.2, 59: 0.2, 60: 0.02, 69: 0.02, 70: 0.002, 79: 0.002},
    ("piecewise", 1): {0: 0.0, 5: 0.1, 9: 0.18, 10: 0.2, 59: 0.2, 60: 0.02, 69: 0.02,
                       70: 0.002, 79: 0.002},
    ("cosine", 0): {0: 0.2, 20: 0.1 * (1 + np.cos(np.pi / 4)), 40: 0.1, 80: 0.0},
    ("cosine", 1): {0: 0.0, 5: 0.1, 10: 0.2, 45: 0.1, 80: 0.0},
    ("constant", 0): {0: 0.2, 40: 0.2, 79: 0.2},
    ("constant", 1): {0: 0.0, 5: 0.1, 10: 0.2, 79: 0.2},
}


@pytest.mark.parametrize("kind,warmup", sorted(_SCHEDULE_TABLE))
def test_schedule_against_a_table_written_by_hand(kind, warmup):
  cfg = tiny.get_config()
  cfg.train.update(lr=0.2, epochs=8, schedule=kind, lr_boundaries=(6, 7), lr_decay=0.1,
                   warmup_epochs=warmup)
  config_lib.validate(cfg)
  s = train.make_schedule(cfg, steps_per_epoch=10)
  for step, lr in _SCHEDULE_TABLE[(kind, warmup)].items():
    assert float(s(step)) == pytest.approx(lr, abs=1e-7), (kind, warmup, step)


def test_the_study_schedule_reaches_its_last_step():
  """configs/study.py (gpu): 1 warm-up epoch, x0.1 at epochs 6 and 7 of 8. The last epoch
  trains at 0.2 * 0.01 (with optax.join_schedules the boundaries moved one epoch later)."""
  from configs import study  # pylint: disable=import-outside-toplevel
  cfg = study.get_config("pgd_at,gpu")
  spe = 49000 // cfg.train.batch_size
  s = train.make_schedule(cfg, spe)
  assert float(s(6 * spe - 1)) == pytest.approx(0.2)
  assert float(s(6 * spe)) == pytest.approx(0.02)
  assert float(s(7 * spe)) == pytest.approx(0.002)
  assert float(s(8 * spe - 1)) == pytest.approx(0.002)


def test_two_boundaries_on_one_step_are_refused():
  """(6.0, 6.05) at 10 steps per epoch both decay at step 60: keyed by step, one was lost."""
  cfg = tiny.get_config("pgd_at")
  cfg.train.epochs, cfg.train.lr_boundaries = 8, (6.0, 6.05)
  with pytest.raises(ConfigError, match="fall on the same step"):
    train.make_schedule(cfg, steps_per_epoch=10)
  assert float(train.make_schedule(cfg, steps_per_epoch=100)(606)) == pytest.approx(
      cfg.train.lr * cfg.train.lr_decay ** 2)


def test_step_is_deterministic_and_folds_the_step_into_the_rng():
  _, state, step, batch = _setup("sovr")
  step = jax.jit(step)
  a, ma = step(state, batch, jax.random.PRNGKey(0))
  b, mb = step(state, batch, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(ma["loss"], mb["loss"])
  c, mc = step(a, batch, jax.random.PRNGKey(0))  # step 1: different attack start
  assert float(mc["loss"]) != float(ma["loss"])


_SHARDED_SCRIPT = r"""
import os, json, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {repo!r})
import jax, numpy as np
from tests.test_train import _ConvBnDense, _setup
from sovr_jax import sharding, train
from sovr_jax.errors import ConfigError
out = {{"devices": [str(d) for d in jax.devices()]}}
try:
    sharding.check_batch_size(12, sharding.make_mesh(), "train.batch_size")
except ConfigError as e:
    out["indivisible"] = str(e)
for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    cfg, state, step, batch = _setup("sovr", model=_ConvBnDense(), batch=16)
    step = train.jit_train_step(step, mesh)
    state = sharding.replicate(state, mesh)
    ms = []
    for i in range(2):
        state, m = step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(7))
        ms.append({{k: float(v) for k, v in jax.device_get(m).items()}})
    out[n] = {{"metrics": ms, "params": [np.asarray(x).tolist() for x in
                                         jax.tree.leaves(jax.device_get(state.params))],
               "stats": [np.asarray(x).tolist() for x in
                         jax.tree.leaves(jax.device_get(state.batch_stats))],
               "shards": len(state.params["Conv_0"]["kernel"].sharding.device_set)}}
print("RESULT" + json.dumps(out))
"""


def test_sharded_step_on_8_devices_matches_1_device():
  script = _SHARDED_SCRIPT.format(repo=REPO)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert len(out["devices"]) == 8 and all("cpu" in d.lower() for d in out["devices"]), out
  assert "train.batch_size=12 must be divisible by the number of devices (8)" in \
      out["indivisible"]
  one, eight = out["1"], out["8"]
  assert eight["shards"] == 8
  for m1, m8 in zip(one["metrics"], eight["metrics"]):
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-5, err_msg=k)
  for a, b in zip(one["params"], eight["params"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  for a, b in zip(one["stats"], eight["stats"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_multi_step_dispatch_equals_single_steps():
  _, state, step, (images, labels) = _setup("sovr", batch=8)
  mesh = sharding.make_mesh()
  single = train.jit_train_step(step, mesh)
  multi = train.jit_train_step(train.make_multi_step(step, 3), mesh, stacked=True)
  rng = np.random.default_rng(1)
  batches = [(rng.integers(0, 256, images.shape).astype(np.uint8),
              rng.integers(0, 10, labels.shape).astype(np.int32)) for _ in range(3)]
  key = jax.random.PRNGKey(5)
  fresh = lambda: sharding.replicate(jax.tree.map(jnp.copy, state), mesh)  # donated below
  s1 = fresh()
  losses_single = []
  for b in batches:
    s1, m = single(s1, train.put_batch(b, mesh), key)
    losses_single.append(float(m["loss"]))
  stacked = (np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches]))
  s3, m3 = multi(fresh(), train.put_batch(stacked, mesh, stacked=True), key)
  np.testing.assert_allclose(m3["loss"], losses_single, rtol=1e-5)
  assert int(s3.step) == int(s1.step) == 3
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s3.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="steps_per_dispatch"):
    train.make_multi_step(step, 0)


@pytest.mark.parametrize("method", ["mail_at", "gairat"])
def test_reweighting_is_off_before_its_start_epoch_and_on_after(method):
  """Before the start epoch MAIL-AT and GAIRAT are PGD-AT (same loss, and the same attack
  once MAIL's own start, 0.001 N(0, I), is set to PGD-AT's); from it on their weights change
  the loss. (A mean weight alone cannot tell: GAIRAT normalises it to 1.)"""
  start = {f"{s}__start_epoch": 1 for s in ("mail", "gairat")}
  start["attack__init"] = "uniform"
  _, state, step, batch = _setup(method, batch=16, **start)
  _, _, pgd_step, _ = _setup("pgd_at", batch=16, **start)
  step, pgd_step = jax.jit(step), jax.jit(pgd_step)
  rng = jax.random.PRNGKey(2)
  for s, active in ((2, False), (5, True)):  # 4 steps per epoch: epoch 0, then epoch 1
    at = state.replace(step=jnp.asarray(s, jnp.int32))
    _, m = step(at, batch, rng)
    _, ref = pgd_step(at, batch, rng)
    if active:
      assert abs(float(m["loss"]) - float(ref["loss"])) > 1e-4, (method, s)
    else:
      np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6, err_msg=f"{method} {s}")
      assert float(m["weight"]) == 1.0


def _replica_attack(model, variables, x, labels, *, eps, objective):
  """One FGSM step from x (init zero, step eps, L-inf), written out: the attack the train
  step runs with attack.init=zero, num_steps=1, step_size=eps, BatchNorm running stats."""
  from sovr_jax import losses  # pylint: disable=import-outside-toplevel
  clean = model.apply(variables, x, train=False)

  def objective_fn(xa):
    z = model.apply(variables, xa, train=False)
    if objective == "kl":
      return jnp.sum(losses.kl_divergence(clean, z))
    return jnp.sum(losses.cross_entropy(z, labels))
  g = jax.grad(objective_fn)(x)
  return jnp.clip(x + jnp.clip(eps * jnp.sign(g), -eps, eps), 0.0, 1.0)


@pytest.mark.parametrize("method", ["trades", "mart", "mail_trades", "mail_at", "sovr", "ovr",
                                    "pgd_at"])
def test_update_is_the_gradient_of_the_formula(method):
  """The update of one plain-SGD step (lr 1, no momentum or weight decay) equals minus the
  gradient of the method's formula, computed here from the formula itself: through both the
  clean and the adversarial logits (a stop_gradient on the clean logits fails this), with
  SOVR's margins and MAIL's weights from the train-mode adversarial logits and no gradient
  through the selection or the weights.

  CE attacks: one FGSM step (replicated here). TRADES and MAIL-TRADES: eps = 0, so x' = x and
  the whole gradient is the clean CE's (the KL attack's sign of a round-off-sized gradient
  could not be replicated)."""
  from sovr_jax import losses  # pylint: disable=import-outside-toplevel
  eps = 0.0 if method in ("trades", "mail_trades") else 0.1
  cfg, state, step, (images, labels) = _setup(
      method, batch=8, attack__eps=eps,
      attack__step_size=eps, attack__num_steps=1, attack__init="zero", data__crop_pad=0,
      data__flip=False, train__lr=1.0, train__momentum=0.0, train__weight_decay=0.0,
      train__schedule="constant", mail__start_epoch=0)
  new_state, _ = jax.jit(step)(state, (images, labels), jax.random.PRNGKey(0))
  model = models.get_model("small_cnn", num_classes=10, width=cfg.model.width, mean=(0.5,),
                           std=(0.25,))
  x = images.astype(np.float32) / 255.0
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  objective = "kl" if method in ("trades", "mail_trades") else "ce"
  x_adv = _replica_attack(model, variables, x, labels, eps=eps, objective=objective)

  # SOVR: the ceil(0.4 * 8) = 4 smallest margins of the train-mode z(x') take OVR, a set
  # fixed before the gradient is taken.
  za0 = model.apply(variables, x_adv, train=True, mutable=["batch_stats"])[0]
  switched = np.zeros(len(labels), bool)
  switched[np.argsort(np.asarray(losses.logit_margin(za0, labels)), kind="stable")[:4]] = True

  def formula(params):
    v = {"params": params, "batch_stats": state.batch_stats}
    zc = model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    za = model.apply(v, x_adv, train=True, mutable=["batch_stats"])[0]
    if method == "trades":
      per = losses.trades(zc, za, labels, beta=cfg.trades.beta)
    elif method == "mart":
      per = losses.mart(zc, za, labels, beta=5.0)  # mart.beta -1: 5 for a non-WRN model
    elif method in ("mail_at", "mail_trades"):
      w = jax.lax.stop_gradient(losses.mail_weights(za, labels, bias=cfg.mail.bias,
                                                    slope=cfg.mail.slope))
      per = (w * losses.cross_entropy(za, labels) if method == "mail_at" else
             losses.cross_entropy(zc, labels) + cfg.mail.beta * w * losses.kl_divergence(zc, za))
    elif method == "sovr":
      per = jnp.where(switched, losses.ovr(za, labels), losses.cross_entropy(za, labels))
    elif method == "ovr":
      per = losses.ovr(za, labels)
    else:
      per = losses.cross_entropy(za, labels)
    return jnp.mean(per)

  want = jax.grad(formula)(state.params)
  got = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-6)


def test_bfloat16_step_keeps_float32_parameters_statistics_and_optimizer():
  """precision=bfloat16 computes in bf16; parameters, BatchNorm statistics and the optimizer
  state stay float32, and two steps point where the float32 ones do (eps = 0 here: the
  sign of a PGD gradient turns bf16 round-off into a different attack)."""
  out = {}
  for precision in ("float32", "bfloat16"):
    cfg = tiny.get_config("pgd_at")
    cfg.model.name, cfg.model.width, cfg.precision = "preact_resnet18", 0.0625, precision
    cfg.train.batch_size = 16
    cfg.attack.eps = 0.0
    config_lib.validate(cfg)
    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    model = models.get_model("preact_resnet18", num_classes=10, width=0.0625, dtype=dtype,
                             mean=(0.5,), std=(0.25,))
    schedule = train.make_schedule(cfg, steps_per_epoch=4)
    state = train.create_train_state(jax.random.PRNGKey(0), model, (16, 16, 3),
                                     train.make_optimizer(cfg, schedule))
    step = jax.jit(train.make_train_step(cfg, steps_per_epoch=4, schedule=schedule))
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8),
             rng.integers(0, 10, 16).astype(np.int32))
    params0 = state.params
    for _ in range(2):
      state, m = step(state, batch, jax.random.PRNGKey(1))
    out[precision] = (state, m, jax.tree.map(lambda a, b: a - b, state.params, params0))
  state, m, update = out["bfloat16"]
  for tree in (state.params, state.batch_stats, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, leaf.dtype
  _, ref_m, ref_update = out["float32"]
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=5e-2)
  a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(u)]) for u in (update, ref_update))
  cosine = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  assert cosine > 0.9, cosine


def test_dropping_the_clean_acc_metric_removes_a_forward_and_changes_nothing_else():
  """train.clean_acc_metric=False: the same update, the metric left out, and one eval-mode
  forward fewer in the compiled step (XLA drops the unused forward)."""
  out = {}
  for flag in (True, False):
    cfg, state, step, batch = _setup("pgd_at", batch=8, train__clean_acc_metric=flag)
    fn = jax.jit(step)
    flops = fn.lower(state, batch, jax.random.PRNGKey(0)).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
    new, m = fn(state, batch, jax.random.PRNGKey(0))
    out[flag] = (flops, new, jax.device_get(m))
  (f_on, s_on, m_on), (f_off, s_off, m_off) = out[True], out[False]
  assert "clean_acc" in m_on and "clean_acc" not in m_off
  assert m_on["loss"] == m_off["loss"]
  for a, b in zip(jax.tree.leaves(s_on.params), jax.tree.leaves(s_off.params)):
    np.testing.assert_array_equal(a, b)
  model = models.get_model("small_cnn", num_classes=10, width=cfg.model.width, mean=(0.5,),
                           std=(0.25,))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      {"params": s_on.params, "batch_stats": s_on.batch_stats},
      jnp.zeros((8, 28, 28, 1))).compile().cost_analysis()
  fwd = (fwd[0] if isinstance(fwd, (list, tuple)) else fwd)["flops"]
  assert f_on - f_off == pytest.approx(fwd, rel=0.1), (f_on, f_off, fwd)


def test_folding_batchnorm_in_the_attack_changes_the_step_only_by_rounding():
  """attack.fold_bn: the attack's eval-mode forwards fold BatchNorm into the convolutions;
  the update is the unfolded step's up to float32 rounding (the attack's sign steps see the
  same gradients)."""
  def activation_ops(jaxpr):  # rank-4 element-wise mul/add/sub, in nested jaxprs too
    return sum(e.primitive.name in ("mul", "add", "sub") and e.outvars[0].aval.ndim == 4
               for e in bench.jaxpr_eqns(jaxpr))

  out, ops = {}, {}
  for fold in (False, True):
    _, state, step, batch = _setup("sovr", model_name="preact_resnet18", batch=8,
                                   model__width=0.0625, attack__fold_bn=fold)
    out[fold] = jax.jit(step)(state, batch, jax.random.PRNGKey(0))
    ops[fold] = activation_ops(jax.make_jaxpr(step)(state, batch, jax.random.PRNGKey(0)).jaxpr)
  # 8 blocks x 3 passes fewer in each eval-mode forward (clean, and the attack step's body).
  assert ops[False] - ops[True] >= 2 * 8 * 3, ops
  (ref_state, ref_m), (state, m) = out[False], out[True]
  for k in ("loss", "adv_acc", "clean_acc", "margin"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (float(np.abs(b).max()) + 1e-6))
