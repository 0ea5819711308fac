"""The train step: every method, optimizer, schedule, BatchNorm handling, sharding."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import tiny
from sovr_jax import config_lib, methods, models, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(method, *, model_name="small_cnn", batch=16, **overrides):
  cfg = tiny.get_config(method)
  cfg.model.name = model_name
  cfg.train.batch_size = batch
  for k, v in overrides.items():
    sec, field = k.split("__")
    cfg[sec][field] = v
  config_lib.validate(cfg)
  shape = (28, 28, 1) if model_name == "small_cnn" else (16, 16, 3)
  model = models.get_model(model_name, num_classes=10, width=cfg.model.width,
                           mean=(0.5,), std=(0.25,))
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
  _, state, step, batch = _setup(method, model_name="preact_resnet18", batch=8,
                                 model__width=0.0625)
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
  if method == "gairat":  # start epoch 1 of 2 (50 %): step 3 is past it.
    assert m["weight"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_batchnorm_stats_come_from_the_training_forward_only(bn_mode):
  """The attack must not update the running statistics. With eps = 0 and no
  augmentation the attack's output is x, so the new statistics must equal one
  train-mode forward on x from the old ones (the attack runs 3 more forwards)."""
  _, state, step, (images, labels) = _setup(
      "pgd_at", model_name="preact_resnet18", batch=8, model__width=0.0625, attack__eps=0.0,
      data__crop_pad=0, data__flip=False, attack__bn_mode=bn_mode)
  new_state, _ = jax.jit(step)(state, (images, labels), jax.random.PRNGKey(3))
  x = images.astype(np.float32) / 255.0
  _, upd = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                          train=True, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(upd["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.batch_stats),
                                                   jax.tree.leaves(new_state.batch_stats))]
  assert any(changed)


def test_sgd_matches_torch():
  """optax chain == torch.optim.SGD(momentum, weight_decay) over a few steps."""
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


def test_piecewise_and_cosine_schedules():
  cfg = tiny.get_config()
  cfg.train.lr, cfg.train.epochs, cfg.train.lr_boundaries = 0.1, 10, (5, 8)
  s = train.make_schedule(cfg, steps_per_epoch=10)
  assert float(s(49)) == pytest.approx(0.1)
  assert float(s(50)) == pytest.approx(0.01)
  assert float(s(80)) == pytest.approx(0.001)
  cfg.train.schedule = "cosine"
  s = train.make_schedule(cfg, steps_per_epoch=10)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
  cfg.train.warmup_epochs = 1
  s = train.make_schedule(cfg, steps_per_epoch=10)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(0.1)


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
sys.path.insert(0, {repo!r})
import jax, numpy as np
from tests.test_train import _setup
from sovr_jax import sharding, train
out = {{}}
for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    cfg, state, step, batch = _setup("sovr", model_name="preact_resnet18", batch=16,
                                     model__width=0.0625)
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
               "shards": len(state.params["conv1"]["kernel"].sharding.device_set)
                          if "conv1" in state.params else n}}
print("RESULT" + json.dumps(out))
"""


def test_sharded_step_on_8_devices_matches_1_device():
  script = _SHARDED_SCRIPT.format(repo=REPO)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  one, eight = out["1"], out["8"]
  for m1, m8 in zip(one["metrics"], eight["metrics"]):
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-5, err_msg=k)
  for a, b in zip(one["params"], eight["params"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  for a, b in zip(one["stats"], eight["stats"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_devices():
  mesh = sharding.make_mesh()
  sharding.check_batch_size(8, mesh, "train.batch_size")
  if mesh.devices.size > 1:
    with pytest.raises(ValueError, match="train.batch_size"):
      sharding.check_batch_size(mesh.devices.size + 1, mesh, "train.batch_size")


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
