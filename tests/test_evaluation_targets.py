"""What the evaluation attacks: twins that compute the same function, and the worst case."""

import jax.numpy as jnp
import numpy as np

from sovr_jax.evaluation import targets
from tests import references

references.skip_module_without("torch")  # every test compares with a PyTorch twin
import torch  # pylint: disable=wrong-import-position,wrong-import-order


def _torch_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def test_tiny_mlp_twins_agree_and_label_their_points():
  t = targets.tiny_mlp(32, seed=3)
  assert t.x.shape == (32, 8, 8, 3) and t.x.dtype == np.float32 and t.n == 32
  z_jax = np.asarray(t.model_fn(jnp.asarray(t.x)))
  z_torch = _torch_logits(t.make_torch("cpu"), t.x)
  np.testing.assert_allclose(z_torch, z_jax, rtol=1e-5, atol=1e-5)
  assert np.array_equal(z_jax.argmax(1), t.y)  # clean accuracy 100 % by construction


def test_run_target_restores_the_checkpoint_and_its_twin(trained_tiny_run):
  t = targets.from_run(trained_tiny_run, checkpoint="best", n=16, log=lambda _: None)
  assert t.n == 16 and t.eps == 0.1 and t.norm == "linf" and t.dataset == "mnist5k"
  assert t.info["architecture"] == "small_cnn" and t.info["step"] > 0
  z_jax = np.asarray(t.model_fn(jnp.asarray(t.x)))
  np.testing.assert_allclose(_torch_logits(t.make_torch("cpu"), t.x), z_jax, rtol=1e-4,
                             atol=1e-4)
  ub = t.upper_bounds(t.x, t.y, eps=t.eps, seed=0, batch_size=16)
  assert ub["n"] == 16 and ub["pgd20_acc"] <= ub["clean_acc"] and "upper bound" in ub["note"]


def test_worst_case_never_changes_a_prediction():
  t = targets.worst_case(targets.tiny_mlp(8))
  x = t.x.copy()
  x[:4] = 1.0 - x[:4]
  assert np.all(t.y == 0)
  z = np.asarray(t.model_fn(jnp.asarray(x)))
  assert np.all(z.argmax(1) == 0)
  np.testing.assert_allclose(_torch_logits(t.make_torch("cpu"), x), z, rtol=1e-6, atol=1e-3)
